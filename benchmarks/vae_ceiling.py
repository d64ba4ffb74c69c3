"""Does a VAE cap petal colour on some colour/background pair?

A diffusion model hands its latents to the VAE's decoder, so a VAE that shifts a pair's colour
caps every model on it. The held-out pairs are the suspects: the VAE trains on the same images as
the UNet and never sees them. For every colour/background pair this renders N real flowers (size,
centre, place and rotation random), passes them through each VAE (encode, decode) and asks the
attribute classifier which petal colour it reads; it prints the held-out pairs, the seen pairs'
mean and worst, and the PSNR of the reconstructions over all pairs. No timing.

    .venv/bin/python benchmarks/vae_ceiling.py outputs/vae [other/vae ...] [--n 100] [--classifier DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from blossom.classifier import HEADS, SHIPPED, load_classifier, predict, render
from blossom.data import synthetic
from blossom.evaluate import through_vae
from blossom.images import psnr, to_tensor
from blossom.models import load_vae


def colour_read_per_pair(vae, classifier, n: int, size: int, seed: int = 5) -> tuple[dict, float]:
    """{(colour, background): the share read as the asked colour after the VAE}, and the PSNR."""
    rng = np.random.default_rng(seed)
    colours = HEADS["petal_color"]
    read, psnrs = {}, []
    for colour in synthetic.PETAL_COLORS:
        for background in synthetic.BACKGROUNDS:
            flowers = [
                dataclasses.replace(synthetic.sample_flower(rng, "any"), petal_color=colour, background=background)
                for _ in range(n)
            ]
            real = render(flowers, size, seed=11)
            back = through_vae(vae, real)
            psnrs.append(psnr(to_tensor(back), to_tensor(real)))
            pred = predict(classifier, to_tensor(back))["petal_color"]
            read[(colour, background)] = float((pred == colours.index(colour)).float().mean())
    return read, float(np.mean(psnrs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vae", nargs="+", help="AutoencoderKL folders (outputs/vae, or a model's vae/)")
    ap.add_argument("--n", type=int, default=100, help="real flowers per colour/background pair")
    ap.add_argument("--size", type=int, default=64, help="image size the VAEs and classifier take")
    ap.add_argument("--classifier", default=str(SHIPPED), help="the attribute classifier's folder")
    args = ap.parse_args()
    torch.manual_seed(0)
    classifier, _ = load_classifier(Path(args.classifier), args.size)
    print(f"petal colour read right after the VAE, per pair ({args.n} real flowers each)")
    for folder in args.vae:
        read, db = colour_read_per_pair(load_vae(folder).eval(), classifier, args.n, args.size)
        seen = {k: v for k, v in read.items() if k not in synthetic.HELD_OUT}
        worst = min(seen, key=seen.get)
        held = "  ".join(f"{c}/{b} {read[(c, b)]:.2f}" for c, b in synthetic.HELD_OUT)
        print(
            f"{folder}: held-out {held}  | held-out mean {np.mean([read[p] for p in synthetic.HELD_OUT]):.3f}, "
            f"seen mean {np.mean(list(seen.values())):.3f} (worst {worst[0]}/{worst[1]} {seen[worst]:.2f}), "
            f"PSNR {db:.2f} dB"
        )


if __name__ == "__main__":
    main()
