import numpy as np
import pytest

from blossom.backends import TorchBackend
from blossom.errors import BlossomError
from blossom.sampling import SAMPLERS, sample
from blossom.train.diffusion import train_diffusion


@pytest.fixture(scope="session")
def backend(micro_prepared, tmp_path_factory):
    cfg, paths = micro_prepared
    out = tmp_path_factory.mktemp("sampling") / "train"
    train_diffusion(cfg, paths.cache, paths.vae, out)
    return TorchBackend(out / "model")


def test_shape_dtype_and_determinism_for_a_seed(backend):
    a = sample(backend, ["a red flower", "a blue flower"], "ddim", steps=3, guidance=4.0, seed=7)
    b = sample(backend, ["a red flower", "a blue flower"], "ddim", steps=3, guidance=4.0, seed=7)
    c = sample(backend, ["a red flower", "a blue flower"], "ddim", steps=3, guidance=4.0, seed=8)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_an_image_does_not_depend_on_its_batch(backend):
    # Image i uses seed + i, so generating it alone or beside others gives the same pixels.
    batch = sample(backend, ["a red flower", "a pink flower"], "ddim", steps=3, guidance=3.0, seed=5)
    alone = sample(backend, ["a pink flower"], "ddim", steps=3, guidance=3.0, seed=6)
    assert np.abs(batch[1].astype(int) - alone[0].astype(int)).max() <= 1  # batched BLAS may round differently


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_the_shared_loop(backend, sampler):
    out = sample(backend, ["a white flower"], sampler, steps=3, guidance=2.0, seed=0)
    assert out.shape == (1, 32, 32, 3) and out.std() > 0


def test_bad_sampling_arguments(backend):
    with pytest.raises(BlossomError, match="steps must be a positive number"):
        sample(backend, ["x"], steps=0)
    with pytest.raises(BlossomError, match="unknown sampler 'plms'"):
        sample(backend, ["x"], "plms", steps=2)


def test_long_prompt_is_truncated_with_a_warning(backend, caplog):
    long = "a red flower " * 40
    out = sample(backend, [long], steps=2, guidance=2.0)
    assert out.shape[0] == 1
    assert any("truncated" in r.getMessage() for r in caplog.records)


def test_bf16_backend_stays_close_to_fp32(backend):
    import torch

    half = TorchBackend(backend.folder, torch.bfloat16)
    a = sample(backend, ["a red flower"], "unipc", 4, 5.0, 0).astype(int)
    b = sample(half, ["a red flower"], "unipc", 4, 5.0, 0).astype(int)
    assert half.unet_model.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits (0.4 % per value): over a few steps pixels move a few 8-bit levels, no more.
    assert np.abs(a - b).mean() < 4 and not np.array_equal(a, b)


def test_tokenizing_from_many_threads_always_pads(micro_cfg):
    """The web app tokenizes for many visitors at once; a fast tokenizer's padding settings are
    shared state (found by the 16-session browser test: an unpadded batch reached ONNX Runtime)."""
    from concurrent.futures import ThreadPoolExecutor

    from blossom.models import count_tokens, load_text_encoder, tokenize

    tokenizer, n = load_text_encoder(micro_cfg.text).tokenizer, micro_cfg.text.max_tokens

    def work(i: int) -> set:
        if i % 2:  # the page counts a prompt's tokens while other visitors' prompts are encoded
            return {n if count_tokens(tokenizer, "a red flower") < n else -1 for _ in range(500)}
        return {tokenize(tokenizer, ["a red flower"], n)["input_ids"].shape[1] for _ in range(500)}

    with ThreadPoolExecutor(8) as pool:
        widths = set().union(*pool.map(work, range(16)))
    assert widths == {n}


def test_only_prompts_that_were_cut_are_warned_about(micro_cfg, caplog):
    """tokenize re-reads only the prompts that fill every position: one that fits exactly is not
    warned about, one a token longer is, beside a short one in the same batch."""
    from blossom.models import count_tokens, load_text_encoder, tokenize

    tokenizer, n = load_text_encoder(micro_cfg.text).tokenizer, micro_cfg.text.max_tokens
    exact, over = " ".join(["red"] * (n - 2)), " ".join(["red"] * (n - 1))
    assert (count_tokens(tokenizer, exact), count_tokens(tokenizer, over)) == (n, n + 1)
    with caplog.at_level("WARNING"):
        batch = tokenize(tokenizer, ["a red flower", exact], n)
    assert batch["attention_mask"].sum(1).tolist() == [5, n] and "truncated" not in caplog.text
    with caplog.at_level("WARNING"):
        batch = tokenize(tokenizer, ["a red flower", exact, over], n)
    assert batch["input_ids"].shape == (3, n) and "1 prompt(s) longer than" in caplog.text


@pytest.mark.parametrize("sampler", [*SAMPLERS, "tcd"])
def test_a_scheduler_made_with_its_steps_is_fresh_every_time(backend, sampler):
    """make_scheduler keeps one scheduler per sampler, config and steps and hands out copies: a
    copy stepped to the end leaves the next one as a newly set scheduler would be."""
    import inspect

    import torch

    from blossom.sampling import _build_scheduler, make_scheduler

    config = backend.scheduler_config
    used = make_scheduler(sampler, config, 4)
    takes = inspect.signature(used.step).parameters
    extra = {"generator": torch.Generator().manual_seed(0)} if "generator" in takes else {}
    latents = torch.randn(1, 4, 8, 8)
    for t in used.timesteps:
        latents = used.step(torch.randn(1, 4, 8, 8), t, latents, **extra).prev_sample
    fresh, new = make_scheduler(sampler, config, 4), _build_scheduler(sampler, config)
    new.set_timesteps(4)
    assert fresh is not used and torch.equal(fresh.timesteps, new.timesteps)
    assert vars(fresh).keys() == vars(new).keys()
    for key, value in vars(new).items():
        if key != "config":
            assert repr(vars(fresh)[key]) == repr(value), key  # step state (index, stored outputs) is fresh


def test_uint8_images_round_half_to_even_as_torch_does():
    """to_uint8 converts in NumPy (torch's round() wakes its OpenMP pool beside ONNX Runtime's
    threads): the same bits as torch's own conversion, ties and out-of-range values included."""
    import torch

    from blossom.images import to_uint8

    torch.manual_seed(0)
    ties = (torch.arange(256, dtype=torch.float32) + 0.5) / 127.5 - 1  # (x + 1) * 127.5 lands on k + 0.5
    x = torch.cat([ties.reshape(1, 1, 16, 16).expand(1, 3, 16, 16), torch.randn(1, 3, 16, 16) * 2])
    want = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    got = to_uint8(x)
    assert got.dtype == np.uint8 and got.shape == (2, 16, 16, 3) and np.array_equal(got, want)
