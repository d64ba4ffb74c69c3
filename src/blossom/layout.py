"""A blossom model folder's layout: the files it holds and how the exported UNet is fed.

One home for what the backends that read a folder, the export that writes it and the int8
quantizer that adds to it must agree on. In diffusers' sub-folder names: `unet/`, `vae/`,
`scheduler/scheduler_config.json` and `blossom.json` (text encoder and token length); an exported
folder adds `text_encoder/`, `tokenizer/` and `onnx/`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

MODEL_FILES = ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "blossom.json"]
ONNX_FILES = {"text_encoder": "text_encoder.onnx", "unet": "unet.onnx", "vae_decoder": "vae_decoder.onnx"}
INT8_FILES = {"unet": "unet.int8.onnx", "vae_decoder": "vae_decoder.int8.onnx"}
# The text encoder's int8 copy (quantize.quantize_text_encoder) is optional: exports made before it
# have none, and export keeps the text encoder in fp32 when its int8 copy moves the image too far.
INT8_TEXT_ENCODER = "text_encoder.int8.onnx"


def remove_graph(path: Path) -> None:
    """An ONNX graph and the external weights file beside it (`<name>.data`), where they exist."""
    for part in path.parent.glob(path.name + "*"):
        part.unlink()


def model_files_missing(folder: Path, needed: list[str] | None = None) -> list[str]:
    return [n for n in needed or MODEL_FILES if not (folder / n).exists()]


def has_onnx(folder: str | Path) -> bool:
    return all((Path(folder) / "onnx" / f).exists() for f in ONNX_FILES.values())


def has_int8(folder: str | Path) -> bool:
    return all((Path(folder) / "onnx" / f).exists() for f in INT8_FILES.values())


def sample_settings(folder: Path) -> dict:
    """The sampling a model folder was exported with (blossom.json's `sample`, from params.yaml),
    completed by SampleConfig's defaults; a folder that does not say, or says it damaged, gets the
    defaults alone (loading the model reports the damage)."""
    from blossom.config import SampleConfig

    try:
        said = dict(json.loads((folder / "blossom.json").read_text()).get("sample", {}))
    except (OSError, ValueError, AttributeError, TypeError):
        said = {}
    return {**dataclasses.asdict(SampleConfig()), **said}


def unet_feed(
    latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, cond: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """The exported UNet's inputs by name: float32 arrays, one timestep per row; a distilled UNet
    also takes its guidance embedding (`timestep_cond`)."""
    feed = {
        "sample": latents.float().numpy(),
        "timestep": t.float().reshape(-1).expand(len(latents)).contiguous().numpy(),
        "encoder_hidden_states": text.float().numpy(),
    }
    if cond is not None:
        feed["timestep_cond"] = cond.float().numpy()
    return feed
