"""Latents and text states, computed once into packed, memory-mapped shards.

The training loop reads only this cache: encoding every image through the VAE and every caption
through the text encoder at every step (as the original system did) costs more than the UNet
step itself at this size (benchmarks/cache_throughput.py measures the ratio).

Layout (format 3; docs/cache.md):
- `text-NNNNN.safetensors`: the states of each distinct caption of both splits, once, as int8 with
  one fp16 scale per token vector, the empty prompt (classifier-free guidance's unconditional input)
  among them;
- `{train,val}-NNNNN.safetensors`: fp16 latents (and the mirrored images' latents for random flips)
  and each sample's caption number;
- `index.json`: counts, shapes, dtypes, each shard's size, the encoder and the format version.
Every shard stays under a byte limit, so a rank reads and maps only what it touches. Text states
keep every token position, padding included: the UNet attends to all of them (as Stable
Diffusion's does), so dropping the padding would change what the model is conditioned on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from blossom.data.folder import Record, load_images, read_metadata
from blossom.data.shards import FIX, map_shard, read_header, write_shard
from blossom.errors import DataError
from blossom.fsutil import remove_stale_temps, swap_in, write_json
from blossom.images import to_tensor
from blossom.models import TextEncoder

log = logging.getLogger(__name__)

FORMAT = 3  # 3: int8 text states (2: fp16)
SHARD_BYTES = 64 << 20  # MosaicML streaming's default shard size: big enough to read fast, small enough to spread
SHARD_ROWS = 2048  # and few enough rows that a small data set still spreads over the processes that build it
SPLITS = ("train", "val")


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Scaled latents (the posterior mean, times the VAE's scaling factor).

    Small batches by default: on a CPU the encoder's activations then stay in cache (32 images of
    64 px encode 2-3x faster than 256 at once, measured); the same pixel budget at larger sizes."""
    batch = batch or max(1, 32 * 64 * 64 // (images.shape[-1] * images.shape[-2]))
    device = vae.device
    out = [vae.encode(images[i : i + batch].to(device)).latent_dist.mode().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out) * vae.config.scaling_factor


def quantize_states(states: np.ndarray) -> dict[str, np.ndarray]:
    """int8 text states, each token's vector scaled by its own absmax / 127 (kept in fp16).

    Text states are most of a sample's bytes; this halves them again after fp16, at a relative
    error of ~1.7 % on MiniLM's states (a caption's states differ from another's by ~70-100 %).
    One scale per token vector keeps a caption's bytes independent of what else is in its shard."""
    states = np.asarray(states, np.float32)
    scale = (np.abs(states).max(-1) / 127).astype(np.float16)
    scale[scale == 0] = 1  # an all-zero vector (or one under fp16's range) stores zeros
    q = np.clip(np.rint(states / scale[..., None].astype(np.float32)), -127, 127).astype(np.int8)
    return {"text": q, "text_scale": scale}


def text_row_bytes(max_tokens: int, dim: int) -> int:
    """One caption's stored states: int8 values and an fp16 scale per token."""
    return max_tokens * (dim + 2)


def dequantize_states(q: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """fp32 tensor of fp16 values: the exact values training sees, whichever way the rows travel (a
    streamed cache carries them as fp16 and trains bit for bit like the local one). An int8 times
    an fp16 scale is exact in fp32, so one rounding to fp16 equals fp16 arithmetic, at a tenth of
    numpy's fp16 cost (4 ms a batch of 64)."""
    return (torch.from_numpy(q).float() * torch.from_numpy(scale).float()[..., None]).half().float()


@torch.no_grad()
def encode_captions(encoder: TextEncoder, captions: list[str], batch: int = 64) -> torch.Tensor:
    return torch.cat([encoder(captions[i : i + batch]).cpu() for i in range(0, len(captions), batch)])


def _units(records: dict[str, list[Record]], captions: list[str], rows: dict[str, int]) -> list[tuple]:
    """Every shard of the build as (file name, split or "text", first row, rows), in a fixed order."""
    units = [
        (f"text-{k:05d}.safetensors", "text", i, captions[i : i + rows["text"]])
        for k, i in enumerate(range(0, len(captions), rows["text"]))
    ]
    for split in SPLITS:
        step = rows[split]
        units += [
            (f"{split}-{k:05d}.safetensors", split, i, records[split][i : i + step])
            for k, i in enumerate(range(0, len(records[split]), step))
        ]
    return units


def build_key(
    data_dir: Path,
    vae,
    encoder_name: str,
    max_tokens: int,
    image_size: int,
    flip: bool,
    shard_bytes: int,
    precision: str = "fp32",
) -> str:
    """What the cache's bytes depend on: a build killed part-way continues only with the same key."""
    h = hashlib.sha256(
        json.dumps([FORMAT, encoder_name, max_tokens, image_size, flip, shard_bytes, SHARD_ROWS, precision]).encode()
    )
    for split in SPLITS:
        meta = data_dir / split / "metadata.jsonl"
        h.update(meta.read_bytes() if meta.exists() else b"")
    for p in sorted(vae.state_dict().items()):
        h.update(p[0].encode())
        h.update(p[1].detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def build_cache(
    data_dir: Path,
    out_dir: Path,
    vae,
    encoder: TextEncoder,
    image_size: int,
    encoder_name: str = "",
    flip: bool = False,
    rt=None,
    shard_bytes: int = SHARD_BYTES,
    precision: str = "fp32",
) -> dict:
    """flip: also cache the latents of the mirrored training images, for random flips in training.
    rt: a distributed Runtime; under torchrun each rank encodes every world-th shard.
    precision: fp32, or bf16 (autocast) on devices that compute it natively (cpu.pick_precision).

    The build happens in a folder beside out_dir named after its inputs; finished shards stay
    there, so a killed build continues where it stopped, and out_dir is replaced only once every
    shard is written."""
    from blossom.models import vae_downsampling

    rank, world = (rt.rank, rt.world) if rt else (0, 1)
    down = vae_downsampling(vae)
    if image_size % down:
        raise DataError(
            f"data.image_size {image_size} is not a multiple of the VAE's downsampling factor {down}: "
            f"set data.image_size to {max(down, image_size // down * down)}"
        )
    records = {}
    for split in SPLITS:
        records[split] = read_metadata(data_dir / split)
        if not records[split]:
            raise DataError(f"{data_dir / split} has no captioned images: run `blossom data` first")
    captions = sorted({r.text for rs in records.values() for r in rs} | {""})  # "" sorts first: caption 0
    latent_shape = (vae.config.latent_channels, image_size // down, image_size // down)
    latent_bytes = int(np.prod(latent_shape)) * 2
    rows = {
        "text": shard_bytes // text_row_bytes(encoder.max_tokens, encoder.dim),
        "train": shard_bytes // (latent_bytes * (2 if flip else 1) + 4),
        "val": shard_bytes // (latent_bytes + 4),
    }
    rows = {k: min(max(1, v), SHARD_ROWS) for k, v in rows.items()}
    meta = {
        "format": str(FORMAT),
        "text_encoder": encoder_name,
        "max_tokens": str(encoder.max_tokens),
        "text_dim": str(encoder.dim),
        "encoded_in": precision,
    }
    key = build_key(data_dir, vae, encoder_name, encoder.max_tokens, image_size, flip, shard_bytes, precision)
    staging = out_dir.with_name(f".{out_dir.name}.build-{key}")
    if rank == 0:
        remove_stale_temps(out_dir)
        for old in out_dir.parent.glob(f".{out_dir.name}.build-*"):
            if old != staging:  # a build of other inputs: its shards can never be reused
                shutil.rmtree(old, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
        for tmp in staging.glob(".*.tmp"):  # a shard a killed build was writing
            tmp.unlink()
    if rt:
        rt.barrier()

    units = _units(records, captions, rows)
    mine = [u for k, u in enumerate(units) if k % world == rank]
    todo = [u for u in mine if not _finished(staging / u[0], meta)]
    if rank == 0 and len(todo) < len(mine):
        log.info("cache: %d of %d shards already built by a previous run, kept", len(mine) - len(todo), len(mine))
    caption_id = {c: i for i, c in enumerate(captions)}
    with (
        torch.autocast(vae.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"),
        tqdm(total=sum(len(u[3]) for u in todo), desc="cache", unit="row", disable=rank != 0, mininterval=1) as bar,
    ):
        for name, split, _, part in todo:
            if split == "text":
                tensors = quantize_states(encode_captions(encoder, part).numpy())
            else:
                tensors = _encode_samples(vae, part, image_size, flip and split == "train", caption_id)
            write_shard(staging / name, tensors, {**meta, "split": split})
            bar.update(len(part))
    if rt:
        rt.barrier()
    info = None
    if rank == 0:
        names = {part: [u[0] for u in units if u[1] == part] for part in ("text", *SPLITS)}
        info = write_index(staging, names, encoder_name, encoder.max_tokens, encoder.dim, latent_shape, flip, precision)
        swap_in(staging, out_dir)
    if rt:
        rt.barrier()
    return info or cache_index(out_dir)


def _encode_samples(
    vae, part: list[Record], size: int, flip: bool, caption_id: dict[str, int]
) -> dict[str, np.ndarray]:
    try:
        images, kept = load_images(part, size)
    except DataError:  # none of this shard's images is readable: an empty shard, counted in the index
        kept = []
    if not kept:
        return {"latents": np.zeros((0,), np.float16), "caption": np.zeros((0,), np.int32)}
    pixels = to_tensor(images)
    out = {
        "latents": encode_images(vae, pixels).half().numpy(),
        "caption": np.array([caption_id[r.text] for r in kept], np.int32),
    }
    if flip:
        out["latents_flipped"] = encode_images(vae, pixels.flip(-1)).half().numpy()
    return out


def _finished(path: Path, meta: dict) -> bool:
    """A shard a killed build already wrote (shards are renamed into place only when complete)."""
    if not path.exists():
        return False
    try:
        header, _ = read_header(path)
    except DataError:
        return False
    return {k: header.get("__metadata__", {}).get(k) for k in meta} == meta


def write_index(
    folder: Path,
    names: dict[str, list[str]],
    encoder_name: str,
    max_tokens: int,
    text_dim: int,
    latent_shape,
    flip: bool,
    precision: str = "fp32",
) -> dict:
    """index.json for the shards `names` ("text", "train", "val": file names in order) in folder."""
    info: dict = {
        "format": FORMAT,
        "text_encoder": encoder_name,
        "max_tokens": max_tokens,
        "text_dim": text_dim,
        "flipped": flip,
        "encoded_in": precision,
        "latent_shape": list(latent_shape),
        "dtypes": {"latents": "float16", "text": "int8", "text_scale": "float16", "caption": "int32"},
        "text": {"count": 0, "null_caption": 0, "shards": []},
        "splits": {s: {"count": 0, "shards": []} for s in SPLITS},
    }
    for part, files in names.items():
        for name in files:
            arrays, _ = map_shard(folder / name)
            count = int(arrays["text" if part == "text" else "latents"].shape[0])
            entry = {"file": name, "count": count, "bytes": (folder / name).stat().st_size}
            home = info["text"] if part == "text" else info["splits"][part]
            if count:  # a shard whose images were all unreadable holds nothing to list
                home["shards"].append(entry)
                home["count"] += count
    for split in SPLITS:
        if not info["splits"][split]["count"]:
            raise DataError(f"no readable images in the {split} split: check that the data set's images exist")
    samples = sum(info["splits"][s]["count"] for s in SPLITS)
    on_disk = sum(e["bytes"] for part in (info["text"], *info["splits"].values()) for e in part["shards"])
    info["bytes_per_sample"] = round(on_disk / samples, 1)
    write_json(folder / "index.json", info)
    return info


def cache_index(cache_dir: Path) -> dict:
    index_path = cache_dir / "index.json"
    if not index_path.exists():
        raise DataError(f"no cache at {cache_dir}: run `blossom cache` first")
    try:
        index = json.loads(index_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{index_path} is damaged: {FIX}") from None
    version = index.get("format", 1) if isinstance(index, dict) else None
    if version != FORMAT:
        raise DataError(f"the cache at {cache_dir} is in format {version}, this blossom reads format {FORMAT}: {FIX}")
    return index


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


class CacheSplit:
    """One split of the cache, memory-mapped: rows are read when asked for, never all at once.

    `batch(idx)` gathers the given samples (fp32, as the UNet takes them); only the shards and pages
    holding those rows are touched, so each rank of a distributed run reads its own slices."""

    def __init__(self, cache_dir: Path, split: str, index: dict | None = None):
        index = index or cache_index(cache_dir)
        self.index = index
        expect = {
            "format": str(FORMAT),
            "text_encoder": index["text_encoder"],
            "max_tokens": str(index["max_tokens"]),
            "text_dim": str(index["text_dim"]),
        }
        self._latents, self._flipped, self._caption = [], [], []
        for entry in index["splits"][split]["shards"]:
            arrays = self._open(cache_dir, entry, expect)
            self._latents.append(arrays["latents"])
            self._caption.append(arrays["caption"])
            if "latents_flipped" in arrays:
                self._flipped.append(arrays["latents_flipped"])
        text = [self._open(cache_dir, entry, expect) for entry in index["text"]["shards"]]
        self._text, self._text_scale = [t["text"] for t in text], [t["text_scale"] for t in text]
        self._starts = np.cumsum([0] + [len(a) for a in self._latents])
        self._text_starts = np.cumsum([0] + [len(a) for a in self._text])
        self.has_flipped = bool(self._flipped) and len(self._flipped) == len(self._latents)
        self.latent_shape = tuple(index["latent_shape"])
        self.null_text = self.text_rows(np.array([index["text"]["null_caption"]]))

    @staticmethod
    def _open(cache_dir: Path, entry: dict, expect: dict) -> dict[str, np.ndarray]:
        arrays, meta = map_shard(cache_dir / entry["file"], entry["bytes"])
        got = {k: meta.get(k) for k in expect}
        if got != expect:
            raise DataError(
                f"cache shard {cache_dir / entry['file']} was built with text.encoder={got['text_encoder']}, "
                f"text.max_tokens={got['max_tokens']} (format {got['format']}), not this cache's "
                f"{expect['text_encoder']}, {expect['max_tokens']}: {FIX}"
            )
        return arrays

    def __len__(self) -> int:
        return int(self._starts[-1])

    @staticmethod
    def _gather(parts: list[np.ndarray], starts: np.ndarray, idx: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(starts, idx, side="right") - 1
        out = np.empty((len(idx), *parts[0].shape[1:]), parts[0].dtype)
        for s in np.unique(shard):
            at = np.nonzero(shard == s)[0]
            out[at] = parts[s][idx[at] - starts[s]]
        return out

    def text_rows(self, captions: np.ndarray) -> torch.Tensor:
        q = self._gather(self._text, self._text_starts, captions)
        scale = self._gather(self._text_scale, self._text_starts, captions)
        return dequantize_states(q, scale)

    def batch(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, text states) of the samples idx, fp32; flip[i] takes sample i's mirrored latents."""
        rows = idx.numpy().astype(np.int64)
        x0 = self._gather(self._latents, self._starts, rows)
        if flip is not None and flip.any():
            if not self.has_flipped:
                raise DataError(f"the cache has no mirrored latents: {FIX} with data.random_flip on")
            f = flip.numpy()
            x0[f] = self._gather(self._flipped, self._starts, rows[f])
        text = self.text_rows(self._gather(self._caption, self._starts, rows))
        return torch.from_numpy(x0).float(), text


def load_cache(cache_dir: Path, split: str) -> dict[str, torch.Tensor]:
    """A whole split in memory, for inspection and tests; training reads through CacheSplit instead."""
    data = CacheSplit(cache_dir, split)
    everything = torch.arange(len(data))
    latents, text = data.batch(everything)
    out = {"latents": latents, "text": text, "null_text": data.null_text}
    if data.has_flipped:
        out["latents_flipped"] = data.batch(everything, torch.ones(len(data), dtype=torch.bool))[0]
    return out
