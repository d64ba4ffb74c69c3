"""The data set from its configured source: procedural flowers, a user's image folder or Oxford 102,
all written in the one imagefolder layout that everything downstream reads."""

from __future__ import annotations

from pathlib import Path

from blossom.config import CaptionConfig, DataConfig
from blossom.data.folder import import_folder, write_synthetic
from blossom.data.oxford import import_oxford102


def make_dataset(cfg: DataConfig, out_dir: Path, caption: CaptionConfig | None = None) -> dict[str, int]:
    if cfg.source == "synthetic":
        return write_synthetic(cfg, out_dir)
    if cfg.source == "oxford102":
        return import_oxford102(cfg, out_dir, caption or CaptionConfig())
    return import_folder(cfg, out_dir, caption)
