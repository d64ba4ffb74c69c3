"""Inference backends behind one small interface (see sampling.Backend): PyTorch and ONNX Runtime,
over a model folder (layout.py says what it holds)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from blossom.config import TextConfig
from blossom.errors import BlossomError, ModelError, first_line
from blossom.images import to_uint8
from blossom.layout import (
    INT8_FILES,
    INT8_TEXT_ENCODER,
    ONNX_FILES,
    has_int8,
    has_onnx,
    model_files_missing,
    unet_feed,
)
from blossom.models import VAE_CLASSES, fit_attention, load_text_encoder, load_vae, tokenize


def check_finished(folder: Path) -> None:
    """Refuse a temp folder of a stage that never finished, which can otherwise hold enough files to load."""
    from blossom.fsutil import unfinished

    if unfinished(Path(folder).resolve()):
        raise ModelError(
            f"{folder} is the temp folder of a build that never finished, not a model: run the stage "
            "again (it removes such folders) and pass the folder it writes"
        )


def _check_folder(folder: Path, needed: list[str] | None = None) -> None:
    if not folder.is_dir():
        raise ModelError(f"no model at {folder}: run `make run` (or `dvc repro`) to train one, or pass --model")
    missing = model_files_missing(folder, needed)
    if missing:
        raise ModelError(
            f"{folder} is not a complete blossom model (missing {', '.join(missing)}): "
            "train one with `dvc repro`, or export it again with `blossom export`"
        )


def fast_folder(folder: Path, distilled: Path) -> Path:
    """The distilled model to serve for `--fast`: the folder itself if it is one, its `fast/`
    (an exported or published folder), else `distilled` (what `blossom distill` wrote)."""
    for candidate in (folder, folder / "fast", distilled):
        path = candidate / "blossom.json"
        if path.exists() and json.loads(path.read_text()).get("distilled"):
            return candidate
    raise ModelError(
        f"--fast: {folder} holds no distilled model: run `blossom distill` (then `blossom export`), "
        "or pass --model a distilled folder"
    )


def check_scheduler(folder: Path, distilled: dict | None, scheduler_config: dict) -> None:
    """A distilled UNet samples only with the consistency scheduler it was distilled for, and a teacher not with one."""
    from blossom.sampling import FAST_SCHEDULERS

    kind = scheduler_config.get("_class_name")
    consistency = {cls.__name__ for cls in FAST_SCHEDULERS.values()}
    if distilled and kind not in consistency:
        raise ModelError(
            f"{folder} holds a distilled few-step UNet but a {kind} scheduler: its scheduler/ must be the "
            f"{' or '.join(sorted(consistency))} `blossom distill` wrote; distil it again "
            "(or copy the student's scheduler/ back)"
        )
    if not distilled and kind in consistency:
        raise ModelError(
            f"{folder} has a {kind} but no distilled UNet (blossom.json has no 'distilled' entry): "
            "pass the teacher's own folder, or the student folder `blossom distill` wrote"
        )


def physical_cores() -> int:
    import psutil

    usable = len(os.sched_getaffinity(0))  # taskset, a container's cpuset
    return min(psutil.cpu_count(logical=False) or usable, usable)


class TorchBackend:
    name = "torch"

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32):
        """dtype bfloat16 runs the UNet and VAE decoder in bf16 (AVX512-BF16 / AMX CPUs, GPUs); text stays fp32."""
        from diffusers import UNet2DConditionModel

        folder = Path(folder)
        _check_folder(folder)
        self.folder, self.dtype = folder, dtype
        try:
            self.info = json.loads((folder / "blossom.json").read_text())
            text = TextConfig(**self.info["text"])
            tokenizer = None
            if (
                not Path(text.encoder).is_absolute()
                and (folder / text.encoder).is_dir()
                and (folder / "tokenizer").is_dir()
            ):
                # an exported folder carries its own encoder and tokenizer
                text.encoder, tokenizer = str(folder / text.encoder), folder / "tokenizer"
            self.text_encoder = load_text_encoder(text, tokenizer)
            self.unet_model = fit_attention(
                UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype).eval()
            )
            self.vae = load_vae(folder / "vae", dtype, kinds=VAE_CLASSES)
            self.scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        except BlossomError:
            raise
        # truncated weights, a damaged JSON: diffusers, safetensors and json each fail their own way
        except Exception as e:
            first = first_line(e)
            raise ModelError(
                f"cannot load the model at {folder} ({type(e).__name__}: {first}): its files are damaged; "
                "train or export it again"
            ) from None
        c = self.unet_model.config
        self.latent_shape = (c.in_channels, c.sample_size, c.sample_size)
        self.distilled = self.info.get("distilled")
        check_scheduler(folder, self.distilled, self.scheduler_config)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(prompts)

    @torch.no_grad()
    def unet(
        self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        d = self.dtype
        extra = {} if cond is None else {"timestep_cond": cond.to(d)}
        return self.unet_model(latents.to(d), t, encoder_hidden_states=text.to(d), **extra).sample.float()

    @torch.no_grad()
    def decode_float(self, latents: torch.Tensor, batch: int = 64) -> torch.Tensor:
        z = (latents / self.vae.config.scaling_factor).to(self.dtype)
        return torch.cat([self.vae.decode(z[i : i + batch]).sample.float() for i in range(0, len(z), batch)])

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8(self.decode_float(latents))


# How a session's idle threads wait: spinning through and between calls (the UNet's, called again
# within a millisecond), spinning through a call and sleeping after it, or sleeping whenever idle.
SPIN_MODES = ("always", "in_call", "never")


def ort_session(path: Path, optimized_path: Path | None = None, threads: int | None = None, spin: str = "always"):
    """An ONNX Runtime session: all graph optimisations (all but layout when saving the optimised
    graph to `optimized_path`), one intra-op thread per physical core,
    the CUDA provider when this onnxruntime build has it; `spin` one of SPIN_MODES."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # A saved graph stops before the layout optimisations: their NCHWc blocking follows this CPU's
    # vector width (16 floats on AVX-512, 8 on AVX2), and a published model runs on other machines.
    # Loading redoes them for the machine at hand in a fraction of a second.
    level = ort.GraphOptimizationLevel
    opts.graph_optimization_level = level.ORT_ENABLE_EXTENDED if optimized_path else level.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0" if spin == "never" else "1")
    if spin == "in_call":
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / NoSuchFile types
        first = first_line(e)
        raise ModelError(
            f"cannot load the ONNX model {path} ({first}): export it again with `blossom export`"
        ) from None


