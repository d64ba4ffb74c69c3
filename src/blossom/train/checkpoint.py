"""Training checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a folder `step-NNNNNN/`; the file `latest` names the newest complete one and is
flipped only after that folder is in place, so a kill at any moment leaves a usable `latest`.
`manifest.json`, written last, holds every file's size and SHA-256: a checkpoint damaged later
(a truncated copy, a full disk, bit rot on a spot machine's volume) is found before it is
trusted, and resuming from `latest` falls back to the newest intact one.
Optimizer and RNG states go through `pack`: tensors to safetensors, the rest to JSON, no pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from blossom.errors import BlossomError
from blossom.fsutil import write_json, write_text

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    write_json(folder / MANIFEST, {p.name: {"bytes": p.stat().st_size, "sha256": digest(p)} for p in files})


def damage(folder: Path) -> str | None:
    """Why the checkpoint cannot be trusted, or None when every file matches its manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST}"
    for name, want in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {want['bytes']} were written"
        if digest(path) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def pack(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Split a nested state (dicts, lists, tensors, scalars) into safetensors-ready tensors and a JSON skeleton."""
    if torch.is_tensor(obj):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) for k in obj):  # optimizer states are keyed by parameter index
            return {"__int_keys__": {str(k): pack(v, tensors, f"{path}.{k}") for k, v in obj.items()}}
        return {str(k): pack(v, tensors, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    return obj


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__int_keys__" in obj:
            return {int(k): unpack(v, tensors) for k, v in obj["__int_keys__"].items()}
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


def save_state(folder: Path, name: str, state: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = pack(state, tensors)
    save_file(tensors, folder / f"{name}.safetensors")
    write_json(folder / f"{name}.json", skeleton)


def load_state(folder: Path, name: str) -> Any:
    return unpack(json.loads((folder / f"{name}.json").read_text()), load_file(folder / f"{name}.safetensors"))


def rng_state(generators: tuple[torch.Generator, ...]) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
        "python": repr(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generators: tuple[torch.Generator, ...]) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    for g, saved in zip(generators, state["generators"], strict=True):
        g.set_state(saved)
    random.setstate(ast.literal_eval(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    ckpt_dir: Path,
    step: int,
    rt,
    engine,
    ema,
    lr_scheduler,
    generators: tuple[torch.Generator, ...],
    keep: int,
    extra: dict,
) -> Path:
    """Rank 0 writes the checkpoint (with every rank's RNG state, gathered); under ZeRO each rank adds
    its optimizer shard.

    The folder is built under a temp name and renamed whole by rank 0; only then does `latest`
    flip. A kill at any moment leaves `latest` naming a complete checkpoint. Only ZeRO shards need
    the checkpoint folder on storage that all machines share; DDP runs need it on rank 0's only.
    """
    name = f"step-{step:06d}"
    tmp = ckpt_dir / f".{name}.tmp"
    rngs = rt.gather(rng_state(generators))
    if rt.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if engine.sharded:
        rt.barrier()
        save_state(tmp, f"optimizer-rank{rt.rank}", engine.optimizer_state())
        rt.barrier()
    if rt.main:
        for rank, rng in enumerate(rngs):
            save_state(tmp, f"rng-rank{rank}", rng)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in engine.module.state_dict().items()}, tmp / "model.safetensors"
        )
        ema_state = ema.state_dict()
        save_file(
            {f"{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema_state.pop("shadow_params"))},
            tmp / "ema.safetensors",
        )
        if not engine.sharded:
            save_state(tmp, "optimizer", engine.optimizer_state())
        write_json(
            tmp / "state.json",
            {
                "step": step,
                "ema": ema_state,
                "lr_scheduler": lr_scheduler.state_dict(),
                "world_size": rt.world,
                "sharded_optimizer": engine.sharded,
                **extra,
            },
        )
        write_manifest(tmp)
        final = ckpt_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text(ckpt_dir / "latest", name + "\n")
        done = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_dir.glob(".step-*.tmp"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
    rt.barrier()
    return ckpt_dir / name


def resolve(ckpt_dir: Path, which: str) -> Path:
    """The checkpoint to resume: `latest`, or the newest intact one before it if it is damaged
    (said in a warning); a named folder only if it is intact."""
    if which != "latest":
        path = Path(which)
        if not (path / "state.json").exists():
            raise BlossomError(f"{path} is not a complete checkpoint: pass --resume latest or a step-NNNNNN folder")
        if (why := damage(path)) is not None:
            raise BlossomError(f"checkpoint {path} is damaged ({why}): pass --resume latest or another step folder")
        return path
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        raise BlossomError(f"no checkpoint in {ckpt_dir} to resume from: run `blossom train` without --resume")
    named = ckpt_dir / pointer.read_text().strip()
    candidates = [named, *sorted((p for p in ckpt_dir.glob("step-*") if p.is_dir() and p != named), reverse=True)]
    problems = []
    for path in candidates:
        why = damage(path)
        if why is None:
            if problems:
                log.warning("checkpoint %s; resuming from %s, the newest intact one", "; ".join(problems), path.name)
            return path
        problems.append(f"{path.name} is damaged ({why})")
    raise BlossomError(
        f"no intact checkpoint in {ckpt_dir} ({'; '.join(problems)}): start a fresh run without --resume"
    )


def load_checkpoint(path: Path, rt, engine, ema, lr_scheduler, *generators: torch.Generator) -> dict:
    state = json.loads((path / "state.json").read_text())
    if "sharded_optimizer" not in state:
        raise BlossomError(f"{path} is in an older blossom checkpoint format: start a fresh run (without --resume)")
    if state["sharded_optimizer"] != engine.sharded or (engine.sharded and state["world_size"] != rt.world):
        how = (
            f"DeepSpeed ZeRO over {state['world_size']} processes"
            if state["sharded_optimizer"]
            else "without DeepSpeed"
        )
        raise BlossomError(f"{path} was written {how}: resume it the same way (train.deepspeed and the process count)")
    engine.module.load_state_dict({k: v.to(rt.device) for k, v in load_file(path / "model.safetensors").items()})
    ema_tensors = load_file(path / "ema.safetensors")
    ema.load_state_dict(
        {**state["ema"], "shadow_params": [ema_tensors[str(i)].to(rt.device) for i in range(len(ema_tensors))]}
    )
    shard = f"optimizer-rank{rt.rank}" if engine.sharded else "optimizer"
    engine.load_optimizer_state(load_state(path, shard), state["world_size"], rt.rank)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    # A DDP run resumed on another process count reads rank 0's generator: all ranks draw the same batches.
    rng = path / f"rng-rank{rt.rank}.json"
    set_rng_state(load_state(path, rng.stem if rng.exists() else "rng-rank0"), generators)
    return state
