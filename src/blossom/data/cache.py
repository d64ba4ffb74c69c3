"""Latents and text embeddings, computed once into safetensors shards.

The training loop reads only this cache: encoding every image through the VAE and every caption
through the text encoder at every step (as the original system did) costs more than the UNet
step itself at this size (benchmarks/cache_throughput.py measures the ratio).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from blossom.data.folder import load_images, read_metadata
from blossom.errors import DataError
from blossom.fsutil import atomic_dir, write_json
from blossom.images import to_tensor
from blossom.models import TextEncoder

log = logging.getLogger(__name__)

SHARD_SIZE = 4096


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Scaled latents (the posterior mean, times the VAE's scaling factor)."""
    out = [vae.encode(images[i : i + batch]).latent_dist.mode() for i in range(0, len(images), batch)]
    return torch.cat(out) * vae.config.scaling_factor


@torch.no_grad()
def encode_captions(encoder: TextEncoder, captions: list[str], batch: int = 256) -> torch.Tensor:
    """Token hidden states per caption; each distinct caption is encoded once."""
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    states = torch.cat(
        [encoder(unique[i : i + batch]) for i in tqdm(range(0, len(unique), batch), desc="encode text", leave=False)]
    )
    return states[torch.tensor([index[c] for c in captions])]


def build_cache(
    data_dir: Path,
    out_dir: Path,
    vae,
    encoder: TextEncoder,
    image_size: int,
    encoder_name: str = "",
    flip: bool = False,
) -> dict:
    """flip: also cache the latents of the mirrored training images, for random flips in training."""
    from blossom.models import vae_downsampling

    down = vae_downsampling(vae)
    if image_size % down:
        raise DataError(
            f"data.image_size {image_size} is not a multiple of the VAE's downsampling factor {down}: "
            f"set data.image_size to {max(down, image_size // down * down)}"
        )
    info: dict = {
        "splits": {},
        "max_tokens": encoder.max_tokens,
        "text_dim": encoder.dim,
        "text_encoder": encoder_name,
        "flipped": flip,
    }
    with atomic_dir(out_dir) as tmp:
        for split in ("train", "val"):
            records = read_metadata(data_dir / split)
            if not records:
                raise DataError(f"{data_dir / split} has no captioned images: run `blossom data` first")
            images, records = load_images(records, image_size)
            shards = []
            for start in tqdm(range(0, len(records), SHARD_SIZE), desc=f"cache {split}", unit="shard"):
                part = records[start : start + SHARD_SIZE]
                pixels = to_tensor(images[start : start + SHARD_SIZE])
                latents = encode_images(vae, pixels)
                tensors = {
                    "latents": latents.contiguous(),
                    "text": encode_captions(encoder, [r.text for r in part]).half(),
                }
                if flip and split == "train":
                    tensors["latents_flipped"] = encode_images(vae, pixels.flip(-1)).contiguous()
                name = f"{split}-{len(shards):05d}.safetensors"
                save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / name)
                shards.append(name)
            info["splits"][split] = {"count": len(records), "shards": shards}
            info["latent_shape"] = list(latents.shape[1:])
        save_file({"text": encoder([""]).half().contiguous()}, tmp / "null_text.safetensors")
        write_json(tmp / "index.json", info)
    return info


def cache_index(cache_dir: Path) -> dict:
    import json

    index_path = cache_dir / "index.json"
    if not index_path.exists():
        raise DataError(f"no cache at {cache_dir}: run `blossom cache` first")
    return json.loads(index_path.read_text())


def check_cache(index: dict, text_encoder: str, max_tokens: int, flip: bool = False) -> None:
    """A cache built with another text encoder or token length would train the UNet on the wrong states."""
    if flip and not index.get("flipped"):
        raise DataError(
            "data.random_flip is on but the cache has no mirrored latents: rerun `blossom cache` "
            "(or set data.random_flip to false)"
        )
    built = (index.get("text_encoder") or text_encoder, index.get("max_tokens", max_tokens))
    if built != (text_encoder, max_tokens):
        raise DataError(
            f"the cache was built with text.encoder={built[0]} and text.max_tokens={built[1]}, but the "
            f"config now says {text_encoder} and {max_tokens}: rerun `blossom cache` (or restore those keys)"
        )


def load_cache(cache_dir: Path, split: str) -> dict[str, torch.Tensor]:
    index = cache_index(cache_dir)
    parts = [load_file(cache_dir / name) for name in index["splits"][split]["shards"]]
    out = {
        "latents": torch.cat([p["latents"] for p in parts]).float(),
        "text": torch.cat([p["text"] for p in parts]).float(),
        "null_text": load_file(cache_dir / "null_text.safetensors")["text"].float(),
    }
    if all("latents_flipped" in p for p in parts):
        out["latents_flipped"] = torch.cat([p["latents_flipped"] for p in parts]).float()
    return out
