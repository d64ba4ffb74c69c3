"""How much memory this process may still use, so a run that cannot fit stops with a message
instead of being killed by the kernel part-way (a cgroup's OOM kill leaves no traceback, no log
line, and under torchrun only a signal number)."""

from __future__ import annotations

import math
from pathlib import Path

from blossom.errors import ConfigError

UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63


def cgroup_limit() -> int | None:
    """This process's memory limit in bytes (cgroup v2 or v1), None when there is none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        number, controllers, path = line.split(":", 2)
        if number == "0" and controllers == "":
            limit_file = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            limit_file = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            value = limit_file.read_text().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < UNLIMITED:
            return int(value)
    return None


def rss() -> int:
    """Resident bytes of this process now."""
    import psutil

    return psutil.Process().memory_info().rss


def check_room(need: int, what: str, fix: str, limit: int | None = None) -> None:
    """Refuse, in one line, work that needs more than the memory limit leaves above what is in use.
    `need` is a floor (what must be resident at once), so a run that fits is never refused."""
    limit = cgroup_limit() if limit is None else limit
    if limit is None:
        return
    room = limit - rss()
    if need > room:
        mib = 1 << 20
        raise ConfigError(
            f"{what} needs at least {need // mib} MiB but the memory limit ({limit // mib} MiB) leaves "
            f"{max(room, 0) // mib} MiB: {fix}"
        )


def step_floor(n_params: int, rows: int, latent_shape: tuple[int, ...], text_shape: tuple[int, int]) -> int:
    """Bytes one optimiser step surely holds at once: fp32 weights, gradients, two Adam moments and
    the EMA copy, plus the batch's latents, noise, noisy latents and target and its text states.
    Activations come on top; this is the floor, not the estimate."""
    return 4 * (5 * n_params + rows * (4 * math.prod(latent_shape) + text_shape[0] * text_shape[1]))
