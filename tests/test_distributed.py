"""Many processes train like one, and a killed run resumes to the same weights.

Real processes throughout: torchrun with two CPU workers over gloo (DDP and DeepSpeed ZeRO-2),
and `kill -9` on a training subprocess, also in the middle of a checkpoint write.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import killed_after, micro_args
from safetensors.torch import load_file
from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = ROOT / "configs" / "deepspeed_zero2.json"
STEPS = 6


def run_root(paths, root: Path) -> Path:
    """A fresh outputs folder that shares the micro data's VAE and cache."""
    root.mkdir(parents=True)
    for name in ("vae", "cache"):
        shutil.copytree(getattr(paths, name), root / name)
    return root


def train_cmd(
    root: Path, *extra: str, procs: int = 1, torchrun_args: tuple[str, ...] = (), accelerate: bool = False
) -> list[str]:
    args = [*micro_args(root), *extra]
    if procs == 1:
        return [sys.executable, "-m", "blossom.cli", *args]
    if accelerate:  # the shipped config, as a GPU user runs it; on this CPU machine it trains over gloo
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "configs" / "accelerate_multi_gpu.yaml"),
            "--num_processes",
            str(procs),
            "--main_process_port",
            str(free_port()),
            "-m",
            "blossom.cli",
            *args,
        ]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(procs),
        "--standalone",
        *torchrun_args,
    ]
    return [*launcher, "-m", "blossom.cli", *args]


def train(root: Path, *extra: str, procs: int = 1, resume: str | None = None, accelerate: bool = False):
    cmd = (
        train_cmd(root, *extra, procs=procs, accelerate=accelerate)
        + ["train"]
        + (["--resume", resume] if resume else [])
    )
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def weights(root: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(root / "train" / "checkpoints" / f"step-{step:06d}" / "model.safetensors")


def ema_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "train" / "model" / "unet" / "diffusion_pytorch_model.safetensors")


def relative_difference(a: dict, b: dict, skip: tuple[str, ...] = ()) -> float:
    """Largest per-tensor ||a - b|| / ||a||."""
    return max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a if not k.endswith(skip))


def stats_steps(root: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (root / "train" / "stats.jsonl").read_text().splitlines()]


# The attention-pooling key bias gets no gradient by construction (softmax ignores a shift shared
# by all keys), so its "gradient" is float round-off, which Adam scales up to full ±lr steps.
GRADIENT_FREE = ("add_embedding.pool.k_proj.bias",)


@pytest.mark.slow
def test_two_processes_train_like_one_with_ddp_under_accelerate_and_deepspeed_zero2_under_torchrun(
    micro_prepared, tmp_path
):
    _, paths = micro_prepared
    steps = f"train.steps={STEPS}"
    single = run_root(paths, tmp_path / "single")
    train(single, "--set", steps)
    ddp = run_root(paths, tmp_path / "ddp")
    train(ddp, "--set", steps, procs=2, accelerate=True)
    zero2 = run_root(paths, tmp_path / "zero2")
    train(zero2, "--set", steps, "--set", f"train.deepspeed={ZERO2}", procs=2)

    one = weights(single, STEPS)
    for run in (ddp, zero2):
        # Each rank saw half of every global batch; the all-reduced gradient differs from one
        # process's only in the order of float sums. Adam scales each entry's step by its own
        # gradient history, so that noise moves small tensors (a norm's bias) by ~1e-5 of their
        # norm; a rank's lost batch would move them by orders more.
        assert relative_difference(one, weights(run, STEPS), skip=GRADIENT_FREE) < 1e-4
        assert relative_difference(ema_weights(single), ema_weights(run), skip=GRADIENT_FREE) < 1e-4
        assert stats_steps(run) == list(range(1, STEPS + 1))
        info = json.loads((run / "train" / "model" / "train.json").read_text())
        assert info["processes"] == 2
        val = info["val_history"]
        single_val = json.loads((single / "train" / "model" / "train.json").read_text())["val_history"]
        assert val[-1][1] == pytest.approx(single_val[-1][1], rel=1e-5)  # all-reduced over the ranks' val shares
    # ZeRO-2 keeps one optimizer shard per rank; DDP one whole optimizer state.
    names = {p.name for p in (zero2 / "train" / "checkpoints" / f"step-{STEPS:06d}").iterdir()}
    assert {"optimizer-rank0.safetensors", "optimizer-rank1.safetensors", "rng-rank1.safetensors"} <= names
    assert not (ddp / "train" / "checkpoints" / f"step-{STEPS:06d}" / "optimizer-rank0.safetensors").exists()

    # ZeRO-2 resumes from its sharded checkpoint to the uninterrupted run's weights, bit for bit.
    cut = run_root(paths, tmp_path / "zero2-cut")
    killed_after(zero2 / "train", cut / "train", 4)
    train(cut, "--set", steps, "--set", f"train.deepspeed={ZERO2}", procs=2, resume="latest")
    a, b = weights(zero2, STEPS), weights(cut, STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a)


