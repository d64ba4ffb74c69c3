"""Typed configuration read from params.yaml: base values, a named preset on top, then overrides.

The base sections of params.yaml are the `tiny` preset; other presets are blocks of overrides
under `presets:`. Validation is strict: an unknown key or a value of the wrong type is a
one-line error naming the key. Environment variables are read in env.py and arrive here as values.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from blossom.env import LaunchEnv, overrides_from_env
from blossom.errors import ConfigError, first_line


@dataclass
class DataConfig:
    source: Literal["synthetic", "folder", "oxford102"] = "synthetic"
    path: str | None = None  # image folder with metadata.jsonl (folder), or the Oxford 102 download (oxford102)
    image_size: int = 64
    train_size: int = 12000
    val_size: int = 512
    seed: int = 0
    resize: Literal["crop", "squash", "pad"] = "crop"  # crop: short side, centre crop; squash: the original's
    small_images: Literal["upscale", "skip"] = "upscale"  # images smaller than image_size
    max_pixels: int = 64_000_000  # larger images are skipped without decoding (decompression-bomb guard)
    workers: int = 0  # processes that draw or decode images; 0: one per core
    random_flip: bool = True  # train on mirrored images half the time (their latents are cached too)
    background_dropout: float = 0.1  # procedural captions: the share that leave the background out (docs/quality.md)


@dataclass
class TextConfig:
    encoder: str = "minilm"  # 'minilm' (the offline PyPI package) or a local transformers folder
    max_tokens: int = 24


@dataclass
class CacheConfig:
    # What the cache stage encodes images and captions in. auto: bf16 on devices that compute it
    # natively (AVX512-BF16 / AMX CPUs, GPUs with bf16), fp32 elsewhere; docs/cache.md.
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class VAEConfig:
    pretrained: str | None = None  # a diffusers AutoencoderKL folder; skips train-vae
    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    steps: int = 800
    batch_size: int = 32
    crop: int = 32  # train on random crops: the VAE is convolutional, crops cost a quarter
    lr: float = 2e-3
    kl_weight: float = 1e-6
    # The share of training crops whose RGB channels are shuffled: the VAE then meets colour next to
    # colour as it never does in the data (a held-out pair's petals on their background), so its
    # latents code any colour (docs/recipe.md)
    color_shuffle: float = 0.0

    @property
    def downsampling(self) -> int:
        """How many pixels per latent side blossom's own VAE of these settings has (a pretrained
        VAE's comes from its config: models.vae_downsampling)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class UNetConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [64, 64, 64])
    layers_per_block: int = 1
    down_block_types: list[str] = field(
        default_factory=lambda: ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    )
    up_block_types: list[str] = field(default_factory=lambda: ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    cross_attention_dim: int | None = None  # None: the text encoder's hidden size (a set value must equal it)
    # Pool the text states into the time embedding too (diffusers addition_embed_type='text'):
    # global attributes such as colour and background then condition every ResNet block.
    text_time_embedding: bool = True


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 4e-3  # the recipe study (docs/quality.md): more of the petals per minute than 1e-3, 2e-3 and 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # 0: no averaging, the last weights are the model. At the tiny preset's 1,000 steps, with the
    # learning rate annealed to zero, the last weights drew petal count and shape better than an
    # EMA of 0.999 in two runs (docs/quality.md); the longer presets set their own.
    ema_decay: float = 0.0
    ema_power: float = 0.75  # EMA warmup: decay = 1 - (1 + step)^-power, capped at ema_decay
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    min_snr_gamma: float | None = 5.0
    # Which noise levels a step trains on: uniform over the timesteps, or logit-normal (SD3, Esser
    # et al. 2024), which spends the steps on the middle levels where layout and shape are decided.
    timesteps: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    cfg_dropout: float = 0.1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    val_every: int = 250
    log_every: int = 25
    seed: int = 0
    # Under torchrun / accelerate launch: DDP by default; a DeepSpeed JSON (configs/deepspeed_zero2.json)
    # switches to DeepSpeed ZeRO. Its batch size, clipping and precision are filled in from this section.
    deepspeed: str | None = None
    # auto: bf16 where the device computes it natively (AVX512-BF16/AMX CPUs, bf16 GPUs), else no.
    # fp16: GPUs without bf16 (with a gradient scaler).
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"
    # The order samples are read in: random (drawn with replacement) or shards (epochs over the
    # shuffled cache shards, dealt to `lanes` streams: what reading from object storage needs).
    order: Literal["random", "shards"] = "random"
    lanes: int = 8
    cache_url: str | None = None  # s3://bucket/prefix of a cache `blossom push-cache` wrote: train streams it


@dataclass
class SampleConfig:
    sampler: Literal["ddim", "dpm++2m", "unipc", "euler", "ddpm"] = "unipc"  # sampling.SAMPLERS
    steps: int = 15
    guidance: float = 3.0  # the recipe study (docs/quality.md): petal colour 0.96 vs 0.92 at 5
    seed: int = 0


@dataclass
class DistillConfig:
    # `blossom distill`: latent consistency distillation (Luo et al. 2023) of the champion into a
    # student that draws in 1-8 steps with the guidance scale as an input (one UNet call per step).
    # Off in `dvc repro` and `blossom run` unless enabled: it adds ~5 minutes to the tiny main job.
    enabled: bool = False
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-4
    guidance_min: float = 2.0  # the student learns every guidance scale in [min, max] (standard CFG scale)
    guidance_max: float = 8.0
    solver_steps: int = 50  # the teacher's DDIM grid the student jumps along (k = 1000 / 50 timesteps)
    target_ema: float = 0.95  # the target network's EMA decay
    huber_c: float = 0.001
    guidance_embedding_dim: int = 256  # diffusers time_cond_proj_dim
    default_steps: int = 4
    max_steps: int = 8  # the most steps the student is served with; more only blurs
    # The student leaves out the attention blocks and the mid-block at the UNet's lowest resolution
    # (structural pruning, as BK-SDM's block removal): on tiny its image is ~6 ms (a quarter) faster
    # with the same adherence (docs/fast.md). Not measured on the larger presets, which keep every block.
    prune_lowest_level: bool = True
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 25
    seed: int = 0
    # A diffusers AutoencoderTiny folder (TAESD for the SD VAE's latents) the student decodes with
    # instead of the teacher's VAE: at 256 px the full decoder is most of a 4-step image's time.
    tiny_decoder: str | None = None


@dataclass
class EvalConfig:
    classifier_train_size: int = 32000
    classifier_test_size: int = 2000
    classifier_epochs: int = 4
    images_per_pair: int = 16  # draws per colour/background pair (held-out pairs twice); 16 -> 720 images
    batch_size: int = 64
    real_images: int = 512  # folder / oxford102 data: validation captions drawn for FID, KID and CLIP score
    inception: str | None = None  # the FID Inception weights file (.pth or .safetensors), for FID and KID
    clip: str | None = None  # a local CLIP model folder, for CLIP score


@dataclass
class TrackingConfig:
    # MLflow tracking URI; MLFLOW_TRACKING_URI (any server) wins over it.
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "blossom"
    model_name: str = "blossom"
    # A new model becomes the champion only if its validation loss is lower by more than this.
    promote_tolerance: float = 1e-4
    # Training logs to MLflow as it goes (rank 0): the run shows from the first step, and its status
    # says how training ended. Off, the run reaches MLflow only when `promote` runs.
    live: bool = True


@dataclass
class CaptionConfig:
    # Images without a caption get one from `template` (their label or folder name; offline) or
    # `florence2` (any transformers image-to-text model folder or hub id, Florence-2 by default).
    backend: Literal["template", "florence2"] = "template"
    template: str = "a photo of a {label}"
    model: str = "florence-community/Florence-2-base"
    task: str = "<DETAILED_CAPTION>"
    batch_size: int = 8
    max_new_tokens: int = 64


@dataclass
class RemoteConfig:
    # Where `blossom push-data` sends the data set: a local folder, or s3://bucket/prefix.
    # Credentials never go here: S3 reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment.
    url: str = "dvc-storage"
    endpoint: str | None = None  # an S3-compatible server (MinIO, SeaweedFS, R2, ...); None: AWS
    region: str | None = None


@dataclass
class PublishConfig:
    # A Hub model repo ("you/blossom-flowers"); uploads when HF_TOKEN is set too. Unset, or with no
    # token: the same layout goes to outputs/hub/<repo>, which generate and the app load.
    repo_id: str | None = None
    private: bool = False


@dataclass
class SageMakerConfig:
    # `blossom sagemaker`: the training job on AWS (needs AWS credentials in the environment).
    role: str | None = None  # the IAM role ARN the job runs as
    instance_type: str = "ml.g5.12xlarge"  # 4 A10G GPUs
    instance_count: int = 2
    spot: bool = True  # spot capacity; an interrupted job restarts and resumes from checkpoint_s3_uri
    checkpoint_s3_uri: str | None = None  # s3://bucket/blossom/checkpoints: synced with /opt/ml/checkpoints
    output_s3_uri: str | None = None  # where the model.tar.gz goes; None: the session's default bucket
    max_run_hours: float = 24.0
    max_wait_hours: float = 48.0  # spot: total time including waiting for capacity
    framework_version: str = "2.5"  # the SageMaker PyTorch container
    py_version: str = "py311"


@dataclass
class Config:
    preset: str = "tiny"
    outputs: str = "outputs"
    threads: int = 0  # 0: one per core
    data: DataConfig = field(default_factory=DataConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    text: TextConfig = field(default_factory=TextConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    sagemaker: SageMakerConfig = field(default_factory=SageMakerConfig)

    @property
    def out(self) -> Path:
        return Path(self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"config key '{key}' must not be null")
    if origin is Literal:  # a choice: the type says which values there are
        allowed = typing.get_args(tp)
        if isinstance(value, bool):
            value = _check_type(value, str, key)  # YAML 1.1's `no` is false: mixed_precision: no
        if value not in allowed:
            listed = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"
            raise ConfigError(f"{key} must be one of {listed}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, bool):
        # YAML 1.1 (PyYAML) reads a bare `no` as false; tools writing YAML 1.2 (DVC's `exp run -S`)
        # leave `mixed_precision: no` unquoted
        return "no" if value is False else "yes"
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key '{dotted}': check its spelling against params.yaml")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' must be a section (a mapping), got {value!r}")
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _check_type(value, tp, dotted)
    return cls(**kwargs)


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"--set {dotted}: '{p}' is not a section")
    tree[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: write it as key=value, e.g. --set train.steps=200")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"--set {item!r}: the value is not valid YAML ({first_line(e, 200)}): "
            "write lists like [1,2,3] and quote strings with special characters"
        ) from None


def load_config(
    path: str | Path | None = None, preset: str | None = None, overrides: list[str] | None = None
) -> Config:
    """path None: ./params.yaml when present, else built-in defaults (the tiny preset)."""
    explicit = path is not None
    path = Path(path or "params.yaml")
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML ({first_line(e, 200)}): fix the syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must be a mapping of sections")
    elif explicit:
        raise ConfigError(f"config file {path} not found: pass an existing --params file")
    presets = raw.pop("presets", {}) or {}
    env = overrides_from_env()
    name = preset or env.get("preset") or raw.get("preset", "tiny")
    if name != "tiny":
        if name not in presets:
            choices = ", ".join(["tiny", *presets]) or "tiny"
            raise ConfigError(f"unknown preset '{name}': choose one of {choices}")
        raw = _merge(raw, presets[name])
    raw["preset"] = name
    for item in overrides or []:
        key, value = parse_override(item)
        _set(raw, key, value)
    if "outputs" in env:
        raw["outputs"] = env["outputs"]
    if "tracking_uri" in env:
        raw.setdefault("tracking", {})["uri"] = env["tracking_uri"]
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


# Upper limits, each a size or count whose excess would exhaust memory or run for days before
# failing; presets and their GPU setups stay well inside them.
LIMITS = {
    "data.image_size": 2048,
    "data.train_size": 100_000_000,
    "data.val_size": 1_000_000,
    "vae.batch_size": 4096,
    "train.batch_size": 65_536,
    "train.lanes": 4096,
    "sample.steps": 1000,
    "distill.batch_size": 65_536,
    "distill.guidance_embedding_dim": 4096,
    "distill.max_steps": 50,
    "text.max_tokens": 1024,
    "caption.batch_size": 4096,
    "caption.max_new_tokens": 1024,
    "evaluate.images_per_pair": 1000,
    "evaluate.real_images": 100_000,
    "data.max_pixels": 2**31,
    "data.workers": 512,
}


def _walk(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def validate(cfg: Config) -> None:
    def positive(key: str, value: float) -> None:
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")

    for key, value in _walk(cfg):
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
        if key in LIMITS and isinstance(value, int) and value > LIMITS[key]:
            raise ConfigError(f"config key '{key}' is {value}, above its limit of {LIMITS[key]}: lower it")
        if key.endswith(".seed") and isinstance(value, int) and not 0 <= value < 2**32:
            raise ConfigError(f"config key '{key}' must be from 0 to {2**32 - 1}, got {value}")

    for key in (
        "data.image_size",
        "data.train_size",
        "data.val_size",
        "vae.steps",
        "vae.batch_size",
        "train.steps",
        "train.batch_size",
        "train.lr",
        "train.logit_std",
        "train.lanes",
        "sample.steps",
        "distill.steps",
        "distill.batch_size",
        "distill.lr",
        "distill.solver_steps",
        "distill.default_steps",
        "distill.guidance_embedding_dim",
        "distill.huber_c",
        "text.max_tokens",
        "caption.batch_size",
        "caption.max_new_tokens",
    ):
        section, name = key.split(".")
        positive(key, getattr(getattr(cfg, section), name))
    if cfg.data.source != "synthetic" and not cfg.data.path:
        raise ConfigError(
            f"data.source is '{cfg.data.source}' but data.path is empty: set data.path to your image folder"
        )
    # The Hub's repo id rules (namespace/name of letters, digits, '-', '_', '.'), which also keep the
    # local copy's folder name (outputs/hub/namespace--name) inside outputs/hub.
    repo = cfg.publish.repo_id
    if repo is not None and (
        not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", repo) or ".." in repo or repo.endswith(".")
    ):
        raise ConfigError(
            f"publish.repo_id {repo!r} is not a Hub repo id: write it as namespace/name, e.g. "
            "you/blossom-flowers (letters, digits, '-', '_', '.')"
        )
    for key, value in (
        ("remote.url", cfg.remote.url),
        ("remote.endpoint", cfg.remote.endpoint),
        ("tracking.uri", cfg.tracking.uri),
    ):
        if value and re.search(r"//[^/@\s]+:[^/@\s]*@", value) and not _from_env(key, value):
            raise ConfigError(f"{key} holds a password: remove it and put credentials in environment variables")
    if cfg.data.workers < 0:
        raise ConfigError(f"data.workers must be 0 (one per core) or a number of processes, got {cfg.data.workers}")
    if not 0 <= cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0: no averaging), got {cfg.train.ema_decay}")
    if not 0 <= cfg.vae.color_shuffle <= 1:
        raise ConfigError(f"vae.color_shuffle must be in [0, 1], got {cfg.vae.color_shuffle}")
    if not 0 <= cfg.data.background_dropout < 1:
        raise ConfigError(f"data.background_dropout must be in [0, 1), got {cfg.data.background_dropout}")
    if not 0 <= cfg.train.cfg_dropout < 1:
        raise ConfigError(f"train.cfg_dropout must be in [0, 1), got {cfg.train.cfg_dropout}")
    if len(cfg.unet.down_block_types) != len(cfg.unet.block_out_channels) or len(cfg.unet.up_block_types) != len(
        cfg.unet.block_out_channels
    ):
        raise ConfigError(
            "unet.down_block_types, unet.up_block_types and unet.block_out_channels must have one entry per level"
        )
    if cfg.train.cache_url is not None:
        if not str(cfg.train.cache_url).startswith("s3://"):
            raise ConfigError(f"train.cache_url must be an s3://bucket/prefix URL, got {cfg.train.cache_url!r}")
        if cfg.train.order != "shards":
            raise ConfigError("train.cache_url streams the cache shard by shard: set train.order to shards")
    d = cfg.distill
    if not 1 <= d.guidance_min <= d.guidance_max:
        raise ConfigError(
            f"distill.guidance_min and guidance_max must satisfy 1 <= min <= max, got {d.guidance_min} and "
            f"{d.guidance_max}: e.g. 2 and 8"
        )
    if cfg.train.num_train_timesteps % d.solver_steps or d.solver_steps > cfg.train.num_train_timesteps:
        raise ConfigError(
            f"distill.solver_steps {d.solver_steps} must divide train.num_train_timesteps "
            f"{cfg.train.num_train_timesteps}: e.g. 50"
        )
    if not d.default_steps <= d.max_steps <= d.solver_steps:
        raise ConfigError(
            f"distill.default_steps <= distill.max_steps <= distill.solver_steps must hold, got {d.default_steps}, "
            f"{d.max_steps} and {d.solver_steps}"
        )
    if not 0 <= d.target_ema < 1:
        raise ConfigError(f"distill.target_ema must be in [0, 1), got {d.target_ema}")
    if d.guidance_embedding_dim % 2:
        raise ConfigError(f"distill.guidance_embedding_dim must be even, got {d.guidance_embedding_dim}")
    down = cfg.vae.downsampling
    if not cfg.vae.pretrained and (
        cfg.data.image_size % down or cfg.vae.crop % down
    ):  # a pretrained VAE is checked at cache time
        raise ConfigError(f"data.image_size and vae.crop must be multiples of the VAE's downsampling factor {down}")


def choices(section: type, key: str) -> tuple[str, ...]:
    """The values a Literal-typed key takes, e.g. choices(DataConfig, "source"): one list for the
    loader, the CLI and the launcher checks."""
    return typing.get_args(typing.get_type_hints(section)[key])


def with_launcher(cfg: Config, launch: LaunchEnv) -> Config:
    """What `accelerate launch --mixed_precision / --use_deepspeed` asked for, checked against the config."""
    wanted = launch.mixed_precision
    if wanted and wanted != cfg.train.mixed_precision:
        if wanted not in (allowed := choices(TrainConfig, "mixed_precision")):
            raise ConfigError(
                f"accelerate launch --mixed_precision {wanted}: blossom trains with "
                f"{', '.join(allowed[:-1])} or {allowed[-1]}"
            )
        if cfg.train.mixed_precision not in ("no", "auto"):
            raise ConfigError(
                f"accelerate launch --mixed_precision {wanted} but train.mixed_precision is "
                f"{cfg.train.mixed_precision}: make them agree"
            )
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=wanted))
    if launch.use_deepspeed and not cfg.train.deepspeed:
        raise ConfigError(
            "accelerate launch --use_deepspeed but train.deepspeed is not set: "
            "set it to a DeepSpeed JSON such as configs/deepspeed_zero2.json"
        )
    return cfg


def _from_env(key: str, value: str) -> bool:
    return key == "tracking.uri" and value == overrides_from_env().get("tracking_uri")


def redact(text: str) -> str:
    """The text with the user:password part of any URL in it removed, safe to log or save."""
    return re.sub(r"//[^/@\s]+@", "//", text)


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config beside a stage's outputs; credentials that came from the environment are cut."""
    from blossom.fsutil import write_text

    values = cfg.to_dict()
    values["tracking"]["uri"] = redact(values["tracking"]["uri"])
    write_text(path, yaml.safe_dump(values, sort_keys=False))


def config_from_dict(values: dict[str, Any]) -> Config:
    return _build(Config, values, "")
