"""The SageMaker job: its definition from params.yaml, its refusals, and its entry point run for real under torchrun."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MICRO, PARAMS
from servers import free_port

ROOT = Path(__file__).resolve().parents[1]


def blossom(*args, env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "blossom.cli", "--params", str(PARAMS), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_dry_run_prints_the_job_from_params():
    res = blossom(
        "--preset",
        "flowers128",
        "--set",
        "sagemaker.instance_count=4",
        "--set",
        "sagemaker.checkpoint_s3_uri=s3://bucket/ckpt",
        "--set",
        "train.steps=7",
        "sagemaker",
        "--dry-run",
    )
    assert res.returncode == 0, res.stderr
    job = json.loads(res.stdout)
    assert job["instance_count"] == 4 and job["distribution"] == {"torch_distributed": {"enabled": True}}
    assert job["use_spot_instances"] and job["max_wait"] >= job["max_run"] > 0
    assert job["checkpoint_s3_uri"] == "s3://bucket/ckpt" and job["checkpoint_local_path"] == "/opt/ml/checkpoints"
    assert job["hyperparameters"] == {
        "preset": "flowers128",
        "overrides": "sagemaker.instance_count=4 sagemaker.checkpoint_s3_uri=s3://bucket/ckpt train.steps=7",
    }
    # Outputs live in the synced checkpoint folder, so a restarted spot job finds `latest` there.
    assert job["environment"]["BLOSSOM_OUTPUTS"].startswith("/opt/ml/checkpoints/")
    assert "sagemaker.role" in res.stderr  # what is still missing to submit


@pytest.mark.parametrize(
    "sets, env, message",
    [
        ([], {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"}, "set sagemaker.role"),
        (["sagemaker.role=arn:aws:iam::1:role/r", "sagemaker.checkpoint_s3_uri=s3://b/c"], {}, "no AWS credentials"),
        (
            ["sagemaker.role=arn:aws:iam::1:role/r", "sagemaker.checkpoint_s3_uri=s3://b/c"],
            {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"},
            "pip install 'blossom[sagemaker]'",
        ),
    ],
)
def test_submit_refuses_in_one_line(sets, env, message):
    res = blossom(*[a for s in sets for a in ("--set", s)], "sagemaker", env=env)
    assert res.returncode == 2 and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


@pytest.mark.slow
def test_entry_point_prepares_once_per_machine_trains_and_writes_the_model(tmp_path):
    from blossom.config import load_config
    from blossom.sagemaker import stage_source

    code = stage_source(ROOT, PARAMS, tmp_path / "code")  # what the job's container gets
    outputs, model_dir = tmp_path / "checkpoints" / "outputs", tmp_path / "model"
    env = os.environ | {"BLOSSOM_OUTPUTS": str(outputs), "SM_MODEL_DIR": str(model_dir)}
    overrides = shlex.join([*MICRO, "train.steps=4"])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(code / "sagemaker_entry.py"),
        "--overrides",
        overrides,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=code, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("cache: ") == 1  # one process per machine prepared; the other waited
    info = json.loads((model_dir / "blossom" / "train.json").read_text())
    assert info["processes"] == 2 and info["steps"] == 4
    assert (outputs / "train" / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert load_config(code / "params.yaml").sagemaker.instance_count == 2
    # A restarted job (spot) finds its cache and checkpoint and does not redo them.
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=code, env=env, timeout=600)
    assert again.returncode == 0 and "cache: " not in again.stdout and "resumed from step-000004" in again.stderr
