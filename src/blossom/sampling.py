"""One denoising loop for every backend and sampler, with classifier-free guidance.

The conditional and unconditional passes go through the UNet as one batch. Each image's
starting noise comes from its own seed (seed + i), so an image does not depend on how many
others were generated beside it.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

# Imported here, once, not inside make_scheduler: diffusers' lazy imports are not thread-safe,
# and the web app samples for many visitors in parallel threads.
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

from blossom.config import DistillConfig, SampleConfig
from blossom.errors import BlossomError

log = logging.getLogger(__name__)

SAMPLERS = ("ddim", "dpm++2m", "unipc", "euler", "ddpm")
# A distilled (fast) model draws with a consistency sampler, one UNet call per step, the guidance
# scale fed to the UNet (diffusers' time_cond_proj_dim) instead of a second, unconditional pass.
# tcd: TCD's strategic stochastic sampling (Zheng et al. 2024) at gamma 0, deterministic steps along
# the student's own trajectory; lcm: LCM's multistep sampler, which draws fresh noise at every step
# (gamma 1). On the tiny student tcd scores ~1 point more petal colour at 2, 4 and 8 steps
# (docs/fast.md), so it is what `blossom distill` makes a student's own; either draws any student.
FAST_SCHEDULERS = {"tcd": TCDScheduler, "lcm": LCMScheduler}
FAST_SAMPLERS = tuple(FAST_SCHEDULERS)
FAST_SAMPLER = FAST_SAMPLERS[0]
TCD_GAMMA = 0.0
# Limits on one request. Steps: the schedule has 1,000 training timesteps, and no sampler can take
# more steps than that. Guidance above ~20 only saturates colours. Seeds: seed + i must fit the
# 64-bit generator state, and 2**32 keeps them NumPy-compatible too.
MAX_STEPS, MAX_GUIDANCE, MAX_SEED = 1000, 50.0, 2**32 - 1


def check_request(sampler: str, steps: int, guidance: float, seed: int, n: int = 1) -> None:
    """A one-line error for a request no sampler can serve, before any model is loaded."""
    if sampler not in (*SAMPLERS, *FAST_SAMPLERS):
        raise BlossomError(
            f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)} "
            f"({' or '.join(FAST_SAMPLERS)} for a distilled model)"
        )
    if not 0 < steps <= MAX_STEPS:
        usual = DistillConfig.default_steps if sampler in FAST_SAMPLERS else SampleConfig.steps
        raise BlossomError(
            f"steps must be a positive number up to {MAX_STEPS} (the schedule's length), got {steps}: "
            f"try --steps {usual}"
        )
    if not (isinstance(guidance, (int, float)) and 0 <= guidance <= MAX_GUIDANCE):  # NaN fails every comparison
        raise BlossomError(
            f"guidance must be a number from 0 to {MAX_GUIDANCE:g}, got {guidance}: "
            f"try --guidance {SampleConfig.guidance:g}"
        )
    if not 0 <= seed <= MAX_SEED - max(n - 1, 0):
        raise BlossomError(f"seed must be from 0 to {MAX_SEED - max(n - 1, 0)} (image i uses seed + i), got {seed}")


class Backend(Protocol):
    latent_shape: tuple[int, int, int]
    scheduler_config: dict
    distilled: dict | None  # blossom.json's "distilled" entry for a student, else None

    def encode_text(self, prompts: list[str]) -> torch.Tensor: ...

    def unet(
        self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor: ...

    def decode_float(self, latents: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> np.ndarray: ...


def guidance_embedding(scale: torch.Tensor, dim: int) -> torch.Tensor:
    """What a distilled UNet reads its guidance scale from: the sinusoidal embedding of (scale - 1)
    that diffusers' LatentConsistencyModelPipeline feeds as `timestep_cond` (tests check it is the same)."""
    half = dim // 2
    # the pipeline's own order of operations: arguments reach ~10^4, where float32 rounding shows
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    args = ((scale.float() - 1) * 1000)[:, None] * freqs[None, :]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


@functools.lru_cache(maxsize=64)
def _guidance_row(scale: float, dim: int) -> torch.Tensor:
    return guidance_embedding(torch.tensor([scale]), dim)


def make_scheduler(name: str, train_config: dict, steps: int | None = None):
    """A fresh scheduler (they hold per-call state), with `steps` timesteps set when given: a copy
    of one built once per sampler, config and steps. Building one recomputes its noise schedule in
    Python (~2 ms, a tenth of a few-step image), and setting its steps takes a square root that
    runs on torch's OpenMP pool, whose threads then spin beside ONNX Runtime's (a guided ONNX
    image took ~3 ms longer)."""
    return copy.deepcopy(_scheduler(name, steps, json.dumps(train_config, sort_keys=True, default=str)))


@functools.lru_cache(maxsize=64)  # a web app's visitors may ask for any step count: keep the recent ones
def _scheduler(name: str, steps: int | None, train_config: str):
    sched = _build_scheduler(name, json.loads(train_config))
    if steps is not None:
        sched.set_timesteps(steps)
    return sched


