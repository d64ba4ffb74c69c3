"""The diffusion training loop: reads the latent/text cache, trains the UNet, keeps an EMA copy.

Flat on purpose: every step of the recipe is visible here, top to bottom.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from blossom.config import Config, save_config
from blossom.data.cache import load_cache
from blossom.fsutil import atomic_dir, atomic_path, write_json, write_text
from blossom.models import build_unet, n_params, noise_scheduler
from blossom.train import checkpoint as ckpt

log = logging.getLogger(__name__)

N_BINS = 10  # the loss is also logged per timestep bin: cheap, and shows where the model is weak
VAL_SEED = 1234


def target_for(sched, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if sched.config.prediction_type == "v_prediction":
        return sched.get_velocity(x0, noise, t)
    return noise


def snr_weights(sched, t: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), expressed for the model's prediction target."""
    if gamma is None:
        return torch.ones(len(t))
    alphas = sched.alphas_cumprod[t]
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if sched.config.prediction_type == "v_prediction" else clipped / snr


def as_epsilon(sched, pred: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's noise estimate whatever it predicts, so validation losses compare across recipes."""
    if sched.config.prediction_type == "epsilon":
        return pred
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * pred + (1 - a).sqrt() * xt


@torch.no_grad()
def validation_loss(unet, sched, val: dict[str, torch.Tensor], batch: int = 128) -> float:
    """Noise-prediction MSE on the val split with fixed noise and evenly spread timesteps."""
    gen = torch.Generator().manual_seed(VAL_SEED)
    n = len(val["latents"])
    noise = torch.randn(val["latents"].shape, generator=gen)
    t = torch.linspace(0, sched.config.num_train_timesteps - 1, n).round().long()
    total = 0.0
    for i in range(0, n, batch):
        x0, eps, tt = val["latents"][i : i + batch], noise[i : i + batch], t[i : i + batch]
        xt = sched.add_noise(x0, eps, tt)
        pred = unet(xt, tt, encoder_hidden_states=val["text"][i : i + batch]).sample
        total += F.mse_loss(as_epsilon(sched, pred, xt, tt), eps, reduction="sum").item()
    return total / noise.numel()


def plot_loss(stats: list[dict], val: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([s["step"] for s in stats], [s["loss"] for s in stats], label="train (weighted)")
    if val:
        ax.plot(*zip(*val), "o-", label="val (noise MSE, fixed seed)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def train_diffusion(cfg: Config, cache_dir: Path, vae_dir: Path, out_dir: Path, resume: str | None = None) -> dict:
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    c = cfg.train
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    torch.manual_seed(c.seed)
    data, val = load_cache(cache_dir, "train"), load_cache(cache_dir, "val")
    latents, text, null_text = data["latents"], data["text"], data["null_text"]
    val_data = {"latents": val["latents"], "text": val["text"]}

    unet = build_unet(cfg, cross_attention_dim=text.shape[-1], latent_shape=tuple(latents.shape[1:]))
    ema = EMAModel(unet.parameters(), decay=c.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=c.ema_power)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, c.warmup_steps, c.steps)
    sched = noise_scheduler(cfg)
    gen = torch.Generator().manual_seed(c.seed)

    ckpt_dir = out_dir / "checkpoints"
    stats_path = out_dir / "stats.jsonl"
    start, val_history, stats = 0, [], []
    if not resume and (ckpt_dir / "latest").exists():
        # A fresh run must not mix its checkpoints with an older run's (pruning keeps the highest steps).
        log.warning("starting a fresh run: discarding the previous run's checkpoints (--resume latest continues it)")
        shutil.rmtree(ckpt_dir)
    if resume:
        path = ckpt.resolve(ckpt_dir, resume)
        state = ckpt.load_checkpoint(path, unet, ema, optimizer, lr_scheduler, gen)
        start, val_history = state["step"], [tuple(v) for v in state["val_history"]]
        log.info("resumed from %s at step %d", path.name, start)
    if stats_path.exists() and start > 0:
        stats = [json.loads(line) for line in stats_path.read_text().splitlines() if line.strip()]
        stats = [s for s in stats if s["step"] <= start]  # drop what the killed run logged past its checkpoint
    write_text(stats_path, "".join(json.dumps(s) + "\n" for s in stats))

    log.info("UNet: %.2fM parameters; %d training latents %s", n_params(unet) / 1e6, len(latents), tuple(latents.shape[1:]))
    bins_sum, bins_n = torch.zeros(N_BINS), torch.zeros(N_BINS)
    running, t0 = [], time.time()
    unet.train()
    bar = tqdm(range(start, c.steps), initial=start, total=c.steps, desc="train", unit="step")
    stats_file = open(stats_path, "a", encoding="utf-8")
    for step in bar:
        idx = torch.randint(len(latents), (c.batch_size,), generator=gen)
        x0, cond = latents[idx], text[idx]
        # Per-sample caption dropout teaches the unconditional model that guidance needs.
        drop = torch.rand(c.batch_size, generator=gen) < c.cfg_dropout
        cond = torch.where(drop.view(-1, 1, 1), null_text.expand_as(cond), cond)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (c.batch_size,), generator=gen)
        xt = sched.add_noise(x0, noise, t)

        pred = unet(xt, t, encoder_hidden_states=cond).sample
        per_sample = F.mse_loss(pred, target_for(sched, x0, noise, t), reduction="none").mean(dim=(1, 2, 3))
        loss = (snr_weights(sched, t, c.min_snr_gamma) * per_sample).mean()

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), c.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        ema.step(unet.parameters())

        b = (t * N_BINS // sched.config.num_train_timesteps).clamp(max=N_BINS - 1)
        bins_sum.index_add_(0, b, per_sample.detach())
        bins_n.index_add_(0, b, torch.ones_like(per_sample))
        running.append(loss.item())
        done = step + 1
        img_s = (done - start) * c.batch_size / (time.time() - t0)
        if done % c.log_every == 0 or done == c.steps:
            row = {
                "step": done,
                "images_seen": done * c.batch_size,
                "loss": sum(running) / len(running),
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "images_per_s": round(img_s, 1),
                "loss_by_t_bin": (bins_sum / bins_n.clamp(min=1)).round(decimals=5).tolist(),
            }
            stats.append(row)
            stats_file.write(json.dumps(row) + "\n")
            stats_file.flush()
            running, bins_sum, bins_n = [], torch.zeros(N_BINS), torch.zeros(N_BINS)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{img_s:.0f}")
        if done % c.val_every == 0 or done == c.steps:
            with ema_weights(unet, ema):
                val_history.append((done, validation_loss(unet, sched, val_data)))
            log.info("step %d: val loss %.5f", done, val_history[-1][1])
        if done % c.checkpoint_every == 0 or done == c.steps:
            ckpt.save_checkpoint(ckpt_dir, done, unet, ema, optimizer, lr_scheduler, gen, c.keep_checkpoints,
                                 {"val_history": val_history, "images_seen": done * c.batch_size})
    stats_file.close()

    plot_loss(stats, val_history, out_dir / "loss_curve.png")
    result = {
        "steps": c.steps,
        "images_seen": c.steps * c.batch_size,
        "val_loss": val_history[-1][1] if val_history else None,
        "val_history": val_history,
        "unet_params": n_params(unet),
        "train_seconds_this_run": round(time.time() - t0, 1),
    }
    with ema_weights(unet, ema), atomic_dir(out_dir / "model") as tmp:
        unet.save_pretrained(tmp / "unet")  # the EMA weights: what gets evaluated and served
        write_model_files(cfg, vae_dir, tmp, result)
    return result


def write_model_files(cfg: Config, vae_dir: Path, folder: Path, train_info: dict) -> None:
    """Everything but the UNet that inference needs, beside it (see backends.py for the layout)."""
    import dataclasses

    (folder / "vae").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy2(vae_dir / name, folder / "vae" / name)
    noise_scheduler(cfg).save_pretrained(folder / "scheduler")
    write_json(folder / "blossom.json", {"text": dataclasses.asdict(cfg.text), "preset": cfg.preset,
                                         "image_size": cfg.data.image_size})
    write_json(folder / "train.json", train_info)


class ema_weights:
    """Context manager: swap the EMA weights into the model, and the training weights back after."""

    def __init__(self, model, ema):
        self.model, self.ema = model, ema

    def __enter__(self):
        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())
        self.model.eval()

    def __exit__(self, *exc):
        self.ema.restore(self.model.parameters())
        self.model.train()
