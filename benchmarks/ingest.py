"""Ingestion throughput: a folder of Oxford-102-sized JPEGs into blossom's imagefolder.

Makes N photo-like JPEGs (500x375 to 500x750, like Oxford 102's, a few per cent of them
awkward: grayscale, CMYK, RGBA PNG, EXIF-rotated, truncated), then imports the folder at each
size (the tiny preset's 64 px, peer256's 256 px) with one decoding process and with one per
core, side by side, and prints images/s, the ratio and the summary line.

    .venv/bin/python benchmarks/ingest.py [--n 10000] [--sizes 64 256]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import machine_line
from PIL import Image

from blossom.config import DataConfig
from blossom.data.folder import import_folder


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour fields plus noise: compresses like a photo, unlike flat colour or pure noise."""
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(im) + noise, 0, 255).astype(np.uint8))


def make_folder(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    exif = Image.Exif()
    exif[0x0112] = 6
    rows = []
    for i in range(n):
        w, h = 500, int(rng.integers(375, 751))
        im, name = photo(rng, w, h), f"image_{i:05d}.jpg"
        kind = i % 50
        if kind == 1:
            im.convert("L").save(root / name, quality=90)
        elif kind == 2:
            im.convert("CMYK").save(root / name, quality=90)
        elif kind == 3:
            name = name.replace(".jpg", ".png")
            im.convert("RGBA").save(root / name)
        elif kind == 4:
            im.save(root / name, quality=90, exif=exif.tobytes())
        elif kind == 5:
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            (root / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
        else:
            im.save(root / name, quality=90)
        rows.append(json.dumps({"file_name": name, "text": f"a photo of flower {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cores = len(os.sched_getaffinity(0))
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="blossom-ingest-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        t = time.perf_counter()
        make_folder(src, args.n)
        print(f"made {args.n} images in {time.perf_counter() - t:.0f} s")
        for size in args.sizes:
            rates = {}
            for workers in (1, cores):
                out = Path(tmp) / f"out{workers}"
                cfg = DataConfig(
                    source="folder",
                    path=str(src),
                    image_size=size,
                    workers=workers,
                    train_size=args.n,
                    val_size=args.n // 20,
                )
                t = time.perf_counter()
                import_folder(cfg, out)
                rates[workers] = args.n / (time.perf_counter() - t)
                print(f"{size} px, {workers} process(es): {rates[workers]:.0f} images/s")
                shutil.rmtree(out)
            print(f"{size} px: {cores} processes vs 1: {rates[cores] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