KILL_STEPS = 24  # long enough that a kill lands mid-run, short enough for CI
# The kill runs average their weights (the tiny default does not), so that resuming must restore
# the EMA and its counters exactly too.
KILL_EMA = ("--set", "train.ema_decay=0.999")


def start_training(
    root: Path, resume: str | None, procs: int = 1, torchrun_args: tuple[str, ...] = ()
) -> subprocess.Popen:
    cmd = train_cmd(root, "--set", f"train.steps={KILL_STEPS}", *KILL_EMA, procs=procs, torchrun_args=torchrun_args)
    cmd += ["train"] + (["--resume", resume] if resume else [])
    log = open(root / "train.log", "a")  # a file, not a pipe: nobody reads a pipe while training runs
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def log_of(root: Path) -> str:
    return (root / "train.log").read_text()


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"training ended before the kill: {proc.args}"
        assert time.time() < end, "timed out waiting to kill"
        time.sleep(0.0005)


def latest_step(root: Path) -> int:
    pointer = root / "train" / "checkpoints" / "latest"
    return int(pointer.read_text().strip().split("-")[1]) if pointer.exists() else 0


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def saving(root: Path) -> bool:
    ckpts = root / "train" / "checkpoints"
    return ckpts.exists() and any(e.name.endswith(".tmp") for e in os.scandir(ckpts))


@pytest.mark.slow
def test_kill_9_mid_run_and_mid_save_then_resume_equals_an_uninterrupted_run(micro_prepared, tmp_path):
    _, paths = micro_prepared
    straight = run_root(paths, tmp_path / "straight")
    train(straight, "--set", f"train.steps={KILL_STEPS}", *KILL_EMA)

    killed = run_root(paths, tmp_path / "killed")
    # 1: killed between checkpoints, once the first one is in place.
    proc = start_training(killed, None)
    wait_for(proc, lambda: latest_step(killed) >= 2)
    kill(proc)
    # 2: killed while a checkpoint folder is being written (it exists only under its temp name then).
    caught_mid_save = False
    for _ in range(5):
        before = latest_step(killed)
        proc = start_training(killed, "latest")
        wait_for(proc, lambda before=before: latest_step(killed) > before and saving(killed))
        kill(proc)
        caught_mid_save = saving(killed)
        if caught_mid_save:
            break
    assert caught_mid_save, "no kill landed inside a checkpoint write in 5 tries"
    ckpts = killed / "train" / "checkpoints"
    # `latest` still names a complete checkpoint: the half-written one is only a temp folder.
    assert (ckpts / (ckpts / "latest").read_text().strip() / "state.json").exists()
    # 3: resumed to the end (leftover temp folders are cleaned up by the next save).
    assert start_training(killed, "latest").wait(timeout=300) == 0, log_of(killed)[-3000:]
    assert not saving(killed)

    a, b = weights(straight, KILL_STEPS), weights(killed, KILL_STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    ea, eb = ema_weights(straight), ema_weights(killed)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # Counters survive several resumes: each step logged once, scheduler and optimizer at the last step.
    assert stats_steps(killed) == list(range(1, KILL_STEPS + 1))
    state = json.loads((ckpts / f"step-{KILL_STEPS:06d}" / "state.json").read_text())
    assert state["step"] == state["lr_scheduler"]["last_epoch"] == state["ema"]["optimization_step"] == KILL_STEPS
    opt = load_file(ckpts / f"step-{KILL_STEPS:06d}" / "optimizer.safetensors")
    assert {float(v) for k, v in opt.items() if k.endswith(".step")} == {float(KILL_STEPS)}
    s_straight = [json.loads(x) for x in (straight / "train" / "stats.jsonl").read_text().splitlines()]
    s_killed = [json.loads(x) for x in (killed / "train" / "stats.jsonl").read_text().splitlines()]
    assert [(s["images_seen"], s["loss"]) for s in s_straight] == [(s["images_seen"], s["loss"]) for s in s_killed]


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_training_resumes_by_itself(micro_prepared, tmp_path):
    import psutil

    _, paths = micro_prepared
    straight = run_root(paths, tmp_path / "straight")
    assert start_training(straight, None, procs=2).wait(timeout=300) == 0, log_of(straight)[-3000:]

    spot = run_root(paths, tmp_path / "spot")
    proc = start_training(spot, None, procs=2, torchrun_args=("--max-restarts", "1"))
    wait_for(proc, lambda: latest_step(spot) >= 4)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    workers[1].kill()  # the spot interruption: one worker dies, torchrun restarts the group
    assert proc.wait(timeout=300) == 0, log_of(spot)[-3000:]
    assert "resumed from step-" in log_of(spot)  # the restarted workers found `latest` without being told
    a, b = weights(straight, KILL_STEPS), weights(spot, KILL_STEPS)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert stats_steps(spot) == list(range(1, KILL_STEPS + 1))


def test_stopping_lets_go_of_the_ddp_wrapper_before_the_process_group(micro_cfg, monkeypatch):
    """DDP's C++ reducer must not be the process group's last owner: freed with the GIL held, it
    joins gloo's threads while one of them waits for that GIL (a hang at exit, seen in CI with both
    ranks on one core). stop() lets go of the wrapper while the group is still registered."""
    import weakref

    import torch.distributed as dist

    from blossom.train import distributed

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        rt = distributed.Runtime(0, 2, torch.device("cpu"), True)  # two ranks' path, on a group of one
        module = torch.nn.Linear(4, 4)
        engine = distributed.Engine(module, torch.optim.SGD(module.parameters(), lr=0.1), rt, micro_cfg.train)
        engine.step(engine.forward(torch.randn(2, 4)).sum())
        wrapper = weakref.ref(engine.forward)
        assert isinstance(wrapper(), torch.nn.parallel.DistributedDataParallel)
        seen = []
        destroy = dist.destroy_process_group
        monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: (seen.append(wrapper()), destroy()))
        rt.stop(engine)
        assert seen == [None] and engine.forward is module
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_deepspeed_without_a_launcher_says_how_to_launch(micro_prepared, tmp_path):
    import dataclasses

    from blossom.errors import ConfigError
    from blossom.train.diffusion import train_diffusion

    cfg, paths = micro_prepared
    ds = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, deepspeed=str(ZERO2)))
    with pytest.raises(ConfigError, match="train.deepspeed needs a launcher: torchrun"):
        train_diffusion(ds, paths.cache, paths.vae, tmp_path / "train")


