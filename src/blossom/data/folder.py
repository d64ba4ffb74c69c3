"""Image folders in the diffusers `imagefolder` convention: images + metadata.jsonl (file_name, text).

blossom writes its data set in this layout, one folder per split, and reads any user folder in
it, so everything downstream of `blossom data` sees one format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from blossom.config import CaptionConfig, DataConfig
from blossom.data import synthetic
from blossom.data.ingest import Policy, Tally, decode_line, prepare, prepare_all
from blossom.data.parallel import ordered_map
from blossom.errors import DataError
from blossom.fsutil import atomic_dir, inside
from blossom.images import png_bytes

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


@dataclass
class Record:
    path: Path
    text: str
    meta: dict


def _draw_many(args: tuple[int, range, int, float]) -> list[tuple[bytes, str, dict]]:
    seed, indices, size, background_dropout = args
    out = []
    for index in indices:
        img, flower, text = synthetic.generate(seed, index, size, background_dropout=background_dropout)
        out.append((png_bytes(np.asarray(img), compress_level=1), text, synthetic.attributes(flower)))
    return out


def draw_all(seed: int, indices: range, size: int, workers: int, background_dropout: float = 0.0):
    """Yield (PNG bytes, caption, attributes) for each index in order, drawn on `workers` processes
    (each flower depends on its seed and index alone, so the bytes do not depend on the count)."""
    chunk = 256
    chunks = ((seed, indices[i : i + chunk], size, background_dropout) for i in range(0, len(indices), chunk))
    for batch in ordered_map(_draw_many, chunks, workers):
        yield from batch


def write_synthetic(cfg: DataConfig, out_dir: Path) -> dict[str, int]:
    """Generate the procedural flowers into out_dir/{train,val}. Val draws other indices of the same seed."""
    counts = {}
    workers = cfg.workers or len(os.sched_getaffinity(0))
    with atomic_dir(out_dir) as tmp:
        for split, n, offset in (("train", cfg.train_size, 0), ("val", cfg.val_size, 10_000_000)):
            d = tmp / split
            d.mkdir()
            drawn = draw_all(cfg.seed, range(offset, offset + n), cfg.image_size, workers, cfg.background_dropout)
            with open(d / "metadata.jsonl", "w", encoding="utf-8") as meta:
                for i, (png, text, attrs) in enumerate(
                    tqdm(drawn, total=n, desc=f"data {split}", unit="img", mininterval=1)
                ):
                    name = f"{i:06d}.png"
                    (d / name).write_bytes(png)
                    meta.write(json.dumps({"file_name": name, "text": text, **attrs}) + "\n")
            counts[split] = n
    return counts


def read_metadata(folder: Path, tally: Tally | None = None, meta: Path | None = None) -> list[Record]:
    """Rows with a file and a caption from `meta` (default folder/metadata.jsonl), images resolved in
    `folder`; rows without text, unreadable lines and repeated file names are skipped and counted
    (into `tally` when given, else in one warning); a file name that leaves the folder is refused."""
    meta = meta or folder / "metadata.jsonl"
    if not meta.exists():
        raise DataError(f"{meta} not found: an image folder needs a metadata.jsonl with file_name and text per line")
    own = tally is None
    tally = tally or Tally()
    records, seen = [], set()
    with open(meta, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(decode_line(line, tally))
            except json.JSONDecodeError:
                tally.rows["unreadable lines"] += 1
                continue
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip() or "file_name" not in row:
                tally.rows["rows without file_name/text"] += 1
                continue
            path = inside(folder, row["file_name"], f"{meta} line {number}")
            if row["file_name"] in seen:
                tally.rows["repeated file names (first kept)"] += 1
                continue
            seen.add(row["file_name"])
            records.append(Record(path, text.strip(), row))
    if own and sum(tally.rows.values()):
        log.warning(
            "%s: skipped %s: caption rows with `blossom caption`, fix or remove the rest",
            meta,
            ", ".join(f"{n} {k}" for k, n in tally.rows.items()),
        )
    return records


def policy_for(cfg: DataConfig) -> Policy:
    return Policy(cfg.image_size, cfg.resize, cfg.small_images, cfg.max_pixels)


def load_image(path: Path, size: int) -> Image.Image:
    """RGB, resized on the short side and centre-cropped to size x size."""
    array, skip, _ = prepare(path, Policy(size))
    if array is None:
        raise OSError(f"{path}: {skip}")
    return Image.fromarray(array)


def load_images(records: list[Record], size: int) -> tuple[np.ndarray, list[Record]]:
    """uint8 array (N, size, size, 3) of readable images; missing or corrupt files are skipped and counted."""
    arrays, kept, bad = [], [], []
    for r in tqdm(records, desc="read images", unit="img", mininterval=1, leave=False):
        try:
            arrays.append(np.asarray(load_image(r.path, size)))
            kept.append(r)
        except OSError:
            bad.append(r.path.name)
    if bad:
        log.warning("skipped %d missing or unreadable image(s) (first: %s): remove or replace them", len(bad), bad[0])
    if not kept:
        raise DataError("no readable images: check that the folder's images exist and that metadata.jsonl names them")
    return np.stack(arrays), kept


def write_imagefolder(
    items: list[tuple[Path, str, dict]], out_dir: Path, cfg: DataConfig, tally: Tally, source: Path
) -> dict[str, int]:
    """(source image, split, metadata row) -> out_dir/<split>/NNNNNN.png + metadata.jsonl, all or nothing:
    a set with no usable training image is an error that leaves the previous out_dir as it was."""
    counts = dict.fromkeys([*SPLITS, *sorted({split for _, split, _ in items})], 0)  # train and val always exist
    workers = cfg.workers or len(os.sched_getaffinity(0))
    with atomic_dir(out_dir) as tmp:
        files = {}
        for s in counts:
            (tmp / s).mkdir()
            files[s] = open(tmp / s / "metadata.jsonl", "w", encoding="utf-8")
        try:
            with tqdm(total=len(items), desc="ingest", unit="img", mininterval=1) as bar:
                for i, png, skip, fixes in prepare_all([p for p, _, _ in items], policy_for(cfg), workers, bar):
                    src, split, row = items[i]
                    tally.add(src.name, skip, fixes)
                    if png is None:
                        continue
                    name = f"{counts[split]:06d}.png"
                    (tmp / split / name).write_bytes(png)
                    files[split].write(
                        json.dumps({**row, "file_name": name, "source": str(row.get("source", src.name))}) + "\n"
                    )
                    counts[split] += 1
        finally:
            for f in files.values():
                f.close()
        if counts["train"] == 0:
            raise DataError(
                f"no usable training images in {source} ({tally.line()}): add images or lower "
                "data.val_size; the previous data set is kept"
            )
    return counts


def import_folder(
    cfg: DataConfig, out_dir: Path, caption: CaptionConfig | None = None, captions_dir: Path | None = None
) -> dict[str, int]:
    """Bring a user imagefolder into blossom's layout, resized, with a stable hash-based val split.
    The user's folder is only read. Images without a caption are captioned first when `caption` is
    given, into a metadata file of blossom's own under captions_dir (default: beside out_dir)."""
    from blossom.data.captions import caption_folder, captions_file, needs_caption, scan

    src = Path(cfg.path or "")
    if not src.is_dir():
        raise DataError(f"data.path {src} is not a folder: point it at an image folder with metadata.jsonl")
    meta = None
    if caption is not None and any(needs_caption(r) for r in scan(src)):
        meta = captions_file(captions_dir or out_dir.parent / "captions", src)
        caption_folder(src, caption, out=meta)
    tally = Tally()
    records = read_metadata(src, tally, meta)
    if not records:
        raise DataError(f"{src}/metadata.jsonl has no captioned images: add rows with file_name and text")
    val_share = cfg.val_size / max(1, cfg.val_size + cfg.train_size)
    items = []
    for r in records:
        h = int(hashlib.sha1(str(r.meta["file_name"]).encode()).hexdigest()[:8], 16) / 2**32
        row = {k: v for k, v in r.meta.items() if k not in ("file_name", "text")}
        items.append(
            (r.path, "val" if h < val_share else "train", {"text": r.text, "source": str(r.meta["file_name"]), **row})
        )
    counts = write_imagefolder(items, out_dir, cfg, tally, src)
    log.info("data: %s", tally.line())
    return counts
