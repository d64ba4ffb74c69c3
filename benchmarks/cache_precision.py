"""The cache stage's encoding in fp32 against bf16 autocast, side by side in one run.

Encodes a block of real training captions (MiniLM) and images (the trained VAE, each image and
its mirror, as the cache does) both ways, taking turns, and prints rows per second, the ratio,
and how far bf16 moves the stored values from fp32's, beside the int8 text storage's own error.
Needs `blossom data` and `blossom train-vae` outputs:

    .venv/bin/python benchmarks/cache_precision.py [--outputs outputs] [--rows 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from machine import machine_line
from timing import median_seconds

from blossom.config import load_config
from blossom.cpu import pick_precision
from blossom.data.cache import dequantize_states, encode_captions, encode_images, quantize_states
from blossom.data.folder import load_images, read_metadata
from blossom.images import to_tensor
from blossom.models import load_text_encoder, load_vae, set_threads


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outputs", default="outputs", help="a folder with data/ and vae/ from `make run`")
    ap.add_argument("--rows", type=int, default=512, help="captions and images per timed call")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config()
    set_threads(cfg.threads)
    print(machine_line())
    precision, why = pick_precision("auto", "cpu")
    print(f"cache.precision auto here: {precision} ({why})")
    out = Path(args.outputs)
    records = read_metadata(out / "data" / "train")
    captions = sorted({r.text for r in records})[: args.rows]
    images, _ = load_images(records[: args.rows], cfg.data.image_size)
    pixels = to_tensor(images)
    encoder, vae = load_text_encoder(cfg.text), load_vae(out / "vae").eval()

    def text(precision: str) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return encode_captions(encoder, captions)

    def latents(precision: str) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):  # encode_images: no_grad
            return torch.cat([encode_images(vae, pixels), encode_images(vae, pixels.flip(-1))]).float()

    fns = {
        f"{what} {p}": (lambda seed, f=f, p=p: f(p))
        for what, f in (("text", text), ("images", latents))
        for p in ("fp32", "bf16")
    }
    times = median_seconds(fns, rounds=args.rounds, per_round=2)
    for what, n in (("text", len(captions)), ("images", len(pixels))):
        a, b = times[f"{what} fp32"], times[f"{what} bf16"]
        print(f"{what:>6}: fp32 {n / a:6.0f} rows/s, bf16 {n / b:6.0f} rows/s: bf16 {a / b:.2f}x")
    t32, t16 = text("fp32"), text("bf16")
    stored = quantize_states(t32.numpy())
    back = dequantize_states(stored["text"], stored["text_scale"])
    l32, l16 = latents("fp32"), latents("bf16")
    print(
        f"bf16 against fp32 (norm of the difference / norm): text states {rel(t16, t32):.4f} "
        f"(the int8 storage of fp32's: {rel(back, t32):.4f}); "
        f"latents as stored (fp16) {rel(l16.half(), l32.half()):.4f} "
        f"(fp16 storage of fp32's: {rel(l32.half(), l32):.4f})"
    )


if __name__ == "__main__":
    main()
