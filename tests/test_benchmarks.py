"""The benchmarks' machine probe: every timing is printed beside the CPU's features and a peak
measured in the same run."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

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