@pytest.mark.slow
def test_two_processes_distil_like_one(micro_exported, micro_prepared, tmp_path):
    """`blossom distill` under torchrun (DDP over gloo): each rank distils its half of every batch,
    and the student equals one process's up to the order of float sums."""
    teacher, _, _ = micro_exported
    _, paths = micro_prepared
    settings = [
        "--set",
        "distill.steps=4",
        "--set",
        "distill.batch_size=8",
        "--set",
        "distill.guidance_embedding_dim=16",
    ]
    roots = {}
    for procs in (1, 2):
        root = roots[procs] = run_root(paths, tmp_path / f"p{procs}")
        if procs == 1:
            subprocess.run(train_cmd(root) + ["classifier"], check=True, capture_output=True, timeout=600)
        else:
            shutil.copytree(roots[1] / "classifier", root / "classifier")
        cmd = train_cmd(root, *settings, procs=procs) + ["distill", "--teacher", str(teacher), "--no-register"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert ("INFO [rank 0/2] blossom.train.distill: distilling" in res.stderr) == (procs == 2)
    student = {
        p: load_file(r / "distill" / "checkpoints" / "step-000004" / "model.safetensors") for p, r in roots.items()
    }
    # Over the whole weight vector: four steps of lr 1e-4 leave some biases near zero, where Adam's
    # normalisation lifts float-order differences of near-zero gradients to a large share of a tiny
    # norm (measured per tensor: up to 4e-4, in a norm bias of norm 0.015; whole vector: 9e-7).
    a, b = student[1], student[2]
    keys = [k for k in a if not k.endswith(GRADIENT_FREE)]
    whole = (sum((a[k] - b[k]).norm() ** 2 for k in keys) / sum(a[k].norm() ** 2 for k in keys)).sqrt()
    assert whole < 1e-5
    info = {p: json.loads((r / "distill" / "model" / "train.json").read_text())["distill"] for p, r in roots.items()}
    assert info[2]["processes"] == 2
    assert [h[1] for h in info[2]["loss_history"]] == pytest.approx([h[1] for h in info[1]["loss_history"]], rel=1e-4)


def test_two_processes_build_the_cache_one_process_builds(micro_prepared, tmp_path):
    from blossom.data.cache import cache_index, load_cache

    _, paths = micro_prepared
    root = tmp_path / "out"
    root.mkdir()
    for name in ("data", "vae"):
        shutil.copytree(getattr(paths, name), root / name)
    # in fp32, as the one-process reference was built (auto would pick bf16 on some CPUs)
    cmd = train_cmd(root, "--set", "cache.precision=fp32", procs=2) + ["cache"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = cache_index(paths.cache), cache_index(root / "cache")
    assert two["splits"] == one["splits"] and two["text"] == one["text"]
    for split in ("train", "val"):
        a, b = load_cache(paths.cache, split), load_cache(root / "cache", split)
        # Each rank encoded its own shards with its own threads: equal up to float summation order.
        assert all(torch.allclose(a[k], b[k], atol=1e-3, rtol=2e-3) for k in a)
    assert not list(root.glob(".cache.build-*"))
