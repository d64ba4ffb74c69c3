"""Oxford 102 Flowers from its published layout: jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat.

The official split is kept (train 1,020, val 1,020, test 6,149 images); captions come from the
class names through the caption template, or from Florence-2 (`caption.backend: florence2`).
The download has no class names, so they are read from a file beside it: `cat_to_name.json`
({"1": "pink primrose", ...}, the file most copies carry) or `class_names.txt` (one per line, in
label order). Without one, labels read "flower class N" and a warning says how to add names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from blossom.config import CaptionConfig, DataConfig
from blossom.data.folder import write_imagefolder
from blossom.data.ingest import Tally
from blossom.errors import DataError

log = logging.getLogger(__name__)

SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}


def read_mat(path: Path, key: str):
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    if not path.exists():
        raise DataError(
            f"{path} not found: data.path must be the Oxford 102 folder with jpg/, imagelabels.mat and setid.mat"
        )
    try:
        return loadmat(path)[key].ravel().astype(int)
    except (ValueError, KeyError, TypeError, OSError, MatReadError, IndexError) as e:
        raise DataError(
            f"{path} is not the Oxford 102 {path.name} ({type(e).__name__}: no '{key}'): download it again"
        ) from None


def class_names(folder: Path, n: int) -> list[str]:
    """Names for labels 1..n, from cat_to_name.json or class_names.txt in the folder."""
    as_json, as_text = folder / "cat_to_name.json", folder / "class_names.txt"
    if as_json.exists():
        mapping = json.loads(as_json.read_text(encoding="utf-8"))
        names = [mapping.get(str(i)) for i in range(1, n + 1)]
        source = as_json
    elif as_text.exists():
        lines = [line.strip() for line in as_text.read_text(encoding="utf-8").splitlines() if line.strip()]
        names = lines[:n] + [None] * (n - len(lines))
        source = as_text
    else:
        log.warning(
            "%s has no cat_to_name.json or class_names.txt: captions name 'flower class N'; "
            "add the 102 class names (one per line, in label order) to %s",
            folder,
            as_text,
        )
        return [f"flower class {i}" for i in range(1, n + 1)]
    missing = [i + 1 for i, name in enumerate(names) if not name]
    if missing:
        raise DataError(f"{source} names no class for label(s) {missing[:5]}: give all {n} names")
    return [name.strip() for name in names]


def import_oxford102(
    cfg: DataConfig, out_dir: Path, caption: CaptionConfig, captions_dir: Path | None = None
) -> dict[str, int]:
    """The download is only read; a model's captions go to a file under captions_dir (default: beside out_dir)."""
    from blossom.data.captions import caption_folder, captions_file, scan

    root = Path(cfg.path or "")
    if not (root / "jpg").is_dir():
        raise DataError(
            f"{root / 'jpg'} not found: data.path must be the Oxford 102 folder with jpg/, imagelabels.mat "
            "and setid.mat"
        )
    labels = read_mat(root / "imagelabels.mat", "labels")
    ids = {split: read_mat(root / "setid.mat", key) for split, key in SPLIT_KEYS.items()}
    names = class_names(root, int(labels.max()))
    rows = {}  # image id -> metadata row
    for i, label in enumerate(labels, start=1):
        name = names[label - 1]
        rows[i] = {"label": name, "class_id": int(label), "source": f"jpg/image_{i:05d}.jpg"}
    if caption.backend == "template":
        for row in rows.values():
            row["text"] = caption.template.format(label=row["label"])
    else:
        # A model's captions go to blossom's own file first: that run is long, and resumable there.
        meta = captions_file(captions_dir or out_dir.parent / "captions", root / "jpg")
        caption_folder(root / "jpg", caption, out=meta)
        for row in scan(root / "jpg", meta):
            name = str(row["file_name"])
            if name.startswith("image_") and name[6:11].isdigit() and row.get("text") and int(name[6:11]) in rows:
                rows[int(name[6:11])]["text"] = row["text"]
    tally = Tally()
    items = [
        (root / "jpg" / f"image_{i:05d}.jpg", split, rows[i])
        for split, split_ids in ids.items()
        for i in split_ids
        if "text" in rows.get(i, {})
    ]
    tally.rows["images without a caption"] = sum(len(v) for v in ids.values()) - len(items)
    counts = write_imagefolder(items, out_dir, cfg, tally, root)
    log.info("data: %s", tally.line())
    return counts
