import copy
import json
import shutil

import pytest
import torch
from conftest import killed_after, linked_outputs
from safetensors.torch import load_file

from blossom.data.cache import load_cache
from blossom.errors import BlossomError
from blossom.train.diffusion import check_diverged, draw_timesteps, train_diffusion
from blossom.train.optim import adamw


def test_cache_round_trip(micro_prepared):
    cfg, paths = micro_prepared
    info = json.loads((paths.cache / "index.json").read_text())
    train = load_cache(paths.cache, "train")
    assert train["latents"].shape == (cfg.data.train_size, 4, 8, 8)
    assert (
        train["text"].shape
        == (cfg.data.train_size, cfg.text.max_tokens, 384)
        == (info["splits"]["train"]["count"], 16, 384)
    )
    assert train["null_text"].shape == (1, 16, 384)
    # Latents are scaled to roughly unit variance by the VAE's scaling factor.
    assert 0.5 < train["latents"].std().item() < 2.0
    assert torch.isfinite(train["latents"]).all() and torch.isfinite(train["text"]).all()


def test_training_writes_loadable_model_and_checkpoints(micro_prepared, tmp_path):
    from blossom.backends import TorchBackend

    cfg, paths = micro_prepared
    out = tmp_path / "train"
    result = train_diffusion(cfg, paths.cache, paths.vae, out)
    assert result["steps"] == 4 and result["val_loss"] > 0
    assert [s for s, _ in result["val_history"]] == [2, 4]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2, 3, 4] and len(stats[0]["loss_by_t_bin"]) == 10
    assert (out / "loss_curve.png").stat().st_size > 0 and (out / "config.yaml").exists()
    backend = TorchBackend(out / "model")  # a complete model folder
    assert backend.latent_shape == (4, 8, 8)
    # No averaging by default: the served UNet is the last step's weights, bit for bit.
    served = load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    last = load_file(out / "checkpoints" / "step-000004" / "model.safetensors")
    assert cfg.train.ema_decay == 0 and all(torch.equal(served[k], last[k]) for k in last)


