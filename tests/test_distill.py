"""Few-step distillation: the student's pieces match diffusers' LCM, it starts as the teacher
(pruned, as the rest of the teacher), resumes exactly, samples the same image in blossom and in
diffusers' own pipeline, and exports to ONNX within the parity bar."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import killed_after, linked_outputs
from safetensors.torch import load_file

from blossom.backends import TorchBackend, fast_folder, physical_cores
from blossom.sampling import denoise, guidance_embedding, sample
from blossom.train.distill import boundary, distill, student_from

GRAPHS = ("text_encoder", "unet", "vae_decoder")

DISTILL = {"steps": 4, "batch_size": 8, "checkpoint_every": 2, "log_every": 1, "guidance_embedding_dim": 16}


def micro_distill_cfg(cfg, **extra):
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, **{**DISTILL, **extra}))


@pytest.fixture(scope="session")
def student(micro_exported, micro_prepared, tmp_path_factory):
    teacher, _, _ = micro_exported
    cfg, paths = micro_prepared
    out = tmp_path_factory.mktemp("distill")
    result = distill(micro_distill_cfg(cfg), paths.cache, teacher, out)
    return out, result


def test_guidance_embedding_is_the_lcm_pipelines():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([1.0, 3.5, 8.0])
    want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=32)
    assert torch.allclose(guidance_embedding(w, 32), want, atol=1e-6)


def test_boundary_condition_is_the_lcm_schedulers():
    from diffusers import LCMScheduler

    sched = LCMScheduler(timestep_scaling=10.0)
    for t in (0, 19, 259, 999):
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        got = boundary(torch.tensor([t]))
        assert got[0].item() == pytest.approx(c_skip, rel=1e-6) and got[1].item() == pytest.approx(c_out, rel=1e-6)


def test_the_student_starts_as_the_teacher(micro_exported):
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(micro_exported[0] / "unet").eval()
    s = student_from(teacher, 16).eval()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([999, 300]), torch.randn(2, 16, 384)
    with torch.no_grad():
        a = teacher(x, t, encoder_hidden_states=text).sample
        b = s(x, t, encoder_hidden_states=text, timestep_cond=guidance_embedding(torch.tensor([2.0, 7.0]), 16)).sample
    assert torch.equal(a, b)


TINY_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
TINY_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


def _three_levels(down=TINY_DOWN, up=TINY_UP):
    """A micro teacher of three levels, by default with the tiny preset's blocks (attention at two)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=4,
        attention_head_dim=2,
        cross_attention_dim=16,
    ).eval()


