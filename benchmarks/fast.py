"""One image from the tiny model: the distilled student against its teacher, side by side in one run.

The teacher at its default (UniPC 15 steps, guidance as a batch of two: 30 UNet evaluations);
the student at 1, 2, 4 and 8 steps (one UNet call per step, guidance embedded); both in ONNX
Runtime fp32, and int8 where the export holds int8 graphs; `auto` is what `--precision auto`
picks on this CPU. The student's sessions fit their thread count at load, as blossom serves
them; one more row runs the int8 student on every core, to show what that fitting buys. Last, the
split of the served student's image into its graphs' calls and the rest. Needs an
export with a student in it (`blossom distill` then `blossom export`):

    .venv/bin/python benchmarks/fast.py [--export outputs/export] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from machine import machine_line
from timing import median_seconds

from blossom.backends import OnnxBackend, load_backend, physical_cores
from blossom.layout import has_int8
from blossom.sampling import FAST_SAMPLER, FAST_SAMPLERS, sample

PROMPT = "a red flower with five round petals on green grass"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", default="outputs/export", help="an exported folder with a fast/ student")
    ap.add_argument("--rounds", type=int, default=3, help="blocks of 5 timed images per path, taking turns")
    ap.add_argument("--split-images", type=int, default=100, help="images timed part by part for the split")
    args = ap.parse_args()
    torch.set_num_threads(physical_cores())
    print(machine_line())
    teacher_dir, student_dir = Path(args.export), Path(args.export) / "fast"
    if not (student_dir / "blossom.json").exists():
        raise SystemExit(f"{student_dir} holds no student: run `blossom distill` and `blossom export` first")
    teacher, student = OnnxBackend(teacher_dir), OnnxBackend(student_dir)
    fns = {"teacher fp32 unipc-15": lambda seed: sample(teacher, [PROMPT], "unipc", 15, 5.0, seed)}
    if has_int8(teacher_dir):
        t8 = OnnxBackend(teacher_dir, precision="int8")
        fns["teacher int8 unipc-15"] = lambda seed: sample(t8, [PROMPT], "unipc", 15, 5.0, seed)
    for n in (1, 2, 4, 8):
        fns[f"student fp32 {FAST_SAMPLER}-{n}"] = lambda seed, n=n: sample(
            student, [PROMPT], FAST_SAMPLER, n, 5.0, seed
        )
    if has_int8(student_dir):
        s8 = OnnxBackend(student_dir, precision="int8")
        for name in FAST_SAMPLERS:  # the two consistency samplers: the same UNet calls, other step arithmetic
            fns[f"student int8 {name}-4"] = lambda seed, name=name: sample(s8, [PROMPT], name, 4, 5.0, seed)
        # what fitting the student's threads at load bought: the same graphs on every core
        s8_all = OnnxBackend(student_dir, threads=physical_cores(), precision="int8")
        fns[f"student int8 {FAST_SAMPLER}-4, all cores"] = lambda seed: sample(
            s8_all, [PROMPT], FAST_SAMPLER, 4, 5.0, seed
        )
        print(f"threads fitted at load: teacher {teacher.threads}, int8 student {s8.threads}")
    auto = load_backend("onnx", student_dir, "auto")
    print(f"--precision auto on this CPU: {auto.precision} ({auto.precision_why})")
    times = median_seconds(fns, rounds=args.rounds)
    base = times["teacher fp32 unipc-15"]
    for name, t in times.items():
        print(f"{name:>30}: {t * 1000:7.1f} ms/image  ({base / t:5.2f}x the teacher's default)")
    print_split(auto, args.split_images)


class _TimedSession:
    """An ONNX Runtime session that adds the seconds of each call to `spent`."""

    def __init__(self, session, spent: list[float]):
        self.session, self.spent = session, spent

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.session.run(*args, **kwargs)
        self.spent.append(time.perf_counter() - start)
        return out


def print_split(backend: OnnxBackend, images: int) -> None:
    """Where the served student's image goes: each graph's calls, and the rest (tokenizing, the
    sampler's steps, copies), over `images` images of FAST_SAMPLER at 4 steps after 10 untimed."""
    spent = {key: [] for key in backend.sessions}
    sessions = backend.sessions
    backend.sessions = {key: _TimedSession(s, spent[key]) for key, s in sessions.items()}
    try:
        for seed in range(10):
            sample(backend, [PROMPT], FAST_SAMPLER, 4, 5.0, seed)
        for calls in spent.values():
            calls.clear()
        start = time.perf_counter()
        for seed in range(images):
            sample(backend, [PROMPT], FAST_SAMPLER, 4, 5.0, 10 + seed)
        total = (time.perf_counter() - start) / images
    finally:
        backend.sessions = sessions
    parts = {key: sum(calls) / images for key, calls in spent.items()}
    line = ", ".join(f"{key} {t * 1000:.1f}" for key, t in parts.items())
    print(
        f"the {backend.precision} student, {FAST_SAMPLER}-4, mean of {images} images: {total * 1000:.1f} ms = "
        f"{line}, the rest {(total - sum(parts.values())) * 1000:.1f} (threads {backend.threads})"
    )


if __name__ == "__main__":
    main()
