"""Pretrained parts from local paths (tiny stand-ins for sd-vae-ft-mse and CLIP ViT-L/14), Hub ids, mismatches."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from conftest import MICRO, PARAMS
from PIL import Image

from blossom.config import load_config
from blossom.errors import BlossomError, DataError, ModelError

SCALING = 0.37  # not SD's 0.18215 nor 1.0: proves the factor is read from the VAE's own config
CLIP_WIDTH = 32  # not MiniLM's 384: the UNet's cross-attention must follow the encoder


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """A diffusers AutoencoderKL folder and a transformers CLIPTextModel + tokenizer folder, random weights."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=SCALING,
    )
    vae.save_pretrained(root / "vae")
    chars = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *[c + "</w>" for c in chars]])}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), pad_token="<|endoftext|>")
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=CLIP_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=40,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(config).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return root / "vae", root / "clip"


def config_with(tmp_path, *extra):
    return load_config(PARAMS, None, [*MICRO, f"outputs={tmp_path / 'outputs'}", *extra])


@pytest.mark.slow
def test_the_flow_runs_on_a_pretrained_vae_and_clip_from_local_folders(tiny_parts, tmp_path):
    from blossom import cli
    from blossom.backends import TorchBackend
    from blossom.data.cache import load_cache
    from blossom.export import export
    from blossom.models import load_vae
    from blossom.sampling import sample

    vae_dir, clip_dir = tiny_parts
    # cache.precision fp32: the latents are checked against an fp32 encoding below (bf16: tests/test_cache.py)
    cfg = config_with(
        tmp_path, f"vae.pretrained={vae_dir}", f"text.encoder={clip_dir}", "train.steps=2", "cache.precision=fp32"
    )
    paths, args = cli.Paths(cfg.out), argparse.Namespace(source=None, path=None, resume=None)
    for stage in (cli.cmd_data, cli.cmd_train_vae, cli.cmd_cache, cli.cmd_train):
        stage(cfg, paths, args)
    assert not (paths.vae / "diffusion_pytorch_model.safetensors").exists()  # nothing trained: the VAE is given
    cache = load_cache(paths.cache, "train")
    assert cache["latents"].shape[1:] == (4, 8, 8) and cache["text"].shape[-1] == CLIP_WIDTH
    # Latents are the posterior mode times the VAE's own scaling factor.
    first = torch.from_numpy(np.array(Image.open(paths.data / "train" / "000000.png")))
    x = first.permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = load_vae(vae_dir).encode(x).latent_dist.mode() * SCALING
    assert torch.allclose(cache["latents"][:1], expected.half().float(), atol=1e-4, rtol=1e-3)  # stored fp16
    model = paths.train / "model"
    unet_config = json.loads((model / "unet" / "config.json").read_text())
    assert unet_config["cross_attention_dim"] == CLIP_WIDTH
    assert json.loads((model / "vae" / "config.json").read_text())["scaling_factor"] == SCALING
    images = sample(TorchBackend(model), ["a red flower"], steps=2, guidance=3.0, seed=0)
    assert images.shape == (1, 32, 32, 3)
    diffs = export(model, tmp_path / "export")  # CLIP's text tower exports and matches PyTorch too
    assert diffs["text_encoder"] < 1e-4 and diffs["image"] < 1e-3


def test_cross_attention_that_disagrees_with_the_encoder_stops_before_the_cache(tiny_parts, tmp_path):
    from blossom import cli

    _, clip_dir = tiny_parts
    cfg = config_with(tmp_path, f"text.encoder={clip_dir}", "unet.cross_attention_dim=768")
    with pytest.raises(ModelError, match=f"set unet.cross_attention_dim to {CLIP_WIDTH}, or to null"):
        cli.cmd_cache(cfg, cli.Paths(cfg.out), argparse.Namespace())
    assert not cli.Paths(cfg.out).cache.exists()


def test_more_tokens_than_the_encoder_reads_names_the_key(tiny_parts, tmp_path):
    from blossom.models import load_text_encoder

    _, clip_dir = tiny_parts
    cfg = config_with(tmp_path, f"text.encoder={clip_dir}", "text.max_tokens=77")
    with pytest.raises(ModelError, match="set text.max_tokens to 40 or less"):
        load_text_encoder(cfg.text)


def test_a_cache_from_another_text_setup_is_refused(micro_prepared, tmp_path):
    from blossom.train.diffusion import train_diffusion

    cfg, paths = micro_prepared
    other = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, max_tokens=12))
    with pytest.raises(DataError, match="rerun `blossom cache`"):
        train_diffusion(other, paths.cache, paths.vae, tmp_path / "train")


@pytest.mark.parametrize("key", ["text.encoder", "vae.pretrained"])
def test_hub_ids_offline_say_to_pass_a_local_path(key, tmp_path, monkeypatch):
    from blossom import cli
    from blossom.models import load_text_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = config_with(tmp_path, f"{key}=someone/not-on-this-disk")
    start = time.time()
    with pytest.raises(ModelError, match=f"download it where there is network and set {key} to its local path"):
        load_text_encoder(cfg.text) if key == "text.encoder" else cli.vae_dir(cfg, cli.Paths(cfg.out))
    assert time.time() - start < 10  # no retry back-off: fail-fast bound, 10x what it takes here
    with pytest.raises(BlossomError, match=f"{key} './missing' is not a model folder"):
        bad = config_with(tmp_path, f"{key}=./missing")
        load_text_encoder(bad.text) if key == "text.encoder" else cli.vae_dir(bad, cli.Paths(bad.out))