def test_a_pruned_student_leaves_out_the_lowest_levels_attention_and_keeps_the_rest_of_the_teacher(tmp_path):
    import onnxruntime as ort
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from blossom.export import _export_onnx, _StudentUNet

    teacher = _three_levels()
    s = student_from(teacher, 16, prune=True).eval()
    assert s.mid_block is None
    assert list(s.config.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert list(s.config.up_block_types) == ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    mine, theirs = s.state_dict(), teacher.state_dict()
    assert not any(k.startswith(("mid_block.", "down_blocks.2.attentions.", "up_blocks.0.attentions.")) for k in mine)
    assert all(torch.equal(v, theirs[k]) for k, v in mine.items() if "cond_proj" not in k)
    assert sum(v.numel() for v in mine.values()) < 0.8 * sum(v.numel() for v in theirs.values())
    # diffusers reads it back, and it exports to ONNX within the parity bar, as a full student does
    s.save_pretrained(tmp_path / "unet")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    args = (
        torch.randn(1, 4, 8, 8),
        torch.tensor([700.0]),
        torch.randn(1, 5, 16),
        guidance_embedding(torch.tensor([4.0]), 16),
    )
    with torch.no_grad():
        want = s(*args[:2], encoder_hidden_states=args[2], timestep_cond=args[3]).sample
        assert torch.equal(want, back(*args[:2], encoder_hidden_states=args[2], timestep_cond=args[3]).sample)
    s.set_attn_processor(AttnProcessor2_0())
    names = ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    _export_onnx(_StudentUNet(s), args, tmp_path / "unet.onnx", names, ["noise_pred"])
    (got,) = ort.InferenceSession(str(tmp_path / "unet.onnx")).run(
        None, {n: a.numpy() for n, a in zip(names, args, strict=True)}
    )
    assert np.abs(got - want.numpy()).max() < 1e-4


@pytest.mark.parametrize("pruned", [True, False])
def test_the_card_says_whether_the_student_is_pruned(tmp_path, pruned):
    from blossom.publish import fast_section

    info = {"method": "latent consistency distillation", "default_steps": 4, "max_steps": 8}
    info |= {"guidance_range": [2.0, 8.0], "sampler": "tcd", "decoder": "teacher's", "pruned": pruned}
    (tmp_path / "fast").mkdir()
    (tmp_path / "fast" / "blossom.json").write_text(json.dumps({"distilled": info}))
    assert ("Its UNet is pruned" in "\n".join(fast_section(tmp_path, "you/x", 3.0))) is pruned


@pytest.mark.parametrize(
    "down, up",
    [
        (("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
        (("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    ],
    ids=["no attention there", "its only attention there"],
)
def test_pruning_keeps_every_block_where_it_would_leave_no_attention_or_has_none_to_leave_out(down, up):
    t = _three_levels(down, up)
    s = student_from(t, 16, prune=True)
    assert s.config.down_block_types == t.config.down_block_types and s.config.mid_block_type == t.config.mid_block_type


def test_distil_writes_a_student_that_serves_in_few_steps(student, micro_prepared):
    out, result = student
    info = json.loads((out / "model" / "blossom.json").read_text())["distilled"]
    assert info["default_steps"] == 4 and info["sampler"] == "tcd" and info["guidance_embedding_dim"] == 16
    assert info["pruned"] is False  # the micro UNet's lowest level holds its only attention: nothing to spare
    assert [h[0] for h in result["loss_history"]] == [1, 2, 3, 4]
    assert (
        json.loads((out / "model" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "TCDScheduler"
    )
    backend = TorchBackend(out / "model")
    latents = {}
    for sampler in ("tcd", "lcm"):  # the student's own sampler, and LCM's, which draws any student too
        a = sample(backend, ["a red flower", "a blue flower"], sampler, 2, 5.0, seed=3)
        b = sample(backend, ["a blue flower"], sampler, 2, 5.0, seed=4)
        # Image i depends on seed + i only; a batch of 2 and a batch of 1 sum in another order, which
        # may move a pixel across a rounding boundary.
        assert a.shape == (2, 32, 32, 3) and np.abs(a[1].astype(int) - b[0]).max() <= 1
        la = denoise(backend, ["a red flower", "a blue flower"], sampler, 2, 5.0, seed=3)
        lb = denoise(backend, ["a blue flower"], sampler, 2, 5.0, seed=4)
        assert torch.allclose(la[1], lb[0], atol=1e-5)
        latents[sampler] = la
    # one step is the same x0 estimate for both; after that lcm draws fresh noise and tcd does not
    assert not torch.allclose(latents["tcd"], latents["lcm"], atol=1e-3)
    assert fast_folder(out, out / "model") == out / "model"


def same_weights(a_dir, b_dir):
    """The student and target of two runs' step-4 checkpoints, bit for bit."""
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(a_dir / "checkpoints" / "step-000004" / name)
        b = load_file(b_dir / "checkpoints" / "step-000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distil_resumes_bit_equal(student, micro_exported, micro_prepared, tmp_path, caplog):
    """Killed after step 2 of 4, `--resume auto` continues it: the same student and target as four steps straight."""
    teacher, _, _ = micro_exported
    cfg, paths = micro_prepared
    straight, result = student
    cut = killed_after(straight, tmp_path / "cut", 2)
    with caplog.at_level(logging.INFO, logger="blossom"):
        resumed = distill(micro_distill_cfg(cfg), paths.cache, teacher, cut, resume="auto")
    assert "resumed from step-000002 at step 2" in caplog.text
    assert resumed["loss_history"] == result["loss_history"]
    same_weights(straight, cut)


def test_a_changed_setting_does_not_resume(student, micro_exported, micro_prepared, tmp_path, caplog):
    teacher, _, _ = micro_exported
    cfg, paths = micro_prepared
    cut = killed_after(student[0], tmp_path / "cut", 2)
    with caplog.at_level(logging.INFO, logger="blossom"):
        again = distill(micro_distill_cfg(cfg, lr=5e-4), paths.cache, teacher, cut, resume="auto")
    assert "resumed" not in caplog.text
    assert [h[0] for h in again["loss_history"]] == [1, 2, 3, 4]  # started afresh, at the new rate
    assert again["loss_history"][1] != student[1]["loss_history"][1]


@pytest.fixture(scope="session")
def exported(student, micro_exported, tmp_path_factory):
    """The micro teacher exported with its student in fast/: (export folder, parity numbers)."""
    from blossom.export import export

    teacher, _, _ = micro_exported
    out, _ = student
    folder = tmp_path_factory.mktemp("exported") / "export"
    return folder, export(teacher, folder, None, ("unipc", 4, 5.0), fast_dir=out / "model")


def test_exported_student_loads_in_diffusers_and_matches_blossom(exported, tmp_path):
    """The fast/ folder: DiffusionPipeline picks StableDiffusionPipeline with the student's
    TCDScheduler with no blossom code and draws blossom's image for the same seed (its default eta
    is blossom's gamma 0), and LatentConsistencyModelPipeline with an LCMScheduler draws blossom's
    lcm image; its ONNX graphs hold the parity bar."""
    from diffusers import DiffusionPipeline, LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline

    from blossom.backends import OnnxBackend

    folder, diffs = exported
    assert diffs["fast_unet"] < 1e-4 and diffs["fast_image"] < 1e-3
    fast = folder / "fast"
    pipe = DiffusionPipeline.from_pretrained(fast)
    assert isinstance(pipe, StableDiffusionPipeline) and type(pipe.scheduler).__name__ == "TCDScheduler"
    lcm = LatentConsistencyModelPipeline(
        **{**pipe.components, "scheduler": LCMScheduler.from_config(pipe.scheduler.config)}
    )
    prompts = ["a red flower", "a white flower at night"]
    for sampler, stock in (("tcd", pipe), ("lcm", lcm)):
        gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
        theirs = stock(prompts, num_inference_steps=4, guidance_scale=5.0, generator=gens, output_type="np").images
        ours = sample(TorchBackend(fast), prompts, sampler, 4, 5.0, seed=7)
        assert np.abs(ours.astype(int) - np.round(theirs * 255).astype(int)).max() <= 1, sampler
    onnx = sample(OnnxBackend(fast), prompts, "lcm", 4, 5.0, seed=7)
    assert np.abs(onnx.astype(int) - ours.astype(int)).max() <= 2
    assert fast_folder(folder, tmp_path / "none") == fast


def test_a_students_threads_are_fitted_at_load_and_draw_the_same_bits(exported):
    from blossom.backends import OnnxBackend

    fast = exported[0] / "fast"
    fitted = OnnxBackend(fast)
    assert set(fitted.threads) == {"text_encoder", "unet", "vae_decoder"}
    assert set(fitted.threads.values()) <= {1, physical_cores()}
    backends = (fitted, OnnxBackend(fast, threads=1), OnnxBackend(fast, threads=2))
    images = [sample(b, ["a red flower"], "tcd", 4, 5.0, seed=3) for b in backends]
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])


@pytest.mark.parametrize("unet_threads, others", [(1, "in_call"), (2, "never")])
def test_the_other_graphs_spin_through_their_calls_only_beside_a_one_thread_unet(
    exported, monkeypatch, unet_threads, others
):
    """A UNet pool spinning between calls makes spinning text-encoder and decoder threads slower
    (a teacher's text encoder: 12.5 ms instead of 6.2); without one, spinning through a call is
    what lets them use a second core."""
    from blossom import backends

    made, fitted = [], {}

    def session(path, optimized_path=None, threads=None, spin="always"):
        made.append((Path(path).name.split(".")[0], spin))
        return object()

    def fit(session, path, feed, cores, spin):
        name = Path(path).name.split(".")[0]
        fitted[name] = spin
        return session, unet_threads if name == "unet" else cores

    monkeypatch.setattr(backends, "ort_session", session)
    monkeypatch.setattr(backends, "fit_threads", fit)
    monkeypatch.setattr(backends, "physical_cores", lambda: 2)
    monkeypatch.setattr(backends.OnnxBackend, "_serving_feeds", lambda self: dict.fromkeys(GRAPHS, {}))
    backend = backends.OnnxBackend(exported[0] / "fast")
    # each graph's session is made once, with its spin mode decided by the UNet's fitted threads
    assert made == [("unet", "always"), ("text_encoder", others), ("vae_decoder", others)]
    assert fitted == {"unet": "always", "text_encoder": others, "vae_decoder": others}
    assert backend.threads["unet"] == unet_threads


def test_the_apps_fast_switch_serves_the_student(exported, micro_exported, monkeypatch):
    """The switch is off (and disabled) for a model without a student; on, the page draws the
    student's 4-step images for the seed, the same as the backend does."""
    from test_app import generate, page

    from blossom.backends import load_backend

    at = page(monkeypatch, BLOSSOM_MODEL=micro_exported[1])
    assert at.toggle[0].disabled
    folder, _ = exported
    at = page(monkeypatch, BLOSSOM_MODEL=folder)
    assert not at.toggle[0].disabled and not at.toggle[0].value
    at.toggle[0].set_value(True).run()
    assert at.slider[0].max == 8 and at.slider[0].value == 4
    prompt = "a pink flower with six thin petals at night"
    at = generate(at, prompt, n=2, seed=5)
    assert "(tcd, 4 steps, guidance 5.0, seed 5)" in at.success[0].value
    want = sample(load_backend("onnx", folder / "fast"), [prompt] * 2, "tcd", 4, 5.0, 5)
    assert np.array_equal(at.session_state["result"]["images"], want)


def test_a_tiny_decoder_redecodes_a_finished_student_and_serves_everywhere(
    student, micro_exported, micro_prepared, tmp_path, caplog
):
    """distill.tiny_decoder (TAESD's architecture, random weights here): set on a finished
    distillation, `--resume auto` writes the same UNet with the AutoencoderTiny as its vae/ without
    distilling again; its export holds the parity bar with it, and diffusers' own pipeline loads it
    and draws blossom's image."""
    import shutil

    from conftest import tiny_decoder
    from diffusers import AutoencoderTiny, DiffusionPipeline
    from safetensors.torch import load_file

    from blossom.export import export
    from blossom.publish import fast_section

    teacher, _, _ = micro_exported
    cfg, paths = micro_prepared
    out = tmp_path / "distill"
    shutil.copytree(student[0], out)
    decoder = tiny_decoder(tmp_path, latent_channels=4)
    with caplog.at_level(logging.INFO, logger="blossom"):
        distill(micro_distill_cfg(cfg, tiny_decoder=decoder), paths.cache, teacher, out, resume="auto")
    assert "resumed from step-000004" in caplog.text
    before, after = (load_file(d / "model" / "unet" / "diffusion_pytorch_model.safetensors") for d in (student[0], out))
    assert all(torch.equal(before[k], after[k]) for k in before)
    backend = TorchBackend(out / "model")
    assert isinstance(backend.vae, AutoencoderTiny) and backend.distilled["decoder"] == "tiny"
    prompts = ["a red flower", "a white flower at night"]
    ours = sample(backend, prompts, "tcd", 4, 5.0, seed=7)
    assert ours.shape == (2, cfg.data.image_size, cfg.data.image_size, 3)
    assert not np.array_equal(ours, sample(TorchBackend(student[0] / "model"), prompts, "tcd", 4, 5.0, seed=7))

    folder = tmp_path / "export"  # the student alone: _export_into is the same for fast/
    diffs = export(out / "model", folder, None, ("unipc", 4, 5.0))
    assert diffs["vae_decoder"] < 1e-4 and diffs["image"] < 1e-3
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe.vae, AutoencoderTiny)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, generator=gens, output_type="np").images
    assert np.abs(ours.astype(int) - np.round(theirs * 255).astype(int)).max() <= 1
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "fast").symlink_to(folder)
    assert "tiny decoder (`AutoencoderTiny`" in "\n".join(fast_section(tmp_path / "card", "you/x", 3.0))


def test_steps_past_what_was_distilled_warn(student, caplog):
    out, _ = student
    backend = TorchBackend(out / "model")
    sample(backend, ["a red flower"], "tcd", 9, 5.0)
    assert "past the 8 this model was distilled for" in caplog.text


def test_distill_stage_registers_fast_and_every_path_serves_it(micro_exported, micro_prepared, tmp_path, monkeypatch):
    """As a user runs it: promote a champion, `blossom distill` scores the student at 1/2/4/8 steps
    and registers it (alias `fast` when it holds the bar: the bar is opened wide here, since a
    4-step micro teacher scores by chance); `models:/blossom@fast` draws with the student's own
    sampler by default; `blossom export` puts it in fast/ and `generate --fast` draws from that."""
    import shutil

    import mlflow
    import pandas as pd
    from conftest import micro_args

    from blossom import cli

    teacher, _, _ = micro_exported
    _, paths = micro_prepared
    monkeypatch.chdir(tmp_path)
    out = linked_outputs(paths, tmp_path / "outputs")
    shutil.copytree(teacher.parent, out / "train", ignore=shutil.ignore_patterns("checkpoints"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # mlflow.set_tracking_uri also sets this variable; monkeypatch removes it again after the test,
    # so later tests' subprocesses do not inherit this store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = [
        *micro_args(out),
        "--set",
        f"tracking.uri={uri}",
        *[a for k, v in DISTILL.items() for a in ("--set", f"distill.{k}={v}")],
    ]
    for stage in ("classifier", "evaluate", "promote"):
        assert cli.main([*args, stage]) == 0
    # The DVC stage with distillation off: a placeholder in each of its outputs (DVC warns of an
    # empty one), which a real distillation then replaces.
    assert cli.main([*args, "distill", "--if-enabled"]) == 0
    for part in ("model", "eval", "checkpoints"):
        assert [p.name for p in (out / "distill" / part).iterdir()] == ["SKIPPED.txt"]
    monkeypatch.setattr(cli, "FAST_BAR", 1.0)
    assert cli.main([*args, "distill"]) == 0
    for part in ("model", "eval", "checkpoints"):
        assert not (out / "distill" / part / "SKIPPED.txt").exists()
    assert any((out / "distill" / "checkpoints").glob("step-*"))
    metrics = json.loads((out / "distill" / "eval" / "metrics.json").read_text())
    assert list(metrics["steps"]) == ["1", "2", "4", "8"]
    assert all(m["images"] == metrics["steps"]["4"]["images"] > 0 for m in metrics["steps"].values())
    reported = json.loads((tmp_path / "reports" / "metrics" / "distill.json").read_text())
    assert reported["holds_bar"] is True and "acc" in reported["steps_4"]["petal_color"]

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    fast = client.get_model_version_by_alias("blossom", "fast")
    champ = client.get_model_version_by_alias("blossom", "champion")
    assert fast.version != champ.version
    assert client.get_run(fast.run_id).data.tags["teacher_run_id"] == champ.run_id
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/blossom@fast")
    drawn = model.predict(pd.DataFrame({"prompt": ["a red flower"]}))
    assert len(drawn["image"]) == 1

    # Folder data: registered, but with no adherence to hold a bar, never aliased `fast`.
    folder_data = ["--set", "data.source=folder", "--set", f"data.path={tmp_path}"]
    assert cli.main([*args, *folder_data, "distill"]) == 0
    assert [p.name for p in (out / "distill" / "eval").iterdir()] == ["SKIPPED.txt"]
    assert client.get_model_version_by_alias("blossom", "fast").version == fast.version
    assert len(client.search_model_versions("name='blossom'")) == 3
    assert cli.main([*args, "distill"]) == 0  # back to procedural data for what follows

    assert cli.main([*args, "export"]) == 0
    assert (
        json.loads((out / "export" / "fast" / "blossom.json").read_text())["distilled"]["teacher_run"] == champ.run_id
    )
    assert cli.main([*args, "generate", "a red flower", "--fast", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "000.png").exists()
    assert cli.main([*args, "publish"]) == 0
    card = (out / "hub" / "blossom-flowers" / "README.md").read_text()
    assert "## Fast: the distilled few-step model" in card and "num_inference_steps=4," in card
    assert (out / "hub" / "blossom-flowers" / "fast" / "onnx" / "unet.onnx").exists()
