"""The diffusion training loop: reads the latent/text cache, trains the UNet, keeps an EMA copy.

Flat on purpose: every step of the recipe is visible here, top to bottom.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from blossom.config import Config, save_config
from blossom.data.cache import CacheSplit, cache_index, check_cache
from blossom.data.stream import ShardOrder, check_lanes
from blossom.env import LaunchEnv
from blossom.errors import BlossomError
from blossom.fsutil import atomic_dir, atomic_path, write_json, write_text
from blossom.memory import check_room, step_floor
from blossom.mlflow_run import LiveRun, NoRun, row_metrics
from blossom.models import build_unet, check_cross_attention, fit_attention, n_params, noise_scheduler
from blossom.train import checkpoint as ckpt
from blossom.train import distributed
from blossom.train.distributed import Runtime
from blossom.train.optim import adamw

log = logging.getLogger(__name__)

N_BINS = 10  # the loss is also logged per timestep bin: cheap, and shows where the model is weak
# A validation loss this many times the run's best is a run that diverged, not noise: it stops
# rather than finishing as a model that draws nothing, which a fresh project would promote (a
# `small` run at lr 4e-3 went from 0.089 to 0.54 at step 1,000 and stayed above 0.4: docs/recipe.md).
DIVERGED = 2.0
VAL_SEED = 1234


def target_for(sched, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if sched.config.prediction_type == "v_prediction":
        return sched.get_velocity(x0, noise, t)
    return noise


def draw_timesteps(c, n_timesteps: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """train.timesteps: uniform, or logit-normal u = sigmoid(mean + std * z) scaled to the timesteps.

    diffusers' compute_density_for_timestep_sampling takes no generator; this one draws from the
    run's own, so a resumed or multi-process run draws the same timesteps.
    """
    if c.timesteps == "uniform":
        return torch.randint(0, n_timesteps, (batch,), generator=gen)
    u = torch.sigmoid(c.logit_mean + c.logit_std * torch.randn(batch, generator=gen))
    return (u * n_timesteps).long().clamp(max=n_timesteps - 1)


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


def check_diverged(step: int, lr: float, loss: float | None = None, val_history: list | None = None) -> None:
    """A one-line error for a run that diverged: a training or validation loss that is not finite,
    or a validation loss DIVERGED times its best before it, or times that of a model that predicts
    no noise at all (1.0: the validation loss is the noise's MSE, and the noise has unit variance).
    Both losses are all-reduced values, so every rank stops at the same step."""
    fix = (
        f"lower train.lr (now {lr:g}) and train again: a changed lr starts a fresh run, "
        "and resuming this one would repeat the same steps"
    )
    if loss is not None and not math.isfinite(loss):
        raise BlossomError(f"training diverged at step {step}: the training loss is {loss}; {fix}")
    if not val_history:
        return
    now = val_history[-1][1]
    if not math.isfinite(now):
        raise BlossomError(f"training diverged at step {step}: the validation loss is {now}; {fix}")
    best_step, best = min([(None, 1.0), *val_history[:-1]], key=lambda v: v[1])
    if now > DIVERGED * best:
        than = f"its best ({best:.4f} at step {best_step})" if best_step else "a model that predicts no noise (1.0)"
        raise BlossomError(
            f"training diverged at step {step}: validation loss {now:.4f}, {now / best:.1f}x {than}; {fix}"
        )


@torch.no_grad()
def validation_loss(unet, sched, val: CacheSplit, rt: Runtime | None = None, batch: int = 128) -> float:
    """Noise-prediction MSE on the val split with fixed noise and evenly spread timesteps.

    Under several processes each rank scores its share and the sums are all-reduced.
    """
    rt = rt or Runtime()
    gen = torch.Generator().manual_seed(VAL_SEED)
    n = len(val)
    noise = torch.randn((n, *val.latent_shape), generator=gen)
    t = torch.linspace(0, sched.config.num_train_timesteps - 1, n).round().long()
    mine = range(n)[rt.share(n)]
    total = 0.0
    for i in range(mine.start, mine.stop, batch):
        j = min(i + batch, mine.stop)
        x0, cond = val.batch(torch.arange(i, j))
        x0, cond, eps, tt = x0.to(rt.device), cond.to(rt.device), noise[i:j].to(rt.device), t[i:j].to(rt.device)
        xt = sched.add_noise(x0, eps, tt)
        pred = unet(xt, tt, encoder_hidden_states=cond).sample
        total += F.mse_loss(as_epsilon(sched, pred, xt, tt), eps, reduction="sum").item()
    return rt.sum(torch.tensor([total], dtype=torch.float64)).item() / noise.numel()


def plot_loss(stats: list[dict], val: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([s["step"] for s in stats], [s["loss"] for s in stats], label="train (weighted)")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val (noise MSE, fixed seed)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def open_splits(cfg: Config, cache_dir: Path):
    """The train and val splits: memory-mapped from cache_dir, or streamed from train.cache_url."""
    if cfg.train.cache_url:
        from blossom.data.stream import StreamSplit, s3_filesystem

        fs = s3_filesystem(cfg.remote.endpoint, cfg.remote.region)
        return StreamSplit(cfg.train.cache_url, "train", fs), StreamSplit(cfg.train.cache_url, "val", fs)
    index = cache_index(cache_dir)
    return CacheSplit(cache_dir, "train", index), CacheSplit(cache_dir, "val", index)


def fingerprint(cfg: Config, index: dict) -> str:
    """What a run's checkpoints are only valid for: every setting that shapes training, and the cache."""
    train = {
        k: v
        for k, v in dataclasses.asdict(cfg.train).items()
        if k not in ("checkpoint_every", "keep_checkpoints", "log_every", "val_every")
    }
    settings = {
        "train": train,
        "unet": dataclasses.asdict(cfg.unet),
        "text": dataclasses.asdict(cfg.text),
        "image_size": cfg.data.image_size,
        "random_flip": cfg.data.random_flip,
        "cache": {k: v for k, v in index.items() if k != "stream"},
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_of(ckpt_dir: Path) -> str | None:
    path = ckpt_dir / "run.txt"
    return path.read_text().strip() if path.exists() else None


def train_diffusion(
    cfg: Config,
    cache_dir: Path,
    vae_dir: Path,
    out_dir: Path,
    resume: str | None = None,
    launch: LaunchEnv = LaunchEnv(),
    track: bool = False,
) -> dict:
    """track: rank 0 logs to MLflow as it trains (mlflow_run.LiveRun); the CLI passes tracking.live."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    rt, c = distributed.start(launch, cfg.train)
    cfg = dataclasses.replace(cfg, train=c)  # the fingerprint and the saved settings name what ran
    ckpt_dir = out_dir / "checkpoints"
    stats_path = out_dir / "stats.jsonl"
    if resume not in (None, "auto"):
        ckpt.resolve(ckpt_dir, resume)  # a checkpoint asked for that is not there: said before the data
    data, val_data = open_splits(cfg, cache_dir)
    index = data.index
    run_id = fingerprint(cfg, index)
    if resume == "auto" or (resume is None and launch.restart_count > 0):
        # `auto` (and a worker group restarted by torchrun) continues a run if there is one to
        # continue: the same settings on the same cache, so a changed param never resumes an old run.
        resume = "latest" if (ckpt_dir / "latest").exists() and _run_of(ckpt_dir) == run_id else None
    path = (
        ckpt.resolve(ckpt_dir, resume) if resume else None
    )  # before anything is written: a failed resume changes nothing
    if rt.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume and (ckpt_dir / "latest").exists():
            # A fresh run must not mix its checkpoints with an older run's (pruning keeps the highest steps).
            why = (
                "its settings or cache differ from this run's"
                if _run_of(ckpt_dir) not in (None, run_id)
                else "--resume latest continues it"
            )
            log.warning("starting a fresh run: discarding the previous run's checkpoints (%s)", why)
            shutil.rmtree(ckpt_dir)
        if not resume:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            write_text(ckpt_dir / "run.txt", run_id + "\n")
    rt.barrier()
    check_cache(index, cfg.text.encoder, cfg.text.max_tokens, cfg.data.random_flip)
    torch.manual_seed(c.seed)
    null_text = data.null_text
    order = None
    if c.order == "shards":
        check_lanes(c.lanes, c.batch_size, rt.world)
        order = ShardOrder([s["count"] for s in index["splits"]["train"]["shards"]], c.lanes, c.seed)

    cross_attention_dim = check_cross_attention(cfg, index["text_dim"])
    unet = build_unet(cfg, cross_attention_dim=cross_attention_dim, latent_shape=data.latent_shape).to(rt.device)
    fit_attention(unet, rt.device)
    ema = EMAModel(unet.parameters(), decay=c.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=c.ema_power)
    # None when not averaging: the last weights are the model (the checkpoint still keeps the slot).
    served_ema = ema if c.ema_decay > 0 else None
    optimizer = adamw(unet.parameters(), c.lr, c.weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, c.warmup_steps, c.steps)
    engine = distributed.Engine(unet, optimizer, rt, c)
    sched = noise_scheduler(cfg)
    gen = torch.Generator().manual_seed(c.seed)
    flip_gen = torch.Generator().manual_seed(c.seed + 1)  # its own stream: flips on or off leave the other draws alone

    start, val_history, stats = 0, [], []
    if path:
        state = ckpt.load_checkpoint(path, rt, engine, ema, lr_scheduler, gen, flip_gen)
        start, val_history = state["step"], [tuple(v) for v in state["val_history"]]
        if rt.main:
            log.info("resumed from %s at step %d", path.name, start)
    if rt.main:
        save_config(cfg, out_dir / "config.yaml")
        if stats_path.exists() and start > 0:
            stats = [json.loads(line) for line in stats_path.read_text().splitlines() if line.strip()]
            stats = [s for s in stats if s["step"] <= start]  # drop what the killed run logged past its checkpoint
        write_text(stats_path, "".join(json.dumps(s) + "\n" for s in stats))
        log.info(
            "UNet: %.2fM parameters; %d training latents %s; %d process(es)%s",
            n_params(unet) / 1e6,
            len(data),
            data.latent_shape,
            rt.world,
            f", DeepSpeed {c.deepspeed}" if c.deepspeed else "",
        )
    need = step_floor(
        n_params(unet), c.batch_size // rt.world, data.latent_shape, (index["max_tokens"], index["text_dim"])
    )
    check_room(need, "one training step", "lower train.batch_size (or raise the memory limit)")
    live = LiveRun(cfg, ckpt_dir, bool(path), f"{cfg.preset}-{c.steps}steps") if track and rt.main else NoRun()
    with live:
        bins = torch.zeros(2 * N_BINS + 2, dtype=torch.float64)  # per-bin loss sums and counts, loss sum, step count
        t0 = time.time()
        unet.train()
        bar = tqdm(range(start, c.steps), initial=start, total=c.steps, desc="train", unit="step", disable=not rt.main)
        stats_file = open(stats_path, "a", encoding="utf-8") if rt.main else None
        mine = rt.share(c.batch_size)
        for step in bar:
            # Every rank draws the whole global batch from the same generator and trains on its slice.
            idx = torch.randint(len(data), (c.batch_size,), generator=gen)
            if order is not None:  # the step alone decides the samples: a resumed run reads on where it stopped
                idx = order.indices(step, c.batch_size)
            # Per-sample caption dropout teaches the unconditional model that guidance needs.
            drop = torch.rand(c.batch_size, generator=gen) < c.cfg_dropout
            noise = torch.randn((c.batch_size, *data.latent_shape), generator=gen)
            t = draw_timesteps(c, sched.config.num_train_timesteps, c.batch_size, gen)
            flip = torch.rand(c.batch_size, generator=flip_gen) < 0.5
            idx, drop, noise, t, flip = idx[mine], drop[mine], noise[mine], t[mine], flip[mine]
            x0, cond = data.batch(idx, flip if cfg.data.random_flip else None)  # only this rank's rows are read
            cond = torch.where(drop.view(-1, 1, 1), null_text.expand_as(cond), cond)
            xt = sched.add_noise(x0, noise, t)
            target, weights = target_for(sched, x0, noise, t), snr_weights(sched, t, c.min_snr_gamma)
            xt, t_dev, cond, target, weights = (v.to(rt.device) for v in (xt, t, cond, target, weights))

            with distributed.autocast(rt, c):
                pred = engine.forward(xt, t_dev, encoder_hidden_states=cond).sample
            per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
            loss = (weights * per_sample).mean()
            grad_norm = engine.step(loss)
            lr_scheduler.step()
            if served_ema is not None:
                served_ema.step(unet.parameters())

            b = (t * N_BINS // sched.config.num_train_timesteps).clamp(max=N_BINS - 1)
            bins[:N_BINS].index_add_(0, b, per_sample.detach().cpu().double())
            bins[N_BINS : 2 * N_BINS].index_add_(0, b, torch.ones(len(b), dtype=torch.float64))
            bins[-2:] += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
            done = step + 1
            img_s = (done - start) * c.batch_size / (time.time() - t0)
            if done % c.log_every == 0 or done == c.steps:
                total = rt.sum(bins)
                row = {
                    "step": done,
                    "images_seen": done * c.batch_size,
                    "loss": (total[-2] / total[-1]).item(),
                    "lr": lr_scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "images_per_s": round(img_s, 1),
                    "loss_by_t_bin": (total[:N_BINS] / total[N_BINS : 2 * N_BINS].clamp(min=1))
                    .float()
                    .round(decimals=5)
                    .tolist(),
                }
                bins.zero_()
                if rt.main:
                    stats.append(row)
                    stats_file.write(json.dumps(row) + "\n")
                    stats_file.flush()
                    live.log(row_metrics(row), done)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{img_s:.0f}")
                check_diverged(done, c.lr, loss=row["loss"])  # after the row is on record
            if done % c.val_every == 0 or done == c.steps:
                with ema_weights(unet, served_ema):
                    val_history.append((done, validation_loss(unet, sched, val_data, rt)))
                if rt.main:
                    log.info("step %d: val loss %.5f", done, val_history[-1][1])
                    live.log({"val_loss": val_history[-1][1]}, done)
                check_diverged(done, c.lr, val_history=val_history)
            if done % c.checkpoint_every == 0 or done == c.steps:
                ckpt.save_checkpoint(
                    ckpt_dir,
                    done,
                    rt,
                    engine,
                    ema,
                    lr_scheduler,
                    (gen, flip_gen),
                    c.keep_checkpoints,
                    {"val_history": val_history, "images_seen": done * c.batch_size},
                )
        if stats_file:
            stats_file.close()

        result = {
            "steps": c.steps,
            "images_seen": c.steps * c.batch_size,
            "val_loss": val_history[-1][1] if val_history else None,
            "val_history": val_history,
            "unet_params": n_params(unet),
            "processes": rt.world,
            "mixed_precision": c.mixed_precision,
            "train_seconds_this_run": round(time.time() - t0, 1),
            "mlflow_run_id": live.run_id,
        }
        if rt.main:
            plot_loss(stats, val_history, out_dir / "loss_curve.png")
            with ema_weights(unet, served_ema), atomic_dir(out_dir / "model") as tmp:
                unet.save_pretrained(tmp / "unet")  # the EMA weights (or the last): what gets evaluated and served
                write_model_files(cfg, vae_dir, tmp, result)
    rt.stop(engine)
    return result


def write_model_files(cfg: Config, vae_dir: Path, folder: Path, train_info: dict) -> None:
    """Everything but the UNet that inference needs, beside it (see backends.py for the layout)."""
    import dataclasses

    (folder / "vae").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy2(vae_dir / name, folder / "vae" / name)
    noise_scheduler(cfg).save_pretrained(folder / "scheduler")
    write_json(
        folder / "blossom.json",
        {
            "text": dataclasses.asdict(cfg.text),
            "preset": cfg.preset,
            "image_size": cfg.data.image_size,
            # what the model card says it was trained on (the folder's name, never its path)
            "data": {"source": cfg.data.source, "name": Path(cfg.data.path).name if cfg.data.path else None},
        },
    )
    write_json(folder / "train.json", train_info)


class ema_weights:
    """Context manager: swap the EMA weights into the model (ema None: keep the training weights),
    in eval mode, and the training weights back after."""

    def __init__(self, model, ema):
        self.model, self.ema = model, ema

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
        self.model.eval()

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.model.parameters())
        self.model.train()
