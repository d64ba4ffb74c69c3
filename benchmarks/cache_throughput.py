"""Training throughput with the latent/text cache vs encoding every batch (the original design).

Both loops run the same UNet training step on the tiny preset's models, side by side in one
process; the only difference is where the latents and text states come from. Prints images/s
for each and their ratio.

    .venv/bin/python benchmarks/cache_throughput.py [--steps 12] [--batch 64]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from machine import machine_line

from blossom.config import load_config
from blossom.data import synthetic
from blossom.images import to_tensor
from blossom.models import build_unet, build_vae, load_text_encoder, noise_scheduler, set_threads


def train_step(unet, opt, sched, x0: torch.Tensor, text: torch.Tensor) -> None:
    """One plain noise-prediction step: the work every cache benchmark feeds, whatever the source."""
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (len(x0),))
    loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=text).sample, noise)
    opt.zero_grad()
    loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    cfg = load_config()
    set_threads(cfg.threads)
    print(machine_line())
    torch.manual_seed(0)

    pool = [synthetic.generate(0, i, cfg.data.image_size) for i in range(args.batch * 4)]
    images = to_tensor(np.stack([np.asarray(im) for im, _, _ in pool]))
    captions = [c for _, _, c in pool]
    vae, encoder = build_vae(cfg.vae).eval(), load_text_encoder(cfg.text)
    with torch.no_grad():
        cached_latents = vae.encode(images).latent_dist.mode()
        cached_text = encoder(captions)
    unet = build_unet(cfg, encoder.dim, tuple(cached_latents.shape[1:]))
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sched = noise_scheduler(cfg)

    def step(x0: torch.Tensor, text: torch.Tensor) -> None:
        train_step(unet, opt, sched, x0, text)

    def cached(i: int) -> None:
        idx = torch.arange(i * args.batch, (i + 1) * args.batch) % len(images)
        step(cached_latents[idx], cached_text[idx])

    def encode_every_step(i: int) -> None:
        idx = torch.arange(i * args.batch, (i + 1) * args.batch) % len(images)
        with torch.no_grad():
            x0 = vae.encode(images[idx]).latent_dist.sample()
            text = encoder([captions[j] for j in idx])
        step(x0, text)

    results = {}
    for name, fn in (("cached", cached), ("encode every step", encode_every_step)):
        fn(0)  # warm-up
        start = time.perf_counter()
        for i in range(args.steps):
            fn(i)
        results[name] = args.steps * args.batch / (time.perf_counter() - start)
    for name, ips in results.items():
        print(f"{name:>18}: {ips:7.1f} images/s")
    print(
        f"cache speed-up: {results['cached'] / results['encode every step']:.2f}x "
        f"(batch {args.batch}, {cfg.data.image_size} px, {torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
