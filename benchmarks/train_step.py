"""The training step in fp32, under bf16 autocast (`train.mixed_precision: bf16`) and in
channels-last memory, side by side in one process on the preset's UNet.

The step is the one `blossom train` takes (forward, v-target MSE, backward, fused AdamW) on random
latents and text states of the cache's shapes; only the precision, memory format or optimizer
kernel differs (`foreach AdamW` is PyTorch's default, what blossom used before the fused one).
Prints the median ms per step of each and its speed relative to fp32. `--profile` then splits
the fp32 step into convolutions, matrix products and the rest: the FLOPs each does (PyTorch's
FLOP counter) against the time it takes (PyTorch's profiler), so a step can be read against the
machine's peak (printed first).

    .venv/bin/python benchmarks/train_step.py [--preset tiny] [--batch 64] [--rounds 6] [--profile]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import median_seconds, unet_shapes

from blossom.models import build_unet, fit_attention
from blossom.train.optim import adamw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--profile", action="store_true", help="also split the fp32 step by kind of operation")
    args = ap.parse_args()
    cfg, text_dim, latent = unet_shapes(args.preset)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *latent, generator=gen)
    target = torch.randn(args.batch, *latent, generator=gen)
    text = torch.randn(args.batch, cfg.text.max_tokens, text_dim, generator=gen)
    t = torch.randint(0, cfg.train.num_train_timesteps, (args.batch,), generator=gen)

    def variant(bf16: bool, channels_last: bool, fused: bool = True):
        torch.manual_seed(0)
        unet = fit_attention(build_unet(cfg, text_dim, latent), "cpu")  # the attention `blossom train` uses here
        xs = x
        if channels_last:
            unet, xs = unet.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        if fused:
            opt = adamw(unet.parameters(), 1e-4, 0.01)
        else:
            opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.01)

        def step(_seed: int) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pred = unet(xs, t, encoder_hidden_states=text).sample
            F.mse_loss(pred.float(), target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    fns = {
        "fp32": variant(False, False),
        "bf16 autocast": variant(True, False),
        "fp32 channels-last": variant(False, True),
        "bf16 autocast channels-last": variant(True, True),
        "fp32 foreach AdamW": variant(False, False, fused=False),
    }
    times = median_seconds(fns, rounds=args.rounds, per_round=3)
    base = times["fp32"]
    print(f"training step, batch {args.batch}, {'x'.join(map(str, latent[::-1]))} latents, {cfg.preset} UNet:")
    for name, s in times.items():
        print(f"  {name:28s} {s * 1000:7.1f} ms  {base / s:.2f}x fp32")
    if args.profile:
        profile(fns["fp32"])


KINDS = {  # aten operations by kind: what the FLOP counter names them, and the profiler
    "convolutions, forward": lambda op: "convolution" in op and "backward" not in op,
    "convolutions, backward": lambda op: "convolution_backward" in op,
    "matrix products": lambda op: op.split("::")[-1].split(".")[-1] in ("mm", "addmm", "bmm", "baddbmm"),
}


def profile(step, steps: int = 5) -> None:
    from torch.profiler import profile as torch_profile
    from torch.utils.flop_counter import FlopCounterMode

    step(0)  # warm: the first step allocates the optimizer's state
    with FlopCounterMode(display=False) as counter:
        step(0)
    flops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    with torch_profile() as prof:
        for i in range(steps):
            step(i)
    self_ms = {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}
    total_ms = sum(self_ms.values())
    print(f"the fp32 step by kind of operation ({steps} profiled steps; profiling adds its own overhead):")
    rows = []
    for kind, match in KINDS.items():
        gflop = sum(n for op, n in flops.items() if match(op)) / 1e9
        ms = sum(t for op, t in self_ms.items() if match(op))
        rows.append((kind, gflop, ms))
    rest = total_ms - sum(ms for _, _, ms in rows)
    rows.append(("the rest (norms, activations, optimizer, copies)", 0.0, rest))
    for kind, gflop, ms in rows:
        rate = f"{gflop / ms * 1000:6.0f} GFLOP/s" if gflop else " " * 14
        print(f"  {kind:50s} {gflop:6.1f} GFLOP {ms:7.1f} ms ({ms / total_ms:4.0%})  {rate}")
    gflop = sum(flops.values()) / 1e9
    print(f"  {'the step':50s} {gflop:6.1f} GFLOP {total_ms:7.1f} ms         {gflop / total_ms * 1000:6.0f} GFLOP/s")


if __name__ == "__main__":
    main()
