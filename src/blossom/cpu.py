"""What the CPU that runs blossom can do, and the precision that runs fastest on it.

int8 pays on x86 CPUs with VNNI dot products (AVX512-VNNI or AVX-VNNI): on them ONNX Runtime's
int8 UNet call is ~2.7x faster than fp32 on the original's architecture. Without VNNI (AVX2
only) the same graphs gain little or nothing on the tiny model, so `auto` picks fp32 there.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

# The vector extensions that decide which kernels ONNX Runtime and oneDNN run, in the order printed.
FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")
BF16 = ("avx512_bf16", "amx_bf16")


@cache
def _cpuinfo(key: str) -> str:
    """The first value of `key` in /proc/cpuinfo; empty where Linux does not report it."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":")[0].strip() == key), "")


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo("flags").split())


def vector_features(flags: frozenset[str] | None = None) -> list[str]:
    flags = cpu_flags() if flags is None else flags
    return [f for f in FEATURES if f in flags]


def has_vnni(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return platform.machine() in ("x86_64", "AMD64") and any(f in flags for f in VNNI)


def describe() -> str:
    """One line: the CPU model, its family (hosts that report the same model name can differ by a
    generation: AMD family 25 is Zen 3/4, 26 is Zen 5) and its vector features."""
    name = _cpuinfo("model name") or platform.processor() or platform.machine()
    if _cpuinfo("cpu family"):
        name += f" (family {_cpuinfo('cpu family')} model {_cpuinfo('model')})"
    return f"{name} [{' '.join(vector_features()) or 'no x86 vector features reported'}]"


def auto_precision(has_int8: bool, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """(precision, why) for the ONNX backend's `auto`: int8 where the model has int8 graphs and the
    CPU has VNNI, else fp32."""
    if not has_int8:
        return "fp32", "the model has no int8 graphs"
    if has_vnni(flags):
        return "int8", "this CPU has VNNI int8 dot products"
    return "fp32", "this CPU has no VNNI, where int8 is not faster"


def has_bf16(flags: frozenset[str] | None = None) -> bool:
    """bf16 dot products in hardware (AVX512-BF16 or AMX): where oneDNN's bf16 kernels beat fp32.
    Elsewhere PyTorch emulates bf16, slower than fp32."""
    flags = cpu_flags() if flags is None else flags
    return platform.machine() in ("x86_64", "AMD64") and any(f in flags for f in BF16)


def pick_precision(setting: str, device, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """(precision, why) for work that runs under bf16 autocast where that pays (the cache's
    encoders, training): `auto` is bf16 where the device computes bf16 natively, else fp32."""
    if setting != "auto":
        return setting, f"set to {setting}"
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):  # Ampere on; a T4 only emulates it
            return "bf16", "this GPU computes bf16"
        return "fp32", "this GPU has no bf16"
    if device.type == "cpu" and has_bf16(flags):
        return "bf16", "this CPU has bf16 dot products (AVX512-BF16 or AMX)"
    return "fp32", "this device has no native bf16, where fp32 is faster"
