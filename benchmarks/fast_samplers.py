"""A distilled student's adherence under each consistency sampler, on the same prompts and seeds.

The student is the same weights throughout; only how its steps are chained differs: `lcm` (LCM's
multistep sampler: each step predicts the clean latent, then renoises it with fresh noise, TCD's
gamma 1) or `tcd` at a gamma from 0 (deterministic steps along the student's own trajectory) up.
The evaluator is the stage's own (`evaluate.evaluate_fast`): all three phrasing groups, 95 %
Wilson intervals; `--images-per-pair 64` scores 2,880 images where the stage scores 720.

    .venv/bin/python benchmarks/fast_samplers.py --student outputs/distill/model \\
        [--params params.yaml] [--classifier outputs/classifier] [--images-per-pair 16] \\
        [--steps 1 2 4 8] [--samplers lcm tcd:0 tcd:0.3] [--guidance 1 3 8]

`--guidance` scores the student served at each scale (the embedded guidance input); by default
the scale params.yaml serves.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from blossom import sampling
from blossom.backends import TorchBackend
from blossom.config import load_config
from blossom.evaluate import evaluate_fast

DEFAULT_GAMMA = sampling.TCD_GAMMA
ATTRIBUTES = ("petal_color", "background", "petal_count", "petal_shape")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", type=Path, default=Path("outputs/distill/model"))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--classifier", type=Path, default=Path("outputs/classifier"))
    ap.add_argument("--images-per-pair", type=int, default=16)
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--samplers", nargs="+", default=["lcm", "tcd:0", "tcd:0.3"], help="lcm, or tcd:GAMMA")
    ap.add_argument("--guidance", type=float, nargs="+", default=[None], help="scales to serve (default: params')")
    args = ap.parse_args()

    for spec in args.samplers:
        if spec.partition(":")[0] not in sampling.FAST_SAMPLERS:
            ap.error(f"--samplers: {spec!r} is not lcm or tcd:GAMMA")
    overrides = [f"evaluate.images_per_pair={args.images_per_pair}"]
    backend = TorchBackend(args.student)
    own = backend.distilled
    print(f"{args.student}: {own['method']}")
    print("guidance  sampler  steps  " + "  ".join(f"{a:>22}" for a in ATTRIBUTES) + "  images  seconds")
    for w in args.guidance:
        cfg = load_config(args.params, overrides=overrides + ([] if w is None else [f"sample.guidance={w}"]))
        rows(cfg, backend, own, args)


def rows(cfg, backend, own, args) -> None:
    """One line per sampler and step count, at cfg's guidance."""
    for spec in args.samplers:
        name, _, gamma = spec.partition(":")
        # read at each call: the one knob this study turns; a bare `tcd` gets blossom's own gamma,
        # not whatever an earlier `tcd:GAMMA` (or the previous guidance's round) left behind
        sampling.TCD_GAMMA = float(gamma) if gamma else DEFAULT_GAMMA
        backend.distilled = {**own, "sampler": name}
        for n in args.steps:
            start = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                m = evaluate_fast(cfg, backend, args.classifier, Path(tmp), [n])["steps"][str(n)]
            a = m["adherence"]["all"]["all"]
            cells = "  ".join(f"{a[k]['acc']:.3f} [{a[k]['lo']:.2f}, {a[k]['hi']:.2f}]".rjust(22) for k in ATTRIBUTES)
            print(
                f"{cfg.sample.guidance:>8g}  {spec:<8} {n:>5}  {cells}  {m['images']:>6}  {time.time() - start:>7.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