def _build_scheduler(name: str, train_config: dict):
    base = {k: v for k, v in train_config.items() if not k.startswith("_")}
    if name in FAST_SCHEDULERS:
        return FAST_SCHEDULERS[name].from_config(base)
    # clip_sample would clip unit-variance latents to [-1, 1]: chance-level images.
    # "trailing" spacing starts at the last training timestep, which few-step sampling needs.
    common = {"clip_sample": False, "timestep_spacing": "trailing"}
    if name == "ddim":
        return DDIMScheduler.from_config(base, **common, set_alpha_to_one=False)
    if name == "ddpm":
        return DDPMScheduler.from_config(base, **common)
    if name == "dpm++2m":
        return DPMSolverMultistepScheduler.from_config(
            base, timestep_spacing="trailing", algorithm_type="dpmsolver++", solver_order=2
        )
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(base, timestep_spacing="trailing")
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base, timestep_spacing="trailing")
    raise BlossomError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")


def initial_noise(shape: tuple[int, int, int], n: int, seed: int) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


def sample(
    backend: Backend,
    prompts: list[str],
    sampler: str = "ddim",
    steps: int = 30,
    guidance: float = SampleConfig.guidance,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """uint8 images (N, H, W, 3) for the prompts."""
    return backend.decode(denoise(backend, prompts, sampler, steps, guidance, seed, progress))


def check_sampler_fits(backend: Backend, sampler: str) -> None:
    """A distilled model takes only the consistency samplers, and a teacher neither of them."""
    fast = getattr(backend, "distilled", None)
    if fast is None and sampler in FAST_SAMPLERS:
        raise BlossomError(
            f"the {sampler} sampler draws with distilled models only: run `blossom distill` and pass its model "
            f"(or --fast), or choose one of {', '.join(SAMPLERS)}"
        )
    if fast is not None and sampler not in FAST_SAMPLERS:
        raise BlossomError(
            f"this is a distilled few-step model: it draws with a consistency sampler "
            f"(--sampler {' or '.join(FAST_SAMPLERS)}, --steps {fast['default_steps']}), not {sampler}"
        )


def check_fast(backend: Backend, sampler: str, steps: int) -> None:
    """check_sampler_fits, and a warning for more steps than a student was distilled for."""
    check_sampler_fits(backend, sampler)
    fast = getattr(backend, "distilled", None)
    if fast is not None and steps > fast["max_steps"]:
        log.warning(
            "%d steps is past the %d this model was distilled for (%s by default): more steps only blur",
            steps,
            fast["max_steps"],
            fast["default_steps"],
        )


@torch.no_grad()
def denoise(
    backend: Backend,
    prompts: list[str],
    sampler: str = "ddim",
    steps: int = 30,
    guidance: float = SampleConfig.guidance,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The final latents for the prompts."""
    if not prompts:
        raise BlossomError("no prompts given: pass at least one prompt")
    check_request(sampler, steps, guidance, seed, len(prompts))
    check_fast(backend, sampler, steps)
    if sampler in FAST_SAMPLERS:
        return _denoise_fast(backend, prompts, sampler, steps, guidance, seed, progress)
    sched = make_scheduler(sampler, backend.scheduler_config, steps)
    n = len(prompts)
    guided = guidance != 1.0
    text = backend.encode_text(([""] * n if guided else []) + list(prompts))
    latents = initial_noise(backend.latent_shape, n, seed) * sched.init_noise_sigma
    # Stochastic samplers (DDPM, Euler with churn) draw from this generator; others take no generator.
    extra = (
        {"generator": torch.Generator().manual_seed(seed)}
        if "generator" in inspect.signature(sched.step).parameters
        else {}
    )
    for i, t in enumerate(sched.timesteps):
        inp = torch.cat([latents, latents]) if guided else latents
        inp = sched.scale_model_input(inp, t)
        pred = backend.unet(inp, t.expand(len(inp)), text)
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance * (cond - uncond)
        latents = sched.step(pred, t, latents, **extra).prev_sample
        if progress:
            progress(i + 1, steps)
    return latents


def _denoise_fast(
    backend: Backend, prompts: list[str], sampler: str, steps: int, guidance: float, seed: int, progress
) -> torch.Tensor:
    """A consistency sampler: one UNet call per step, guidance as an input. Each image draws its
    starting (and lcm's per-step) noise from its own generator (seed + i), as diffusers' pipelines
    do when handed one generator per image: the same images."""
    sched = make_scheduler(sampler, backend.scheduler_config, steps)
    extra = {"eta": TCD_GAMMA} if sampler == "tcd" else {}
    n = len(prompts)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    text = backend.encode_text(list(prompts))
    latents = torch.cat([torch.randn((1, *backend.latent_shape), generator=g) for g in gens]) * sched.init_noise_sigma
    # one row, made once per scale: its exp, sin and cos would each start torch's OpenMP pool per image
    cond = _guidance_row(float(guidance), backend.distilled["guidance_embedding_dim"]).repeat(n, 1)
    for i, t in enumerate(sched.timesteps):
        pred = backend.unet(latents, t.expand(n), text, cond)
        latents = sched.step(pred, t, latents, generator=gens, **extra).prev_sample
        if progress:
            progress(i + 1, steps)
    return latents
