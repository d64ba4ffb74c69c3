"""Export: a diffusers pipeline folder that stock diffusers runs, and ONNX graphs that match PyTorch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blossom.backends import OnnxBackend, TorchBackend, load_backend, physical_cores
from blossom.errors import ModelError
from blossom.export import COMPONENT_TOLERANCE, IMAGE_TOLERANCE
from blossom.layout import INT8_TEXT_ENCODER
from blossom.sampling import sample

PROMPTS = ["a red flower with five round petals on green grass", "a white flower at night"]


@pytest.fixture
def exported(micro_exported):
    return micro_exported


def test_onnx_parity_is_within_tolerance_and_recorded(exported):
    _, out, diffs = exported
    assert set(diffs) == {"text_encoder", "unet", "vae_decoder", "image", "image_int8_psnr_db"}
    assert max(diffs[k] for k in ("text_encoder", "unet", "vae_decoder")) < COMPONENT_TOLERANCE
    assert diffs["image"] < IMAGE_TOLERANCE
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert (out / "onnx" / f"{name}.onnx").exists() and (out / "onnx" / f"{name}.opt.onnx").exists()
    import onnx

    assert onnx.load(str(out / "onnx" / "unet.onnx"), load_external_data=False).opset_import[0].version >= 17
    # saved optimised graphs carry no CPU-specific layout (NCHWc blocks sized to this CPU's vectors)
    for name in ("text_encoder", "unet", "vae_decoder"):
        graph = onnx.load(str(out / "onnx" / f"{name}.opt.onnx"), load_external_data=False).graph
        assert not [n for n in graph.node if n.domain == "com.microsoft.nchwc"]


def test_pipeline_folder_runs_in_stock_diffusers_and_matches_blossom(exported):
    from diffusers import DiffusionPipeline

    _, out, _ = exported
    assert not list(out.rglob("*.bin")) and len(list(out.rglob("*.safetensors"))) == 3  # unet, vae, text encoder
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    generators = [torch.Generator().manual_seed(7 + i) for i in range(len(PROMPTS))]
    theirs = pipe(PROMPTS, num_inference_steps=5, guidance_scale=5.0, generator=generators, output_type="np").images
    ours = sample(TorchBackend(out), PROMPTS, "ddim", 5, 5.0, seed=7)
    diff = np.abs(np.round(theirs * 255).astype(int) - ours.astype(int))
    assert diff.max() <= 1  # the same image, up to rounding to 8 bits


def test_exported_folder_gives_the_trained_models_images(exported):
    model, out, _ = exported
    a = sample(TorchBackend(model), PROMPTS, "dpm++2m", 4, 5.0, seed=3)
    b = sample(TorchBackend(out), PROMPTS, "dpm++2m", 4, 5.0, seed=3)
    c = sample(OnnxBackend(out), PROMPTS, "dpm++2m", 4, 5.0, seed=3)
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() <= 1


def test_broken_or_missing_models_are_one_line_errors(exported, tmp_path):
    import shutil

    _, out, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "onnx" / "unet.opt.onnx").write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="cannot load the ONNX model .*export it again"):
        OnnxBackend(broken)
    with pytest.raises(ModelError, match="missing onnx/text_encoder.onnx, onnx/unet.onnx"):
        shutil.rmtree(broken / "onnx")
        OnnxBackend(broken)
    with pytest.raises(ModelError, match="no model at"):
        load_backend("torch", tmp_path / "nothing")
    with pytest.raises(ModelError, match="unknown backend 'tf'"):
        load_backend("tf", out)


def _scopes(node) -> str:
    return next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")


def test_int8_quantizes_the_heavy_products_and_keeps_the_sensitive_ones(exported):
    import onnx

    from blossom.layout import INT8_FILES

    _, out, _ = exported
    graph = onnx.load(str(out / "onnx" / "unet.onnx"), load_external_data=False).graph
    int8 = onnx.load(str(out / "onnx" / INT8_FILES["unet"]), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    # in the QDQ graph a quantized op reads its weight through a DequantizeLinear
    fed_by_dq = {
        n.name
        for n in int8.node
        if n.op_type in ("Conv", "MatMul", "Gemm")
        and any(i.endswith(("_DequantizeLinear_Output", "_dequantized")) for i in n.input[1:2])
    }
    convs = [n for n in graph.node if n.op_type == "Conv"]
    kept = {n.name for n in convs if any(k in _scopes(n) for k in ("conv_in", "conv_out"))}
    assert len(kept) == 2 and kept.isdisjoint(fed_by_dq)
    assert {n.name for n in convs} - kept <= fed_by_dq
    attention_products = [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    assert attention_products and fed_by_dq.isdisjoint(attention_products)
    projections = [
        n.name
        for n in graph.node
        if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights and ".attn" in _scopes(n)
    ]
    assert projections and set(projections) <= fed_by_dq


def test_int8_backend_stays_near_fp32_and_is_chosen_by_precision(exported, tmp_path):
    import shutil

    _, out, diffs = exported
    fp32 = sample(load_backend("onnx", out), PROMPTS, "ddim", 4, 5.0, seed=3).astype(float)
    int8 = sample(load_backend("onnx", out, "int8"), PROMPTS, "ddim", 4, 5.0, seed=3).astype(float)
    other_seed = sample(load_backend("onnx", out), PROMPTS, "ddim", 4, 5.0, seed=4).astype(float)

    def psnr(a, b):
        return 10 * np.log10(255**2 / np.mean((a - b) ** 2))

    # int8 is not fp32, but it is the same picture: far closer to it than another seed's picture is
    assert 0 < np.abs(int8 - fp32).max() and psnr(fp32, int8) > psnr(fp32, other_seed) + 10
    assert diffs["image_int8_psnr_db"] > psnr(fp32, other_seed) + 10
    with pytest.raises(ModelError, match="the torch backend runs fp32 or bf16, not 'int8': use --backend onnx"):
        load_backend("torch", out, "int8")
    bare = tmp_path / "no-int8"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("*.int8.onnx*"))
    with pytest.raises(ModelError, match=r"missing onnx/unet.int8.onnx, onnx/vae_decoder.int8.onnx\).*blossom export"):
        load_backend("onnx", bare, "int8")


def test_a_teachers_sessions_keep_every_core(exported):
    _, out, _ = exported
    assert OnnxBackend(out, precision="int8").threads == dict.fromkeys(
        ("text_encoder", "unet", "vae_decoder"), physical_cores()
    )


class _Timed:
    """A stand-in session whose every call takes `seconds`."""

    def __init__(self, seconds: float):
        self.seconds, self.calls = seconds, 0

    def run(self, *_):
        import time

        self.calls += 1
        time.sleep(self.seconds)


@pytest.mark.parametrize(
    "many, one, kept, spin",
    [
        (0.004, 0.004, 1, "always"),
        (0.0035, 0.004, 1, "always"),
        (0.002, 0.004, "many", "always"),
        (0.06, None, "many", "always"),
        (0.0032, 0.004, "many", "in_call"),  # no spinning pool to contend with: a smaller gain pays
        (0.0038, 0.004, 1, "in_call"),
    ],
)
def test_fit_threads_keeps_more_threads_only_where_they_pay(many, one, kept, spin, monkeypatch, tmp_path):
    from blossom import backends

    single = _Timed(one or 0)
    monkeypatch.setattr(backends, "ort_session", lambda path, threads, spin: single)
    session = _Timed(many)
    chosen, threads = backends.fit_threads(session, tmp_path / "g.onnx", {}, 2, spin=spin)
    assert (chosen, threads) == ((session, 2) if kept == "many" else (single, 1))
    if one is None:
        assert single.calls == 0  # a long call is not timed again on one thread
    else:  # two blocks, each an untimed call and ~0.03 s of timed ones (a sleep overshoots a little)
        calls = [2 * (1 + backends.calls_per_block(t)) for t in (1.3 * many, many)]
        assert calls[0] <= single.calls <= calls[1]
    assert [backends.calls_per_block(t) for t in (0.001, 0.004, 0.02)] == [16, 7, 4]


def _with_scores(exported, tmp_path):
    """The exported folder plus the eval files a champion carries (as promote downloads them)."""
    import json
    import shutil

    from PIL import Image

    _, out, _ = exported
    folder = tmp_path / "export"
    shutil.copytree(out, folder)
    half = {"acc": 0.5, "lo": 0.4, "hi": 0.6}
    scores = {k: half for k in ("petal_color", "background", "petal_count", "petal_count_pm1", "petal_shape")}
    seen = {**scores, "petal_color": {"acc": 0.95, "lo": 0.92, "hi": 0.97}, "n": 280}
    metrics = {
        "adherence": {"template": {"seen": seen, "held_out": {**scores, "n": 80}, "all": scores}},
        "ceiling": {"through_vae": {**scores, "petal_color": {"acc": 1.0, "lo": 0.99, "hi": 1.0}}},
        "images": 360,
        "sampler": "ddim",
        "steps": 30,
        "guidance": 5.0,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    Image.new("RGB", (8, 8)).save(folder / "samples.png")
    return folder


def test_publish_locally_with_a_model_card(exported, tmp_path):
    from blossom.config import PublishConfig
    from blossom.publish import publish

    folder = _with_scores(exported, tmp_path)
    result = publish(PublishConfig(), folder, tmp_path / "hub", token=None, offline=False)
    local = tmp_path / "hub" / "blossom-flowers"
    assert result == {"target": "local", "path": str(local), "reason": "publish.repo_id is not set"}
    card = (local / "README.md").read_text()
    from huggingface_hub import ModelCard

    data = ModelCard(card).data  # the Hub's own parser reads the metadata back
    assert data.license == "apache-2.0" and data.pipeline_tag == "text-to-image" and data.library_name == "diffusers"
    assert len(data.eval_results) == 8 and data.eval_results[0].metric_value == 0.95  # model-index: adherence
    assert data.eval_results[0].dataset_type == "procedural-flowers" and data.widget[0]["text"]
    assert "trained with blossom on procedural flowers" in card
    assert "| petal colour | 0.95 [0.92, 0.97] | 0.50 [0.40, 0.60] | 1.00 [0.99, 1.00] |" in card
    assert "95 % Wilson intervals; 280 seen + 80 held-out" in card and "![samples](samples.png)" in card
    assert "Intended use and limitations" in card and "Training data" in card
    assert "int8 copies of the UNet and VAE decoder" in card and "and of the text encoder (8-bit block" in card
    val = json.loads((folder / "train.json").read_text())["val_loss"]
    assert f"**{val:.4f}**" in card
    # the local folder is a complete model for both backends
    a = sample(load_backend("onnx", local), PROMPTS[:1], "ddim", 3, 5.0, 0)
    b = sample(load_backend("torch", local), PROMPTS[:1], "ddim", 3, 5.0, 0)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_publish_to_the_hub_says_at_once_why_it_cannot(exported, tmp_path):
    import time

    from blossom.config import PublishConfig
    from blossom.publish import PublishError, publish

    folder = _with_scores(exported, tmp_path)
    cfg = PublishConfig(repo_id="someone/flowers")
    no_token = publish(cfg, folder, tmp_path / "hub", token=None, offline=False)
    assert no_token["target"] == "local" and no_token["reason"] == "HF_TOKEN is not set"
    assert (tmp_path / "hub" / "someone--flowers" / "model_index.json").exists()
    with pytest.raises(PublishError, match="HF_HUB_OFFLINE is set"):
        publish(cfg, folder, tmp_path / "hub", token="hf_not_a_real_token", offline=True)
    start = time.time()
    with pytest.raises(PublishError, match="cannot reach http://127.0.0.1:9") as err:
        publish(
            cfg, folder, tmp_path / "hub", token="hf_not_a_real_token", offline=False, endpoint="http://127.0.0.1:9"
        )
    assert time.time() - start < 5 and "hf_not_a_real_token" not in str(err.value)


def _int8_step(micro_exported, micro_prepared, out: Path, bar: float) -> dict:
    """Export's int8 step alone, on a copy of the micro export without its int8 graphs (a whole
    export again is the slow part): what write_int8_within_bar decided, and int8.json agrees."""
    import shutil

    from blossom.cli import calibration_captions
    from blossom.export import write_int8_within_bar

    _, exported, _ = micro_exported
    _, paths = micro_prepared
    shutil.copytree(exported, out, ignore=shutil.ignore_patterns("*.int8.onnx*", "int8.json"))
    calibration = calibration_captions(paths.data / "val")
    result = write_int8_within_bar(out / "onnx", OnnxBackend(out), calibration, ("ddim", 4, 5.0), bar)
    decided = json.loads((out / "onnx" / "int8.json").read_text())
    assert {k: v for k, v in decided.items() if k != "written"} == result
    return decided


def test_int8_below_the_bar_is_searched_then_not_shipped(micro_exported, micro_prepared, tmp_path):
    """With an unreachable bar, export tries the text encoder in fp32, then the UNet with each
    decoder-side block kept in fp32, records what each gave, and ships no int8 graphs; the fp32
    export is complete."""
    out = tmp_path / "export"
    decided = _int8_step(micro_exported, micro_prepared, out, 99.0)
    assert decided["written"] is False and decided["bar_db"] == 99.0 and decided["text_encoder_int8"] is False
    assert set(decided["tried_db"]) == {"", "text_encoder", "mid_block", "up_blocks.0", "up_blocks.1"}
    assert decided["psnr_db"] == max(decided["tried_db"].values()) > 15
    assert not list((out / "onnx").glob("*.int8.onnx*")) and not list((out / "onnx").glob(".best*"))
    with pytest.raises(ModelError, match="missing onnx/unet.int8.onnx"):
        load_backend("onnx", out, "int8")
    assert load_backend("onnx", out, "auto").precision == "fp32"


def test_int8_below_the_bar_ships_the_best_block_and_only_its_weights(
    micro_exported, micro_prepared, tmp_path, monkeypatch
):
    """The shipped UNet is the best try's graph with that try's weights alone (onnx appends to an
    existing weights file, which once left another try's weights inside the shipped one)."""
    import blossom.export as export_module
    from blossom.cli import calibration_captions
    from blossom.export import INT8_MIN_PSNR_DB
    from blossom.quantize import calibration_feeds, quantize_graph

    _, paths = micro_prepared
    # all int8, the text encoder in fp32, then with it mid_block (the best), up_blocks.0, up_blocks.1
    scores = iter([20.0, 21.0, 30.0, 25.0, 22.0])
    monkeypatch.setattr(export_module, "int8_psnr", lambda fp32, int8: next(scores))
    out = tmp_path / "export"
    decided = _int8_step(micro_exported, micro_prepared, out, INT8_MIN_PSNR_DB)
    assert decided["written"] and decided["fp32_block"] == "mid_block" and decided["psnr_db"] == 30.0
    assert decided["text_encoder_int8"] is False and not list((out / "onnx").glob(INT8_TEXT_ENCODER + "*"))
    feeds, _ = calibration_feeds(OnnxBackend(out), calibration_captions(paths.data / "val"), "ddim", 4, 5.0)
    quantize_graph(out / "onnx" / "unet.onnx", tmp_path / "direct.onnx", feeds, keep=("mid_block",))
    shipped = (out / "onnx" / "unet.int8.onnx.data").stat().st_size
    assert shipped == (tmp_path / "direct.onnx.data").stat().st_size
    assert not list((out / "onnx").glob(".best*"))
    load_backend("onnx", out, "int8")


def test_int8_below_the_bar_keeps_the_text_encoder_in_fp32_first(micro_exported, micro_prepared, tmp_path, monkeypatch):
    """When the text encoder in fp32 brings the image within the bar, the UNet stays all int8."""
    import blossom.export as export_module
    from blossom.export import INT8_MIN_PSNR_DB

    scores = iter([27.0, 29.0])  # all int8 under a 28 dB bar; the text encoder in fp32 over it
    monkeypatch.setattr(export_module, "int8_psnr", lambda fp32, int8: next(scores))
    out = tmp_path / "export"
    decided = _int8_step(micro_exported, micro_prepared, out, INT8_MIN_PSNR_DB)
    assert decided["written"] and decided["tried_db"] == {"": 27.0, "text_encoder": 29.0}
    assert decided["text_encoder_int8"] is False and decided["fp32_block"] is None
    assert not list((out / "onnx").glob(INT8_TEXT_ENCODER + "*"))
    backend = load_backend("onnx", out, "int8")  # int8 UNet and decoder, the fp32 text encoder
    assert backend.sessions["text_encoder"]._model_path.endswith("text_encoder.opt.onnx")


def test_int8_text_encoder_has_8_bit_block_weights_and_stays_near_fp32(micro_exported):
    """Every weight product of the text encoder reads 8-bit weights in blocks (MatMulNBits), and
    the int8 backend runs it; its states move a few percent."""
    import onnx

    from blossom.quantize import TEXT_BLOCK

    _, out, _ = micro_exported
    fp32_graph = onnx.load(str(out / "onnx" / "text_encoder.onnx"), load_external_data=False).graph
    int8_graph = onnx.load(str(out / "onnx" / INT8_TEXT_ENCODER), load_external_data=False).graph
    weights = {i.name for i in fp32_graph.initializer}
    products = [n for n in fp32_graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    blocks = [n for n in int8_graph.node if n.op_type == "MatMulNBits"]
    assert products and len(blocks) == len(products)
    assert {(a.name, a.i) for n in blocks for a in n.attribute if a.name in ("bits", "block_size")} == {
        ("bits", 8),
        ("block_size", TEXT_BLOCK),
    }
    assert json.loads((out / "onnx" / "int8.json").read_text())["text_encoder_int8"] is True
    fp32, int8 = load_backend("onnx", out), load_backend("onnx", out, "int8")
    assert int8.sessions["text_encoder"]._model_path.endswith(INT8_TEXT_ENCODER)
    a, b = fp32.encode_text(PROMPTS), int8.encode_text(PROMPTS)
    moved = ((b - a).norm(dim=-1) / a.norm(dim=-1)).mean().item()
    print(f"int8 text encoder: states moved {moved:.4f} of their norm")
    assert 0 < moved < 0.1


def test_onnx_threads_follow_the_cores_the_process_may_use():
    # under taskset or a container's cpuset, sessions must not start a thread per host core
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from blossom.backends import physical_cores; print(physical_cores())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
