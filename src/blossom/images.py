"""uint8 image arrays (N, H, W, 3): to and from model tensors (N, 3, H, W) in [-1, 1], as a grid, as PNG."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def png_bytes(image: np.ndarray, compress_level: int = 6) -> bytes:
    """One (H, W, 3) uint8 image as PNG; compress_level 1 where speed matters more than size."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="png", compress_level=compress_level)
    return buf.getvalue()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    import torch  # here, not above: the data stage's image workers need png_bytes alone

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    # In NumPy (the same float32 arithmetic, the same bits): torch's round() runs on its OpenMP
    # pool, whose threads then spin beside ONNX Runtime's and slow its next calls.
    a = x.detach().float().cpu().numpy()
    return np.rint((np.clip(a, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8).transpose(0, 2, 3, 1)


def image_grid(images: np.ndarray, cols: int) -> np.ndarray:
    n, h, w, c = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * h, cols * w, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return grid


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two image batches in [-1, 1] (each clamped to it)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-10))
