"""Kill training with SIGKILL inside checkpoint writes, N times, and count corrupt `latest` pointers.

Prepares a micro data set, VAE and cache once, then repeatedly starts `blossom train --resume
auto`, waits until a checkpoint folder is being written (it exists only under its temp name
then), kills the process group with SIGKILL and checks that `latest` names a complete
checkpoint. Finally resumes to the end and compares the weights with an uninterrupted run.

    .venv/bin/python benchmarks/kill_resume.py [--kills 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

SETS = [
    "data.image_size=32",
    "data.train_size=96",
    "data.val_size=16",
    "vae.block_out_channels=[8,16,16]",
    "vae.norm_num_groups=4",
    "vae.steps=3",
    "vae.batch_size=8",
    "vae.crop=16",
    "unet.block_out_channels=[16,32]",
    "unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
    "unet.up_block_types=[CrossAttnUpBlock2D,UpBlock2D]",
    "unet.norm_num_groups=8",
    "unet.attention_head_dim=4",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.checkpoint_every=2",
    "train.val_every=2",
    "train.log_every=1",
    "text.max_tokens=16",
]


def blossom(root: Path, steps: int, *args: str) -> list[str]:
    sets = [a for s in [*SETS, f"train.steps={steps}", f"outputs={root}"] for a in ("--set", s)]
    return [sys.executable, "-m", "blossom.cli", *sets, *args]


def latest(ckpts: Path) -> int:
    pointer = ckpts / "latest"
    return int(pointer.read_text().strip().split("-")[1]) if pointer.exists() else 0


def saving(ckpts: Path) -> bool:
    return ckpts.exists() and any(e.name.endswith(".tmp") for e in os.scandir(ckpts))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="blossom-kill-") as tmp:
        root, straight = Path(tmp) / "killed", Path(tmp) / "straight"
        for stage in ("data", "train-vae", "cache"):
            subprocess.run(blossom(root, args.steps, stage), check=True, capture_output=True)
        subprocess.run(["cp", "-r", str(root), str(straight)], check=True)
        subprocess.run(blossom(straight, args.steps, "train"), check=True, capture_output=True)
        ckpts = root / "train" / "checkpoints"
        mid_save = corrupt = 0
        for _ in range(args.kills):
            proc = subprocess.Popen(
                blossom(root, args.steps, "train", "--resume", "auto"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            before = latest(ckpts)
            # Wait for a write after a new `latest` exists, so every run makes progress before its kill.
            while proc.poll() is None and not (latest(ckpts) > before and saving(ckpts)):
                time.sleep(0.0005)
            if proc.poll() is not None:
                break  # training finished before the kill
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            mid_save += saving(ckpts)
            pointer = ckpts / "latest"
            corrupt += not (pointer.exists() and (ckpts / pointer.read_text().strip() / "state.json").exists())
        subprocess.run(blossom(root, args.steps, "train", "--resume", "auto"), check=True, capture_output=True)
        last = f"step-{args.steps:06d}"
        a = load_file(straight / "train" / "checkpoints" / last / "model.safetensors")
        b = load_file(ckpts / last / "model.safetensors")
        same = all(torch.equal(a[k], b[k]) for k in a)
        print(
            f"{args.kills} kills: {mid_save} landed inside a checkpoint write, {corrupt} left a corrupt `latest`; "
            f"final weights {'equal' if same else 'DIFFER from'} the uninterrupted run's"
        )


if __name__ == "__main__":
    main()
