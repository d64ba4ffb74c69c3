"""Turning the images real folders hold into clean square RGB training images, in parallel.

Real folders hold corrupt and truncated files, grayscale, CMYK, palette, RGBA and 16-bit images,
photos rotated by an EXIF tag, thumbnails and decompression bombs. Each is handled (converted,
rotated, upscaled or skipped), counted, and reported in one summary line; nothing raises.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from blossom.data.parallel import ordered_map
from blossom.images import png_bytes

# Why an image was skipped, or what was done to it; the summary line reads these in this order.
SKIPS = ("missing", "unreadable", "too large", "too small")
FIXES = ("grayscale", "CMYK", "alpha", "palette", "16-bit", "EXIF-rotated", "upscaled")


@dataclass(frozen=True)
class Policy:
    size: int
    resize: str = "crop"  # crop: short side to size, centre crop | squash: both sides to size (the original's) | pad
    small: str = "upscale"  # images with a short side below `size`: upscale | skip
    max_pixels: int = 64_000_000  # larger images are skipped unread (decompression-bomb guard)


def _to_rgb(im: Image.Image, fixes: list[str]) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        fixes.append("16-bit")
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode != "I" or a.max() > 255 else 255.0
        return Image.fromarray((a * (255.0 / top)).clip(0, 255).round().astype(np.uint8)).convert("RGB")
    if mode == "P":
        fixes.append("palette")
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        fixes.append("alpha")
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent areas become white, not black
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("L", "1"):
        fixes.append("grayscale")
    elif mode == "CMYK":
        fixes.append("CMYK")
    elif mode == "F":
        fixes.append("16-bit")
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray((a / max(a.max(), 1e-12) * 255).clip(0, 255).round().astype(np.uint8)).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def prepare(path: Path, policy: Policy) -> tuple[np.ndarray | None, str | None, list[str]]:
    """(uint8 HxWx3 array or None, why it was skipped, what was fixed)."""
    fixes: list[str] = []
    if not path.is_file():
        return None, "missing", fixes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size  # read from the header: nothing decoded yet
                if w * h > policy.max_pixels:
                    return None, "too large", fixes
                if min(w, h) < policy.size and policy.small == "skip":
                    return None, "too small", fixes
                # JPEG decodes straight to a smaller scale when the image is much larger than needed.
                im.draft("RGB", (policy.size * w // min(w, h), policy.size * h // min(w, h)))
                orientation = im.getexif().get(0x0112, 1)
                im = ImageOps.exif_transpose(im)
                if orientation not in (1, None):
                    fixes.append("EXIF-rotated")
                im = _to_rgb(im, fixes)
                if min(im.size) < policy.size:
                    fixes.append("upscaled")
                out = _fit(im, policy)
                return np.asarray(out), None, fixes
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
        EOFError,
    ):
        return None, "unreadable", fixes


def _fit(im: Image.Image, policy: Policy) -> Image.Image:
    size = (policy.size, policy.size)
    if policy.resize == "squash":
        return im.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    if policy.resize == "pad":
        return ImageOps.pad(im, size, Image.Resampling.BICUBIC, color=(255, 255, 255))
    return ImageOps.fit(im, size, Image.Resampling.BICUBIC)


def _prepare_many(args: tuple[list[Path], Policy]) -> list[tuple[bytes | None, str | None, list[str]]]:
    paths, policy = args
    # PNG-encoded in the worker: encoding in the parent would make it the bottleneck at larger sizes.
    prepared = (prepare(p, policy) for p in paths)
    return [(png_bytes(a, compress_level=1) if a is not None else None, skip, fixes) for a, skip, fixes in prepared]


def prepare_all(paths: list[Path], policy: Policy, workers: int, progress=None):
    """Yield (index, PNG bytes or None, skip reason, fixes) in order, decoding on `workers` processes."""
    chunk = 64
    chunks = [(paths[i : i + chunk], policy) for i in range(0, len(paths), chunk)]
    i = 0
    for batch in ordered_map(_prepare_many, chunks, 1 if len(paths) < 2 * chunk else workers):
        for array, skip, fixes in batch:
            yield i, array, skip, fixes
            i += 1
        if progress is not None:
            progress.update(len(batch))


class Tally:
    """Counts of what ingestion skipped and fixed, and the one line that reports them."""

    def __init__(self):
        self.written, self.skipped, self.fixed, self.examples = 0, Counter(), Counter(), {}
        self.rows = Counter()  # metadata problems: duplicate names, re-decoded captions, rows without text

    def add(self, name: str, skip: str | None, fixes: list[str]) -> None:
        if skip:
            self.skipped[skip] += 1
            self.examples.setdefault(skip, name)
        else:
            self.written += 1
            self.fixed.update(fixes)

    def line(self) -> str:
        parts = [f"{self.written} images written"]
        skipped = [f"{self.skipped[k]} {k} (e.g. {self.examples[k]})" for k in SKIPS if self.skipped[k]]
        if skipped:
            parts.append("skipped " + ", ".join(skipped))
        rows = [f"{n} {k}" for k, n in sorted(self.rows.items()) if n]
        if rows:
            parts.append("metadata: " + ", ".join(rows))
        fixed = [f"{self.fixed[k]} {k}" for k in FIXES if self.fixed[k]]
        if fixed:
            parts.append("converted " + ", ".join(fixed))
        return "; ".join(parts)


def decode_line(line: bytes, tally: Tally | None = None) -> str:
    """A metadata line as text: UTF-8, else Windows-1252 (what non-UTF-8 captions usually are), else Latin-1."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        if tally is not None:
            tally.rows["non-UTF-8 lines re-decoded"] += 1
        try:
            return line.decode("cp1252")
        except UnicodeDecodeError:
            return line.decode("latin-1")
