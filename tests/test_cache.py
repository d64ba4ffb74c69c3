"""The compact cache: fp16 latents and int8 text states in shards under a byte limit, captions
stored once, memory-mapped reads, and builds that survive a kill without losing finished shards or
the previous cache."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blossom.data import cache as cache_mod
from blossom.data.cache import FORMAT, CacheSplit, build_cache, cache_index, load_cache
from blossom.data.folder import read_metadata
from blossom.errors import DataError
from blossom.models import load_text_encoder, load_vae

ROOT = Path(__file__).resolve().parents[1]


def _build(cfg, paths, out, **kw):
    return build_cache(
        paths.data,
        out,
        load_vae(paths.vae),
        load_text_encoder(cfg.text),
        cfg.data.image_size,
        cfg.text.encoder,
        flip=cfg.data.random_flip,
        **kw,
    )


def test_index_describes_a_compact_deduplicated_cache(micro_prepared):
    cfg, paths = micro_prepared
    index = cache_index(paths.cache)
    assert index["format"] == FORMAT and index["dtypes"]["latents"] == "float16"
    captions = {r.text for s in ("train", "val") for r in read_metadata(paths.data / s)}
    assert index["text"]["count"] == len(captions | {""})  # each caption once, the empty prompt among them
    n = sum(index["splits"][s]["count"] for s in ("train", "val"))
    on_disk = sum(p.stat().st_size for p in paths.cache.glob("*.safetensors"))
    assert index["bytes_per_sample"] == pytest.approx(on_disk / n, rel=0.01)
    # fp16 latents (train also mirrored), a 4-byte caption number, and the caption table shared out:
    # int8 states and one fp16 scale per token.
    latent = int(np.prod(index["latent_shape"]))
    payload = (
        index["splits"]["train"]["count"] * (2 * latent * 2 + 4)
        + index["splits"]["val"]["count"] * (latent * 2 + 4)
        + index["text"]["count"] * cfg.text.max_tokens * (384 + 2)
    ) / n
    assert payload < index["bytes_per_sample"] < payload * 1.02  # headers are all the rest


def test_reads_are_row_gathers_equal_to_the_whole_split(micro_prepared):
    _, paths = micro_prepared
    whole = load_cache(paths.cache, "train")
    data = CacheSplit(paths.cache, "train")
    idx = torch.tensor([5, 0, 95, 5, 17])
    flip = torch.tensor([True, False, True, False, False])
    x0, text = data.batch(idx, flip)
    expect = torch.where(flip.view(-1, 1, 1, 1), whole["latents_flipped"][idx], whole["latents"][idx])
    assert torch.equal(x0, expect) and torch.equal(text, whole["text"][idx])
    assert x0.dtype == torch.float32 and isinstance(data._latents[0], np.memmap)  # mapped, not loaded
    assert torch.equal(data.null_text, whole["null_text"]) and data.null_text.shape[0] == 1


def test_small_shards_hold_the_same_samples(micro_prepared, tmp_path):
    cfg, paths = micro_prepared
    info = _build(cfg, paths, tmp_path / "cache", shard_bytes=20_000)
    shards = info["splits"]["train"]["shards"]
    assert len(shards) > 3 and len(info["text"]["shards"]) > 1
    assert max(s["bytes"] for s in shards) < 20_000 + 1_000  # the limit, plus the header
    a, b = load_cache(paths.cache, "train"), load_cache(tmp_path / "cache", "train")
    # Encoded in other batch sizes: equal up to float summation order, then one fp16 rounding (and
    # for text states one int8 step either way, where the summation order moved a value across one).
    assert all(torch.allclose(a[k], b[k], atol=1e-3, rtol=2e-3) for k in a if k not in ("text", "null_text"))
    step = a["text"].abs().amax(-1, keepdim=True) / 127
    assert ((a["text"] - b["text"]).abs() <= step * 1.01 + 1e-3).all()


def test_a_killed_build_keeps_its_shards_and_the_previous_cache(micro_prepared, tmp_path, monkeypatch):
    cfg, paths = micro_prepared
    out = tmp_path / "cache"
    shutil.copytree(paths.cache, out)
    before = (out / "index.json").read_bytes()
    calls, real = [], cache_mod._encode_samples

    def dies_on_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would, part-way through
        return real(*args)

    monkeypatch.setattr(cache_mod, "_encode_samples", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        _build(cfg, paths, out, shard_bytes=20_000)
    assert (out / "index.json").read_bytes() == before  # the previous cache is untouched
    staging = list(tmp_path.glob(".cache.build-*"))
    assert len(staging) == 1 and len(list(staging[0].glob("train-*.safetensors"))) == 2

    calls.clear()
    monkeypatch.setattr(cache_mod, "_encode_samples", lambda *a: calls.append(1) or real(*a))
    info = _build(cfg, paths, out, shard_bytes=20_000)
    n_sample_shards = len(info["splits"]["train"]["shards"]) + len(info["splits"]["val"]["shards"])
    assert len(calls) == n_sample_shards - 2  # the two finished shards were kept, not encoded again
    assert not list(tmp_path.glob(".cache.build-*"))
    fresh = _build(cfg, paths, tmp_path / "fresh", shard_bytes=20_000)
    assert fresh["splits"] == info["splits"]
    a, b = load_cache(tmp_path / "fresh", "train"), load_cache(out, "train")
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed = built in one go, bit for bit


def test_text_states_are_int8_within_half_a_step_of_the_encoders():
    rng = np.random.default_rng(0)
    states = rng.standard_normal((5, 7, 384)).astype(np.float32) * rng.uniform(0.01, 30, (5, 7, 1))
    states[0, 3] = 0  # an all-zero token vector stores zeros
    states[1, 2, 5] = 300.0  # an outlier costs only its own token vector's resolution
    stored = cache_mod.quantize_states(states)
    assert stored["text"].dtype == np.int8 and stored["text_scale"].dtype == np.float16
    back = cache_mod.dequantize_states(stored["text"], stored["text_scale"]).numpy()
    assert np.array_equal(back, back.astype(np.float16)) and not back[0, 3].any()  # fp16 values, as streamed
    step = np.abs(states).max(-1, keepdims=True) / 127
    assert (np.abs(back - states) <= step * 0.5 * 1.002 + np.abs(states) * 1e-3).all()
    err = np.linalg.norm(np.delete(back, 1, 0) - np.delete(states, 1, 0)) / np.linalg.norm(np.delete(states, 1, 0))
    assert err < 0.01  # Gaussian rows: ~0.6 % (MiniLM's real states: ~1.7 %)


def _damaged(paths, tmp_path, damage):
    out = tmp_path / "cache"
    shutil.copytree(paths.cache, out)
    damage(out)
    return out


def _swap_meta(path, old: bytes, new: bytes):
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    path.write_bytes(data.replace(old, new, 1))


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda c: (c / "index.json").write_text(json.dumps({"splits": {}})), "format 1"),
        (lambda c: (c / "index.json").write_text("{"), "damaged"),
        (lambda c: (c / "train-00000.safetensors").unlink(), "missing"),
        (lambda c: (c / "text-00000.safetensors").unlink(), "missing"),
        (
            lambda c: (c / "train-00000.safetensors").write_bytes((c / "train-00000.safetensors").read_bytes()[:-100]),
            "truncated",
        ),
        (lambda c: (c / "val-00000.safetensors").write_bytes(b"\x00" * 64), "not a safetensors file"),
        (
            lambda c: _swap_meta(c / "train-00000.safetensors", b'"max_tokens":"16"', b'"max_tokens":"77"'),
            "max_tokens=77",
        ),
    ],
    ids=["old format", "damaged index", "missing shard", "missing text shard", "truncated", "junk", "other encoder"],
)
def test_a_damaged_cache_is_one_line_naming_the_rebuild(micro_prepared, tmp_path, damage, words):
    _, paths = micro_prepared
    out = _damaged(paths, tmp_path, damage)
    with pytest.raises(DataError) as e:
        CacheSplit(out, "train")
        CacheSplit(out, "val")
    assert words in str(e.value) and "blossom cache" in str(e.value) and "\n" not in str(e.value)


def test_a_step_that_cannot_fit_the_memory_limit_is_refused_in_one_line():
    from blossom.errors import ConfigError
    from blossom.memory import check_room, rss, step_floor

    need = step_floor(1_000_000, 64, (4, 16, 16), (24, 384))
    assert need == 4 * (5_000_000 + 64 * (4 * 1024 + 24 * 384))
    check_room(need, "one training step", "lower train.batch_size", limit=rss() + need + 1)  # fits: no error
    with pytest.raises(ConfigError, match=r"one training step needs at least \d+ MiB but the memory limit .* lower"):
        check_room(need, "one training step", "lower train.batch_size", limit=rss() + need // 2)


CGROUP_V1 = Path("/sys/fs/cgroup/memory")


@pytest.mark.skipif(os.geteuid() != 0 or not CGROUP_V1.is_dir(), reason="needs root and cgroup v1's memory controller")
def test_under_a_real_memory_limit_training_refuses_a_batch_that_cannot_fit(micro_prepared, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cache_format import _in_cgroup
    from conftest import micro_args

    _, paths = micro_prepared
    root = tmp_path / "out"
    for name in ("vae", "cache"):
        shutil.copytree(getattr(paths, name), root / name)
    cmd = [sys.executable, "-m", "blossom.cli", *micro_args(root), "--set", "train.batch_size=65536", "train"]
    code, _, _, last = _in_cgroup(cmd, 1 << 30, "test")
    assert code == 2 and "one training step needs at least" in last and "memory limit (1024 MiB)" in last, last
    assert "lower train.batch_size" in last


def test_a_bf16_build_holds_the_fp32_cache_within_its_own_storage_error(micro_prepared, tmp_path):
    cfg, paths = micro_prepared
    info = _build(cfg, paths, tmp_path / "bf16", precision="bf16")
    assert info["encoded_in"] == "bf16" and cache_index(paths.cache)["encoded_in"] == "fp32"
    a, b = load_cache(paths.cache, "train"), load_cache(tmp_path / "bf16", "train")
    # bf16 keeps 8 bits of mantissa: ~1.1-1.3 % here (norm of the difference over the norm), the
    # order of the int8 text storage's own error (~1.7 % on MiniLM's states)
    for key in ("latents", "latents_flipped", "text"):
        assert 0 < float((b[key] - a[key]).norm() / a[key].norm()) < 0.03, key


@pytest.mark.parametrize(
    "setting, device, flags, expect",
    [
        ("auto", "cpu", {"avx2", "avx512f", "avx512_bf16"}, "bf16"),
        ("auto", "cpu", {"avx2", "amx_tile", "amx_bf16"}, "bf16"),
        ("auto", "cpu", {"avx2", "fma", "avx512f", "avx512_vnni"}, "fp32"),  # emulated bf16 is slower than fp32
        ("auto", "cpu", set(), "fp32"),
        ("fp32", "cpu", {"avx512_bf16"}, "fp32"),
        ("bf16", "cpu", {"avx2"}, "bf16"),  # asked for: obeyed
        ("auto", "meta", {"avx512_bf16"}, "fp32"),
    ],
)
def test_auto_encodes_in_bf16_only_where_the_device_computes_it(setting, device, flags, expect):
    from blossom.cpu import pick_precision

    precision, why = pick_precision(setting, device, frozenset(flags))
    assert precision == expect and why
