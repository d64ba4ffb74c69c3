"""Seconds per image, PyTorch eager vs ONNX Runtime (fp32, and int8 where the export has it), on the
same weights, side by side in one run.

One image, DDIM with classifier-free guidance (the UNet sees a batch of 2 per step), plus the
compute limit: the model's FLOPs per image (torch's FlopCounterMode, math attention so the
attention matmuls are counted) over the machine's fp32 peak, measured in the same run (the better
of a matrix product and a convolution probe, benchmarks/machine.py), or `--peak` GFLOP/s.

    .venv/bin/python benchmarks/inference.py [--model outputs/export] [--steps 30] [--rounds 3]

Without --model and with no outputs/export, it exports a tiny-preset model with random weights
(the speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from machine import machine_line, measured_peak
from timing import median_seconds

from blossom.backends import OnnxBackend, TorchBackend, physical_cores
from blossom.sampling import sample

PROMPT = "a red flower with five round petals on green grass"


def random_model(root: Path) -> Path:
    """A tiny-preset model folder with random weights, exported."""
    from blossom.config import load_config
    from blossom.export import export
    from blossom.models import build_unet, build_vae, load_text_encoder
    from blossom.train.diffusion import write_model_files

    cfg = load_config()
    torch.manual_seed(0)
    vae, encoder = build_vae(cfg.vae), load_text_encoder(cfg.text)
    size = cfg.data.image_size // cfg.vae.downsampling
    vae.save_pretrained(root / "vae_src")
    model = root / "model"
    model.mkdir()
    build_unet(cfg, encoder.dim, (cfg.vae.latent_channels, size, size)).save_pretrained(model / "unet")
    write_model_files(cfg, root / "vae_src", model, {"val_loss": None, "steps": 0})
    export(model, root / "export", [PROMPT, "a white flower at night", "a blue flower on sand"], int8_bar=False)
    return root / "export"


def flops_per_image(backend: TorchBackend, steps: int) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    c, h, w = backend.latent_shape
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        with FlopCounterMode(display=False) as text_count:
            states = backend.encode_text(["", PROMPT])
        with FlopCounterMode(display=False) as unet_count:
            backend.unet(torch.randn(2, c, h, w), torch.tensor([500, 500]), states)
        with FlopCounterMode(display=False) as vae_count:
            backend.decode_float(torch.randn(1, c, h, w))
    return text_count.get_total_flops() + steps * unet_count.get_total_flops() + vae_count.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="an exported model folder (default: outputs/export, else a random tiny model)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="blocks of 5 timed images per backend, taking turns")
    ap.add_argument("--peak", type=float, help="the machine's fp32 peak, GFLOP/s (default: measured now)")
    args = ap.parse_args()
    torch.set_num_threads(physical_cores())
    probe = measured_peak()
    peak = args.peak or max(probe.values())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else Path("outputs/export")
        if not folder.is_dir():
            print("no exported model given: exporting a tiny-preset model with random weights")
            folder = random_model(Path(tmp))
        backends = {"pytorch eager": TorchBackend(folder), "onnx runtime": OnnxBackend(folder)}
        if (folder / "onnx" / "unet.int8.onnx").exists():
            backends["onnx runtime int8"] = OnnxBackend(folder, precision="int8")
        limit = flops_per_image(backends["pytorch eager"], args.steps) / (peak * 1e9)
        times = median_seconds(
            {
                name: (lambda seed, b=b: sample(b, [PROMPT], "ddim", args.steps, 5.0, seed))
                for name, b in backends.items()
            },
            rounds=args.rounds,
        )
    print(machine_line(probe))
    print(
        f"DDIM {args.steps} steps, guidance 5, one image, {torch.get_num_threads()} threads; "
        f"compute limit {limit * 1e3:.0f} ms at {peak:.0f} GFLOP/s"
    )
    for name, s in times.items():
        print(
            f"{name:>17}: {s * 1e3:7.1f} ms/image  ({s / limit:.2f}x the compute limit; "
            f"{times['pytorch eager'] / s:.2f}x faster than PyTorch eager)"
        )


if __name__ == "__main__":
    main()
