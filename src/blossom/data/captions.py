"""Captions for images that have none, written to a metadata file of blossom's own.

The user's folder is only read: its metadata.jsonl rows are copied as they are into the output
file (outputs/captions/<folder>-<hash>.jsonl), with text added where a row had none and a row
added for each image the metadata does not name; `blossom data --path` reads that file.

Two backends: `template` fills a sentence from each image's label (a `label` field in the
metadata, or the sub-folder the image sits in), offline and instant; `florence2` runs a
transformers image-to-text model (Florence-2 by default) from a local folder or a hub id.
Captioning is resumable: rows that already have text are never captioned again, captions found
in an earlier output file are reused, and the output is rewritten atomically every few seconds,
so a killed run loses at most those seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from blossom.config import CaptionConfig
from blossom.data.ingest import decode_line
from blossom.errors import DataError, ModelError, first_line
from blossom.fsutil import inside, write_text

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SAVE_EVERY_S = 10.0


def captions_file(captions_dir: Path, folder: Path) -> Path:
    """Where blossom keeps the captioned metadata of a user's folder: one file per folder path."""
    resolved = Path(folder).resolve()
    return captions_dir / f"{resolved.name}-{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}.jsonl"


def scan(folder: Path, meta: Path | None = None) -> list[dict]:
    """metadata rows (unreadable lines dropped; a file name leaving the folder refused), then a row for
    every image file they do not name."""
    rows: list[dict] = []
    meta = meta or folder / "metadata.jsonl"
    if meta.exists():
        for number, line in enumerate(meta.read_bytes().splitlines(), start=1):
            try:
                row = json.loads(decode_line(line))
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "file_name" in row:
                inside(folder, row["file_name"], f"{meta} line {number}")
                rows.append(row)
    named = {str(r["file_name"]) for r in rows}
    for path in sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.resolve().is_relative_to(folder.resolve())
    ):
        rel = path.relative_to(folder).as_posix()
        if rel not in named:
            rows.append({"file_name": rel})
    return rows


def needs_caption(row: dict) -> bool:
    return not (isinstance(row.get("text"), str) and row["text"].strip())


def label_of(row: dict) -> str | None:
    """The image's label: a `label` or `class_name` field, else the sub-folder it sits in."""
    for key in ("label", "class_name"):
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key].strip()
    parent = Path(str(row["file_name"])).parent.name
    return parent.replace("_", " ").replace("-", " ") if parent else None


class TemplateCaptioner:
    def __init__(self, template: str):
        if "{label}" not in template:
            raise DataError(f"caption.template {template!r} has no {{label}}: write it like 'a photo of a {{label}}'")
        self.template = template

    def caption_rows(self, rows: list[dict], folder: Path) -> list[str | None]:
        return [self.template.format(label=label) if (label := label_of(r)) else None for r in rows]


class ModelCaptioner:
    """A transformers image-to-text model (Florence-2 and kin) with its processor; batched, greedy."""

    def __init__(self, cfg: CaptionConfig):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(cfg.model)
            self.model = AutoModelForImageTextToText.from_pretrained(cfg.model).eval()
        except (OSError, ValueError) as e:
            first = first_line(e)
            raise ModelError(
                f"cannot load the captioning model {cfg.model!r} ({first}): set caption.model to a local folder "
                "with its weights, or caption.backend=template"
            ) from None
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        self.task, self.max_new_tokens = cfg.task, cfg.max_new_tokens

    def _generate(self, images: list[Image.Image]) -> list[str]:
        import torch

        inputs = self.processor(text=[self.task] * len(images), images=images, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def caption_rows(self, rows: list[dict], folder: Path) -> list[str | None]:
        import torch

        images: list[Image.Image | None] = []
        for r in rows:
            try:
                with Image.open(folder / str(r["file_name"])) as im:
                    images.append(ImageOps.exif_transpose(im).convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError):
                images.append(None)
        readable = [im for im in images if im is not None]
        if not readable:
            return [None] * len(rows)
        try:
            texts = iter(self._generate(readable))
        except torch.OutOfMemoryError:
            log.warning("out of memory captioning a batch of %d: falling back to one image at a time", len(readable))
            texts = iter([t for im in readable for t in self._generate([im])])
        return [next(texts) or None if im is not None else None for im in images]


def make_captioner(cfg: CaptionConfig):
    return TemplateCaptioner(cfg.template) if cfg.backend == "template" else ModelCaptioner(cfg)


def _save(out: Path, rows: list[dict]) -> None:
    write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def caption_folder(
    folder: Path,
    cfg: CaptionConfig,
    count_tokens: Callable[[str], int] | None = None,
    token_limit: int | None = None,
    *,
    out: Path,
) -> dict[str, int]:
    """Caption every image in folder that has no text, into `out` (the folder's metadata with the
    captions added); returns counts (captioned, kept, failed, too_long). Nothing in folder is written."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: pass the image folder to caption")
    if out.resolve().is_relative_to(folder.resolve()):
        raise DataError(
            f"captions would be written into the image folder {folder}: blossom never writes there; "
            "set `outputs` to a folder outside it"
        )
    rows = scan(folder)
    earlier = (
        {str(r["file_name"]): r["text"] for r in scan(folder, out) if not needs_caption(r)} if out.exists() else {}
    )
    for row in rows:
        if needs_caption(row) and str(row["file_name"]) in earlier:
            row["text"] = earlier[str(row["file_name"])]  # resumed from an earlier, interrupted run
    todo = [r for r in rows if needs_caption(r)]
    counts = {"captioned": 0, "kept": len(rows) - len(todo), "failed": 0, "too_long": 0}
    if not todo:
        _save(out, rows)
        return counts
    captioner = make_captioner(cfg)
    last_save = time.monotonic()
    batch = cfg.batch_size if cfg.backend != "template" else 1024
    with tqdm(total=len(todo), desc=f"caption ({cfg.backend})", unit="img", mininterval=1) as bar:
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            for row, text in zip(chunk, captioner.caption_rows(chunk, folder), strict=True):
                if text is None:
                    counts["failed"] += 1
                    continue
                row["text"] = text
                counts["captioned"] += 1
                if count_tokens and token_limit and count_tokens(text) > token_limit:
                    counts["too_long"] += 1
            bar.update(len(chunk))
            if time.monotonic() - last_save > SAVE_EVERY_S:
                _save(out, rows)
                last_save = time.monotonic()
    _save(out, rows)
    if counts["too_long"]:
        log.warning(
            "%d caption(s) are longer than the text encoder's %d tokens and will be truncated in training",
            counts["too_long"],
            token_limit,
        )
    if counts["failed"]:
        log.warning(
            "%d image(s) got no caption (unreadable, no label for the template, or an empty model output): "
            "give them a label or text, or use caption.backend=florence2",
            counts["failed"],
        )
    return counts
