"""The code's layout: no import cycles, and each DVC stage reruns when any module it runs changes.

Imports are read from the source (function-level ones included: they run too), so the check
needs no imports of its own and sees exactly what a stage's code can reach.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from blossom.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "blossom"

# The modules each stage's command runs (stages.py; cli.py itself is left out of the deps on
# purpose: listing it would rerun the whole pipeline for a help-text edit).
STAGE_MODULES = {s.name: list(s.modules) for s in STAGES}


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = ("blossom", *path.relative_to(SRC).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("blossom"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("blossom"))
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def closure(graph: dict[str, set[str]], start: list[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def source_files(names: set[str]) -> set[str]:
    mods = modules()
    return {str(mods[n].relative_to(ROOT)) for n in names if mods[n].stat().st_size > 0}


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def is_code(dep: str) -> bool:
    """A module a stage runs, as opposed to a data file shipped in the package (the judge's weights)."""
    return dep.strip().removeprefix("- ").startswith("src/") and dep.endswith(".py")


def test_each_stage_depends_on_exactly_the_code_it_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_MODULES)
    graph = import_graph()
    for name, stage in stages.items():
        listed = {d for d in stage.get("deps", []) if isinstance(d, str) and is_code(d)}
        assert listed == source_files(closure(graph, STAGE_MODULES[name])), f"{name}: run python tests/test_layout.py"


def test_editing_a_module_makes_exactly_its_stages_stale():
    """What DVC would rerun after an edit of each module: the stages whose closure holds it."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    graph = import_graph()
    for module in ("blossom.sampling", "blossom.layout", "blossom.data.cache", "blossom.models"):
        path = source_files({module}).pop()
        using = {s for s, st in stages.items() if path in st.get("deps", [])}
        assert using == {s for s in STAGE_MODULES if module in closure(graph, STAGE_MODULES[s])}, module


def write_code_deps(path: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite each stage's src/ deps in dvc.yaml from the import closure, keeping the rest of the
    text (comments included): `python tests/test_layout.py` after changing imports."""
    graph, lines, out, stage = import_graph(), path.read_text().splitlines(), [], None
    for line in lines:
        if m := re.match(r"^  ([a-z-]+):", line):
            stage = m.group(1)
        if line.startswith("      - src/blossom/") and is_code(line):
            if out[-1].startswith("      - src/blossom/") and is_code(out[-1]):
                continue
            out += [f"      - {f}" for f in sorted(source_files(closure(graph, STAGE_MODULES[stage])))]
            continue
        out.append(line)
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    write_code_deps()
