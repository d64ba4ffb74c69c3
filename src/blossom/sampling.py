"""One denoising loop for every backend and sampler, with classifier-free guidance.

The conditional and unconditional passes go through the UNet as one batch. Each image's
starting noise comes from its own seed (seed + i), so an image does not depend on how many
others were generated beside it.
"""

from __future__ import annotations

import inspect
from typing import Callable, Protocol

import numpy as np
import torch

# Imported here, once, not inside make_scheduler: diffusers' lazy imports are not thread-safe,
# and the web app samples for many visitors in parallel threads.
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from blossom.errors import BlossomError

SAMPLERS = ("ddim", "dpm++2m", "unipc", "euler", "ddpm")


class Backend(Protocol):
    latent_shape: tuple[int, int, int]
    scheduler_config: dict

    def encode_text(self, prompts: list[str]) -> torch.Tensor: ...

    def unet(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor: ...

    def decode_float(self, latents: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> np.ndarray: ...


def make_scheduler(name: str, train_config: dict):
    base = {k: v for k, v in train_config.items() if not k.startswith("_")}
    # clip_sample would clip unit-variance latents to [-1, 1]: chance-level images.
    # "trailing" spacing starts at the last training timestep, which few-step sampling needs.
    common = {"clip_sample": False, "timestep_spacing": "trailing"}
    if name == "ddim":
        return DDIMScheduler.from_config(base, **common, set_alpha_to_one=False)
    if name == "ddpm":
        return DDPMScheduler.from_config(base, **common)
    if name == "dpm++2m":
        return DPMSolverMultistepScheduler.from_config(base, timestep_spacing="trailing", algorithm_type="dpmsolver++", solver_order=2)
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
    guidance: float = 5.0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """uint8 images (N, H, W, 3) for the prompts."""
    return backend.decode(denoise(backend, prompts, sampler, steps, guidance, seed, progress))


@torch.no_grad()
def denoise(
    backend: Backend,
    prompts: list[str],
    sampler: str = "ddim",
    steps: int = 30,
    guidance: float = 5.0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The final latents for the prompts."""
    if steps <= 0:
        raise BlossomError(f"steps must be a positive number, got {steps}: try --steps 30")
    if not prompts:
        raise BlossomError("no prompts given: pass at least one prompt")
    sched = make_scheduler(sampler, backend.scheduler_config)
    sched.set_timesteps(steps)
    n = len(prompts)
    guided = guidance != 1.0
    text = backend.encode_text(([""] * n if guided else []) + list(prompts))
    latents = initial_noise(backend.latent_shape, n, seed) * sched.init_noise_sigma
    # Stochastic samplers (DDPM, Euler with churn) draw from this generator; others take no generator.
    extra = {"generator": torch.Generator().manual_seed(seed)} if "generator" in inspect.signature(sched.step).parameters else {}
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
