"""`blossom distill`: latent consistency distillation (LCM, Luo et al. 2023) of a trained model.

The student starts as a copy of the teacher's UNet plus a guidance-embedding input (diffusers'
`time_cond_proj_dim`, zero-initialised, so step 0 is the teacher), by default less the attention
and mid-block at its lowest resolution (`distill.prune_lowest_level`). Each step, from the latent/text
cache: noise a latent to a timestep t_n on the teacher's DDIM grid; the teacher, with classifier-
free guidance at a scale w drawn from [guidance_min, guidance_max], takes one DDIM step to
t_{n-k}; the student at t_n must land where the target network (an EMA of the student) lands from
t_{n-k}, under LCMScheduler's boundary condition. Huber loss, as in the paper's recipe. The same
checkpoint format and exact resume as `train` (train/checkpoint.py), under torchrun too.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from blossom.config import Config, save_config
from blossom.data.cache import CacheSplit, cache_index, check_cache
from blossom.env import LaunchEnv
from blossom.errors import BlossomError, ModelError
from blossom.fsutil import atomic_dir, write_json, write_text
from blossom.memory import check_room, step_floor
from blossom.models import fit_attention, load_tiny_decoder, load_vae, n_params
from blossom.sampling import FAST_SAMPLER, FAST_SCHEDULERS, guidance_embedding
from blossom.train import checkpoint as ckpt
from blossom.train import distributed
from blossom.train.optim import adamw

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"
SIGMA_DATA = 0.5  # LCMScheduler's boundary-condition constants: training must use the sampler's
TIMESTEP_SCALING = 10.0


def boundary(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_skip, c_out of LCMScheduler.get_scalings_for_boundary_condition_discrete, per sample."""
    s = t.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s / (s**2 + SIGMA_DATA**2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def x0_eps(pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor, alphas: torch.Tensor, kind: str):
    """The clean-latent and noise estimates from a model output of either prediction type."""
    a = alphas[t].view(-1, 1, 1, 1)
    if kind == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * pred, a.sqrt() * pred + (1 - a).sqrt() * x
    return (x - (1 - a).sqrt() * pred) / a.sqrt(), pred


# A pruned student's blocks at the UNet's lowest resolution: each attention block there becomes its
# plain counterpart (the same resnets and resamplers, by the same names), and the mid-block goes.
PLAIN = {"CrossAttnDownBlock2D": "DownBlock2D", "CrossAttnUpBlock2D": "UpBlock2D"}


def pruned_config(config: dict) -> dict | None:
    """`config` without the attention and the mid-block at the lowest resolution (distill.
    prune_lowest_level), or None where it has no such attention blocks or no other level with
    attention: a student without cross-attention would read the prompt only through its pooled
    embedding, if at all."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if down[-1] not in PLAIN or up[0] not in PLAIN or not any(b in PLAIN for b in down[:-1]):
        return None
    down[-1], up[0] = PLAIN[down[-1]], PLAIN[up[0]]
    return {**config, "down_block_types": down, "up_block_types": up, "mid_block_type": None}


def is_pruned(teacher_config, student_config) -> bool:
    """Whether a student built by `student_from` left blocks out (its block types are the teacher's otherwise)."""
    return list(student_config["down_block_types"]) != list(teacher_config["down_block_types"])


def student_from(teacher, dim: int, prune: bool = False):
    """The teacher's UNet with a guidance-embedding input whose projection starts at zero, so the
    student starts as the teacher; with `prune`, less the blocks `pruned_config` leaves out (where
    it leaves any), the rest of its weights the teacher's."""
    from diffusers import UNet2DConditionModel

    # without diffusers' private keys: a config's `_use_default_values` would override what is set here
    config = {**{k: v for k, v in teacher.config.items() if not k.startswith("_")}, "time_cond_proj_dim": dim}
    lean = pruned_config(config) if prune else None
    student = UNet2DConditionModel.from_config(lean or config)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    left_out = (
        "mid_block.",
        f"down_blocks.{len(config['down_block_types']) - 1}.attentions.",
        "up_blocks.0.attentions.",
    )
    if any(not (lean and k.startswith(left_out)) for k in unexpected) or any("cond_proj" not in k for k in missing):
        raise ModelError(f"the teacher's UNet does not fit its student ({(missing + unexpected)[:3]}): report it")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student


def load_teacher(folder: Path):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if not (folder / "unet" / "config.json").exists() or not (folder / "blossom.json").exists():
        raise ModelError(f"no trained model at {folder} to distil: run `blossom train` and `blossom promote` first")
    info = json.loads((folder / "blossom.json").read_text())
    if info.get("distilled"):
        raise ModelError(f"{folder} is already a distilled model: distil its teacher (outputs/champion)")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval().requires_grad_(False)
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return unet, DDPMScheduler.from_config(sched_cfg), info


def distill(
    cfg: Config,
    cache_dir: Path,
    teacher_dir: Path,
    out_dir: Path,
    resume: str | None = None,
    launch: LaunchEnv = LaunchEnv(),
) -> dict:
    from diffusers.optimization import get_constant_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    d = cfg.distill
    # The loop's plumbing (processes, precision, clipping, checkpoints) reads a TrainConfig.
    c = dataclasses.replace(cfg.train, steps=d.steps, batch_size=d.batch_size, lr=d.lr, seed=d.seed)
    rt, c = distributed.start(launch, c)
    teacher, sched, info = load_teacher(teacher_dir)
    if info["text"]["encoder"] != cfg.text.encoder or info["text"]["max_tokens"] != cfg.text.max_tokens:
        raise BlossomError(
            f"the teacher was trained with text.encoder={info['text']['encoder']} and "
            f"text.max_tokens={info['text']['max_tokens']}, the config says {cfg.text.encoder} and "
            f"{cfg.text.max_tokens}: distil with the teacher's settings (and its cache)"
        )
    check_cache(cache_index(cache_dir), cfg.text.encoder, cfg.text.max_tokens, cfg.data.random_flip)
    # loaded (and refused) now, not after the distillation
    tiny = load_tiny_decoder(d.tiny_decoder, load_vae(teacher_dir / "vae")) if d.tiny_decoder else None
    ckpt_dir = out_dir / "checkpoints"
    # Checkpoints are valid for this teacher (by its weights' digest), these settings and this cache.
    # The decoder is not among them: changing it re-decodes a finished distillation, not redoes it.
    settings = [
        {k: v for k, v in dataclasses.asdict(d).items() if k != "tiny_decoder"},
        [c.mixed_precision, c.deepspeed, c.grad_clip, cfg.data.random_flip],
        ckpt.digest(teacher_dir / "unet" / WEIGHTS),
        (cache_dir / "index.json").read_text(),
    ]
    run_id = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    previous = (ckpt_dir / "run.txt").read_text().strip() if (ckpt_dir / "run.txt").exists() else None
    if resume == "auto" or (resume is None and launch.restart_count > 0):
        resume = "latest" if (ckpt_dir / "latest").exists() and previous == run_id else None
    path = ckpt.resolve(ckpt_dir, resume) if resume else None
    if rt.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        if not resume:
            ckpt_dir.mkdir(parents=True)
            write_text(ckpt_dir / "run.txt", run_id + "\n")
    rt.barrier()

    torch.manual_seed(d.seed)
    data = CacheSplit(cache_dir, "train")
    null_text = data.null_text
    student = student_from(teacher, d.guidance_embedding_dim, d.prune_lowest_level)
    if d.prune_lowest_level and not is_pruned(teacher.config, student.config) and rt.main:
        log.warning(
            "distill.prune_lowest_level: the teacher has no attention at its lowest level, or none elsewhere, "
            "so the student keeps every block"
        )
    student = fit_attention(student.to(rt.device), rt.device)
    fit_attention(teacher.to(rt.device), rt.device)
    target = copy.deepcopy(student).requires_grad_(False).eval()
    # The target network's weights live in an EMA at a fixed decay (min_decay = decay: no warm-up),
    # so they checkpoint and resume exactly as training's EMA does.
    ema = EMAModel(student.parameters(), decay=d.target_ema, min_decay=d.target_ema, use_ema_warmup=False)
    optimizer = adamw(student.parameters(), d.lr, 0.0)
    lr_scheduler = get_constant_schedule_with_warmup(optimizer, min(100, d.steps // 10))
    engine = distributed.Engine(student, optimizer, rt, c)
    alphas = sched.alphas_cumprod.to(rt.device)
    kind = sched.config.prediction_type
    k = sched.config.num_train_timesteps // d.solver_steps
    gen = torch.Generator().manual_seed(d.seed)
    flip_gen = torch.Generator().manual_seed(d.seed + 1)

    start, history = 0, []
    if path:
        state = ckpt.load_checkpoint(path, rt, engine, ema, lr_scheduler, gen, flip_gen)
        start, history = state["step"], state["history"]
        if rt.main:
            log.info("resumed from %s at step %d", path.name, start)
    ema.copy_to(target.parameters())
    if rt.main:
        save_config(cfg, out_dir / "config.yaml")
        log.info(
            "distilling %.2fM-parameter UNet: %d steps of %d, guidance %g-%g, %d-step solver grid",
            n_params(student) / 1e6,
            d.steps,
            d.batch_size,
            d.guidance_min,
            d.guidance_max,
            d.solver_steps,
        )
    index = data.index
    text_shape = (index["max_tokens"], index["text_dim"])
    # the student's training state, plus the teacher's and the target's weights
    need = step_floor(n_params(student), d.batch_size // rt.world, data.latent_shape, text_shape) + 8 * n_params(
        student
    )
    check_room(need, "one distillation step", "lower distill.batch_size (or raise the memory limit)")
    mine = rt.share(d.batch_size)
    running, t0 = [], time.time()
    student.train()
    bar = tqdm(range(start, d.steps), initial=start, total=d.steps, desc="distill", unit="step", disable=not rt.main)
    for step in bar:
        b = d.batch_size
        idx = torch.randint(len(data), (b,), generator=gen)
        noise = torch.randn((b, *data.latent_shape), generator=gen)
        t = (torch.randint(0, d.solver_steps, (b,), generator=gen) + 1) * k - 1
        w = d.guidance_min + (d.guidance_max - d.guidance_min) * torch.rand(b, generator=gen)
        flip = torch.rand(b, generator=flip_gen) < 0.5
        idx, noise, t, w, flip = idx[mine], noise[mine], t[mine], w[mine], flip[mine]
        x0, cond = data.batch(idx, flip if cfg.data.random_flip else None)
        cond = cond.to(rt.device)
        s = (t - k).clamp(min=0)
        xt = sched.add_noise(x0, noise, t)
        xt, t, s, w = (v.to(rt.device) for v in (xt, t, s, w))
        w_emb = guidance_embedding(w, d.guidance_embedding_dim).to(rt.device)

        with distributed.autocast(rt, c):
            pred = engine.forward(xt, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample.float()
        c_skip, c_out = boundary(t)
        out = c_skip * xt + c_out * x0_eps(pred, xt, t, alphas, kind)[0]
        with torch.no_grad(), distributed.autocast(rt, c):
            both = teacher(
                torch.cat([xt, xt]),
                torch.cat([t, t]),
                encoder_hidden_states=torch.cat([null_text.expand_as(cond), cond]),
            ).sample.float()
            (x0_u, eps_u), (x0_c, eps_c) = (x0_eps(p, xt, t, alphas, kind) for p in both.chunk(2))
            g = w.view(-1, 1, 1, 1)
            x0_g, eps_g = x0_u + g * (x0_c - x0_u), eps_u + g * (eps_c - eps_u)
            a_s = alphas[s].view(-1, 1, 1, 1)
            x_s = a_s.sqrt() * x0_g + (1 - a_s).sqrt() * eps_g  # one DDIM step of the guided teacher
            tgt = target(x_s, s, encoder_hidden_states=cond, timestep_cond=w_emb).sample.float()
            c_skip_s, c_out_s = boundary(s)
            goal = c_skip_s * x_s + c_out_s * x0_eps(tgt, x_s, s, alphas, kind)[0]
        loss = (((out - goal) ** 2 + d.huber_c**2).sqrt() - d.huber_c).mean()
        engine.step(loss)
        lr_scheduler.step()
        ema.step(student.parameters())
        ema.copy_to(target.parameters())

        done = step + 1
        running.append(loss.item())
        if done % d.log_every == 0 or done == d.steps:
            mean = rt.sum(torch.tensor([sum(running) / len(running)], dtype=torch.float64)).item() / rt.world
            history.append([done, round(mean, 6)])
            running = []
            bar.set_postfix(loss=f"{mean:.4f}")
        if done % d.checkpoint_every == 0 or done == d.steps:
            ckpt.save_checkpoint(
                ckpt_dir, done, rt, engine, ema, lr_scheduler, (gen, flip_gen), d.keep_checkpoints, {"history": history}
            )

    result = {
        "steps": d.steps,
        "loss_history": history,
        "distill_seconds_this_run": round(time.time() - t0, 1),
        "processes": rt.world,
    }
    if rt.main:
        with atomic_dir(out_dir / "model") as tmp:
            target.save_pretrained(tmp / "unet")  # the target network: the EMA the paper samples from
            write_student_files(teacher_dir, tmp, cfg, info, result, tiny)
    rt.stop(engine)
    return result


def write_student_files(
    teacher_dir: Path, folder: Path, cfg: Config, info: dict, result: dict, tiny_decoder=None
) -> None:
    """Everything of the student's folder but its UNet, which is already in `folder`/unet.
    tiny_decoder: the AutoencoderTiny (models.load_tiny_decoder) the student decodes with, or None
    for the teacher's VAE."""
    d = cfg.distill
    if tiny_decoder is not None:
        tiny_decoder.save_pretrained(folder / "vae")
    else:
        shutil.copytree(teacher_dir / "vae", folder / "vae")
    teacher_sched = json.loads((teacher_dir / "scheduler" / "scheduler_config.json").read_text())
    cls = FAST_SCHEDULERS[FAST_SAMPLER]
    accepted = inspect.signature(cls.__init__).parameters
    base = {k: v for k, v in teacher_sched.items() if k in accepted}  # DDPM's variance_type has no meaning here
    cls(**base, original_inference_steps=d.solver_steps, timestep_scaling=TIMESTEP_SCALING).save_pretrained(
        folder / "scheduler"
    )

    def read(name: str) -> dict:
        return json.loads((teacher_dir / name).read_text()) if (teacher_dir / name).exists() else {}

    teacher_info = read("train.json")
    unet_configs = [json.loads((f / "unet" / "config.json").read_text()) for f in (teacher_dir, folder)]
    write_json(
        folder / "blossom.json",
        {
            **info,
            "distilled": {
                "method": "latent consistency distillation",
                "sampler": FAST_SAMPLER,
                "default_steps": d.default_steps,
                "max_steps": d.max_steps,
                "guidance_range": [d.guidance_min, d.guidance_max],
                "guidance_embedding_dim": d.guidance_embedding_dim,
                "decoder": "tiny" if tiny_decoder is not None else "teacher's",
                "pruned": is_pruned(*unet_configs),
                "teacher_run": read("champion.json").get("run_id"),  # the MLflow run, for a champion
            },
        },
    )
    write_json(folder / "train.json", {**teacher_info, "distill": result})
