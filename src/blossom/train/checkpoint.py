"""Training checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a folder `step-NNNNNN/`; the file `latest` names the newest complete one and is
flipped only after that folder is in place, so a kill at any moment leaves a usable `latest`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from blossom.errors import BlossomError
from blossom.fsutil import atomic_dir, write_json, write_text


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    np_state = np.random.get_state()
    return (
        {"torch": torch.get_rng_state(), "generator": generator.get_state()},
        {"python": repr(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
    )


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, generator: torch.Generator) -> None:
    import ast

    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["generator"])
    random.setstate(ast.literal_eval(meta["python"]))
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(
    ckpt_dir: Path, step: int, model, ema, optimizer, lr_scheduler, generator: torch.Generator, keep: int, extra: dict
) -> Path:
    name = f"step-{step:06d}"
    with atomic_dir(ckpt_dir / name) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        ema_state = ema.state_dict()
        save_file({f"{i}": p.contiguous() for i, p in enumerate(ema_state.pop("shadow_params"))}, tmp / "ema.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng_tensors, rng_meta = rng_state(generator)
        save_file(rng_tensors, tmp / "rng.safetensors")
        write_json(
            tmp / "state.json",
            {"step": step, "ema": ema_state, "optimizer": opt_meta, "lr_scheduler": lr_scheduler.state_dict(),
             "rng": rng_meta, **extra},
        )
    write_text(ckpt_dir / "latest", name + "\n")
    done = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return ckpt_dir / name


def resolve(ckpt_dir: Path, which: str) -> Path:
    if which == "latest":
        pointer = ckpt_dir / "latest"
        if not pointer.exists():
            raise BlossomError(f"no checkpoint in {ckpt_dir} to resume from: run `blossom train` without --resume")
        path = ckpt_dir / pointer.read_text().strip()
    else:
        path = Path(which)
    if not (path / "state.json").exists():
        raise BlossomError(f"{path} is not a complete checkpoint: pass --resume latest or a step-NNNNNN folder")
    return path


def load_checkpoint(path: Path, model, ema, optimizer, lr_scheduler, generator: torch.Generator) -> dict:
    state = json.loads((path / "state.json").read_text())
    model.load_state_dict(load_file(path / "model.safetensors"))
    ema_tensors = load_file(path / "ema.safetensors")
    ema.load_state_dict({**state["ema"], "shadow_params": [ema_tensors[str(i)] for i in range(len(ema_tensors))]})
    optimizer.load_state_dict(_unflatten_optimizer(load_file(path / "optimizer.safetensors"), state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    set_rng_state(load_file(path / "rng.safetensors"), state["rng"], generator)
    return state
