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
