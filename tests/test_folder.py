import json
import logging

import numpy as np
import pytest
from PIL import Image

from blossom.config import DataConfig
from blossom.data.folder import import_folder, load_images, read_metadata, write_synthetic
from blossom.errors import DataError


def make_folder(root, n_good=6):
    root.mkdir()
    rows = []
    for i in range(n_good):
        Image.new("RGB", (40 + i, 30), (10 * i, 100, 200)).save(root / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"flower number {i}"})
    (root / "broken.png").write_bytes(b"not an image at all")
    rows.append({"file_name": "broken.png", "text": "a broken file"})
    rows.append({"file_name": "missing.png", "text": "a file that is not there"})
    rows.append({"file_name": "img0.png"})  # no caption
    with open(root / "metadata.jsonl", "w") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_bad_rows_and_images_are_skipped_counted_and_warned_once(tmp_path, caplog):
    folder = make_folder(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING):
        records = read_metadata(folder)
        images, kept = load_images(records, 16)
    assert len(records) == 8  # the row without text is gone
    assert images.shape == (6, 16, 16, 3) and images.dtype == np.uint8
    assert [r.path.name for r in kept] == [f"img{i}.png" for i in range(6)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipped 1 rows without file_name/text" in w for w in warnings)
    assert any("skipped 2 missing or unreadable image(s)" in w for w in warnings)


def test_import_folder_writes_both_splits_without_losing_captions(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    counts = import_folder(
        DataConfig(source="folder", path=str(folder), image_size=16, train_size=4, val_size=2), tmp_path / "out"
    )
    assert counts["train"] + counts["val"] == 6 and counts["train"] > 0
    texts = [r.text for s in ("train", "val") for r in read_metadata(tmp_path / "out" / s)]
    assert sorted(texts) == sorted(f"flower number {i}" for i in range(6))
    assert not list((tmp_path).glob(".out.*"))  # no temp folder left behind


def test_empty_or_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="metadata.jsonl not found"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("")
    with pytest.raises(DataError, match="no captioned images"):
        import_folder(DataConfig(source="folder", path=str(tmp_path)), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_synthetic_imagefolder_round_trips(tmp_path):
    counts = write_synthetic(DataConfig(image_size=32, train_size=10, val_size=3), tmp_path / "data")
    assert counts == {"train": 10, "val": 3}
    rows = read_metadata(tmp_path / "data" / "train")
    assert len(rows) == 10 and {"petal_color", "background", "petal_count"} <= set(rows[0].meta)
    images, _ = load_images(rows, 32)
    assert images.shape == (10, 32, 32, 3)
