"""The DVC pipeline: its params cover what each stage reads, and `dvc repro` reruns exactly what a change needs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import MICRO, PARAMS

from blossom.config import Config, _set, parse_override
from blossom.stages import STAGES

ROOT = PARAMS.parent
DVC = str(Path(sys.executable).parent / "dvc")

# The config sections each stage reads (whole sections) or single keys of other sections.
STAGE_READS = {s.name: list(s.reads) for s in STAGES}


def _keys(entry: str) -> list[str]:
    section, _, key = entry.partition(".")
    if key:
        return [entry]
    return [f"{section}.{f.name}" for f in dataclasses.fields(getattr(Config(), section))]


def test_every_stage_tracks_each_key_it_reads_and_the_presets_that_override_them():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    presets = yaml.safe_load(PARAMS.read_text())["presets"]
    for name, reads in STAGE_READS.items():
        listed = set(stages[name]["params"])
        wanted = {k for entry in reads for k in _keys(entry)}
        for preset, block in presets.items():  # a preset key of a section the stage reads
            wanted |= {f"presets.{preset}.{s}.{k}" for s, keys in block.items() for k in keys if f"{s}.{k}" in wanted}
        if name not in ("push-data", "promote", "publish"):
            wanted.add("preset")
        assert wanted <= listed, f"stage {name} misses params {sorted(wanted - listed)}"
        assert all("." in p or p == "preset" for p in listed), f"stage {name}: list keys, not whole sections"


def micro_project(root: Path, extra_stages: dict | None = None) -> Path:
    """A copy of the pipeline in root with params.yaml set to the micro config."""
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    pipeline["stages"].update(extra_stages or {})
    (root / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = yaml.safe_load(PARAMS.read_text())
    for item in MICRO:
        _set(params, *parse_override(item))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([DVC, "init", "-q"], cwd=root, check=True)
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")
    return root


# Credentials a user may have in the environment; none may end up in a file or a log.
CANARIES = {
    "AWS_SECRET_ACCESS_KEY": "canary-aws-secret-7f3a",
    "HF_TOKEN": "hf_canaryTOKEN9b2c",
    "MLFLOW_TRACKING_PASSWORD": "canary-mlflow-pw-41d0",
}


def dvc_env(**extra: str) -> dict[str, str]:
    """The environment DVC runs blossom in: this venv's commands first, no MLflow server of the caller's."""
    env = {**os.environ, **extra, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def repro(root: Path, *args: str) -> tuple[list[str], float, str]:
    """Run `dvc repro`; returns the stages that ran, the seconds taken and the output."""
    env = dvc_env(**CANARIES)
    start = time.time()
    res = subprocess.run([DVC, "repro", *args], cwd=root, capture_output=True, text=True, env=env, timeout=900)
    took = time.time() - start
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (root / "repro.log").open("a").write(res.stdout + res.stderr)
    ran = [line.split("'")[1] for line in res.stdout.splitlines() if line.startswith("Running stage")]
    return ran, took, res.stdout


def set_param(root: Path, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    _set(params, key, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_repro_runs_all_then_nothing_then_only_what_a_param_change_needs(tmp_path):
    root = micro_project(tmp_path / "proj")
    published = root / "outputs" / "hub" / "blossom-flowers"

    ran, _, _ = repro(root)
    assert set(ran) == {
        "data",
        "push-data",
        "train-vae",
        "cache",
        "train",
        "classifier",
        "evaluate",
        "promote",
        "distill",
        "export",
        "publish",
    }
    assert (root / "dvc-storage" / "files" / "md5").is_dir()  # the data set went to the default remote
    assert "is empty" not in (root / "repro.log").read_text()  # DVC warns of an empty output folder
    champion = json.loads((published / "champion.json").read_text())
    assert champion["version"] == "1" and (published / "README.md").exists()

    ran, took, out = repro(root)
    assert ran == [] and took < 3.0, (took, out)

    # A worse model (an lr too small to learn anything) trains and is tracked, but nothing downstream moves.
    history = [champion["val_loss"]]
    served_bytes = (published / "champion.json").read_bytes()
    set_param(root, "train.lr", 1e-9)
    ran, _, _ = repro(root)
    assert ran == ["train", "evaluate", "promote"]
    assert (published / "champion.json").read_bytes() == served_bytes
    worse = json.loads((root / "outputs" / "train" / "model" / "train.json").read_text())["val_loss"]
    assert worse > champion["val_loss"]

    # A better one (more steps at the normal lr) is promoted, and only then do export and publish rerun.
    set_param(root, "train.lr", 1e-3)
    set_param(root, "train.steps", 12)
    ran, _, _ = repro(root)
    now = json.loads((root / "outputs" / "champion" / "champion.json").read_text())
    history.append(now["val_loss"])
    assert ran == (
        ["train", "evaluate", "promote", "distill", "export", "publish"]
        if now["version"] == "3"
        else ["train", "evaluate", "promote"]
    )
    assert now["version"] == "3", f"12 steps should beat 4: {history}"
    assert history == sorted(history, reverse=True)  # the champion's loss never rises

    # Editing a module makes exactly the stages whose code imports it stale, as DVC itself sees it.
    from test_layout import STAGE_MODULES, closure, import_graph

    assert json.loads(dvc(root, "status", "--json").stdout) == {}
    graph = import_graph()
    for module in ("blossom.sampling", "blossom.images", "blossom.data.cache", "blossom.env"):
        path = root / "src" / Path(*module.split(".")).with_suffix(".py")
        original = path.read_text()
        path.write_text(original + "\n# edited\n")
        stale = set(json.loads(dvc(root, "status", "--json").stdout))
        path.write_text(original)
        assert stale == {s for s, mods in STAGE_MODULES.items() if module in closure(graph, mods)}, module

    # No credential from the environment in params, dvc.lock, saved configs, logs or the MLflow store.
    scanned = [
        root / "params.yaml",
        root / "dvc.lock",
        root / "repro.log",
        root / "mlflow.db",
        *root.glob("outputs/**/*.yaml"),
        *root.glob("outputs/**/*.json"),
        *root.glob("mlruns/**/*"),
    ]
    for path in (p for p in scanned if p.is_file()):
        data = path.read_bytes()
        for secret in CANARIES.values():
            assert secret.encode() not in data, f"{secret} leaked into {path}"


def dvc(root: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dvc_env()
    res = subprocess.run([DVC, *args], cwd=root, capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def commit_all(root: Path) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=root, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=root, check=True, capture_output=True)


@pytest.mark.slow
def test_dvc_experiments_show_metrics_and_plots_diff_draws_their_curves(tmp_path):
    root = micro_project(tmp_path / "proj")
    (root / ".gitignore").write_text("outputs/\nmlflow.db\nmlruns/\ndvc-storage/\n")
    commit_all(root)
    # up to `evaluate`, whose metrics and plots are compared: promotion and export are not (the repro test has them)
    dvc(root, "exp", "run", "-n", "lr-a", "-S", "train.lr=0.001", "evaluate")
    dvc(root, "exp", "run", "-n", "lr-b", "-S", "train.lr=0.0003", "evaluate")
    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    exps = {
        e["name"]: e["data"]
        for row in shown
        for e in [*(row.get("experiments") or [])]
        for e in (e.get("revs") or [])
        if e.get("name")
    }
    assert {"lr-a", "lr-b"} <= set(exps), shown
    for name, lr in (("lr-a", 0.001), ("lr-b", 0.0003)):
        data = exps[name]
        assert data["params"]["params.yaml"]["data"]["train"]["lr"] == lr
        metrics = data["metrics"]
        assert "data" in metrics["reports/metrics/train.json"], metrics
        train = metrics["reports/metrics/train.json"]["data"]
        evaluate = metrics["reports/metrics/evaluate.json"]["data"]
        assert train["val_loss"] > 0 and train["steps"] == 4
        assert 0 <= evaluate["petal_color_seen"] <= 1 and 0 <= evaluate["background_held_out"] <= 1
    assert (
        exps["lr-a"]["metrics"]["reports/metrics/train.json"]["data"]["val_loss"]
        != (exps["lr-b"]["metrics"]["reports/metrics/train.json"]["data"]["val_loss"])
    )
    # `dvc plots diff` draws both experiments' loss curves from the CSVs train wrote.
    plots = json.loads(dvc(root, "plots", "diff", "lr-a", "lr-b", "--json").stdout)["data"]
    (loss,) = plots["reports/plots/loss.csv"]
    points = loss["content"]["data"]["values"]
    assert loss["revisions"] == ["lr-a", "lr-b"] and {p["rev"] for p in points} == {"lr-a", "lr-b"}
    lr_a = [float(p["loss"]) for p in points if p["rev"] == "lr-a"]
    assert len(lr_a) == 4 and lr_a != [float(p["loss"]) for p in points if p["rev"] == "lr-b"]
    assert "reports/plots/adherence.csv" in plots and "reports/plots/val_loss.csv" in plots


@pytest.mark.slow
def test_repro_killed_during_training_resumes_it_and_matches_an_uninterrupted_run(tmp_path):
    import signal

    from safetensors.torch import load_file

    root = micro_project(tmp_path / "proj")
    set_param(root, "train.steps", 40)
    set_param(root, "train.checkpoint_every", 5)
    set_param(root, "tracking.live", True)
    env = dvc_env()
    proc = subprocess.Popen(
        [DVC, "repro", "train"],
        cwd=root,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    ckpts = root / "outputs" / "train" / "checkpoints"
    deadline = time.time() + 600
    while not (ckpts / "step-000010").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and blossom train, as a killed terminal would
    proc.wait()
    assert (ckpts / "step-000010").is_dir() and not (root / "outputs" / "train" / "model").exists()
    _, _, out = repro(root, "train")
    log = (root / "repro.log").read_text()
    assert "resumed from step-0000" in log, out[-2000:]
    resumed = load_file(root / "outputs" / "train" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    from mlflow import MlflowClient

    mlflow_store = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = mlflow_store.search_runs(["1"])  # the killed run, continued: one run, not two
    assert run.info.status == "FINISHED" and run.data.metrics["val_loss"] > 0
    assert max(m.step for m in mlflow_store.get_metric_history(run.info.run_id, "loss")) == 40

    # the same pipeline, never interrupted
    clean = micro_project(tmp_path / "clean")
    set_param(clean, "train.steps", 40)
    set_param(clean, "train.checkpoint_every", 5)
    repro(clean, "train")
    reference = load_file(clean / "outputs" / "train" / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all(torch_equal(resumed[k], reference[k]) for k in reference)

    # a changed setting never resumes the old run's checkpoints
    set_param(root, "train.lr", 5e-4)
    repro(root, "train")
    assert "starting a fresh run" in (root / "repro.log").read_text().split("resumed from")[-1]
    assert len(mlflow_store.search_runs(["1"])) == 2  # and a fresh run is a new MLflow run


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
