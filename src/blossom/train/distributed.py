"""One process or many, same loop: plain PyTorch, DDP (gloo on CPU, NCCL on GPU) or DeepSpeed ZeRO.

Every rank draws the same global batch from the same generator and trains on its own slice of
it, so N processes with a global batch B step exactly like one process with batch B (up to the
order of floating-point sums in the gradient all-reduce).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from blossom.config import TrainConfig
from blossom.env import LaunchEnv
from blossom.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    launched: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous share of n items (equal shares when the world size divides n)."""
        bounds = [n * r // self.world for r in range(self.world + 1)]
        return slice(bounds[self.rank], bounds[self.rank + 1])

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def stop(self, engine: Engine | None = None) -> None:
        if self.world > 1:
            if engine is not None:
                engine.close()
            # Without the barrier a rank that finishes first tears down the group under the others.
            dist.barrier()
            dist.destroy_process_group()


def start(launch: LaunchEnv, c: TrainConfig) -> tuple[Runtime, TrainConfig]:
    """This process's runtime, and the config the loop runs: `mixed_precision: auto` made
    concrete for its device before anything depends on it (autocast, DeepSpeed's config, the
    checkpoints' fingerprint)."""
    if launch.world_size > 1 and c.batch_size % launch.world_size:
        raise ConfigError(
            f"train.batch_size {c.batch_size} does not split over {launch.world_size} processes: "
            f"make it a multiple of {launch.world_size}"
        )
    rt = connect(launch)
    return rt, concrete_precision(c, rt.device)


def local_device(local_rank: int = 0) -> torch.device:
    """Where this process computes: its GPU when PyTorch sees CUDA, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def connect(launch: LaunchEnv) -> Runtime:
    """This process's place in the launch, with the process group up when there are several."""
    device = local_device(launch.local_rank)
    cuda = device.type == "cuda"
    if launch.world_size == 1:
        return Runtime(0, 1, device, launch.launched)
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torchrun keeps one key-value store across --max-restarts; without a prefix per attempt, the
        # restarted workers read the dead workers' addresses from it and fail to connect.
        store, rank, world = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"blossom/attempt-{launch.restart_count}", store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world)
    return Runtime(launch.rank, launch.world_size, device, True)


def concrete_precision(c: TrainConfig, device: torch.device) -> TrainConfig:
    """`mixed_precision: auto` for this device: bf16 where the device computes bf16 natively,
    else no: a CPU without AVX512-BF16 or AMX emulates bf16, slower than fp32."""
    if c.mixed_precision != "auto":
        return c
    from blossom.cpu import pick_precision

    precision, why = pick_precision("auto", device)
    log.info("train.mixed_precision auto: %s (%s)", precision, why)
    return dataclasses.replace(c, mixed_precision="bf16" if precision == "bf16" else "no")


def autocast(rt: Runtime, c: TrainConfig):
    if c.mixed_precision == "no":
        return torch.autocast(rt.device.type, enabled=False)
    # fp16 also runs on CPU (slowly): what a T4 user trains with can be checked anywhere
    return torch.autocast(rt.device.type, dtype=torch.bfloat16 if c.mixed_precision == "bf16" else torch.float16)


def deepspeed_config(c: TrainConfig, world: int) -> dict:
    """The user's DeepSpeed JSON with the keys that params.yaml owns filled in from it."""
    path = Path(c.deepspeed)
    if not path.is_file():
        raise ConfigError(
            f"train.deepspeed {path} not found: point it at a DeepSpeed JSON such as configs/deepspeed_zero2.json"
        )
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed {path} is not valid JSON ({e}): fix the file") from None
    ds.update(
        train_batch_size=c.batch_size,
        train_micro_batch_size_per_gpu=c.batch_size // world,
        gradient_accumulation_steps=1,
        gradient_clipping=c.grad_clip,
    )
    ds["bf16"] = {"enabled": c.mixed_precision == "bf16"}
    ds["fp16"] = {"enabled": c.mixed_precision == "fp16"}
    return ds


class Engine:
    """The model as the loop drives it: forward, then one optimizer step. Plain, DDP or DeepSpeed."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, c: TrainConfig):
        self.module, self.optimizer, self.grad_clip, self.ds = module, optimizer, c.grad_clip, None
        self.forward = module
        # fp16 gradients of small losses underflow to zero: scale the loss up, and the gradients
        # back down before clipping (DeepSpeed does the same itself when its fp16 is on)
        self.scaler = torch.amp.GradScaler(rt.device.type) if c.mixed_precision == "fp16" and not c.deepspeed else None
        if c.deepspeed:
            try:
                import deepspeed
            except ImportError:
                raise ConfigError(
                    "train.deepspeed is set but DeepSpeed is not installed: pip install 'blossom[deepspeed]'"
                ) from None
            if not rt.launched:
                raise ConfigError(
                    "train.deepspeed needs a launcher: torchrun --standalone --nproc_per_node N "
                    "-m blossom.cli train (or unset train.deepspeed to train in one process)"
                )
            self.config = deepspeed_config(c, rt.world)
            self.ds, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=self.config)
            self.forward = self.ds
        elif rt.world > 1:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            self.forward = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def close(self) -> None:
        """Let go of the DDP wrapper while the process group is still registered.

        DDP's C++ reducer holds the group; were it the group's last owner, freeing the wrapper
        would join gloo's worker threads while holding the GIL, and a worker still letting go of a
        finished all-reduce's Python tensors waits for that GIL: a hang at exit (seen with both
        ranks on one core). Dropped here, the group's last owner is the registry, whose handle
        releases the GIL as it destroys the group."""
        self.forward = self.ds if self.ds is not None else self.module

    @property
    def sharded(self) -> bool:
        """Whether each rank holds only part of the optimizer state (ZeRO), so each saves its own."""
        return self.ds is not None

    def step(self, loss: torch.Tensor) -> float:
        """Backward, clip, update; returns the global gradient norm before clipping."""
        if self.ds is not None:
            self.ds.backward(loss)
            self.ds.step()
            return float(self.ds.get_global_grad_norm() or 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
            self.optimizer.step()
            return float(norm)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
        self.scaler.update()
        return float(norm)

    def optimizer_state(self) -> dict:
        if self.ds is None:
            state = self.optimizer.state_dict()
            return {**state, "grad_scaler": self.scaler.state_dict()} if self.scaler else state
        # ZeRO's state: this rank's partition of the Adam moments and fp32 master weights, plus layout.
        sd = self.optimizer.state_dict()
        keep = (
            "base_optimizer_state",
            "single_partition_of_fp32_groups",
            "zero_stage",
            "group_paddings",
            "param_alignment_paddings",
            "partition_count",
            "ds_version",
            "clip_grad",
            "overflow",
            "dynamic_loss_scale",
        )
        return {k: (int(v) if k == "zero_stage" else v) for k, v in sd.items() if k in keep}

    def load_optimizer_state(self, state: dict, world: int, rank: int) -> None:
        if self.ds is None:
            scaler = state.pop("grad_scaler", None)
            if (scaler is None) != (self.scaler is None):
                raise ConfigError(
                    "the checkpoint was written with another train.mixed_precision (fp16 keeps a gradient "
                    "scaler): resume with the setting it was written with"
                )
            self.optimizer.load_state_dict(state)
            if self.scaler is not None:
                self.scaler.load_state_dict(scaler)
            return
        # DeepSpeed reads only this rank's entry of the list for a checkpoint of the same layout.
        self.optimizer.load_state_dict(
            [state if r == rank else None for r in range(world)],
            load_optimizer_states=True,
            load_from_fp32_weights=True,
        )
