"""Side-by-side timing shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fns: dict[str, Callable[[int], object]], rounds: int = 3, per_round: int = 5) -> dict[str, float]:
    """Median seconds per call of each fn(seed). The fns take turns in blocks, so a machine that
    drifts slower or faster during the run affects all alike; each block starts with an untimed
    call, so threads another library left spinning or caches it left cold do not count."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            fn(0)
            for i in range(per_round):
                start = time.perf_counter()
                fn(1 + r * per_round + i)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def unet_shapes(preset: str | None):
    """A preset's config, its text states' width and its latent shape (channels, height, width),
    after setting torch's threads as blossom does and printing the machine line."""
    from machine import machine_line

    from blossom.config import load_config
    from blossom.models import load_text_encoder, set_threads

    cfg = load_config(preset=preset)
    set_threads(cfg.threads)
    print(machine_line())
    latent = (cfg.vae.latent_channels, *(2 * [cfg.data.image_size // cfg.vae.downsampling]))
    return cfg, load_text_encoder(cfg.text).dim, latent
