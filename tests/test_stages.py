"""The stage registry (stages.py) is the one list: dvc.yaml, the CLI, `blossom run`, the
SageMaker entry point and the README's stage table all agree with it."""

from __future__ import annotations

import re

import yaml
from conftest import PARAMS
from test_layout import is_code

from blossom import cli
from blossom.stages import STAGES, needed_by

ROOT = PARAMS.parent


def outs(entries) -> list[str]:
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def test_dvc_yaml_has_the_registrys_stages_commands_inputs_and_outputs_in_its_order():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == [s.name for s in STAGES]
    for s in STAGES:
        stage = dvc[s.name]
        assert stage["cmd"] == s.command, s.name
        assert [d for d in stage.get("deps", []) if not is_code(d)] == list(s.deps), s.name
        assert outs(stage["outs"]) == list(s.outs), s.name
    # (code deps and params: tests/test_layout.py and tests/test_dvc.py, from the same registry)


def test_each_stage_is_a_cli_verb_with_the_registrys_function_and_summary():
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if a.dest == "command")
    helps = {c.dest: c.help for c in verbs._choices_actions}
    for s in STAGES:
        args = parser.parse_args([s.name])
        assert args.fn is cli.stage_command(s.name) and helps[s.name] == s.summary, s.name


def test_blossom_run_runs_the_registrys_stages_in_order(monkeypatch, tmp_path):
    ran = []
    for s in STAGES:
        name = "_classifier_unless_current" if s.name == "classifier" else f"cmd_{s.name.replace('-', '_')}"
        monkeypatch.setattr(cli, name, lambda cfg, paths, args, n=s.name: ran.append(n))
    assert cli.main(["--params", str(PARAMS), "--set", f"outputs={tmp_path}", "run"]) == 0
    assert ran == [s.name for s in STAGES if s.in_run] and "push-data" not in ran


def test_sagemaker_prepares_what_training_reads():
    assert [s.name for s in needed_by("train")] == ["data", "train-vae", "cache"]
    assert [s.name for s in needed_by("export")] == [
        s.name for s in STAGES if s.name not in ("push-data", "export", "publish")
    ]


def test_the_readme_stage_table_lists_the_stages_in_order():
    rows = re.findall(r"^\| `blossom ([a-z0-9-]+)", (ROOT / "README.md").read_text(), flags=re.M)
    names = [s.name for s in STAGES]
    assert [r for r in rows if r in names] == names
