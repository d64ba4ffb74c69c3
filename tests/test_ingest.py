"""Real folders' awkward images and metadata: each kind handled, counted, and reported in one line."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from blossom.config import CaptionConfig, DataConfig
from blossom.data.folder import import_folder, read_metadata
from blossom.data.sources import make_dataset
from blossom.errors import DataError

SIZE = 16


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def awkward_folder(root):
    """One image of each awkward kind, and metadata with a repeated name and a Windows-1252 caption."""
    root.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "rgb.jpg")
    Image.new("L", (30, 30), 90).save(root / "gray.png")
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # red in CMYK
    rgba = Image.new("RGBA", (30, 30), (0, 0, 255, 0))  # fully transparent: must come out white, not black
    rgba.save(root / "alpha.png")
    Image.fromarray(np.full((30, 30), 32768, dtype=np.uint16)).save(root / "deep.png")  # 16-bit, half of full scale
    pal = Image.new("P", (30, 30), 0)
    pal.putpalette([0, 200, 0] * 256)
    pal.save(root / "palette.png")
    # EXIF orientation 6 (stored sideways): 40 wide with a red left half becomes 40 tall, red on top.
    sideways = np.zeros((20, 40, 3), dtype=np.uint8)
    sideways[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "rotated.jpg").write_bytes(jpeg_bytes(Image.fromarray(sideways), exif=exif.tobytes()))
    Image.new("RGB", (6, 6), (10, 10, 10)).save(root / "tiny.png")
    Image.new("L", (1200, 1000), 0).save(root / "huge.png")  # over the test's max_pixels
    (root / "truncated.jpg").write_bytes(jpeg_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:300])
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    rows = [
        {"file_name": n, "text": f"image {n}"}
        for n in (
            "rgb.jpg",
            "gray.png",
            "cmyk.jpg",
            "alpha.png",
            "deep.png",
            "palette.png",
            "rotated.jpg",
            "tiny.png",
            "huge.png",
            "truncated.jpg",
            "corrupt.png",
            "gone.png",
        )
    ]
    rows.append({"file_name": "rgb.jpg", "text": "the same file named twice"})
    lines = [json.dumps(r).encode() for r in rows]
    lines.append(b'{"file_name": "caf\\u00e9.png", "text": "caf' + b"\xe9" + b' au lait"}')  # cp1252, not UTF-8
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    Image.new("RGB", (30, 30), (5, 5, 5)).save(root / "café.png")
    return root


def by_source(out):
    rows = {}
    for split in ("train", "val"):
        for line in (out / split / "metadata.jsonl").read_text().splitlines():
            row = json.loads(line)
            rows[row["source"]] = (np.asarray(Image.open(out / split / row["file_name"])), row)
    return rows


def cfg_for(folder, **kw):
    return DataConfig(
        source="folder",
        path=str(folder),
        image_size=SIZE,
        train_size=100,
        val_size=1,
        max_pixels=1_000_000,
        workers=1,
        **kw,
    )


def test_each_awkward_kind_is_handled_and_counted_in_one_line(tmp_path, caplog):
    folder = awkward_folder(tmp_path / "imgs")
    with caplog.at_level(logging.INFO, logger="blossom.data.folder"):
        counts = import_folder(cfg_for(folder), tmp_path / "out")
    assert counts["train"] + counts["val"] == 9
    [summary] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: ")]
    assert summary == (
        "data: 9 images written; skipped 1 missing (e.g. gone.png), 2 unreadable (e.g. truncated.jpg), "
        "1 too large (e.g. huge.png); metadata: 1 non-UTF-8 lines re-decoded, "
        "1 repeated file names (first kept); converted 1 grayscale, 1 CMYK, 1 alpha, 1 palette, "
        "1 16-bit, 1 EXIF-rotated, 1 upscaled"
    )
    rows = by_source(tmp_path / "out")
    assert rows["rgb.jpg"][1]["text"] == "image rgb.jpg"  # the first of the repeated rows
    assert rows["café.png"][1]["text"] == "café au lait"
    assert all(img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8 for img, _ in rows.values())
    assert (rows["alpha.png"][0] == 255).all()  # transparent over white
    assert abs(int(rows["deep.png"][0].mean()) - 128) <= 1  # 32768 / 65535 of full scale, not clipped to 255
    assert rows["gray.png"][0].std() == 0 and abs(int(rows["gray.png"][0].mean()) - 90) <= 1
    cmyk = rows["cmyk.jpg"][0].reshape(-1, 3).mean(0)
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60
    rotated = rows["rotated.jpg"][0].astype(int)
    top, bottom = rotated[: SIZE // 2 - 2].mean((0, 1)), rotated[SIZE // 2 + 2 :].mean((0, 1))
    assert top[0] > 200 and bottom[0] < 60  # red on top: the EXIF rotation was applied


def test_small_images_can_be_skipped_and_resize_policies_differ(tmp_path, caplog):
    folder = awkward_folder(tmp_path / "imgs")
    with caplog.at_level(logging.INFO, logger="blossom.data.folder"):
        counts = import_folder(cfg_for(folder, small_images="skip"), tmp_path / "skip")
    # With skip, every image under 16 px on its short side goes: tiny.png only (the rest are 20+).
    assert counts["train"] + counts["val"] == 8
    assert "1 too small (e.g. tiny.png)" in caplog.records[-1].getMessage()
    wide = tmp_path / "wide"
    wide.mkdir()
    img = np.zeros((20, 60, 3), dtype=np.uint8)
    img[:, :20] = 255  # a white left third
    Image.fromarray(img).save(wide / "w.png")
    (wide / "metadata.jsonl").write_text(json.dumps({"file_name": "w.png", "text": "wide"}) + "\n")
    first = {}
    for policy in ("crop", "squash", "pad"):
        import_folder(cfg_for(wide, resize=policy), tmp_path / policy)
        first[policy] = by_source(tmp_path / policy)["w.png"][0].mean()
    # crop keeps the black centre; squash keeps the white third (about 1/3 bright); pad adds white bars.
    assert first["crop"] < 30 and 60 < first["squash"] < 110 and first["pad"] > 150


def test_nothing_usable_is_a_clear_error_and_writes_nothing(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"junk")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "junk"}) + "\n")
    with pytest.raises(DataError, match=r"no usable training images .* 1 unreadable"):
        import_folder(cfg_for(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def oxford_folder(root, names: bool = True):
    """The published layout, small: 12 images of 3 classes, official-style split ids (1-based)."""
    from scipy.io import savemat

    (root / "jpg").mkdir(parents=True)
    colours = [(220, 40, 120), (250, 200, 0), (120, 60, 200)]
    labels = [1 + i % 3 for i in range(12)]
    for i, label in enumerate(labels, start=1):
        Image.new("RGB", (50 + i, 40), colours[label - 1]).save(root / "jpg" / f"image_{i:05d}.jpg")
    savemat(root / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    savemat(
        root / "setid.mat",
        {"trnid": np.array([[1, 2, 3, 4]]), "valid": np.array([[5, 6, 7]]), "tstid": np.array([[8, 9, 10, 11, 12]])},
    )
    if names:
        (root / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "2": "sunflower", "3": "moon orchid"}))
    return root


def test_oxford102_layout_becomes_an_imagefolder_with_the_official_split(tmp_path):
    root = oxford_folder(tmp_path / "oxford")
    cfg = DataConfig(source="oxford102", path=str(root), image_size=SIZE, workers=1)
    counts = make_dataset(cfg, tmp_path / "out", CaptionConfig())
    assert counts == {"train": 4, "val": 3, "test": 5}
    train = read_metadata(tmp_path / "out" / "train")
    assert [r.meta["source"] for r in train] == [f"jpg/image_{i:05d}.jpg" for i in (1, 2, 3, 4)]
    assert [r.text for r in train] == [
        "a photo of a pink primrose",
        "a photo of a sunflower",
        "a photo of a moon orchid",
        "a photo of a pink primrose",
    ]
    assert [r.meta["class_id"] for r in read_metadata(tmp_path / "out" / "test")] == [2, 3, 1, 2, 3]


def test_oxford102_without_names_or_labels(tmp_path, caplog):
    root = oxford_folder(tmp_path / "oxford", names=False)
    cfg = DataConfig(source="oxford102", path=str(root), image_size=SIZE, workers=1)
    with caplog.at_level(logging.WARNING):
        make_dataset(cfg, tmp_path / "out", CaptionConfig())
    assert read_metadata(tmp_path / "out" / "val")[0].text == "a photo of a flower class 2"
    assert any("class_names.txt" in r.getMessage() for r in caplog.records)
    (root / "imagelabels.mat").unlink()
    with pytest.raises(DataError, match="imagelabels.mat not found"):
        make_dataset(cfg, tmp_path / "out2", CaptionConfig())


def test_parallel_decoding_writes_what_one_process_writes(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(140):  # more than two chunks, so the process pool is used
        Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"noise {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    one, two = tmp_path / "one", tmp_path / "two"
    import_folder(DataConfig(source="folder", path=str(folder), image_size=SIZE, workers=1), one)
    import_folder(DataConfig(source="folder", path=str(folder), image_size=SIZE, workers=2), two)
    a, b = by_source(one), by_source(two)
    assert len(a) == 140 and a.keys() == b.keys()
    assert all((a[k][0] == b[k][0]).all() and a[k][1] == b[k][1] for k in a)


def _square(x: int) -> int:
    return x * x


def test_ordered_map_keeps_order_and_pulls_only_a_few_tasks_ahead():
    # a data set of millions of images must not queue millions of tasks (or their results) at once
    from blossom.data.parallel import AHEAD, ordered_map

    pulled = []

    def tasks():
        for i in range(1000):
            pulled.append(i)
            yield i

    results = ordered_map(_square, tasks(), workers=2)
    assert next(results) == 0
    assert len(pulled) <= AHEAD * 2 + 1
    assert list(results) == [i * i for i in range(1, 1000)]
    assert list(ordered_map(_square, range(5), workers=1)) == [0, 1, 4, 9, 16]
