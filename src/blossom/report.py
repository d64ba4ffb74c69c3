"""What DVC shows: each stage's headline numbers and curves, in the files `dvc.yaml` declares.

`reports/metrics/<stage>.json` are small, flat metric files (`dvc metrics show/diff` and the
columns of `dvc exp show`); `reports/plots/*.csv` are tables `dvc plots show/diff` draws. They
live beside the outputs folder, not in it: DVC reads an experiment's metrics from its git commit,
so they are small files meant for git (outputs/ is git-ignored). The stages' own outputs
(metrics.json, train.json, parity.json) stay the full record.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from blossom.fsutil import write_json, write_text


def reports(outputs: Path) -> Path:
    return outputs.parent / "reports"


def write_metrics(outputs: Path, stage: str, values: dict) -> Path:
    path = reports(outputs) / "metrics" / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {k: v for k, v in values.items() if v is not None})
    return path


def write_table(outputs: Path, name: str, fields: list[str], rows: list[dict]) -> Path:
    path = reports(outputs) / "plots" / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: r[k] for k in fields} for r in rows)
    write_text(path, buf.getvalue())
    return path


def training(root: Path, train_dir: Path, info: dict) -> None:
    """Loss, validation loss and loss by timestep (the last logged window) for `dvc plots`."""
    stats = [json.loads(line) for line in (train_dir / "stats.jsonl").read_text().splitlines() if line.strip()]
    write_table(root, "loss", ["step", "loss", "lr"], stats)
    write_table(root, "val_loss", ["step", "val_loss"], [{"step": s, "val_loss": v} for s, v in info["val_history"]])
    last = stats[-1]["loss_by_t_bin"] if stats else []
    bins = [{"timestep_bin": i, "loss": v} for i, v in enumerate(last)]
    write_table(root, "loss_by_timestep", ["timestep_bin", "loss"], bins)
    write_metrics(
        root,
        "train",
        {
            "val_loss": info.get("val_loss"),
            "steps": info.get("steps"),
            "images_seen": info.get("images_seen"),
            "train_seconds": info.get("train_seconds_this_run"),
            "images_per_s": stats[-1].get("images_per_s") if stats else None,
        },
    )


def evaluation(root: Path, metrics: dict) -> None:
    """The adherence headline (template phrasing) as flat metrics, and every accuracy as a plot table."""
    values: dict = {"val_loss": metrics.get("val_loss"), "seconds_per_image": metrics.get("seconds_per_image")}
    rows = []
    if "adherence" in metrics:
        a = metrics["adherence"]
        for split in ("seen", "held_out"):
            for k in ("petal_color", "background", "petal_count", "petal_shape"):
                values[f"{k}_{split}"] = a["template"][split][k]["acc"]
        for group in ("reordered", "synonyms"):
            if group in a:
                values[f"petal_color_{group}"] = a[group]["all"]["petal_color"]["acc"]
        values["fd_classifier"] = metrics.get("fd_classifier")
        for group, splits in a.items():
            for split, scores in splits.items():
                rows += [
                    {"attribute": k, "group": f"{group} {split}", "accuracy": v["acc"], "lo": v["lo"], "hi": v["hi"]}
                    for k, v in scores.items()
                    if isinstance(v, dict) and v["acc"] is not None
                ]
    for k in ("fid", "clip_score"):
        values[k] = metrics.get("real_images", {}).get(k)
    values["prompt_effect"] = metrics.get("prompt_effect", {}).get("levels")
    write_metrics(root, "evaluate", values)
    write_table(root, "adherence", ["attribute", "group", "accuracy", "lo", "hi"], rows)
