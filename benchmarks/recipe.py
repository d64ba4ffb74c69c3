"""The recipe study: what buys prompt adherence per CPU-minute, one change at a time, in one run.

Each variant trains from the main job's data, VAE, cache and classifier (read, never written)
in a folder of its own, then is scored by `blossom evaluate` (720 images, 95 % intervals). A
variant that changes only `sample.*` keys reuses the `base` variant's model.
Prints one row per variant and draws adherence against training minutes.

    .venv/bin/python benchmarks/recipe.py --variant base: --variant lr2e-3:train.lr=2e-3 \
        [--outputs outputs] [--work /tmp/recipe] [--plot docs/quality.png]

Variants named RECIPE@BUDGET (today@500:train.steps=500, today@1000:...) are drawn as one line per
recipe: adherence against training minutes.

Nothing else may run on the machine meanwhile: the minutes are the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from machine import machine_line

SHARED = ("data", "vae", "cache", "classifier")
ATTRS = (("petal_color", "colour"), ("background", "background"), ("petal_count", "count"), ("petal_shape", "shape"))


def run_variant(name: str, sets: list[str], outputs: Path, work: Path) -> dict:
    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    for part in SHARED:
        link = root / part
        if not link.exists():
            link.symlink_to((outputs / part).resolve())
    if sets and all(s.startswith("sample.") for s in sets) and not (root / "train").exists():
        (root / "train").symlink_to((work / "base" / "train").resolve())  # a sampling change: base's model
    env = {**os.environ, "BLOSSOM_OUTPUTS": str(root)}
    blossom = [str(Path(sys.executable).parent / "blossom")]
    args = [a for s in sets for a in ("--set", s)]
    if not (root / "train" / "model" / "train.json").exists():
        subprocess.run([*blossom, "train", *args], env=env, check=True)
    if not (root / "eval" / "metrics.json").exists():
        subprocess.run([*blossom, "evaluate", *args], env=env, check=True)
    train = json.loads((root / "train" / "model" / "train.json").read_text())
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    return {"name": name, "sets": sets, "train": train, "metrics": metrics}


def recipes(rows: list[dict]) -> dict[str, list[dict]]:
    """Variants named RECIPE@BUDGET (e.g. today@500, today@1000) are one recipe at several training
    budgets: drawn as one line, in training minutes."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["name"].split("@")[0], []).append(r)
    return {k: sorted(v, key=lambda r: r["train"]["train_seconds_this_run"]) for k, v in groups.items()}


def cell(s: dict) -> str:
    return f"{s['acc']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--variant", action="append", required=True, help="NAME:key=value,key=[a,b] (NAME: = today's recipe)"
    )
    ap.add_argument("--outputs", default="outputs")
    ap.add_argument("--work", default="/tmp/blossom-recipe")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    print(machine_line())
    rows = []
    for spec in args.variant:
        name, _, sets = spec.partition(":")
        sets = [s for s in re.split(r",(?![^\[]*\])", sets) if s]  # commas inside [..] belong to a list value
        rows.append(run_variant(name, sets, Path(args.outputs), Path(args.work)))
    print(
        f"{'variant':<14} {'train min':>9} {'val loss':>9} "
        + " ".join(f"{label + ' held-out':>24}" for _, label in ATTRS[:2])
    )
    for r in rows:
        a, minutes = r["metrics"]["adherence"]["template"], r["train"]["train_seconds_this_run"] / 60
        print(
            f"{r['name']:<14} {minutes:>9.1f} {r['train']['val_loss']:>9.4f} "
            + " ".join(f"{cell(a['held_out'][k]):>24}" for k, _ in ATTRS[:2])
        )
        print(f"{'':<14} {'':>9} {'':>9} " + "  ".join(f"{label} {cell(a['all'][k])}" for k, label in ATTRS))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for ax, (key, split, title, chance) in zip(
            axes,
            (
                ("petal_count", "all", "petal count", 1 / 6),
                ("petal_shape", "all", "petal shape", 1 / 3),
                ("petal_color", "held_out", "colour, held-out pairs", 1 / 8),
            ),
            strict=True,
        ):
            for recipe, group in recipes(rows).items():
                cells = [r["metrics"]["adherence"]["template"][split][key] for r in group]
                ax.errorbar(
                    [r["train"]["train_seconds_this_run"] / 60 for r in group],
                    [c["acc"] for c in cells],
                    yerr=[[c["acc"] - c["lo"] for c in cells], [c["hi"] - c["acc"] for c in cells]],
                    fmt="o-" if len(group) > 1 else "o",
                    capsize=3,
                    label=recipe,
                )
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
            ax.set_title(title)
            ax.set_xlabel("training minutes (2 cores)")
            ax.set_ylim(0, 1.02)
        axes[0].set_ylabel("accuracy, 95 % interval")
        axes[-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot -> {args.plot}")


if __name__ == "__main__":
    main()
