"""Trains blossom's own small AutoencoderKL on the data set (skipped when vae.pretrained is set)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from blossom.config import Config
from blossom.data.folder import load_images, read_metadata
from blossom.fsutil import atomic_dir, write_json
from blossom.images import psnr, to_tensor, to_uint8
from blossom.models import build_vae, n_params
from blossom.train.distributed import local_device

log = logging.getLogger(__name__)


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, batch: int = 128) -> torch.Tensor:
    out = [vae.decode(vae.encode(x[i : i + batch]).latent_dist.mode()).sample for i in range(0, len(x), batch)]
    return torch.cat(out)


def shuffle_channels(x: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """Each image of the batch, with probability `share`, with its RGB channels in a random order
    (possibly the same one)."""
    order = torch.stack([torch.randperm(3, generator=gen) for _ in range(len(x))])
    keep = torch.rand(len(x), generator=gen) >= share
    order[keep] = torch.arange(3)
    return x.gather(1, order[:, :, None, None].expand_as(x))


def train_vae(cfg: Config, data_dir: Path, out_dir: Path) -> dict:
    c = cfg.vae
    torch.manual_seed(cfg.train.seed)
    images, _ = load_images(read_metadata(data_dir / "train"), cfg.data.image_size)
    val_images, _ = load_images(read_metadata(data_dir / "val")[:256], cfg.data.image_size)
    data, val = to_tensor(images), to_tensor(val_images)
    # the GPU when there is one (as train does); batches and random draws stay on the CPU, so the
    # draws are the same whichever device trains
    device = local_device()
    vae = build_vae(c).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=c.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=c.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    log.info("VAE: %.2fM parameters, %d steps of %d crops %dpx", n_params(vae) / 1e6, c.steps, c.batch_size, c.crop)
    start = time.time()
    bar = tqdm(range(c.steps), desc="train-vae", unit="step")
    for _ in bar:
        idx = torch.randint(len(data), (c.batch_size,), generator=gen)
        x = data[idx]
        if c.crop < cfg.data.image_size:
            y0, x0 = torch.randint(cfg.data.image_size - c.crop + 1, (2,), generator=gen).tolist()
            x = x[:, :, y0 : y0 + c.crop, x0 : x0 + c.crop]
        if c.color_shuffle > 0:
            x = shuffle_channels(x, c.color_shuffle, gen)
        x = x.to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec_loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec_loss + c.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(
            loss=f"{rec_loss.item():.4f}", img_s=f"{bar.n * c.batch_size / max(time.time() - start, 1e-6):.0f}"
        )
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(data[i : i + 256].to(device)).latent_dist.mode() for i in range(0, min(len(data), 2048), 256)]
        )
        # Scale latents to unit variance, as Stable Diffusion's VAE does with its 0.18215.
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        recon = reconstruct(vae, val.to(device)).cpu()
        vae.to("cpu")
    stats = {
        "params": n_params(vae),
        "val_psnr_db": round(psnr(recon, val), 2),
        "scaling_factor": vae.config.scaling_factor,
        "seconds": round(time.time() - start, 1),
    }
    with atomic_dir(out_dir) as tmp:
        vae.save_pretrained(tmp)
        write_json(tmp / "train_vae.json", stats)
        pairs = np.concatenate([to_uint8(val[:8]), to_uint8(recon[:8])], axis=1)  # originals above reconstructions
        Image.fromarray(np.concatenate(list(pairs), axis=1)).save(tmp / "reconstructions.png")
    log.info("VAE: val PSNR %.2f dB, scaling factor %.4f", stats["val_psnr_db"], stats["scaling_factor"])
    return stats
