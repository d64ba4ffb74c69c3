"""Image folders in the diffusers `imagefolder` convention: images + metadata.jsonl (file_name, text).

blossom writes its data set in this layout, one folder per split, and reads any user folder in
it, so everything downstream of `blossom data` sees one format.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from blossom.config import CaptionConfig, DataConfig
from blossom.data import synthetic
from blossom.errors import DataError
from blossom.fsutil import atomic_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


@dataclass
class Record:
    path: Path
    text: str
    meta: dict


def write_synthetic(cfg: DataConfig, out_dir: Path) -> dict[str, int]:
    """Generate the procedural flowers into out_dir/{train,val}. Val draws other indices of the same seed."""
    counts = {}
    with atomic_dir(out_dir) as tmp:
        for split, n, offset in (("train", cfg.train_size, 0), ("val", cfg.val_size, 10_000_000)):
            d = tmp / split
            d.mkdir()
            with open(d / "metadata.jsonl", "w", encoding="utf-8") as meta:
                for i in tqdm(range(n), desc=f"data {split}", unit="img", mininterval=1):
                    img, flower, text = synthetic.generate(cfg.seed, offset + i, cfg.image_size)
                    name = f"{i:06d}.png"
                    img.save(d / name, compress_level=1)
                    meta.write(json.dumps({"file_name": name, "text": text, **synthetic.attributes(flower)}) + "\n")
            counts[split] = n
    return counts


def read_metadata(folder: Path) -> list[Record]:
    """Rows with a file and a caption. Rows without text are skipped, counted and warned about once."""
    meta = folder / "metadata.jsonl"
    if not meta.exists():
        raise DataError(f"{meta} not found: an image folder needs a metadata.jsonl with file_name and text per line")
    records, no_text, bad_json = [], 0, 0
    with open(meta, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                bad_json += 1
                continue
            text = row.get("text")
            if not isinstance(text, str) or not text.strip() or "file_name" not in row:
                no_text += 1
                continue
            records.append(Record(folder / row["file_name"], text.strip(), row))
    if no_text or bad_json:
        log.warning(
            "%s: skipped %d row(s) without file_name/text and %d unreadable line(s): caption them with `blossom caption`",
            meta,
            no_text,
            bad_json,
        )
    return records


def load_image(path: Path, size: int) -> Image.Image:
    """RGB, resized on the short side and centre-cropped to size x size."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        im = im.convert("RGB")
        return ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC)


def load_images(records: list[Record], size: int) -> tuple[np.ndarray, list[Record]]:
    """uint8 array (N, size, size, 3) of readable images; missing or corrupt files are skipped and counted."""
    arrays, kept, bad = [], [], []
    for r in tqdm(records, desc="read images", unit="img", mininterval=1, leave=False):
        try:
            arrays.append(np.asarray(load_image(r.path, size)))
            kept.append(r)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            bad.append(r.path.name)
    if bad:
        log.warning("skipped %d missing or unreadable image(s) (first: %s): remove or replace them", len(bad), bad[0])
    if not kept:
        raise DataError("no readable images: check that the folder's images exist and that metadata.jsonl names them")
    return np.stack(arrays), kept


def import_folder(cfg: DataConfig, out_dir: Path, caption: CaptionConfig | None = None) -> dict[str, int]:
    """Bring a user imagefolder into blossom's layout, resized, with a stable hash-based val split.
    Images without a caption are captioned first (into the folder's metadata.jsonl) when `caption` is given."""
    from blossom.data.captions import caption_folder, needs_caption, scan

    src = Path(cfg.path or "")
    if not src.is_dir():
        raise DataError(f"data.path {src} is not a folder: point it at an image folder with metadata.jsonl")
    if caption is not None and any(needs_caption(r) for r in scan(src)):
        caption_folder(src, caption)
    records = read_metadata(src)
    if not records:
        raise DataError(f"{src}/metadata.jsonl has no captioned images: add rows with file_name and text")
    images, records = load_images(records, cfg.image_size)
    val_share = cfg.val_size / max(1, cfg.val_size + cfg.train_size)
    counts = {s: 0 for s in SPLITS}
    with atomic_dir(out_dir) as tmp:
        files = {}
        for s in SPLITS:
            (tmp / s).mkdir()
            files[s] = open(tmp / s / "metadata.jsonl", "w", encoding="utf-8")
        try:
            for img, r in zip(images, records):
                h = int(hashlib.sha1(str(r.meta["file_name"]).encode()).hexdigest()[:8], 16) / 2**32
                split = "val" if h < val_share else "train"
                name = f"{counts[split]:06d}.png"
                Image.fromarray(img).save(tmp / split / name, compress_level=1)
                row = {k: v for k, v in r.meta.items() if k not in ("file_name", "text")}
                files[split].write(json.dumps({"file_name": name, "text": r.text, "source": str(r.meta["file_name"]), **row}) + "\n")
                counts[split] += 1
        finally:
            for f in files.values():
                f.close()
    if counts["train"] == 0:
        raise DataError("the training split is empty: add images or lower data.val_size")
    return counts


def make_dataset(cfg: DataConfig, out_dir: Path, caption: CaptionConfig | None = None) -> dict[str, int]:
    if cfg.source == "synthetic":
        return write_synthetic(cfg, out_dir)
    return import_folder(cfg, out_dir, caption)
