"""The cache in object storage: webdataset tar shards, read in an order that only the seed and
the step decide, each rank fetching only its own shards.

Why webdataset: its format is plain tar (one sample = one key's files), readable with any tool
and streamable from any URL, and the library is small. MosaicML streaming, the other engine the
field uses, pins numpy < 2.2 and transformers < 5 and needs torchvision, none of which fit
blossom's stack. webdataset has no resumable position of its own, so the order lives here
(`ShardOrder`): a pure function of (seed, step), which makes a restored checkpoint's position
O(1) and any number of processes read the same global batches.

`train.order: shards` reads in this order from the local cache as well; so a run streamed from
S3 and a run from `outputs/cache` with the same settings see the same samples (tested).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from blossom.errors import BlossomError, ConfigError, DataError

log = logging.getLogger(__name__)

FIX = "run `blossom push-cache` to write it"


class ShardOrder:
    """Epochs over shuffled shards, spread over `lanes` streams.

    Epoch e shuffles the shards (seed, e) and deals them to the lanes in turn; each shard's rows
    are shuffled (seed, e, shard). A step takes batch/lanes consecutive samples from every lane,
    lanes in order, so rank r of N (N dividing lanes) trains on the samples of lanes
    [r*lanes/N, (r+1)*lanes/N), which come from the shards those lanes were dealt, and the
    global batch is the same for every N."""

    def __init__(self, counts: list[int], lanes: int, seed: int):
        if len(counts) < lanes:
            raise ConfigError(
                f"train.lanes is {lanes} but the cache's train split has {len(counts)} shards: "
                f"set train.lanes to {max(1, len(counts))} or less"
            )
        self.counts, self.lanes, self.seed = np.asarray(counts), lanes, seed
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])
        self._through: list[np.ndarray] = []  # per epoch: samples each lane has had through its end

    def _lane_shards(self, e: int) -> list[np.ndarray]:
        perm = np.random.default_rng([self.seed, e]).permutation(len(self.counts))
        return [perm[lane :: self.lanes] for lane in range(self.lanes)]

    @functools.lru_cache(maxsize=256)  # noqa: B019 - one order per run; the cache holds the shards in use
    def _rows(self, e: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, e, shard]).permutation(int(self.counts[shard]))

    def _sample(self, lane: int, position: int) -> int:
        while not self._through or self._through[-1][lane] <= position:
            totals = np.array([self.counts[s].sum() for s in self._lane_shards(len(self._through))])
            self._through.append(totals + (self._through[-1] if self._through else 0))
        e = int(np.searchsorted([t[lane] for t in self._through], position, side="right"))
        position -= int(self._through[e - 1][lane]) if e else 0
        shards = self._lane_shards(e)[lane]
        ends = np.cumsum(self.counts[shards])
        k = int(np.searchsorted(ends, position, side="right"))
        shard = int(shards[k])
        return int(self.starts[shard] + self._rows(e, shard)[position - (ends[k - 1] if k else 0)])

    def indices(self, step: int, batch: int) -> torch.Tensor:
        """The global sample numbers of step `step` (0-based): batch/lanes from each lane in turn."""
        per = batch // self.lanes
        return torch.tensor(
            [self._sample(lane, step * per + i) for lane in range(self.lanes) for i in range(per)], dtype=torch.long
        )


def check_lanes(lanes: int, batch: int, world: int) -> None:
    if batch % lanes:
        raise ConfigError(f"train.batch_size {batch} does not split over train.lanes {lanes}: make it a multiple")
    if lanes % world:
        raise ConfigError(
            f"train.lanes {lanes} does not split over {world} processes: make it a multiple of {world}, "
            "so every process reads whole lanes"
        )


# ---- object storage ----


def s3_filesystem(endpoint: str | None, region: str | None):
    """s3fs (which DVC's S3 remote already brings); credentials from the environment only."""
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, client_kwargs={"region_name": region} if region else {})


def _register_opener(fs) -> None:
    """webdataset opens URLs through gopen's scheme table; s3:// goes through this filesystem."""
    import sys

    import webdataset  # noqa: F401  (loads webdataset.gopen)

    gopen = sys.modules["webdataset.gopen"]
    gopen.gopen_schemes["s3"] = lambda url, mode="rb", bufsize=8192, **kw: fs.open(url, "rb")


