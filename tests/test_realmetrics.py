"""FID, KID and CLIP score for folder data, with stand-in networks the tests build (no downloads)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PARAMS
from PIL import Image

from blossom.config import load_config
from blossom.errors import BlossomError
from blossom.realmetrics import inception, real_image_metrics


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory) -> Path:
    """The FID Inception architecture with random weights, saved as safetensors (the real file is 91 MB).
    Needs torch-fidelity, whose torchvision has no CPU build on the CI machines: skipped there."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from safetensors.torch import save_file
    from torchmetrics.image.fid import NoTrainInceptionV3

    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, strict=True: None)
    torch.manual_seed(0)
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    mp.undo()
    for m in net.modules():  # He init keeps activations alive through 90 random ReLU layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast

    root = tmp_path_factory.mktemp("clip")
    vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<|endoftext|>", *"abcdefghijklmnopqrstuvwxyz "])}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizerFast(str(root / "vocab.json"), str(root / "merges.txt"), pad_token="<|endoftext|>")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = root / "clip"
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def folder_data(root: Path, n: int = 24) -> Path:
    """outputs/data/val as the data stage writes it for a folder source."""
    val = root / "data" / "val"
    val.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(val / "metadata.jsonl", "w") as fh:
        for i in range(n):
            base = rng.integers(0, 255, 3)
            img = np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(val / f"{i:03d}.png")
            fh.write(json.dumps({"file_name": f"{i:03d}.png", "text": f"a photo number {i}"}) + "\n")
    return root / "data"


def run(tmp_path, fake, unprompted=None, **settings):
    data = folder_data(tmp_path)
    overrides = ["data.source=folder", f"data.path={tmp_path}", "data.image_size=32"] + [
        f"evaluate.{k}={v}" for k, v in settings.items()
    ]
    cfg = load_config(PARAMS, overrides=overrides)
    real = np.stack([np.asarray(Image.open(p)) for p in sorted((data / "val").glob("*.png"))])

    def generate(backend, prompts, cfg, desc):
        if unprompted is not None and all(p == "" for p in prompts):
            assert cfg.sample.guidance == 1.0  # the unconditional model alone
            return unprompted(real[: len(prompts)])
        return fake(real[: len(prompts)])

    metrics, files = real_image_metrics(cfg, None, generate, data)
    return {**metrics["real_images"], "prompt_effect": metrics["prompt_effect"]}, files


def shuffled(r):
    return np.roll(r, 1, axis=0)


def noise(r):
    return np.random.default_rng(1).integers(0, 255, r.shape).astype(np.uint8)


def test_clip_score_and_distances_on_clip_features_from_a_local_clip(tmp_path, clip_folder):
    close, _ = run(tmp_path / "a", shuffled, clip=clip_folder)
    far, _ = run(tmp_path / "b", noise, clip=clip_folder)
    assert close["images"] == 24 and set(close["skipped"]) == {"fid, kid"}
    assert 0 <= close["fd_clip"] < far["fd_clip"]  # the same images in another order are nearer than noise
    assert close["kid_clip"]["mean"] < far["kid_clip"]["mean"]
    assert np.isfinite(close["clip_score"]) and np.isfinite(close["clip_score_real"])


def test_classic_fid_and_kid_from_local_inception_weights(tmp_path, inception_file):
    close, _ = run(tmp_path / "a", shuffled, inception=inception_file)
    far, _ = run(tmp_path / "b", noise, inception=inception_file)
    assert 0 <= close["fid"] < far["fid"] and close["kid"]["mean"] < far["kid"]["mean"]


def test_missing_networks_skip_their_metrics_and_say_which_setting_enables_them(tmp_path, caplog):
    metrics, files = run(tmp_path, lambda r: r)
    assert set(metrics["skipped"]) == {"fid, kid", "clip_score, fd_clip, kid_clip"}
    assert "evaluate.inception" in metrics["skipped"]["fid, kid"]
    assert "evaluate.clip" in metrics["skipped"]["clip_score, fd_clip, kid_clip"]
    assert "fid" not in metrics and metrics["images"] == 24 and files["samples.png"].shape == (96, 256, 3)
    assert "not computed" in caplog.text


def test_prompt_effect_says_how_far_the_text_moves_each_image_from_its_unprompted_draw(tmp_path):
    """No network needed: generated images against the same seeds' images with an empty prompt."""
    ignored, _ = run(tmp_path / "a", lambda r: r, unprompted=lambda r: r)
    assert ignored["prompt_effect"] == {"levels": 0.0, "lo": 0.0, "hi": 0.0, "n": 24}
    inverted, files = run(tmp_path / "b", lambda r: r, unprompted=lambda r: 255 - r)
    real = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "b" / "data" / "val").glob("*.png"))])
    per_image = np.abs(2 * real.astype(np.float64) - 255).mean(axis=(1, 2, 3))
    effect = inverted["prompt_effect"]
    assert effect["n"] == 24 and effect["levels"] == pytest.approx(per_image.mean(), abs=0.01)
    assert effect["lo"] < effect["levels"] < effect["hi"]
    assert effect["hi"] - effect["levels"] == pytest.approx(1.96 * per_image.std(ddof=1) / np.sqrt(24), abs=0.02)
    grid = files["samples.png"]  # rows: generated, unprompted, real
    assert np.array_equal(grid[32:64, :32], 255 - grid[64:96, :32])


try:
    import torch_fidelity  # noqa: F401

    HAVE_FIDELITY = True
except Exception:
    HAVE_FIDELITY = False


class Boom:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "is not a file"),  # never written
        (lambda p: (p.write_bytes(b"\x00garbage"), p)[1], "is not readable weights"),
        (lambda p: (p.write_bytes(pickle.dumps({"x": Boom()})), p)[1], "is not readable weights"),  # never unpickled
        (
            lambda p: (torch.save({"fc.weight": torch.zeros(2, 2)}, p), p)[1],
            "is not the FID Inception network" if HAVE_FIDELITY else "needs torch-fidelity",
        ),
    ],
)
def test_bad_inception_weights_are_refused_in_one_line(tmp_path, capsys, make, message):
    path = make(tmp_path / "weights.pth")
    with pytest.raises(BlossomError, match=message) as e:
        inception(path)
    assert "\n" not in str(e.value) and "unpickled!" not in capsys.readouterr().out


def test_a_folder_that_is_not_clip_is_refused(tmp_path):
    from blossom.realmetrics import clip_loader

    with pytest.raises(BlossomError, match="not a CLIP model folder"):
        clip_loader(tmp_path)
