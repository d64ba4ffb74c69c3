"""The machine a benchmark runs on: its CPU's vector features and its fp32 peak, measured in the
same run (these machines differ by kind, AVX-512 or AVX2 only, and drift within minutes)."""

from __future__ import annotations

import time

import torch

from blossom.cpu import describe


def _best_rate(fn, flops: float, seconds: float = 0.6) -> float:
    """Best GFLOP/s of fn() over about `seconds`, after one untimed call."""
    fn()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        fn()
        best = max(best, flops / (time.perf_counter() - start) / 1e9)
    return best


def measured_peak() -> dict[str, float]:
    """fp32 GFLOP/s at torch's current thread count: a 1024^3 matrix product and a 3x3 convolution
    (64 -> 64 channels, 8 x 64 x 64), the two shapes of work a UNet is made of."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x, w = torch.randn(8, 64, 64, 64), torch.randn(64, 64, 3, 3)
    with torch.no_grad():
        matmul = _best_rate(lambda: torch.mm(a, b), 2 * 1024**3)
        conv = _best_rate(lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * 8 * 64 * 64 * 64 * 64 * 9)
    return {"matmul": matmul, "conv": conv}


def machine_line(peak: dict[str, float] | None = None) -> str:
    peak = peak or measured_peak()
    return (
        f"machine: {describe()}, {torch.get_num_threads()} threads; fp32 peak measured now: "
        f"matmul {peak['matmul']:.0f} GFLOP/s, conv {peak['conv']:.0f} GFLOP/s"
    )
