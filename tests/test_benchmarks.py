"""The benchmarks' machine probe: every timing is printed beside the CPU's features and a peak
measured in the same run."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from machine import machine_line, measured_peak  # noqa: E402


def test_machine_line_names_the_vector_features_and_a_measured_peak():
    peak = measured_peak()
    assert set(peak) == {"matmul", "conv"} and all(1 < v < 10_000 for v in peak.values())
    line = machine_line(peak)
    assert f"matmul {peak['matmul']:.0f} GFLOP/s" in line and "threads" in line
    if platform.machine() == "x86_64":
        assert "avx2" in line


def test_the_prepared_gpu_check_runs_on_cpu_and_finds_fp16_resume_exact(tmp_path):
    import json
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    cmd = [sys.executable, str(script), "--device", "cpu", "--preset", "tiny", "--steps", "4", "--samples", "64"]
    res = subprocess.run([*cmd, "--batch", "8", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["train"]) == {"no", "bf16", "fp16"} and report["fp16_resume_bit_equal"] is True
    assert all(r["images_per_s"] > 0 and r["val_loss"] > 0 for r in report["train"].values())
    assert set(report["steady"]) == {"no", "bf16", "fp16"} and all(
        r["ms_per_step"] > 0 for r in report["steady"].values()
    )


@pytest.mark.slow
def test_the_prepared_gpu_pipeline_runs_every_stage_and_both_recipes_on_cpu(tmp_path):
    # it waits for a session with a GPU, where it gets one try: a broken script must show here first
    import json
    import os
    import subprocess

    import yaml
    from conftest import MICRO

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_pipeline.sh"
    env = {**os.environ, "PYTHON": sys.executable, "WORK": str(tmp_path / "work"), "TESTS": "0"}
    env["GLOBAL_SETS"] = " ".join(MICRO)
    res = subprocess.run(
        ["bash", str(script), str(tmp_path / "out"), "train.lr=1e-3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for stage in ("a data", "a train-vae", "a cache", "a classifier", "a train", "b train", "a evaluate", "b evaluate"):
        assert f"{stage} rc=0 " in summary, summary
    lr = [yaml.safe_load((tmp_path / "work" / r / "train" / "config.yaml").read_text())["train"]["lr"] for r in "ab"]
    assert lr == [3e-3, 1e-3]  # the micro rate for a, the second recipe's for b, on the same data
    assert (tmp_path / "work" / "b" / "cache").resolve() == (tmp_path / "work" / "a" / "cache")
    for name in ("a-train.json", "b-train.json", "a-metrics.json", "b-metrics.json", "logs.tar.gz"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "out" / "b-metrics.json").read_text())["val_loss"] > 0


def test_the_digit_judge_reads_a_digit_blossom_stored_as_the_8x8_grey_levels_it_was(tmp_path):
    """real_digits.py judges drawn 64 px images on the data set's own 8x8 ink scale: a digit
    written to its folder and taken in by `blossom data`'s resize comes back near its levels."""
    from PIL import Image
    from real_digits import grey8, write_folder
    from sklearn.datasets import load_digits

    from blossom.data.ingest import Policy, prepare

    write_folder(tmp_path)
    rows = (tmp_path / "metadata.jsonl").read_text().splitlines()
    assert len(rows) == 1797 and '"text": "a handwritten digit zero"' in rows[0]
    digits = load_digits()
    for i in (0, 7, 1000):
        pixels, _, _ = prepare(tmp_path / f"digit_{i:04d}.png", Policy(size=64))
        assert Image.open(tmp_path / f"digit_{i:04d}.png").size == (8, 8)
        back = grey8(pixels[None])[0]
        assert abs(back - digits.data[i]).mean() < 1.0  # of 16 levels
