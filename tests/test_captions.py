"""Captioning: template from labels, and a real transformers Florence-2 model (tiny, random, built here)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from blossom.config import CaptionConfig, DataConfig
from blossom.data import captions
from blossom.data.captions import caption_folder
from blossom.data.folder import import_folder
from blossom.errors import DataError, ModelError

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>"]
WORDS = [
    "a",
    "red",
    "blue",
    "flower",
    "with",
    "round",
    "petals",
    "on",
    "grass",
    "Describe",
    "in",
    "detail",
    "what",
    "is",
    "shown",
    "the",
    "image",
    ".",
]


@pytest.fixture(scope="session")
def tiny_florence(tmp_path_factory) -> Path:
    """A Florence-2 with a 2-stage DaViT and a 1-layer BART, random weights, saved with its processor."""
    from transformers import (
        BartConfig,
        BartTokenizer,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    out = tmp_path_factory.mktemp("florence2")
    vocab = {t: i for i, t in enumerate(SPECIAL + ["Ġ" + w for w in WORDS] + WORDS)}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = BartTokenizer(
        str(out / "vocab.json"), str(out / "merges.txt"), extra_special_tokens={"image_token": "<image>"}
    )
    # 32 px in, patch strides 4 and 2: a 4x4 grid, plus one pooled token = 17 image tokens.
    images = CLIPImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False)
    images.image_seq_length = 17
    vision = Florence2VisionConfig(
        depths=[1, 1],
        patch_size=[7, 3],
        patch_stride=[4, 2],
        patch_padding=[3, 1],
        patch_prenorm=[False, True],
        embed_dim=[16, 32],
        num_heads=[2, 2],
        num_groups=[2, 2],
        window_size=2,
        projection_dim=32,
        max_position_embeddings=16,
        max_temporal_embeddings=4,
    )
    text = BartConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(
        Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)
    )
    # Random weights would often stop at once; keep the special tokens out so every caption has words.
    model.generation_config.suppress_tokens = [*range(len(SPECIAL)), tokenizer.image_token_id]
    model.generation_config.forced_eos_token_id = None
    model.save_pretrained(out)
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
    return out


def make_folder(root: Path) -> Path:
    """Two captioned images, three without a caption (one in a label sub-folder), one corrupt file."""
    root.mkdir()
    colors = ["red", "blue", "green", "yellow", "purple"]
    for i, c in enumerate(colors[:4]):
        Image.new("RGB", (48, 40), c).save(root / f"{i}.png")
    (root / "roses").mkdir()
    Image.new("RGB", (40, 40), colors[4]).save(root / "roses" / "r.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [
        {"file_name": "0.png", "text": "a red square"},
        {"file_name": "1.png", "text": "a blue square"},
        {"file_name": "2.png", "label": "green thing"},
    ]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def rows_of(meta: Path) -> dict[str, dict]:
    return {r["file_name"]: r for r in map(json.loads, meta.read_text().splitlines())}


def hashes(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under folder: content hash and permission bits."""
    import hashlib

    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_template_captions_from_labels_and_folder_names(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    before = hashes(folder)
    out = tmp_path / "captions" / "imgs.jsonl"
    counts = caption_folder(folder, CaptionConfig(template="a photo of a {label}"), out=out)
    assert counts == {"captioned": 2, "kept": 2, "failed": 2, "too_long": 0}  # 3.png and broken.png have no label
    assert hashes(folder) == before  # the user's folder is only read
    rows = rows_of(out)
    assert rows["2.png"]["text"] == "a photo of a green thing"
    assert rows["roses/r.jpg"]["text"] == "a photo of a roses"
    assert rows["0.png"]["text"] == "a red square" and "text" not in rows["3.png"]


def test_template_without_label_slot_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"has no \{label\}"):
        caption_folder(make_folder(tmp_path / "imgs"), CaptionConfig(template="a flower"), out=tmp_path / "c.jsonl")


def florence_cfg(model: Path, **kw) -> CaptionConfig:
    return CaptionConfig(backend="florence2", model=str(model), max_new_tokens=10, **{"batch_size": 2, **kw})


