"""Prompt adherence against sampling steps for each sampler, on one trained model, in one run.

Each row samples the same prompts and seeds (every petal-colour x background pair,
`--per-pair` draws each, held-out pairs twice) and scores them with the attribute classifier. The question it
answers: at how few steps does each sampler hold the adherence of DDIM at 50?

    .venv/bin/python benchmarks/samplers.py [--model outputs/export] [--per-pair 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from machine import machine_line

from blossom.backends import load_backend, physical_cores
from blossom.classifier import HEADS
from blossom.config import load_config
from blossom.evaluate import evaluate
from blossom.models import set_threads

GRID = [
    ("ddim", 10),
    ("ddim", 20),
    ("ddim", 30),
    ("ddim", 50),
    ("dpm++2m", 5),
    ("dpm++2m", 10),
    ("dpm++2m", 15),
    ("dpm++2m", 20),
    ("unipc", 5),
    ("unipc", 10),
    ("unipc", 15),
    ("euler", 20),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="outputs/export")
    ap.add_argument("--classifier", default="outputs/classifier")
    ap.add_argument("--backend", default="onnx")
    ap.add_argument("--per-pair", type=int, default=4)
    ap.add_argument("--grid", help="sampler:steps pairs, e.g. ddim:50,unipc:15 (default: the full grid)")
    ap.add_argument(
        "--attributes",
        default="petal_color,background",
        help="attributes averaged into the score that picks the step counts",
    )
    args = ap.parse_args()
    grid = [(p.split(":")[0], int(p.split(":")[1])) for p in args.grid.split(",")] if args.grid else GRID
    keys = args.attributes.split(",")
    cfg = load_config()
    set_threads(physical_cores())
    print(machine_line())
    backend = load_backend(args.backend, args.model)
    cfg.evaluate = dataclasses.replace(cfg.evaluate, images_per_pair=args.per_pair)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sampler, steps in grid:
            cfg.sample = dataclasses.replace(cfg.sample, sampler=sampler, steps=steps)
            start = time.time()
            m = evaluate(cfg, backend, Path(args.classifier), Path(tmp) / f"{sampler}-{steps}")
            a = m["adherence"]["template"]["all"]
            rows.append((sampler, steps, a, sum(a[k] for k in keys) / len(keys), (time.time() - start) / a["n"]))
    print(f"score: mean of {', '.join(keys)}; {rows[0][2]['n']} images per row")
    print(f"{'sampler':<8} {'steps':>5} " + " ".join(f"{k:>12}" for k in HEADS) + f" {'score':>6} {'s/image':>8}")
    for sampler, steps, a, mean, spi in rows:
        print(f"{sampler:<8} {steps:>5} " + " ".join(f"{a[k]:>12.3f}" for k in HEADS) + f" {mean:>6.3f} {spi:>8.3f}")
    ref = next(r[3] for r in rows if r[:2] == ("ddim", 50))
    for sampler in dict.fromkeys(r[0] for r in rows):
        ok = [r[1] for r in rows if r[0] == sampler and r[3] >= ref - 0.01]
        print(f"{sampler}: fewest steps within 1 point of DDIM-50's score ({ref:.3f}): {min(ok) if ok else 'none'}")


if __name__ == "__main__":
    main()
