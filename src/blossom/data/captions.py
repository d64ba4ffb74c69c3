"""Captions for images that have none, written into the folder's metadata.jsonl.

Two backends: `template` fills a sentence from each image's label (a `label` field in the
metadata, or the sub-folder the image sits in), offline and instant; `florence2` runs a
transformers image-to-text model (Florence-2 by default) from a local folder or a hub id.
Captioning is resumable: rows that already have text are never captioned again, and the
metadata is rewritten atomically every few seconds, so a killed run loses at most those seconds.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from blossom.config import CaptionConfig
from blossom.errors import DataError, ModelError
from blossom.fsutil import write_text

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SAVE_EVERY_S = 10.0


def scan(folder: Path) -> list[dict]:
    """metadata.jsonl rows (unreadable lines dropped), then a row for every image file it does not name."""
    rows: list[dict] = []
    meta = folder / "metadata.jsonl"
    if meta.exists():
        for line in meta.read_bytes().splitlines():
            try:
                row = json.loads(line.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "file_name" in row:
                rows.append(row)
    named = {str(r["file_name"]) for r in rows}
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
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
            first = str(e).strip().splitlines()[0][:160]
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


def _save(folder: Path, rows: list[dict]) -> None:
    write_text(folder / "metadata.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def caption_folder(folder: Path, cfg: CaptionConfig, count_tokens: Callable[[str], int] | None = None,
                   token_limit: int | None = None) -> dict[str, int]:
    """Caption every image in folder that has no text; returns counts (captioned, kept, failed, too_long)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: pass the image folder to caption")
    rows = scan(folder)
    todo = [r for r in rows if needs_caption(r)]
    counts = {"captioned": 0, "kept": len(rows) - len(todo), "failed": 0, "too_long": 0}
    if not todo:
        return counts
    captioner = make_captioner(cfg)
    last_save = time.monotonic()
    batch = cfg.batch_size if cfg.backend != "template" else 1024
    with tqdm(total=len(todo), desc=f"caption ({cfg.backend})", unit="img", mininterval=1) as bar:
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            for row, text in zip(chunk, captioner.caption_rows(chunk, folder)):
                if text is None:
                    counts["failed"] += 1
                    continue
                row["text"] = text
                counts["captioned"] += 1
                if count_tokens and token_limit and count_tokens(text) > token_limit:
                    counts["too_long"] += 1
            bar.update(len(chunk))
            if time.monotonic() - last_save > SAVE_EVERY_S:
                _save(folder, rows)
                last_save = time.monotonic()
    _save(folder, rows)
    if counts["too_long"]:
        log.warning("%d caption(s) are longer than the text encoder's %d tokens and will be truncated in training",
                    counts["too_long"], token_limit)
    if counts["failed"]:
        log.warning("%d image(s) got no caption (unreadable, no label for the template, or an empty model output): "
                    "give them a label or text, or use caption.backend=florence2", counts["failed"])
    return counts
