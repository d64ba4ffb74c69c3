"""The web app's page logic with Streamlit's AppTest (no browser; see test_app_browser.py for one)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import PARAMS
from streamlit.testing.v1 import AppTest

from blossom.backends import load_backend
from blossom.cpu import has_vnni
from blossom.sampling import sample

APP = str(PARAMS.parent / "src" / "blossom" / "app_entry.py")  # the script `blossom app` runs


def page(monkeypatch, **env) -> AppTest:
    for key in ("HF_MODEL_REPO", "BLOSSOM_MODEL", "BLOSSOM_OUTPUTS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def generate(at: AppTest, prompt: str, **settings) -> AppTest:
    at.text_area(key="prompt").set_value(prompt)
    if "backend" in settings:
        at.radio[0].set_value(settings["backend"]).run()
    if "precision" in settings:
        at.radio[1].set_value(settings["precision"])
    if "steps" in settings:
        at.slider[0].set_value(settings["steps"])
    if "n" in settings:
        at.number_input[0].set_value(settings["n"])
    if "seed" in settings:
        at.number_input[1].set_value(settings["seed"])
    next(b for b in at.button if b.label == "Generate").click().run()
    assert not at.exception, at.exception
    return at


def test_no_model_yet_explains_the_one_command(monkeypatch, tmp_path):
    at = page(monkeypatch, BLOSSOM_OUTPUTS=tmp_path)
    assert "no model to serve yet" in at.info[0].value
    assert at.code[0].value == "make run"


@pytest.mark.parametrize(
    "backend, precision", [("onnx", "fp32"), ("onnx", "int8"), ("onnx", "auto"), ("torch", "fp32")]
)
def test_generate_shows_the_images_its_seed_gives(monkeypatch, micro_exported, backend, precision):
    _, folder, _ = micro_exported
    at = page(monkeypatch, BLOSSOM_MODEL=folder)
    assert at.sidebar.metric[0].label == "Validation loss"
    prompt = "a pink flower with six thin petals at night"
    assert at.radio[1].options == ["fp32", "int8", "auto"]  # the micro export has int8 graphs
    at = generate(at, prompt, backend=backend, precision=precision, steps=4, n=3, seed=11)
    result = at.session_state["result"]
    assert result["summary"].startswith("3 image(s) in") and "seed 11" in result["summary"]
    assert at.success[0].value == result["summary"]
    runs_int8 = precision == "int8" or (precision == "auto" and has_vnni())
    assert ("int8" in result["summary"]) == runs_int8 and ("(auto)" in result["summary"]) == (precision == "auto")
    alone = sample(load_backend(backend, folder, precision), [prompt] * 3, "unipc", 4, 5.0, 11)
    assert np.array_equal(np.stack(result["images"]), alone)
    assert [b.label for b in at.get("download_button")] == ["Download PNG"] * 3


def test_the_page_starts_with_the_defaults_of_blossom_generate(monkeypatch, micro_exported, micro_prepared):
    from blossom.backends import default_backend
    from blossom.config import SampleConfig

    model, folder, _ = micro_exported
    cfg, _ = micro_prepared
    # an export (its sampling written from params.yaml, as generate reads it); a trained folder
    # without ONNX graphs or sampling of its own (params.yaml's defaults)
    for served, backend, sampling in ((folder, "onnx", cfg.sample), (model, "torch", SampleConfig())):
        at = page(monkeypatch, BLOSSOM_MODEL=served)
        assert at.radio[0].value == backend == default_backend(served)
        assert at.selectbox[0].value == sampling.sampler
        assert at.slider[0].value == sampling.steps
        assert at.slider[1].value == sampling.guidance
    assert cfg.sample.steps == 4 != SampleConfig().steps  # the micro config's, so the export's own are seen


def test_bad_input_is_a_message_on_the_page(monkeypatch, micro_exported):
    _, folder, _ = micro_exported
    at = generate(page(monkeypatch, BLOSSOM_MODEL=folder), "   ")
    assert "Type a prompt first" in at.warning[0].value and "result" not in at.session_state
    long_prompt = " ".join(["a red flower with five round petals"] * 10)
    at = generate(at, long_prompt, steps=2, n=1)
    assert "longer than the model's 16 tokens" in at.info[0].value
    assert at.session_state["result"]["summary"].startswith("1 image(s)")


@pytest.mark.parametrize("damaged", ["onnx/unet.opt.onnx", "blossom.json"])
def test_a_broken_model_folder_is_an_error_not_a_traceback(monkeypatch, micro_exported, tmp_path, damaged):
    _, folder, _ = micro_exported
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / damaged).write_bytes(b"garbage")
    at = page(monkeypatch, BLOSSOM_MODEL=broken)
    assert "cannot be loaded" in at.error[0].value and "export it again" in at.error[0].value


def test_a_hub_model_downloads_only_what_the_chosen_backend_runs(monkeypatch, micro_exported, tmp_path):
    """HF_MODEL_REPO: the page fetches the card's files, each backend its own weights, never both formats."""
    import fnmatch

    import huggingface_hub

    _, folder, _ = micro_exported
    snapshot, asked = tmp_path / "snapshot", []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):  # the Hub, served from the export
        asked.append((repo_id, tuple(allow_patterns or ["*"])))
        for path in folder.rglob("*"):
            rel = str(path.relative_to(folder))
            if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns or ["*"]):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, snapshot / rel)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    at = page(monkeypatch, HF_MODEL_REPO="someone/flowers")
    assert at.sidebar.metric[0].label == "Validation loss"  # the card's files came first
    prompt = "a red flower at night"
    at = generate(at, prompt, backend="onnx", precision="fp32", steps=3, n=1, seed=5)
    # the page's default backend, ONNX Runtime: its graphs, and none of PyTorch's weights
    assert list(snapshot.glob("onnx/*.onnx")) and not list(snapshot.rglob("*.safetensors"))
    assert np.array_equal(
        at.session_state["result"]["images"][0], sample(load_backend("onnx", folder), [prompt], "unipc", 3, 5.0, 5)[0]
    )
    at = generate(at, prompt, backend="torch", precision="fp32", steps=3, n=1, seed=5)
    assert (snapshot / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert {a[0] for a in asked} == {"someone/flowers"} and len(asked) == 3
