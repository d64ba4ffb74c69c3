"""The compact memory-mapped cache against the previous in-RAM format, side by side in one run.

    .venv/bin/python benchmarks/cache_format.py [--sections bytes,throughput,build,memory]
        [--limit-mb 1024] [--steps 30]

- bytes: bytes per sample of the previous format (fp32 latents, fp16 states per sample) and of
  this one (fp16 latents, each caption's states once as int8 with a scale per token; and the same
  with fp16 states, format 2), computed for tiny, flowers128 and peer256 (a 768-wide, 77-token
  encoder), and measured on the built cache in outputs/cache.
- throughput: the tiny preset's training step fed from an in-RAM tensor vs from the memory-mapped
  cache (same UNet, same rows, alternating blocks).
- build: `blossom cache` of outputs/data with one process vs two under torchrun.
- memory: a synthetic cache 4x the memory limit (random states, one caption per image), trained on
  by `blossom train` inside a cgroup-v1 memory group with that limit, and the same samples in the
  previous format loaded the previous way, in the same group. Needs root and cgroup v1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from cache_throughput import train_step
from machine import machine_line
from timing import median_seconds

ROOT = Path(__file__).resolve().parents[1]
OLD_SHARD = 4096  # rows per shard in the previous format
PRESETS = {  # latent shape, text tokens x width, mirrored latents cached
    "tiny (MiniLM 24x384)": ((4, 16, 16), (24, 384), True),
    "flowers128 (768-wide, 77 tokens)": ((4, 16, 16), (77, 768), True),
    "peer256 (768-wide, 77 tokens)": ((4, 32, 32), (77, 768), True),
}


def old_bytes(latent, text, flip) -> float:
    return int(np.prod(latent)) * 4 * (2 if flip else 1) + int(np.prod(text)) * 2


def new_bytes(latent, text, flip, captions_per_image: float, int8: bool = True) -> float:
    from blossom.data.cache import text_row_bytes

    states = text_row_bytes(*text) if int8 else int(np.prod(text)) * 2
    return int(np.prod(latent)) * 2 * (2 if flip else 1) + 4 + states * captions_per_image


def section_bytes() -> None:
    unique = 1.0
    meta = ROOT / "outputs" / "data" / "train" / "metadata.jsonl"
    if meta.exists():
        captions = [json.loads(line)["text"] for line in meta.read_text().splitlines() if line.strip()]
        unique = len(set(captions)) / len(captions)
    print(f"\n## bytes per sample (train rows; procedural captions: {unique:.2f} distinct per image)")
    print(
        f"{'preset':34} {'previous':>10} {'unique captions':>22} {'procedural captions':>22}"
        f" {'fp16 states (format 2), unique / procedural':>46}"
    )
    for name, (latent, text, flip) in PRESETS.items():
        old = old_bytes(latent, text, flip)
        a, b = new_bytes(latent, text, flip, 1.0), new_bytes(latent, text, flip, unique)
        c, d = (new_bytes(latent, text, flip, u, int8=False) for u in (1.0, unique))
        print(
            f"{name:34} {old / 1024:8.1f}KB {a / 1024:8.1f}KB ({old / a:4.2f}x) {b / 1024:8.1f}KB ({old / b:4.2f}x)"
            f" {old / c:31.2f}x / {old / d:4.2f}x"
        )
    from blossom.data.cache import FORMAT

    index = ROOT / "outputs" / "cache" / "index.json"
    if index.exists() and json.loads(index.read_text()).get("format") == FORMAT:
        info = json.loads(index.read_text())
        n = sum(s["count"] for s in info["splits"].values())
        old = (
            sum(
                old_bytes(info["latent_shape"], (info["max_tokens"], info["text_dim"]), s == "train")
                * info["splits"][s]["count"]
                for s in info["splits"]
            )
            / n
        )
        print(
            f"measured, outputs/cache ({n} samples): {info['bytes_per_sample'] / 1024:.1f} KB per sample; "
            f"previous format {old / 1024:.1f} KB computed ({old / info['bytes_per_sample']:.2f}x)"
        )


def section_throughput(steps: int) -> None:
    from blossom.config import load_config
    from blossom.data.cache import CacheSplit, load_cache
    from blossom.models import build_unet, noise_scheduler, set_threads

    cfg = load_config()
    set_threads(cfg.threads)
    cache = ROOT / "outputs" / "cache"
    mapped = CacheSplit(cache, "train")
    ram = load_cache(cache, "train")
    unet = build_unet(cfg, mapped.index["text_dim"], mapped.latent_shape)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sched = noise_scheduler(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randint(len(mapped), (cfg.train.batch_size,), generator=gen),
            torch.rand(cfg.train.batch_size, generator=gen) < 0.5,
        )
        for _ in range(64)
    ]

    def step(x0, text) -> None:
        train_step(unet, opt, sched, x0, text)

    def from_ram(i: int) -> None:
        idx, flip = batches[i % len(batches)]
        x0 = torch.where(flip.view(-1, 1, 1, 1), ram["latents_flipped"][idx], ram["latents"][idx])
        step(x0, ram["text"][idx])

    def from_map(i: int) -> None:
        idx, flip = batches[i % len(batches)]
        step(*mapped.batch(idx, flip))

    t = median_seconds(
        {"in RAM (previous)": from_ram, "memory-mapped": from_map}, rounds=3, per_round=max(1, steps // 3)
    )
    gather = median_seconds({"gather": lambda i: mapped.batch(*batches[i % len(batches)])}, rounds=3, per_round=20)[
        "gather"
    ]
    print(f"\n## training step, tiny preset, batch {cfg.train.batch_size}, {torch.get_num_threads()} threads")
    for name, s in t.items():
        print(f"{name:>20}: {s * 1000:7.1f} ms/step")
    print(
        f"memory-mapped / in RAM: {t['memory-mapped'] / t['in RAM (previous)']:.3f} "
        f"(gathering one batch alone: {gather * 1000:.2f} ms)"
    )


def section_build() -> None:
    data = ROOT / "outputs" / "data"
    vae = ROOT / "outputs" / "export" / "vae"
    if not (data / "train" / "metadata.jsonl").exists() or not (vae / "config.json").exists():
        print("\n## build: needs outputs/data and outputs/export/vae (run `make run` first)")
        return
    times = {}
    cores = len(os.sched_getaffinity(0))
    runs = {
        "1 process, 1 thread": (1, 1),
        f"1 process, {cores} threads (the default)": (1, 0),
        f"{cores} processes (torchrun), 1 thread each": (cores, 0),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for label, (procs, threads) in runs.items():
            root = Path(tmp) / "run"
            root.mkdir()
            os.symlink(data, root / "data")
            sets = ["--set", f"outputs={root}", "--set", f"vae.pretrained={vae}", "--set", f"threads={threads}"]
            cmd = [sys.executable, "-m", "blossom.cli", *sets, "cache"]
            if procs > 1:
                launcher = ["torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
                cmd = [sys.executable, "-m", *launcher, *cmd[1:]]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[label] = time.perf_counter() - start
            shutil.rmtree(root)
    n = sum(1 for _ in open(data / "train" / "metadata.jsonl")) + sum(1 for _ in open(data / "val" / "metadata.jsonl"))
    print(f"\n## cache build, {n} images (whole command, model loading included)")
    labels = list(times)
    for label, s in times.items():
        print(f"{label:>42}: {s:6.1f} s ({n / s:4.0f} images/s, {times[labels[0]] / s:.2f}x the first)")
    print(f"{labels[2]} vs {labels[1]}: {times[labels[1]] / times[labels[2]]:.2f}x")


# ---- memory: a cache bigger than the memory limit ----


def synthetic_cache(folder: Path, n: int, latent, text, encoder: str = "minilm", val: int = 512) -> None:
    """A cache in this format of random latents and text states, one caption per sample, in shards
    sized as `blossom cache` sizes them (at most SHARD_BYTES and SHARD_ROWS)."""
    from blossom.data.cache import FORMAT, SHARD_BYTES, SHARD_ROWS, quantize_states, text_row_bytes, write_index
    from blossom.data.shards import write_shard

    def rows_per_shard(row_bytes: int) -> int:
        return min(max(1, SHARD_BYTES // row_bytes), SHARD_ROWS)

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    meta = {"format": str(FORMAT), "text_encoder": encoder, "max_tokens": str(text[0]), "text_dim": str(text[1])}
    names = {"text": [], "train": [], "val": []}
    per_text, captions = rows_per_shard(text_row_bytes(*text)), n + val + 1
    for k, i in enumerate(range(0, captions, per_text)):
        states = quantize_states(rng.standard_normal((min(per_text, captions - i), *text), np.float32))
        names["text"].append(f"text-{k:05d}.safetensors")
        write_shard(folder / names["text"][-1], states, {**meta, "split": "text"})
    per = rows_per_shard(int(np.prod(latent)) * 4 + 4)
    for split, count, first in (("train", n, 1), ("val", val, 1 + n)):
        for k, i in enumerate(range(0, count, per)):
            rows = min(per, count - i)
            lat = rng.standard_normal((rows, *latent), np.float32).astype(np.float16)
            tensors = {"latents": lat, "caption": np.arange(first + i, first + i + rows, dtype=np.int32)}
            if split == "train":
                tensors["latents_flipped"] = np.ascontiguousarray(lat[..., ::-1])
            names[split].append(f"{split}-{k:05d}.safetensors")
            write_shard(folder / names[split][-1], tensors, {**meta, "split": split})
    write_index(folder, names, encoder, text[0], text[1], latent, True)


def _write_synthetic(root: Path, n: int, latent, text, val: int = 512) -> None:
    """The same random samples in both formats: root/new (this one) and root/old (the previous)."""
    new, old = root / "new" / "cache", root / "old" / "cache"
    synthetic_cache(new, n, latent, text, val=val)
    old.mkdir(parents=True)
    # The previous format: per-sample fp16 states beside fp32 latents, 4096 rows a shard.
    from safetensors.numpy import save_file

    from blossom.data.cache import CacheSplit

    splits = {}
    for split in ("train", "val"):
        data = CacheSplit(new, split)
        files = []
        for k, i in enumerate(range(0, len(data), OLD_SHARD)):
            idx = torch.arange(i, min(i + OLD_SHARD, len(data)))
            lat, states = data.batch(idx)
            tensors = {"latents": lat.numpy(), "text": states.half().numpy()}
            if split == "train":
                tensors["latents_flipped"] = data.batch(idx, torch.ones(len(idx), dtype=torch.bool))[0].numpy()
            files.append(f"{split}-{k:05d}.safetensors")
            save_file(tensors, str(old / files[-1]))
        splits[split] = {"count": len(data), "shards": files}
    save_file({"text": CacheSplit(new, "val").null_text.half().numpy()}, str(old / "null_text.safetensors"))
    (old / "index.json").write_text(
        json.dumps(
            {
                "splits": splits,
                "max_tokens": text[0],
                "text_dim": text[1],
                "text_encoder": "minilm",
                "flipped": True,
                "latent_shape": list(latent),
            }
        )
    )


def _old_loader_train(cache: Path, steps: int) -> None:
    """The previous loader (every shard read into RAM as fp32), then training steps on it."""
    from safetensors.torch import load_file

    index = json.loads((cache / "index.json").read_text())
    parts = [load_file(cache / name) for name in index["splits"]["train"]["shards"]]
    latents = torch.cat([p["latents"] for p in parts]).float()
    text = torch.cat([p["text"] for p in parts]).float()
    flipped = torch.cat([p["latents_flipped"] for p in parts]).float()
    print(f"loaded {len(latents)} samples into RAM", flush=True)
    _train_steps(
        lambda idx: (torch.where(torch.rand(len(idx)).view(-1, 1, 1, 1) < 0.5, flipped[idx], latents[idx]), text[idx]),
        len(latents),
        steps,
    )


def _train_steps(fetch, n: int, steps: int) -> None:
    from blossom.config import load_config
    from blossom.models import build_unet, noise_scheduler

    cfg = load_config()
    x0, text = fetch(torch.arange(2))
    unet = build_unet(cfg, text.shape[-1], tuple(x0.shape[1:]))
    opt, sched = torch.optim.AdamW(unet.parameters(), lr=1e-4), noise_scheduler(cfg)
    for _ in range(steps):
        train_step(unet, opt, sched, *fetch(torch.randint(n, (cfg.train.batch_size,))))
    print(f"trained {steps} steps", flush=True)


def _in_cgroup(cmd: list[str], limit: int, name: str) -> tuple[int, int, int, str]:
    """Run cmd in a fresh cgroup-v1 memory group limited to `limit` bytes:
    (exit status, peak RSS, peak bytes charged to the group, last output line)."""
    mine = next(
        line.split(":", 2)[2]
        for line in Path("/proc/self/cgroup").read_text().splitlines()
        if line.split(":")[1] == "memory"
    )
    group = Path("/sys/fs/cgroup/memory") / mine.lstrip("/") / f"blossom-bench-{name}-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():  # no swapping past the limit either
            swap.write_text(str(limit))
        proc = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh", *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # The kernel's high-water mark of the child's resident set (VmHWM), read until it exits:
        # getrusage would report the benchmark's own peak, which a child keeps across exec.
        peak = [0]

        def watch() -> None:
            status = Path(f"/proc/{proc.pid}/status")
            while proc.poll() is None:
                try:
                    hwm = next(x for x in status.read_text().splitlines() if x.startswith("VmHWM:"))
                    peak[0] = max(peak[0], int(hwm.split()[1]) << 10)
                except (OSError, StopIteration):
                    pass
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        out = proc.stdout.read()
        proc.wait()
        watcher.join()
        charged = int((group / "memory.max_usage_in_bytes").read_text())  # RSS + the page cache it read
        last = out.strip().splitlines()[-1] if out.strip() else ""
        return proc.returncode, peak[0], charged, last
    finally:
        group.rmdir()


def _evict(path: Path) -> None:
    """Drop the file's pages from the page cache. Pages are charged to the cgroup that first read
    or wrote them: left cached by this process (which wrote them), a child's reads would be free."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def section_memory(limit_mb: int, steps: int) -> None:
    limit = limit_mb << 20
    latent, text = (4, 16, 16), (24, 384)
    per_sample = new_bytes(latent, text, True, 1.0)
    n = int(4 * limit / per_sample)
    with tempfile.TemporaryDirectory(dir=ROOT / "outputs") as tmp:
        root = Path(tmp)
        print(f"\n## training from a cache 4x the memory limit ({limit_mb} MiB, cgroup v1): {n} samples", flush=True)
        _write_synthetic(root, n, latent, text)
        sizes = {k: sum(p.stat().st_size for p in (root / k / "cache").iterdir()) for k in ("new", "old")}
        from blossom.config import load_config
        from blossom.models import build_vae

        build_vae(load_config().vae).save_pretrained(root / "new" / "vae")
        train = [
            sys.executable,
            "-m",
            "blossom.cli",
            "--set",
            f"outputs={root / 'new'}",
            "--set",
            f"train.steps={steps}",
            "--set",
            f"train.val_every={steps}",
            "--set",
            f"train.checkpoint_every={steps}",
            "train",
        ]
        old = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--old-loader",
            str(root / "old" / "cache"),
            "--steps",
            str(steps),
        ]
        print(f"{'loader':30} {'cache on disk':>14} {'peak RSS':>10} {'charged':>10}  result")
        for label, cmd, size in (
            ("memory-mapped (blossom train)", train, sizes["new"]),
            ("previous, in RAM", old, sizes["old"]),
        ):
            for f in (root / ("new" if "mapped" in label else "old") / "cache").iterdir():
                _evict(f)
            start = time.perf_counter()
            code, rss, charged, last = _in_cgroup(cmd, limit, label.split()[0].strip(","))
            verdict = "killed (out of memory)" if code == -9 else f"exit {code}"
            print(
                f"{label:30} {size / 2**30:10.2f} GiB {rss / 2**20:6.0f} MiB {charged / 2**20:6.0f} MiB  "
                f"{verdict} after {time.perf_counter() - start:.0f} s; last line: {last[:90]}"
            )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="bytes,throughput,build,memory")
    ap.add_argument("--limit-mb", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--old-loader", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.old_loader:
        _old_loader_train(args.old_loader, args.steps)
        return
    print(machine_line())
    sections = args.sections.split(",")
    if "bytes" in sections:
        section_bytes()
    if "throughput" in sections:
        section_throughput(args.steps)
    if "build" in sections:
        section_build()
    if "memory" in sections:
        section_memory(args.limit_mb, args.steps)


if __name__ == "__main__":
    main()