# More threads must cut an isolated call to this fraction of one thread's time to be kept: in a
# pipeline the sessions' thread pools also contend with each other (a spinning UNet pool beside the
# decoder's), which a call timed alone does not show; and a load-time timing is noisy.
THREAD_GAIN = 0.75
# The same for a graph whose threads spin only through its own calls beside a one-thread UNet: no
# pool is left spinning to contend with, so only the timing's noise needs a margin. The student's
# text encoder measures 0.59-0.77 of its one-thread time at load, and saves 1.35 +- 0.23 ms an
# image in the pipeline on two threads (docs/benchmarks.md).
IN_CALL_GAIN = 0.9
# Calls this long have work enough per operator for every core; timing them again would only slow loading.
LONG_CALL_S = 0.05
# Each timed block runs about this long (4 to 16 calls): a student's 2-4 ms graphs get medians of
# 14-30 calls instead of 8, for about 0.1 s more loading each.
BLOCK_S = 0.03


def calls_per_block(call_s: float) -> int:
    return min(16, max(4, int(BLOCK_S / max(call_s, 1e-6))))


def fit_threads(session, path: Path, feed: dict, cores: int, spin: str) -> tuple:
    """`session` (all `cores` intra-op threads), or a one-thread session of the same graph unless
    every core is clearly faster on this CPU, measured now: a few-step student's batch-1 UNet and
    decoder ops are too small to share, and their threads' hand-offs cost more than they save.
    The images are the same bits either way (ONNX Runtime's CPU kernels split outputs across
    threads; tested)."""
    import statistics
    import time

    def timed(s) -> float:
        start = time.perf_counter()
        s.run(None, feed)
        return time.perf_counter() - start

    session.run(None, feed)
    first = timed(session)
    if first > LONG_CALL_S:
        return session, cores
    one = ort_session(path, threads=1, spin=spin)
    times: dict[int, list[float]] = {cores: [], 1: []}
    # Blocks in the order many, one, one, many, so that neither gains from the other warming the
    # caches or loses to its spinning threads; each block's first call is not timed.
    for s, n in ((session, cores), (one, 1), (one, 1), (session, cores)):
        s.run(None, feed)
        times[n] += [timed(s) for _ in range(calls_per_block(first))]
    many, single = statistics.median(times[cores]), statistics.median(times[1])
    gain = IN_CALL_GAIN if spin == "in_call" else THREAD_GAIN
    return (session, cores) if many <= gain * single else (one, 1)


