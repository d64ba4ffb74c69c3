"""The GPU presets build their real architectures and train a few steps on CPU (a smoke test)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import PARAMS

from blossom.config import load_config

# The presets' architectures as they are; only the amount of data and work is cut.
FEW = [
    "data.train_size=8",
    "data.val_size=4",
    "vae.steps=2",
    "vae.batch_size=2",
    "train.steps=2",
    "train.batch_size=2",
    "train.warmup_steps=1",
    "train.val_every=2",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=1",
    "evaluate.batch_size=2",
]


@pytest.mark.slow
@pytest.mark.parametrize("preset, latent, unet_millions", [("flowers128", 16, (80, 120)), ("peer256", 32, (130, 160))])
def test_preset_trains_a_few_steps(preset, latent, unet_millions, tmp_path):
    from blossom.cli import Paths
    from blossom.data.cache import build_cache
    from blossom.data.sources import make_dataset
    from blossom.models import load_text_encoder, load_vae
    from blossom.train.autoencoder import train_vae
    from blossom.train.diffusion import train_diffusion

    cfg = load_config(PARAMS, preset, [*FEW, f"outputs={tmp_path}"])
    paths = Paths(cfg.out)
    make_dataset(cfg.data, paths.data)
    train_vae(cfg, paths.data, paths.vae)
    info = build_cache(
        paths.data,
        paths.cache,
        load_vae(paths.vae),
        load_text_encoder(cfg.text),
        cfg.data.image_size,
        flip=cfg.data.random_flip,
    )
    assert tuple(info["latent_shape"]) == (4, latent, latent)
    result = train_diffusion(cfg, paths.cache, paths.vae, paths.train)
    assert result["steps"] == 2 and math.isfinite(result["val_loss"])
    low, high = unet_millions
    assert low < result["unet_params"] / 1e6 < high, result["unet_params"]
    assert json.loads((paths.model / "blossom.json").read_text())["preset"] == preset