@contextlib.contextmanager
def s3_errors(url: str):
    """An S3 failure as one line naming the cause and the fix (a missing object stays FileNotFoundError)."""
    try:
        yield
    except (BlossomError, FileNotFoundError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - botocore/aiohttp raise many types for one refused request
        from blossom.config import redact
        from blossom.datastore import s3_hint

        log.debug("S3 request failed", exc_info=True)
        raise DataError(f"cache store {redact(url)}: {s3_hint(e, 'train.cache_url')}") from None


def push_cache(cache_dir: Path, url: str, fs) -> dict:
    """Write the local cache to `url` as webdataset tars, one per cache shard (same rows): each
    sample carries its latents, mirrored latents and caption states. Shards first, the index last,
    so a reader never finds an index whose shards are not all there."""
    import webdataset as wds

    from blossom.data.cache import SPLITS, CacheSplit, cache_index

    index = cache_index(cache_dir)
    url = url.rstrip("/")
    stream: dict = {}
    with tempfile.TemporaryDirectory() as tmp, s3_errors(url):
        for split in SPLITS:
            data = CacheSplit(cache_dir, split, index)
            stream[split], first = [], 0
            for entry in index["splits"][split]["shards"]:
                rows = torch.arange(first, first + entry["count"])
                latents, text = data.batch(rows)
                flipped = data.batch(rows, torch.ones(len(rows), dtype=torch.bool))[0] if data.has_flipped else None
                name = entry["file"].replace(".safetensors", ".tar")
                with open(Path(tmp) / name, "wb") as f, wds.TarWriter(f) as sink:
                    for i in range(len(rows)):
                        sample = {"__key__": f"{first + i:09d}", "latents.npy": latents[i].half().numpy()}
                        sample["text.npy"] = text[i].half().numpy()
                        if flipped is not None:
                            sample["flipped.npy"] = flipped[i].half().numpy()
                        sink.write(sample)
                fs.put_file(str(Path(tmp) / name), f"{url}/{name}")
                stream[split].append({"file": name, "count": entry["count"]})
                first += entry["count"]
        buf = io.BytesIO()
        np.save(buf, data.null_text.half().numpy())
        fs.pipe_file(f"{url}/null_text.npy", buf.getvalue())
        fs.pipe_file(f"{url}/index.json", json.dumps({**index, "stream": stream}, indent=2).encode())
    return index


class StreamSplit:
    """A split of a pushed cache, read shard by shard over webdataset: `batch(idx)` fetches the
    shards holding idx (each whole, once, kept while in use) and serves the rows. With
    ShardOrder, a rank touches only its lanes' shards, one or two per lane at a time."""

    def __init__(self, url: str, split: str, fs, keep: int = 16):
        url = url.rstrip("/")
        _register_opener(fs)
        try:
            with s3_errors(url):
                index = json.loads(fs.cat_file(f"{url}/index.json"))
        except FileNotFoundError:
            raise DataError(f"no cache at {url}: {FIX}") from None
        if "stream" not in index:
            raise DataError(f"{url}/index.json is not a pushed cache: {FIX}")
        self.url, self.split, self.index, self.fs, self.keep = url, split, index, fs, keep
        self.shards = index["stream"][split]
        self.starts = np.concatenate([[0], np.cumsum([s["count"] for s in self.shards])])
        self.latent_shape = tuple(index["latent_shape"])
        self.has_flipped = bool(index.get("flipped")) and split == "train"
        self._loaded: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        try:
            self.null_text = torch.from_numpy(np.load(io.BytesIO(fs.cat_file(f"{url}/null_text.npy")))).float()
        except FileNotFoundError:
            raise DataError(f"{url}/null_text.npy is missing: {FIX}") from None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if k in self._loaded:
            self._loaded.move_to_end(k)
            return self._loaded[k]
        import webdataset as wds

        shard = self.shards[k]
        where = f"{self.url}/{shard['file']}"
        try:
            with s3_errors(where):
                samples = list(wds.WebDataset(where, shardshuffle=False, nodesplitter=None, empty_check=False).decode())
        except FileNotFoundError:
            raise DataError(f"cache shard {where} is missing: {FIX}") from None
        if len(samples) != shard["count"]:
            raise DataError(f"cache shard {where} holds {len(samples)} samples, the index says {shard['count']}: {FIX}")
        keys = ["latents.npy", "text.npy"] + (["flipped.npy"] if self.has_flipped else [])
        arrays = {key: np.stack([s[key] for s in samples]) for key in keys}
        self._loaded[k] = arrays
        while len(self._loaded) > self.keep:
            self._loaded.popitem(last=False)
        return arrays

    def batch(self, idx: torch.Tensor, flip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = idx.numpy().astype(np.int64)
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        x0 = np.empty((len(rows), *self.latent_shape), np.float16)
        text = np.empty((len(rows), self.index["max_tokens"], self.index["text_dim"]), np.float16)
        f = flip.numpy() if flip is not None else np.zeros(len(rows), bool)
        for k in np.unique(shard):
            arrays = self._shard(int(k))
            at = np.nonzero(shard == k)[0]
            local = rows[at] - self.starts[k]
            x0[at] = np.where(
                f[at, None, None, None],
                arrays.get("flipped.npy", arrays["latents.npy"])[local],
                arrays["latents.npy"][local],
            )
            text[at] = arrays["text.npy"][local]
        return torch.from_numpy(x0).float(), torch.from_numpy(text).float()
