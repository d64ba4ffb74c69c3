"""Inference backends behind one small interface (see sampling.Backend).

A model folder holds what inference needs, in diffusers' sub-folder names:
`unet/` and `vae/` (diffusers models), `scheduler/scheduler_config.json` (the training noise
schedule) and `blossom.json` (which text encoder and token length the UNet was trained with).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from blossom.config import TextConfig
from blossom.errors import ModelError
from blossom.images import to_uint8
from blossom.models import load_text_encoder, load_vae


def model_files_missing(folder: Path) -> list[str]:
    needed = ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "blossom.json"]
    return [n for n in needed if not (folder / n).exists()]


class TorchBackend:
    def __init__(self, folder: str | Path):
        from diffusers import UNet2DConditionModel

        folder = Path(folder)
        missing = model_files_missing(folder)
        if missing:
            raise ModelError(
                f"{folder} is not a complete blossom model (missing {', '.join(missing)}): run `blossom run` to make one"
            )
        self.info = json.loads((folder / "blossom.json").read_text())
        self.text_encoder = load_text_encoder(TextConfig(**self.info["text"]))
        self.unet_model = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        self.vae = load_vae(folder / "vae")
        self.scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        c = self.unet_model.config
        self.latent_shape = (c.in_channels, c.sample_size, c.sample_size)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(prompts)

    @torch.no_grad()
    def unet(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet_model(latents, t, encoder_hidden_states=text).sample

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 64) -> np.ndarray:
        z = latents / self.vae.config.scaling_factor
        x = torch.cat([self.vae.decode(z[i : i + batch]).sample for i in range(0, len(z), batch)])
        return to_uint8(x)


def load_backend(name: str, folder: str | Path):
    if name == "torch":
        return TorchBackend(folder)
    raise ModelError(f"unknown backend {name!r}: use 'torch'")
