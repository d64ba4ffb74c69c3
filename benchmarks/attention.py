"""The UNet's attention on a CPU: PyTorch's fused kernel (diffusers' default processor,
`scaled_dot_product_attention`) against the classic one (diffusers' `AttnProcessor`: two batched
matrix products and a softmax), side by side in one process.

Times the preset's training step (forward, MSE, backward, AdamW at the training batch), a UNet
call at batch 2 (one guided sampling step) and at the evaluation batch, in PyTorch; and a
batch-2 UNet call in ONNX Runtime of a graph exported with each processor.

    .venv/bin/python benchmarks/attention.py [--preset tiny] [--rounds 6]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from timing import median_seconds, unet_shapes

from blossom.models import build_unet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=None)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--no-onnx", action="store_true")
    args = ap.parse_args()
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    cfg, text_dim, latent = unet_shapes(args.preset)
    processors = {"fused (SDPA)": AttnProcessor2_0, "classic": AttnProcessor}

    def inputs(batch: int):
        gen = torch.Generator().manual_seed(batch)
        return (
            torch.randn(batch, *latent, generator=gen),
            torch.randint(0, cfg.train.num_train_timesteps, (batch,), generator=gen),
            torch.randn(batch, cfg.text.max_tokens, text_dim, generator=gen),
        )

    def unet(processor):
        torch.manual_seed(0)
        model = build_unet(cfg, text_dim, latent)
        model.set_attn_processor(processor())
        return model

    def train_step(processor):
        model, (x, t, text) = unet(processor), inputs(cfg.train.batch_size)
        target = torch.randn_like(x)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(_seed: int) -> None:
            F.mse_loss(model(x, t, encoder_hidden_states=text).sample, target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def call(processor, batch: int):
        model, (x, t, text) = unet(processor).eval(), inputs(batch)

        def fn(_seed: int) -> None:
            with torch.no_grad():
                model(x, t, encoder_hidden_states=text)

        return fn

    rows = [
        (f"training step, batch {cfg.train.batch_size}", {k: train_step(p) for k, p in processors.items()}),
        ("UNet call, batch 2", {k: call(p, 2) for k, p in processors.items()}),
        (
            f"UNet call, batch {cfg.evaluate.batch_size}",
            {k: call(p, cfg.evaluate.batch_size) for k, p in processors.items()},
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_onnx:
            rows.append(("ONNX Runtime UNet call, batch 2", onnx_calls(processors, unet, inputs(2), Path(tmp))))
        print(f"{cfg.preset} UNet, {'x'.join(map(str, latent[::-1]))} latents, median ms (ratio: fused / classic):")
        for label, fns in rows:
            times = median_seconds(fns, rounds=args.rounds, per_round=3)
            fused, classic = times["fused (SDPA)"], times["classic"]
            print(f"  {label:34s} fused {fused * 1000:8.1f}  classic {classic * 1000:8.1f}  {fused / classic:.2f}x")


def onnx_calls(processors: dict, unet, feeds: tuple, tmp: Path) -> dict:
    from blossom.backends import ort_session
    from blossom.export import _export_onnx, _UNet

    x, t, text = feeds
    t = t.float()  # as export traces it
    fns = {}
    for name, processor in processors.items():
        path = tmp / f"{processor.__name__}.onnx"
        with torch.no_grad():
            _export_onnx(_UNet(unet(processor).eval()), (x, t, text), path, ["sample", "timestep", "text"], ["out"])
        session = ort_session(path)
        feed = {"sample": x.numpy(), "timestep": t.numpy(), "text": text.numpy()}
        fns[name] = lambda _seed, s=session, f=feed: s.run(None, f)
    return fns


if __name__ == "__main__":
    main()
