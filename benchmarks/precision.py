"""Lower precision: the speed it buys and the adherence it costs, side by side in one run.

ONNX Runtime fp32 vs int8 (the UNet and VAE decoder that `blossom export` quantizes statically,
calibrated on the validation captions), and PyTorch fp32 vs bf16 (UNet and VAE decoder cast to
bfloat16, which oneDNN runs on AVX512-BF16). The same prompts and seeds for each, scored by the
attribute classifier.

    .venv/bin/python benchmarks/precision.py [--model outputs/export] [--sampler unipc] [--steps 10] [--per-pair 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch
from machine import machine_line
from timing import median_seconds

from blossom.backends import OnnxBackend, TorchBackend, physical_cores
from blossom.config import load_config
from blossom.evaluate import evaluate
from blossom.models import set_threads
from blossom.sampling import sample

PROMPT = "a red flower with five round petals on green grass"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="outputs/export")
    ap.add_argument("--classifier", default="outputs/classifier")
    ap.add_argument("--sampler", default="unipc")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--per-pair", type=int, default=8)
    args = ap.parse_args()
    cfg = load_config()
    set_threads(physical_cores())
    print(machine_line())
    cfg.sample = dataclasses.replace(cfg.sample, sampler=args.sampler, steps=args.steps)
    cfg.evaluate = dataclasses.replace(cfg.evaluate, images_per_pair=args.per_pair)
    with tempfile.TemporaryDirectory() as tmp:
        variants = {
            "ort fp32": OnnxBackend(args.model),
            "ort int8": OnnxBackend(args.model, precision="int8"),
            "torch fp32": TorchBackend(args.model),
            "torch bf16": TorchBackend(args.model, torch.bfloat16),
        }
        times = median_seconds(
            {
                k: (lambda seed, b=b: sample(b, [PROMPT], args.sampler, args.steps, 5.0, seed))
                for k, b in variants.items()
            }
        )
        scores = {
            k: {
                name: v["acc"] if isinstance(v, dict) else v
                for name, v in evaluate(cfg, b, Path(args.classifier), Path(tmp) / f"eval-{k}")["adherence"][
                    "template"
                ]["all"].items()
            }
            for k, b in variants.items()
        }
    print(f"{args.sampler} {args.steps} steps, guidance 5, one image; adherence over {scores['ort fp32']['n']} images")
    for k in variants:
        t, a = times[k], scores[k]
        print(
            f"{k:>10}: {t * 1e3:6.1f} ms/image  colour {a['petal_color']:.3f}  background {a['background']:.3f}  "
            f"count {a['petal_count']:.3f}  shape {a['petal_shape']:.3f}"
        )
    print(
        f"ORT int8 over fp32: {times['ort fp32'] / times['ort int8']:.2f}x; "
        f"torch bf16 over fp32: {times['torch fp32'] / times['torch bf16']:.2f}x"
    )


if __name__ == "__main__":
    main()