def test_florence2_captions_batched_resumable_and_warns_on_long_captions(tiny_florence, tmp_path, caplog):
    folder = make_folder(tmp_path / "imgs")
    before, out = hashes(folder), tmp_path / "captions.jsonl"
    with caplog.at_level(logging.WARNING):
        counts = caption_folder(folder, florence_cfg(tiny_florence), lambda t: len(t.split()), token_limit=5, out=out)
    # 3.png, 2.png, roses/r.jpg captioned; broken.png cannot be read; 10 new words each > 5 tokens
    assert counts == {"captioned": 3, "kept": 2, "failed": 1, "too_long": 3}
    assert "longer than the text encoder's 5 tokens" in caplog.text
    assert hashes(folder) == before
    rows = rows_of(out)
    new = {k: rows[k]["text"] for k in ("2.png", "3.png", "roses/r.jpg")}
    assert all(len(t.split()) >= 5 and set(t.split()) <= set(WORDS) for t in new.values()), new
    assert rows["0.png"]["text"] == "a red square"  # existing captions are never replaced

    again = caption_folder(folder, florence_cfg(tiny_florence), out=out)  # resumed from the earlier output
    assert again["captioned"] == 0 and again["kept"] == 5
    assert {k: rows_of(out)[k]["text"] for k in new} == new

    # One image at a time gives the same captions as batches of two: batching changes nothing.
    single = make_folder(tmp_path / "single")
    caption_folder(single, florence_cfg(tiny_florence, batch_size=1), out=tmp_path / "single.jsonl")
    assert {k: rows_of(tmp_path / "single.jsonl")[k]["text"] for k in new} == new


def test_florence2_falls_back_to_one_image_at_a_time_on_out_of_memory(tiny_florence, tmp_path, monkeypatch, caplog):
    real = captions.ModelCaptioner._generate

    def small_memory(self, images):
        if len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(self, images)

    monkeypatch.setattr(captions.ModelCaptioner, "_generate", small_memory)
    folder = make_folder(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING):
        counts = caption_folder(folder, florence_cfg(tiny_florence, batch_size=3), out=tmp_path / "c.jsonl")
    assert counts["captioned"] == 3 and "falling back to one image at a time" in caplog.text


def test_missing_model_is_a_one_line_error_naming_the_fix(tmp_path):
    with pytest.raises(ModelError) as err:
        caption_folder(
            make_folder(tmp_path / "imgs"), florence_cfg(tmp_path / "no-such-model"), out=tmp_path / "c.jsonl"
        )
    assert "set caption.model to a local folder" in str(err.value) and "\n" not in str(err.value)


def test_importing_a_folder_captions_what_lacks_a_caption(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    (folder / "broken.png").unlink()
    (folder / "3.png").unlink()
    before = hashes(folder)
    counts = import_folder(
        DataConfig(source="folder", path=str(folder), image_size=16, val_size=1, train_size=100),
        tmp_path / "data",
        CaptionConfig(),
    )
    assert counts["train"] + counts["val"] == 4
    texts = [
        json.loads(line)["text"]
        for s in ("train", "val")
        for line in (tmp_path / "data" / s / "metadata.jsonl").read_text().splitlines()
    ]
    assert sorted(texts) == ["a blue square", "a photo of a green thing", "a photo of a roses", "a red square"]
    assert hashes(folder) == before and (tmp_path / "captions").is_dir()


def test_caption_command_reports_counts(tmp_path, capsys):
    from blossom.cli import main

    folder = make_folder(tmp_path / "imgs")
    assert main(["--params", str(tmp_path / "none.yaml"), "caption", str(folder)]) == 2  # a missing params file
    assert main(["--set", f"outputs={tmp_path / 'out'}", "caption", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "caption: 2 captioned (template), 2 already had one, 2 failed, 0 longer than 24 tokens" in out
    assert str(tmp_path / "out" / "captions") in out and "is left as it was" in out
