"""Shared fixtures: a micro configuration that trains every stage in seconds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# `make test` runs the tests on one pytest-xdist worker per core. Each worker keeps to its own
# cores, and so do its subprocesses (they inherit the mask): blossom, torch and ONNX Runtime then
# size their threads to those cores, and two workers never contend for one (oversubscribed torch
# threads spin, and a run beside another became 17x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _cpus = sorted(os.sched_getaffinity(0))
    _share = len(_cpus) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if _share >= 1:
        _index = int(os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw"))
        os.sched_setaffinity(0, _cpus[_index * _share : (_index + 1) * _share])

# after the mask: torch (imported by blossom.models) sizes its thread pool when first imported
from blossom.config import load_config  # noqa: E402
from blossom.models import set_threads  # noqa: E402

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
set_threads(0)  # one thread per core of this worker's mask

# A config small enough for unit tests: 32 px images, 8x8x4 latents, a ~0.2M-parameter UNet.
MICRO = [
    "data.image_size=32",
    "data.train_size=96",
    "data.val_size=16",
    "vae.block_out_channels=[8,16,16]",
    "vae.norm_num_groups=4",
    "vae.steps=3",
    "vae.batch_size=8",
    "vae.crop=16",
    "unet.block_out_channels=[16,32]",
    "unet.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
    "unet.up_block_types=[CrossAttnUpBlock2D,UpBlock2D]",
    "unet.norm_num_groups=8",
    "unet.attention_head_dim=4",
    "train.steps=4",
    "train.batch_size=8",
    "train.warmup_steps=1",
    "train.lr=3e-3",  # fixed here, so tuning the recipe's rate does not move the micro runs' tolerances
    "train.checkpoint_every=2",
    "train.val_every=2",
    "train.log_every=1",
    "text.max_tokens=16",
    "sample.steps=4",
    "sample.guidance=5.0",  # not the code's default (3): what is served must follow the model's own settings
    "evaluate.classifier_train_size=64",
    "evaluate.classifier_test_size=32",
    "evaluate.classifier_epochs=1",
    "evaluate.images_per_pair=1",
    "evaluate.batch_size=40",
    "tracking.live=false",  # tests that start blossom train would otherwise write mlflow.db where they run
]


def killed_after(out_dir: Path, cut: Path, step: int) -> Path:
    """What a run writing to out_dir leaves when killed after `step`, copied to cut: that
    checkpoint, `latest` and the run's id (`run.txt`, which `--resume auto` matches)."""
    name = f"step-{step:06d}"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(out_dir / "checkpoints" / name, cut / "checkpoints" / name)
    (cut / "checkpoints" / "latest").write_text(name + "\n")
    shutil.copy(out_dir / "checkpoints" / "run.txt", cut / "checkpoints" / "run.txt")
    return cut


def micro_args(outputs: Path | None = None) -> list[str]:
    """The command-line options that run blossom on the micro config (and an outputs folder)."""
    args = ["--params", str(PARAMS), *[a for m in MICRO for a in ("--set", m)]]
    return [*args, "--set", f"outputs={outputs}"] if outputs is not None else args


@pytest.fixture
def micro_overrides(tmp_path):
    return [*MICRO, f"outputs={tmp_path / 'outputs'}"]


@pytest.fixture
def micro_cfg(micro_overrides):
    return load_config(PARAMS, None, micro_overrides)


def linked_outputs(paths, out: Path) -> Path:
    """An outputs folder at `out` whose data, VAE and cache are the prepared micro project's,
    linked (only read): for tests that run later stages in a folder of their own."""
    out.mkdir()
    for name in ("data", "vae", "cache"):
        (out / name).symlink_to(getattr(paths, name))
    return out


# Fixtures that build files are session-scoped, also those a test module defines for itself:
# work stealing interleaves modules on a worker, and pytest tears a module-scoped fixture down
# whenever its worker moves to another module, rebuilding it when the module comes back (the
# evaluation tests' classifier was trained three times in one run).
@pytest.fixture(scope="session")
def micro_prepared(tmp_path_factory):
    """Data, VAE and cache for the micro config, built once per test session."""
    from blossom.cli import Paths
    from blossom.data.cache import build_cache
    from blossom.data.sources import make_dataset
    from blossom.models import load_text_encoder, load_vae
    from blossom.train.autoencoder import train_vae

    root = tmp_path_factory.mktemp("micro")
    cfg = load_config(PARAMS, None, [*MICRO, f"outputs={root / 'outputs'}"])
    paths = Paths(cfg.out)
    make_dataset(cfg.data, paths.data)
    train_vae(cfg, paths.data, paths.vae)
    build_cache(
        paths.data,
        paths.cache,
        load_vae(paths.vae),
        load_text_encoder(cfg.text),
        cfg.data.image_size,
        cfg.text.encoder,
        flip=cfg.data.random_flip,
    )
    return cfg, paths


@pytest.fixture(scope="session")
def micro_exported(micro_prepared, tmp_path_factory):
    """A trained micro model (4 steps) and its export, int8 calibrated on the val captions:
    (model folder, export folder, parity numbers)."""
    from blossom.cli import calibration_captions
    from blossom.export import export
    from blossom.train.diffusion import train_diffusion

    cfg, paths = micro_prepared
    root = tmp_path_factory.mktemp("export")
    train_diffusion(cfg, paths.cache, paths.vae, root / "train")
    diffs = export(
        root / "train" / "model",
        root / "export",
        calibration_captions(paths.data / "val"),
        (cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance),
    )
    return root / "train" / "model", root / "export", diffs


@pytest.fixture
def s3_server(tmp_path):
    """A real S3 server (SeaweedFS) on loopback with a bucket `blossom`; yields its endpoint."""
    from servers import seaweedfs

    with seaweedfs(tmp_path) as endpoint:
        yield endpoint


def tiny_decoder(root: Path, latent_channels: int, downsampling: int = 4) -> str:
    """A random-weight AutoencoderTiny folder (TAESD's architecture, micro widths)."""
    from diffusers import AutoencoderTiny

    n = downsampling.bit_length()  # blocks: one upsampling between each two
    folder = root / "taesd"
    widths, blocks = (8,) * n, (1,) * n
    AutoencoderTiny(
        latent_channels=latent_channels,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        num_encoder_blocks=blocks,
        num_decoder_blocks=blocks,
    ).save_pretrained(folder)
    return str(folder)