def test_an_ema_decay_serves_averaged_weights(micro_prepared, tmp_path):
    import dataclasses

    cfg, paths = micro_prepared
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema_decay=0.999))
    out = tmp_path / "train"
    train_diffusion(cfg, paths.cache, paths.vae, out)
    served = load_file(out / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    last = load_file(out / "checkpoints" / "step-000004" / "model.safetensors")
    ema = load_file(out / "checkpoints" / "step-000004" / "ema.safetensors")
    assert not all(torch.equal(served[k], last[k]) for k in last)
    from diffusers import UNet2DConditionModel

    names = [n for n, _ in UNet2DConditionModel.from_pretrained(out / "model" / "unet").named_parameters()]
    assert all(torch.equal(served[n], ema[str(i)]) for i, n in enumerate(names))  # the EMA's (in parameter order)


@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
def test_resume_from_checkpoint_equals_uninterrupted_run(micro_prepared, tmp_path, precision):
    import dataclasses

    cfg, paths = micro_prepared
    # fp16 (a T4's mixed precision) carries a gradient scaler whose state must resume too; bf16 is
    # what `auto` trains in on CPUs with AVX512-BF16 or AMX
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=precision))
    full = tmp_path / "full"
    train_diffusion(cfg, paths.cache, paths.vae, full)
    # A run "killed" after step 2: only its step-2 checkpoint and stats up to step 3 survive.
    cut = killed_after(full, tmp_path / "cut", 2)
    (cut / "stats.jsonl").write_text("".join((full / "stats.jsonl").read_text().splitlines(keepends=True)[:3]))
    result = train_diffusion(cfg, paths.cache, paths.vae, cut, resume="latest")
    a = load_file(full / "checkpoints" / "step-000004" / "model.safetensors")
    b = load_file(cut / "checkpoints" / "step-000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = load_file(full / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    ema_b = load_file(cut / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert [s for s, _ in result["val_history"]] == [2, 4] and result["mixed_precision"] == precision
    steps = [json.loads(line)["step"] for line in (cut / "stats.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the killed run's step-3 line was dropped, not duplicated


def test_a_fresh_run_does_not_keep_an_older_runs_checkpoints(micro_prepared, tmp_path):
    import dataclasses

    cfg, paths = micro_prepared
    out = tmp_path / "train"
    train_diffusion(cfg, paths.cache, paths.vae, out)
    shorter = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2))
    train_diffusion(shorter, paths.cache, paths.vae, out)
    # Without clearing, pruning would keep the old step-4 folder beside the new run's step 2.
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"


def test_random_flip_trains_on_cached_mirror_latents(micro_prepared, tmp_path):
    import dataclasses

    import numpy as np
    from PIL import Image

    from blossom.images import to_tensor
    from blossom.models import load_vae

    cfg, paths = micro_prepared
    cache = load_cache(paths.cache, "train")
    assert cfg.data.random_flip and cache["latents_flipped"].shape == cache["latents"].shape
    image = to_tensor(np.array(Image.open(paths.data / "train" / "000000.png"))[None])
    vae = load_vae(paths.vae)
    with torch.no_grad():
        mirrored = vae.encode(image.flip(-1)).latent_dist.mode() * vae.config.scaling_factor
    # Stored in fp16: the cache holds the fresh encoding rounded once (docs/cache.md).
    assert torch.allclose(cache["latents_flipped"][:1], mirrored.half().float(), atol=1e-5, rtol=1e-3)
    assert "latents_flipped" not in load_cache(paths.cache, "val")  # validation is never flipped
    # With flips off, the same seed trains on other inputs (and nothing else about the draws changes).
    plain = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, random_flip=False))
    train_diffusion(cfg, paths.cache, paths.vae, tmp_path / "flip")
    train_diffusion(plain, paths.cache, paths.vae, tmp_path / "plain")
    a = load_file(tmp_path / "flip" / "checkpoints" / "step-000004" / "model.safetensors")
    b = load_file(tmp_path / "plain" / "checkpoints" / "step-000004" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_falls_back_past_a_damaged_checkpoint(micro_prepared, tmp_path, caplog):
    """A truncated latest checkpoint (a torn copy, a full disk) is found by its manifest; `auto`
    resumes from the newest intact one, says so, and still ends equal to an uninterrupted run."""
    import logging

    import pytest

    from blossom.errors import BlossomError

    cfg, paths = micro_prepared
    full = tmp_path / "full"
    train_diffusion(cfg, paths.cache, paths.vae, full)
    damaged = tmp_path / "damaged"
    shutil.copytree(full / "checkpoints", damaged / "checkpoints")
    shutil.copy2(full / "stats.jsonl", damaged / "stats.jsonl")
    weights = damaged / "checkpoints" / "step-000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BlossomError, match=r"step-000004 is damaged \(model.safetensors has 1000 bytes"):
        train_diffusion(cfg, paths.cache, paths.vae, damaged, resume=str(damaged / "checkpoints" / "step-000004"))
    assert not (damaged / "config.yaml").exists()  # a failed resume writes nothing
    with caplog.at_level(logging.WARNING):
        train_diffusion(cfg, paths.cache, paths.vae, damaged, resume="auto")
    assert "step-000004 is damaged" in caplog.text and "resuming from step-000002" in caplog.text
    a = load_file(full / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(damaged / "model" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # every file of both checkpoints is intact again, and nothing but its manifest vouches for it
    from blossom.train.checkpoint import damage

    assert [damage(p) for p in sorted((damaged / "checkpoints").glob("step-*"))] == [None, None]


def test_fp16_scales_small_gradients_that_would_underflow():
    """Without a scaler, fp16 activations' gradients of a tiny loss flush to zero; with it they reach the weights."""
    import dataclasses

    from blossom.config import TrainConfig
    from blossom.env import LaunchEnv
    from blossom.train import distributed

    def grads(precision: str) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        c = dataclasses.replace(TrainConfig(), mixed_precision=precision)
        rt, c = distributed.start(LaunchEnv(), c)
        engine = distributed.Engine(model, opt, rt, c)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.randn(8, 16)).float().mean() * 1e-9
        engine.step(loss)
        state = engine.optimizer_state()
        return model[0].weight.grad, state

    plain, plain_state = grads("no")  # what fp16 autocast without a scaler gives
    scaled, state = grads("fp16")
    assert plain is None or plain.abs().max() == 0  # underflowed
    assert scaled is not None and scaled.abs().max() > 0
    assert state["grad_scaler"]["scale"] > 1 and "grad_scaler" not in plain_state


def test_logit_normal_timesteps_sit_in_the_middle_and_replay_from_the_generator():
    from types import SimpleNamespace

    c = SimpleNamespace(timesteps="logit_normal", logit_mean=0.0, logit_std=1.0)
    t = draw_timesteps(c, 1000, 20000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    assert abs(t.float().median().item() - 500) < 15  # sigmoid(0) = 0.5
    middle = ((t >= 250) & (t < 750)).float().mean().item()
    assert 0.70 < middle < 0.76  # P(|z| < logit(0.75) = 1.0986) = 0.728; uniform would give 0.5
    assert torch.equal(t, draw_timesteps(c, 1000, 20000, torch.Generator().manual_seed(0)))
    shifted = draw_timesteps(SimpleNamespace(**{**vars(c), "logit_mean": 1.0}), 1000, 20000, torch.Generator())
    assert shifted.float().mean() > t.float().mean() + 100  # a positive mean leans to the noisy end
    u = draw_timesteps(SimpleNamespace(timesteps="uniform"), 1000, 20000, torch.Generator().manual_seed(0))
    assert abs(((u >= 250) & (u < 750)).float().mean().item() - 0.5) < 0.02


@pytest.mark.parametrize(
    "setting, device, flags, expect",
    [
        ("auto", "cpu", {"avx2", "avx512f", "avx512_bf16"}, "bf16"),
        ("auto", "cpu", {"avx2", "amx_tile", "amx_bf16"}, "bf16"),
        ("auto", "cpu", {"avx2", "fma", "avx512f", "avx512_vnni"}, "no"),  # emulated bf16 trains slower than fp32
        ("no", "cpu", {"avx512_bf16"}, "no"),
        ("fp16", "cpu", {"avx2"}, "fp16"),
        ("bf16", "cpu", {"avx2"}, "bf16"),
    ],
)
def test_mixed_precision_auto_trains_in_bf16_only_where_the_device_computes_it(
    setting, device, flags, expect, monkeypatch
):
    import dataclasses

    from blossom import cpu
    from blossom.config import TrainConfig
    from blossom.train.distributed import concrete_precision

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    c = dataclasses.replace(TrainConfig(), mixed_precision=setting)
    assert concrete_precision(c, torch.device(device)).mixed_precision == expect


@pytest.mark.parametrize(
    "loss, vals, words",
    [
        (0.05, [(250, 0.12), (500, 0.08), (750, 0.09)], None),  # noise around the best: trains on
        (0.05, [(250, 0.9)], None),  # an early model, still better than predicting no noise
        (float("nan"), [], "the training loss is nan"),
        (float("inf"), None, "the training loss is inf"),
        (None, [(250, 0.08), (500, float("nan"))], "the validation loss is nan"),
        (None, [(500, 0.1008), (750, 0.0893), (1000, 0.5352)], "6.0x its best (0.0893 at step 750)"),  # small, lr 4e-3
        (None, [(2, 596.0)], "596.0x a model that predicts no noise"),  # diverged before its first validation
    ],
)
def test_a_diverged_run_is_named_with_its_step_and_the_fix(loss, vals, words):
    if words is None:
        check_diverged(500, 4e-3, loss=loss, val_history=vals)
        return
    with pytest.raises(BlossomError, match="lower train.lr") as e:
        check_diverged(500, 4e-3, loss=loss, val_history=vals)
    assert words in str(e.value) and "training diverged at step 500" in str(e.value)


def test_training_that_diverges_stops_in_one_line_and_keeps_the_previous_model(
    micro_prepared, tmp_path, monkeypatch, capsys
):
    from conftest import micro_args

    from blossom import cli

    _, paths = micro_prepared
    out = linked_outputs(paths, tmp_path / "outputs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert cli.main([*micro_args(out), "train"]) == 0
    files = lambda: {p: p.read_bytes() for p in (out / "train" / "model").rglob("*") if p.is_file()}  # noqa: E731
    model = files()
    assert any(p.suffix == ".safetensors" for p in model)
    capsys.readouterr()
    # lr 1: the first validation scores hundreds of times worse than a model that predicts no noise
    assert cli.main([*micro_args(out), "--set", "train.lr=1", "train"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("blossom: error:")]
    assert len(errors) == 1 and "training diverged at step 2" in errors[0] and "lower train.lr (now 1)" in errors[0]
    assert files() == model


def test_validation_builds_no_autograd_graph(micro_prepared):
    from blossom.models import build_unet, noise_scheduler
    from blossom.train.diffusion import open_splits, validation_loss

    cfg, paths = micro_prepared
    _, val = open_splits(cfg, paths.cache)
    unet = build_unet(cfg, cross_attention_dim=384, latent_shape=val.latent_shape)
    seen = []
    unet.register_forward_hook(lambda module, args, out: seen.append(torch.is_grad_enabled()))
    assert 0 < validation_loss(unet, noise_scheduler(cfg), val) < 2.0  # an untrained model
    assert seen and not any(seen)


def test_the_fused_adamw_makes_the_default_update_to_rounding():
    """The fused kernel is a speed change, not a recipe change (docs/quality.md#fused-adamw): from the
    same weights and gradients it lands where PyTorch's default AdamW does, to a few fp32 roundings."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3), torch.nn.GroupNorm(4, 16), torch.nn.Linear(14, 8))
    b = copy.deepcopy(a)
    fused, default = adamw(b.parameters(), 4e-3, 0.01), torch.optim.AdamW(a.parameters(), lr=4e-3, weight_decay=0.01)
    assert fused.param_groups[0]["fused"] and not default.param_groups[0]["fused"]
    before = [p.detach().clone() for p in a.parameters()]
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            pa.grad = torch.randn(pa.shape, generator=gen)
            pb.grad = pa.grad.clone()
        default.step()
        fused.step()
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), before, strict=True):
        assert (pa - p0).abs().max() > 1e-2  # ten steps of 4e-3 moved every tensor
        assert (pa - pb).abs().max() <= 1e-6 * max(pa.abs().max().item(), 1.0)


def test_colour_shuffle_reorders_the_channels_of_the_asked_share_of_images():
    """vae.color_shuffle (docs/recipe.md): each picked image keeps its pixels' values, in another
    channel order; the rest pass unchanged; the same generator state gives the same batch."""
    from blossom.train.autoencoder import shuffle_channels

    x = torch.rand(400, 3, 4, 4)
    assert torch.equal(shuffle_channels(x, 0.0, torch.Generator().manual_seed(0)), x)
    y = shuffle_channels(x, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(y, shuffle_channels(x, 0.5, torch.Generator().manual_seed(0)))
    assert torch.equal(y.sort(1).values, x.sort(1).values)  # a permutation of each pixel's channels
    moved = (y != x).flatten(1).any(1).float().mean().item()
    assert 0.5 * 5 / 6 - 0.08 < moved < 0.5 * 5 / 6 + 0.08  # one order in six is the identity
    z = shuffle_channels(x, 1.0, torch.Generator().manual_seed(0))
    orders = set()
    for xi, zi in zip(x, z, strict=True):
        order = [int((xi[:, 0, 0] == v).nonzero()) for v in zi[:, 0, 0]]
        assert torch.equal(zi, xi[order])  # one order for every pixel of an image
        orders.add(tuple(order))
    assert len(orders) == 6