def _model_json(folder: Path, name: str) -> dict:
    try:
        data = json.loads((folder / name).read_text())
        why = None if isinstance(data, dict) else "not a JSON object"
    except (OSError, ValueError) as e:
        why = first_line(e)
    if why:
        raise ModelError(
            f"cannot load the model at {folder} ({name}: {why}): its files are damaged; train or export it again"
        )
    return data


class OnnxBackend:
    """The exported ONNX graphs in ONNX Runtime; the optimised copies when present. `precision`
    int8 runs the statically quantized UNet and VAE decoder that `blossom export` calibrates, and
    its int8 text encoder where the export kept one."""

    name = "onnx"

    def __init__(self, folder: str | Path, threads: int | None = None, precision: str = "fp32"):
        from transformers import AutoTokenizer

        folder = Path(folder)
        files = {**ONNX_FILES, **INT8_FILES} if precision == "int8" else ONNX_FILES
        _check_folder(
            folder,
            [
                "blossom.json",
                "unet/config.json",
                "scheduler/scheduler_config.json",
                "tokenizer",
                *[f"onnx/{f}" for f in files.values()],
            ],
        )
        if precision == "int8":
            _check_int8_runs_here(folder)
        self.info = _model_json(folder, "blossom.json")
        self.distilled = self.info.get("distilled")
        self.max_tokens = self.info["text"]["max_tokens"]
        self.tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        self._empty_text: torch.Tensor | None = None
        self.scheduler_config = _model_json(folder, "scheduler/scheduler_config.json")
        check_scheduler(folder, self.distilled, self.scheduler_config)
        c = _model_json(folder, "unet/config.json")
        self.latent_shape = (c["in_channels"], c["sample_size"], c["sample_size"])
        self._text_shape = (self.max_tokens, c["cross_attention_dim"])
        paths = {}
        for key, name in files.items():
            optimized = folder / "onnx" / name.replace(".onnx", ".opt.onnx")
            paths[key] = optimized if optimized.exists() else folder / "onnx" / name
        if precision == "int8" and (folder / "onnx" / INT8_TEXT_ENCODER).exists():
            paths["text_encoder"] = folder / "onnx" / INT8_TEXT_ENCODER
        cores = threads or physical_cores()
        # Only a student's: its batch-1 calls are where threads stop paying. A guided teacher's
        # calls gain 30-40 % from a second core, and a noisy timing at load must not cost them that.
        fitting = threads is None and cores > 1 and bool(self.distilled)
        feeds = self._serving_feeds() if fitting else {}
        self.sessions = {"unet": ort_session(paths["unet"], threads=threads, spin="always")}
        self.threads = {"unet": cores}
        if fitting:
            self.sessions["unet"], self.threads["unet"] = fit_threads(
                self.sessions["unet"], paths["unet"], feeds["unet"], cores, spin="always"
            )
        # Used once per image, the other graphs' threads sleep when idle: spinning, they would compete
        # with a UNet pool that spins between its calls (a guided teacher's text encoder took 12.5 ms an
        # image instead of 6.2, its decoder 4.9 instead of 3.5). Beside a student's one-thread UNet
        # there is no such pool, so they spin through their own calls: sleeping between operators
        # costs a hand-off each, and the text encoder's 269 small ones ran in 0.76 of one thread's
        # time on two that way, in 0.6 spinning.
        spin = "in_call" if fitting and self.threads["unet"] == 1 else "never"
        for key in ("text_encoder", "vae_decoder"):
            self.sessions[key], self.threads[key] = ort_session(paths[key], threads=threads, spin=spin), cores
            if fitting:
                self.sessions[key], self.threads[key] = fit_threads(
                    self.sessions[key], paths[key], feeds[key], cores, spin=spin
                )

    def _serving_feeds(self) -> dict[str, dict[str, np.ndarray]]:
        """Inputs shaped as a distilled model's calls for one image: batch 1, guidance embedded (zero
        text states: the graphs are timed with them before the text encoder's session exists)."""
        text = torch.zeros(1, *self._text_shape)
        cond = torch.zeros(1, self.distilled["guidance_embedding_dim"])
        return {
            "text_encoder": tokenize(self.tokenizer, ["a flower"], self.max_tokens),
            "unet": unet_feed(torch.zeros(1, *self.latent_shape), torch.full((1,), 500), text, cond),
            "vae_decoder": {"latents": np.zeros((1, *self.latent_shape), np.float32)},
        }

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        (states,) = self.sessions["text_encoder"].run(None, tokenize(self.tokenizer, prompts, self.max_tokens))
        return torch.from_numpy(states)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        if "" not in prompts:  # a distilled model's (and unguided) requests: nothing to splice in
            return self._encode(prompts)
        # The empty prompt (the unconditional half of guidance) is encoded once per process.
        if self._empty_text is None:
            self._empty_text = self._encode([""])
        rest = [p for p in prompts if p != ""]
        encoded = iter(self._encode(rest) if rest else ())
        # Stacked, not assigned by index: index_put runs on torch's OpenMP pool, whose threads then
        # spin beside ONNX Runtime's UNet pool (its next call took 2-4 ms longer).
        return torch.stack([self._empty_text[0] if p == "" else next(encoded) for p in prompts])

    def unet(
        self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        (pred,) = self.sessions["unet"].run(None, unet_feed(latents, t, text, cond))
        return torch.from_numpy(pred)

    def decode_float(self, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
        session = self.sessions["vae_decoder"]  # batches of a fixed size bound its memory
        parts = [
            session.run(None, {"latents": latents[i : i + batch].float().numpy()})[0]
            for i in range(0, len(latents), batch)
        ]
        return torch.from_numpy(np.concatenate(parts))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        return to_uint8(self.decode_float(latents))


def _check_int8_runs_here(folder: Path) -> None:
    """Refuse int8 graphs that saturate on this CPU (full-range weights from an older export, on a
    CPU without VNNI) instead of drawing wrong images."""
    from blossom.cpu import has_vnni
    from blossom.quantize import saturates_without_vnni

    if has_vnni():
        return
    if any(saturates_without_vnni(folder / "onnx" / f) for f in INT8_FILES.values()):
        raise ModelError(
            f"{folder}'s int8 graphs use 8-bit weights, which overflow on CPUs without VNNI like "
            "this one: export the model again with `blossom export`, or use --precision fp32"
        )


PRECISIONS = {"torch": ("fp32", "bf16", "auto"), "onnx": ("fp32", "int8", "auto")}


def default_backend(folder: str | Path, precision: str | None = None) -> str:
    """What `generate` and the app run when not told: the backend a precision needs, else ONNX
    Runtime where the folder has its graphs (the faster CPU path: docs/benchmarks.md), else PyTorch."""
    if precision in ("bf16", "int8"):
        return "torch" if precision == "bf16" else "onnx"
    try:  # an export says (a Hub snapshot holds no graphs until asked for them)
        said = json.loads((Path(folder) / "blossom.json").read_text()).get("backends")
    except (OSError, ValueError, AttributeError):  # no folder, or a damaged one: loading it says which
        said = None
    return said[0] if said in (["onnx", "torch"], ["torch"]) else "onnx" if has_onnx(folder) else "torch"


def resolve_precision(name: str, folder: str | Path, precision: str) -> tuple[str, str]:
    """(precision, why) with `auto` decided for this CPU and model: ONNX int8 where the CPU has VNNI
    and the folder has int8 graphs; fp32 otherwise (bf16 loses to fp32 on small models)."""
    from blossom.cpu import auto_precision

    if precision != "auto":
        return precision, "asked for"
    if name == "torch":
        return "fp32", "the PyTorch backend's default"
    return auto_precision(has_int8(folder))


def load_backend(name: str, folder: str | Path, precision: str = "fp32"):
    """The backend for `folder`; `backend.precision` says what `auto` resolved to, `backend.precision_why` why."""
    if name not in PRECISIONS:
        raise ModelError(f"unknown backend {name!r}: use one of {', '.join(PRECISIONS)}")
    if precision not in PRECISIONS[name]:
        fix = {"bf16": "--backend torch", "int8": "--backend onnx"}.get(precision, "--precision fp32")
        runs = " or ".join(p for p in PRECISIONS[name] if p != "auto")
        raise ModelError(f"the {name} backend runs {runs}, not {precision!r}: use {fix}")
    check_finished(Path(folder))
    chosen, why = resolve_precision(name, folder, precision)
    if name == "torch":
        backend = TorchBackend(folder, torch.bfloat16 if chosen == "bf16" else torch.float32)
    else:
        backend = OnnxBackend(folder, precision=chosen)
    backend.precision, backend.precision_why = chosen, why
    return backend
