"""Loading text encoders from local folders: a CLIP checkpoint gives its text tower as a model of its own."""

from __future__ import annotations

import json

import torch

from blossom.config import TextConfig
from blossom.models import load_text_encoder


def test_clip_folder_loads_as_a_savable_text_model(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizerFast

    vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<|endoftext|>", *"abcdefghijklmnopqrstuvwxyz "])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    folder = tmp_path / "clip"
    CLIPTokenizerFast(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(folder)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)  # a full CLIP checkpoint, vision tower included
    enc = load_text_encoder(TextConfig(encoder=str(folder), max_tokens=8))
    assert isinstance(enc.model, CLIPTextModel) and enc.dim == 32
    states = enc(["a red flower", ""])
    assert states.shape == (2, 8, 32) and torch.isfinite(states).all()
    enc.model.save_pretrained(tmp_path / "saved")  # what export needs of it
    assert (tmp_path / "saved" / "model.safetensors").exists()


def test_on_a_cpu_the_unet_attends_with_the_classic_processor_and_computes_the_same(micro_cfg):
    """fit_attention swaps the fused SDPA kernel for diffusers' classic processor on a CPU only
    (faster there for narrow heads: benchmarks/attention.py); the output is the same function."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from blossom.models import build_unet, fit_attention

    torch.manual_seed(0)
    unet = build_unet(micro_cfg, 384, (4, 8, 8)).eval()
    x, t, text = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 990]), torch.randn(3, 7, 384)
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    with torch.no_grad():
        fused = unet(x, t, encoder_hidden_states=text).sample
        fit_attention(unet, "cuda")  # a GPU keeps the fused kernel (the device need not exist to decide)
        assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
        assert fit_attention(unet) is unet
        assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}
        classic = unet(x, t, encoder_hidden_states=text).sample
    assert len(unet.attn_processors) >= 2
    assert (fused - classic).abs().max().item() < 1e-5 * fused.abs().max().item() + 1e-6
