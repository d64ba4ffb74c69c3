"""Training that reads the cache in shard order, from disk or streamed from a real S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import micro_args
from safetensors.torch import load_file
from servers import KEY, SECRET

from blossom.data.stream import ShardOrder, check_lanes
from blossom.errors import ConfigError

COUNTS = [19, 19, 19, 19, 20]


def test_an_epoch_deals_every_sample_once_and_the_step_alone_decides_the_batch():
    order = ShardOrder(COUNTS, lanes=2, seed=0)
    # Lane by lane, the first epoch is each of its shards' rows once, shard after shard.
    epoch = order._lane_shards(0)
    for lane, shards in enumerate(epoch):
        n = sum(COUNTS[s] for s in shards)
        rows = [order._sample(lane, p) for p in range(n)]
        starts = np.concatenate([[0], np.cumsum(COUNTS)])
        expect = sorted(r for s in shards for r in range(starts[s], starts[s + 1]))
        assert sorted(rows) == expect
    assert sorted(np.concatenate([s for s in epoch])) == list(range(len(COUNTS)))  # lanes share no shard
    # A fresh order (a resumed run) gives the same step, whatever came before it.
    assert torch.equal(ShardOrder(COUNTS, 2, 0).indices(37, 8), order.indices(37, 8))
    assert not torch.equal(ShardOrder(COUNTS, 2, 1).indices(37, 8), order.indices(37, 8))
    # Rank r of 2 trains on lane r: its half of the global batch.
    both = order.indices(5, 8)
    assert torch.equal(both[:4], torch.tensor([order._sample(0, 5 * 4 + i) for i in range(4)]))


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda: ShardOrder([10, 10], lanes=4, seed=0), "set train.lanes to 2 or less"),
        (lambda: check_lanes(4, 10, 1), "train.batch_size 10 does not split over train.lanes 4"),
        (lambda: check_lanes(4, 8, 3), "train.lanes 4 does not split over 3 processes"),
    ],
)
def test_orders_that_cannot_be_kept_are_refused(call, words):
    with pytest.raises(ConfigError, match=words):
        call()


def _weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "train" / "checkpoints" / "step-000004" / "model.safetensors")


@pytest.mark.slow
def test_training_streamed_from_s3_equals_training_from_the_local_cache(micro_prepared, s3_server, tmp_path):
    from blossom.data.cache import build_cache
    from blossom.models import load_text_encoder, load_vae

    cfg, paths = micro_prepared
    local = tmp_path / "local"
    (local / "vae").parent.mkdir(parents=True)
    os.symlink(paths.vae, local / "vae")
    build_cache(
        paths.data,
        local / "cache",
        load_vae(paths.vae),
        load_text_encoder(cfg.text),
        cfg.data.image_size,
        cfg.text.encoder,
        flip=True,
        shard_bytes=20_000,  # five train shards of 19-20 samples
    )
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
    url = "s3://blossom/caches/micro"
    order = ["--set", "train.order=shards", "--set", "train.lanes=2", "--set", f"remote.endpoint={s3_server}"]

    def blossom(root: Path, *args: str, procs: int = 1) -> subprocess.CompletedProcess:
        launcher = [sys.executable, "-m"] + (
            ["torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), "-m"] if procs > 1 else []
        )
        cmd = [*launcher, "blossom.cli", *micro_args(root), *order, *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)

    pushed = blossom(local, "push-cache", "--to", url)
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    assert "push-cache: 112 samples" in pushed.stdout
    runs = {}
    for name, procs, extra in (("local", 1, []), ("s3", 1, ["--set", f"train.cache_url={url}"]), ("s3x2", 2, [])):
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        if not (root / "vae").exists():
            os.symlink(paths.vae, root / "vae")
        extra = extra or ["--set", f"train.cache_url={url}"]
        res = blossom(root, *extra, "train", procs=procs)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = _weights(root)
    # Streamed in one process: the same samples in the same order, so the same weights, bit for bit.
    assert all(torch.equal(runs["local"][k], runs["s3"][k]) for k in runs["local"])
    # Two processes, each fetching only its lane's shards: equal up to the order of float sums.
    a, b = runs["local"], runs["s3x2"]
    assert (sum((a[k] - b[k]).norm() ** 2 for k in a) / sum(a[k].norm() ** 2 for k in a)).sqrt() < 1e-5

    # A shard gone from the bucket: one line naming it and the fix, and nothing half-trained kept.
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key=KEY, secret=SECRET)
    fs.rm(fs.glob(f"{url}/train-*.tar"))
    gone = blossom(tmp_path / "gone", "--set", f"train.cache_url={url}", "train")
    errors = [line for line in gone.stderr.splitlines() if line.startswith("blossom: error:")]
    assert gone.returncode != 0 and len(errors) == 1 and ".tar is missing" in errors[0], gone.stderr[-2000:]
    assert "push-cache" in errors[0] and "Traceback" not in gone.stderr
