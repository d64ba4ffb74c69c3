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
