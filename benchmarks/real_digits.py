"""The default recipe on real, human-drawn images: scikit-learn's 1,797 handwritten digits.

The digits (UCI "Optical Recognition of Handwritten Digits": 8x8, 17 grey levels, 43 writers)
ship inside scikit-learn, so this runs offline. They are written as an imagefolder with
`metadata.jsonl` ("a handwritten digit seven", dark ink on white) outside the repository, and
blossom takes them the way a user's folder is taken: `blossom data` with `data.source=folder`
(upscaled to 64 px), `train-vae`, `cache`, `train`, each with the tiny preset's recipe. Then the
trained model draws `--per-digit` images of each digit at the served sampler and guidance, and a
digit classifier (an RBF SVM on the 8x8 grey levels, fitted on blossom's training split only)
says which digit each image shows, with 95 % Wilson intervals. Beside it:

- the classifier's ceiling: the validation split's real digits as blossom stored them, and the
  same images through the trained VAE (the most any model on that VAE can score);
- the same seeds with an empty prompt (chance: the classifier's answer matches the asked digit
  about one time in ten if the prompt does nothing), and how many levels of 255 the prompt
  moves an image from its seed's unprompted draw.

    .venv/bin/python benchmarks/real_digits.py [--work /tmp/blossom-digits] [--per-digit 48] \
        [--set train.steps=600 ...] [--grid docs/real-digits.png]

Stages already finished in --work are not run again (delete the folder to start over). Nothing
else may run on the machine meanwhile: the stage minutes are part of the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import machine_line
from PIL import Image

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT = "a handwritten digit {word}"
# Training captions vary the phrasing a little, as a user's captions would; the scored prompt
# is the first.
TEMPLATES = (PROMPT, "the number {word}, written by hand", "a hand-drawn {digit} in dark ink")
STAGES = ("data", "train-vae", "cache", "train")
DONE = {"data": "data/train/metadata.jsonl", "train-vae": "vae", "cache": "cache", "train": "train/model/train.json"}


def write_folder(src: Path) -> None:
    """The digits as 8x8 PNGs (ink dark on white) with captions; written once."""
    from sklearn.datasets import load_digits

    if (src / "metadata.jsonl").exists():
        return
    digits = load_digits()
    src.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        name = f"digit_{i:04d}.png"
        Image.fromarray((255 - pixels * 255 / 16).round().astype(np.uint8), "L").save(src / name)
        text = TEMPLATES[i % len(TEMPLATES)].format(word=WORDS[label], digit=int(label))
        rows.append(json.dumps({"file_name": name, "text": text, "digit": int(label)}))
    (src / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def grey8(images: np.ndarray) -> np.ndarray:
    """(N, 64, 64, 3) uint8 -> (N, 64) features on the data set's own 0-16 ink scale."""
    n, h, w, _ = images.shape
    g = images.astype(np.float32).mean(axis=3)
    g = g.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))
    return ((255 - g) / 255 * 16).reshape(n, 64)


def read_split(outputs: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    from blossom.data.folder import load_images, read_metadata

    records = read_metadata(outputs / "data" / split)
    images, records = load_images(records, 64)
    return images, np.array([r.meta["digit"] for r in records])


def scored(pred: np.ndarray, want: np.ndarray) -> str:
    from blossom.stats import fmt, wilson

    k, n = int((pred == want).sum()), len(want)
    return f"{fmt(k / n, *wilson(k, n))} ({k}/{n})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/blossom-digits")
    ap.add_argument("--per-digit", type=int, default=48)
    ap.add_argument("--set", action="append", default=[], help="a config override for every stage")
    ap.add_argument("--prompt", default=PROMPT, help="the scored prompt, with {word} or {digit}")
    ap.add_argument("--grid", default=None, help="also write the first 8 draws of each digit here (PNG)")
    args = ap.parse_args()
    print(machine_line())
    work = Path(args.work)
    src, outputs = work / "src", work / "outputs"
    write_folder(src)
    sets = ["data.source=folder", f"data.path={src}", "data.train_size=1600", "data.val_size=197", *args.set]
    env = {**os.environ, "BLOSSOM_OUTPUTS": str(outputs)}
    blossom = [str(Path(sys.executable).parent / "blossom"), *(a for s in sets for a in ("--set", s))]
    minutes = {}
    for stage in STAGES:
        if (outputs / DONE[stage]).exists():
            continue
        start = time.time()
        subprocess.run([*blossom, stage], env=env, check=True)
        minutes[stage] = (time.time() - start) / 60
    if minutes:
        print("stage minutes: " + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items()))

    import torch
    from sklearn.svm import SVC

    from blossom.backends import TorchBackend
    from blossom.config import load_config
    from blossom.evaluate import through_vae
    from blossom.images import image_grid
    from blossom.models import set_threads
    from blossom.sampling import sample

    set_threads(0)
    train_images, train_digits = read_split(outputs, "train")
    val_images, val_digits = read_split(outputs, "val")
    judge = SVC(gamma=0.001, C=10).fit(grey8(train_images), train_digits)
    backend = TorchBackend(outputs / "train" / "model")
    s = load_config(overrides=sets).sample
    want = np.repeat(np.arange(10), args.per_digit)
    prompts = [args.prompt.format(word=WORDS[d], digit=d) for d in want]

    def draw(prompts: list[str], guidance: float) -> np.ndarray:
        batches = range(0, len(prompts), 64)
        return np.concatenate([sample(backend, prompts[i : i + 64], s.sampler, s.steps, guidance, i) for i in batches])

    start = time.time()
    drawn = draw(prompts, s.guidance)
    seconds = time.time() - start
    plain = draw([""] * len(prompts), 1.0)
    moved = np.abs(drawn.astype(np.float32) - plain.astype(np.float32)).mean(axis=(1, 2, 3))
    train_info = json.loads((outputs / "train" / "model" / "train.json").read_text())
    print(
        f"{len(train_digits)} training and {len(val_digits)} validation digits; val loss {train_info['val_loss']:.4f}; "
        f"{s.sampler} {s.steps} steps, guidance {s.guidance}; {seconds / len(want) * 1000:.0f} ms an image"
    )
    print(f"  real digits (validation split, as stored)   {scored(judge.predict(grey8(val_images)), val_digits)}")
    with torch.no_grad():
        recon = through_vae(backend.vae, val_images)
    print(f"  the same through the VAE                    {scored(judge.predict(grey8(recon)), val_digits)}")
    print(f"  drawn for the prompt                        {scored(judge.predict(grey8(drawn)), want)}")
    print(f"  the same seeds, no prompt (chance)          {scored(judge.predict(grey8(plain)), want)}")
    print(
        f"  the prompt moves an image {moved.mean():.1f} levels of 255 (sd {moved.std():.1f}) from its unprompted draw"
    )
    pred = judge.predict(grey8(drawn))
    cells = []
    for d in range(10):
        got = np.bincount(pred[want == d], minlength=10)
        wrong = int(np.argmax(np.where(np.arange(10) == d, -1, got)))
        cells.append(f"{d} {got[d] / got.sum():.2f} (most often misread: {wrong}, {got[wrong] / got.sum():.2f})")
    print("  per digit: " + "; ".join(cells))
    if args.grid:
        first = np.concatenate([np.flatnonzero(want == d)[:8] for d in range(10)])
        Image.fromarray(image_grid(drawn[first], cols=8)).convert("L").save(args.grid, optimize=True)  # grey ink
        print(f"grid (rows 0-9, 8 draws each) -> {args.grid}")


if __name__ == "__main__":
    main()
