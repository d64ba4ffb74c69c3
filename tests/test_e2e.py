"""The main job end to end, as a user runs it, on the micro config."""

import json
import subprocess
import sys

import pytest
from conftest import micro_args
from PIL import Image


def blossom(*args, cwd):
    cmd = [sys.executable, "-m", "blossom.cli", *micro_args(), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=900)


@pytest.mark.slow
def test_run_then_generate(tmp_path):
    out = tmp_path / "outputs"
    res = blossom("--set", f"outputs={out}", "run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "petal_color" in res.stdout and "stage seconds" in res.stdout
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    template = metrics["adherence"]["template"]  # one draw per pair: the template phrasing, held-out pairs twice
    assert template["seen"]["n"] == 35 and template["held_out"]["n"] == 5 and metrics["images"] == 45
    assert 0 <= template["all"]["petal_color"]["acc"] <= 1 and metrics["val_loss"] > 0
    held_ceiling = metrics["ceiling"]["through_vae_held_out"]  # what the VAE lets the held-out pairs score
    assert held_ceiling["n"] == metrics["adherence"]["all"]["held_out"]["n"] == 10  # every phrasing's renders
    assert 0 <= held_ceiling["petal_color"]["acc"] <= 1
    assert all(0 <= p["through_vae"]["acc"] <= 1 for p in metrics["held_out_colours"].values())
    assert "ceiling through vae held out" in res.stdout and "[real ones through the VAE" in res.stdout
    grid = Image.open(out / "eval" / "samples.png")
    assert grid.size == (5 * 32, 8 * 32)  # backgrounds across, petal colours down
    run = json.loads((out / "run.json").read_text())
    assert set(run["seconds"]) == {
        "data",
        "train-vae",
        "cache",
        "train",
        "classifier",
        "evaluate",
        "promote",
        "distill",  # skipped: distill.enabled is false by default
        "export",
        "publish",
    }
    assert not (out / "distill" / "model" / "blossom.json").exists() and not (out / "export" / "fast").exists()
    for stage in ("data", "vae", "cache", "train", "classifier", "eval"):
        assert (out / stage / "config.yaml").exists()
    assert "promoted to champion" in res.stdout  # the first run in a fresh MLflow store
    published = out / "hub" / "blossom-flowers"
    assert "Validation loss" in (published / "README.md").read_text()
    assert json.loads((published / "metrics.json").read_text()) == metrics  # the champion carries its scores

    gen = blossom(
        "--set",
        f"outputs={out}",
        "generate",
        "a pink flower with six thin petals at night",
        "--backend",
        "onnx",
        "--n",
        "3",
        "--steps",
        "5",
        "--seed",
        "1",
        "--out",
        str(tmp_path / "gen"),
        cwd=tmp_path,
    )
    assert gen.returncode == 0, gen.stderr[-2000:]
    pngs = sorted((tmp_path / "gen").glob("*.png"))
    assert [p.name for p in pngs] == ["000.png", "001.png", "002.png"]
    assert Image.open(pngs[0]).size == (32, 32)

    tracked = blossom(
        "--set", f"outputs={out}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "promote", cwd=tmp_path
    )
    assert tracked.returncode == 0, tracked.stderr[-2000:]
    # the same model again: a second version, not better, so the champion stays
    assert "version 2" in tracked.stdout and "kept champion version 1" in tracked.stdout
    assert json.loads((out / "champion" / "champion.json").read_text())["version"] == "1"

    resumed = blossom("--set", f"outputs={out}", "--set", "train.steps=6", "train", "--resume", "latest", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step-000004 at step 4" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (out / "train" / "stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
