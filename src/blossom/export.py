"""Export a trained model: a diffusers pipeline folder, and ONNX graphs checked against PyTorch.

The pipeline folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
`scheduler/`, safetensors weights) loads with `diffusers.StableDiffusionPipeline.from_pretrained`
and no blossom code. `onnx/` beside it holds the text encoder, UNet and VAE decoder as ONNX
graphs (dynamic batch), each also saved after ONNX Runtime's graph optimisations, so a session
starts without redoing them; given calibration captions, also int8 copies of the UNet, VAE
decoder and text encoder (quantize.py). Everything is written to a temp folder and renamed at
the end: a killed export never leaves a half folder that looks complete.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from blossom.errors import ModelError
from blossom.fsutil import atomic_dir, write_json
from blossom.images import psnr
from blossom.layout import ONNX_FILES, remove_graph
from blossom.models import fit_attention
from blossom.sampling import guidance_embedding

log = logging.getLogger(__name__)

OPSET = 18
COMPONENT_TOLERANCE = 1e-4  # max abs difference per component output
# int8 ships only if its check image stays this close to fp32's; below it, one block of the UNet's
# decoder side is kept in fp32, and without a block that gets there, no int8 graphs are written.
INT8_MIN_PSNR_DB = 28.0
IMAGE_TOLERANCE = 1e-3  # max abs difference of the final image in [-1, 1]


class _TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _StudentUNet(_UNet):
    """A distilled UNet: the guidance embedding is one more input."""

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond):
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            timestep_cond=timestep_cond,
            return_dict=False,
        )[0]


class _VAEDecoder(torch.nn.Module):
    """Scaled latents in, images in [-1, 1] out: the scaling factor is folded into the graph."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]


def write_pipeline(backend, out: Path) -> None:
    """A diffusers pipeline folder from a loaded TorchBackend: StableDiffusionPipeline (which feeds a
    distilled UNet its guidance embedding and TCDScheduler its gamma, eta=0 by default), or
    LatentConsistencyModelPipeline for a student of the lcm sampler (DiffusionPipeline picks either)."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    from blossom.sampling import make_scheduler

    encoder = backend.text_encoder
    # The UNet was trained on states computed with the padding masked; diffusers passes the mask
    # only to encoders whose config asks for it.
    encoder.model.config.use_attention_mask = True
    encoder.tokenizer.model_max_length = encoder.max_tokens
    parts = {"vae": backend.vae, "text_encoder": encoder.model, "tokenizer": encoder.tokenizer}
    # steps_offset only shifts DDIM's "leading" spacing (the consistency schedulers ignore it); 1
    # keeps StableDiffusionPipeline from warning about an old config
    config = {**backend.scheduler_config, "steps_offset": 1}
    if backend.distilled:
        own = backend.distilled["sampler"]
        pipeline = LatentConsistencyModelPipeline if own == "lcm" else StableDiffusionPipeline
        scheduler = make_scheduler(own, config)
    else:
        pipeline = StableDiffusionPipeline
        scheduler = make_scheduler("ddim", config)
    pipe = pipeline(
        **parts,
        unet=backend.unet_model,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def _export_onnx(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    """torch.export-based export (dynamo), batch dimension dynamic: its graphs run ~15 % faster in
    ONNX Runtime than the TorchScript exporter's (fewer shape and reshape nodes)."""
    import warnings

    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_shapes=tuple({0: batch} for _ in args),
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )


def write_onnx(backend, out: Path) -> None:
    enc, unet, vae = backend.text_encoder, backend.unet_model, backend.vae
    ids = enc.tokenizer(["a red flower", ""], padding="max_length", max_length=enc.max_tokens, return_tensors="pt")
    c, h, w = backend.latent_shape
    _export_onnx(
        _TextEncoder(enc.model),
        (ids["input_ids"], ids["attention_mask"]),
        out / ONNX_FILES["text_encoder"],
        ["input_ids", "attention_mask"],
        ["last_hidden_state"],
    )
    states = enc(["a red flower", ""])
    args = (torch.randn(2, c, h, w), torch.tensor([500.0, 500.0]), states)
    names = ["sample", "timestep", "encoder_hidden_states"]
    from diffusers.models.attention_processor import AttnProcessor2_0

    # The graph keeps PyTorch's fused attention op: ONNX Runtime runs it faster than the classic
    # processor's products (1.1-1.2x, benchmarks/attention.py), which PyTorch on a CPU runs faster.
    unet.set_attn_processor(AttnProcessor2_0())
    try:
        if backend.distilled:
            cond = guidance_embedding(torch.tensor([5.0, 3.0]), backend.distilled["guidance_embedding_dim"])
            _export_onnx(
                _StudentUNet(unet), (*args, cond), out / ONNX_FILES["unet"], [*names, "timestep_cond"], ["noise_pred"]
            )
        else:
            _export_onnx(_UNet(unet), args, out / ONNX_FILES["unet"], names, ["noise_pred"])
    finally:
        fit_attention(unet)
    _export_onnx(_VAEDecoder(vae), (torch.randn(2, c, h, w),), out / ONNX_FILES["vae_decoder"], ["latents"], ["images"])
    from blossom.backends import ort_session

    for name in ONNX_FILES.values():  # save ORT's optimised graph beside each, loaded in its place later
        ort_session(out / name, optimized_path=out / name.replace(".onnx", ".opt.onnx"))


CHECK_PROMPTS = ["a red flower with five round petals on green grass", "a white flower at night"]


def guided_sample(backend, steps: int = 4) -> torch.Tensor:
    """The check prompts' images in [-1, 1] (DDIM with guidance, or a distilled model's own sampler;
    seed 0), before rounding to 8 bits."""
    from blossom.sampling import denoise

    sampler = backend.distilled["sampler"] if backend.distilled else "ddim"
    return backend.decode_float(denoise(backend, CHECK_PROMPTS, sampler, steps, 5.0, 0))


def parity(torch_backend, onnx_backend, steps: int = 4) -> dict[str, float]:
    """Max abs differences, ONNX Runtime vs PyTorch, per component and for a whole guided sample."""
    c, h, w = torch_backend.latent_shape
    g = torch.Generator().manual_seed(0)
    text_t, text_o = torch_backend.encode_text(CHECK_PROMPTS), onnx_backend.encode_text(CHECK_PROMPTS)
    lat = torch.randn(2, c, h, w, generator=g)
    t = torch.tensor([999.0, 250.0])
    fast = torch_backend.distilled
    cond = guidance_embedding(torch.tensor([5.0, 2.0]), fast["guidance_embedding_dim"]) if fast else None
    diffs = {
        "text_encoder": (text_t - text_o).abs().max().item(),
        "unet": (torch_backend.unet(lat, t, text_t, cond) - onnx_backend.unet(lat, t, text_t, cond)).abs().max().item(),
        "vae_decoder": (torch_backend.decode_float(lat) - onnx_backend.decode_float(lat)).abs().max().item(),
    }
    diffs["image"] = (guided_sample(torch_backend, steps) - guided_sample(onnx_backend, steps)).abs().max().item()
    return diffs


def check_parity(diffs: dict[str, float]) -> None:
    bad = [f"{k} {v:.2e}" for k, v in diffs.items() if v >= (IMAGE_TOLERANCE if k == "image" else COMPONENT_TOLERANCE)]
    if bad:
        raise ModelError(f"ONNX export differs from PyTorch ({', '.join(bad)}): report this with your model config")


TEXT_ENCODER = "text_encoder"  # int8.json's name for the try with the text encoder in fp32


def write_int8_within_bar(onnx_dir: Path, fp32_backend, calibration: list[str], sampling, bar: float) -> dict:
    """The int8 graphs, if some version of them holds `bar` dB: all in int8, else the text encoder in
    fp32, else also the best of the UNet with one decoder-side block in fp32, else none. Returns what
    was decided."""
    from blossom.backends import OnnxBackend
    from blossom.layout import INT8_FILES, INT8_TEXT_ENCODER, ONNX_FILES
    from blossom.quantize import decoder_blocks, quantize_graph, write_int8

    folder = onnx_dir.parent

    def measured() -> float:
        return int8_psnr(fp32_backend, OnnxBackend(folder, precision="int8"))

    feeds = write_int8(onnx_dir, fp32_backend, calibration, *sampling)
    tried = {"": measured()}
    if tried[""] < bar:  # the text encoder first: it is the smallest share of an image's time
        remove_graph(onnx_dir / INT8_TEXT_ENCODER)
        tried[TEXT_ENCODER] = measured()
    if max(tried.values()) < bar:
        unet, best = onnx_dir / INT8_FILES["unet"], onnx_dir / ".best.unet.int8.onnx"
        for block in decoder_blocks(onnx_dir / ONNX_FILES["unet"]):
            quantize_graph(onnx_dir / ONNX_FILES["unet"], unet, feeds, keep=(block,))
            tried[block] = measured()
            if tried[block] == max(tried.values()):
                _move_graph(unet, best)
        if best.exists():
            _move_graph(best, unet)
    kept = max(tried, key=tried.get)
    result = {
        "psnr_db": tried[kept],
        "text_encoder_int8": kept == "",
        "fp32_block": kept if kept not in ("", TEXT_ENCODER) else None,
        "tried_db": tried,
        "bar_db": bar,
    }
    if tried[kept] < bar:
        for name in (*INT8_FILES.values(), INT8_TEXT_ENCODER):
            remove_graph(onnx_dir / name)
        result["text_encoder_int8"] = False
        log.warning(
            "int8 not written: its image is %.1f dB from fp32 at best, below the %.0f dB bar "
            "(fp32 ONNX Runtime is the fast path for this model)",
            tried[kept],
            bar,
        )
    write_json(onnx_dir / "int8.json", {**result, "written": tried[kept] >= bar})
    return result


def _move_graph(src: Path, dst: Path) -> None:
    """A QDQ graph and its external weights, renamed (the graph names its weights file)."""
    import onnx

    from blossom.quantize import save_graph

    model = onnx.load(str(src))
    remove_graph(src)
    save_graph(model, dst)


def int8_psnr(fp32, int8) -> float:
    """How far int8 moves a guided sample, in dB (recorded, not checked: int8 is meant to differ;
    benchmarks/precision.py measures what it costs in adherence)."""
    return psnr(guided_sample(fp32), guided_sample(int8))


def export(
    model_dir: Path,
    out_dir: Path,
    calibration: list[str] | None = None,
    sampling: tuple[str, int, float] = ("unipc", 15, 5.0),
    int8_bar: bool = True,
    fast_dir: Path | None = None,
) -> dict:
    """model_dir (a trained model folder) -> out_dir with the diffusers pipeline and onnx/; returns parity numbers.
    With calibration captions, also the int8 UNet and VAE decoder, calibrated by sampling them
    (sampler, steps, guidance), and the int8 text encoder, kept only within INT8_MIN_PSNR_DB of
    fp32 unless int8_bar is False (benchmarks timing random weights, whose int8 accuracy means
    nothing). fast_dir: a distilled student, exported the same way into out_dir/fast (its numbers
    prefixed `fast_`)."""
    from blossom.backends import check_finished

    for folder in (model_dir, fast_dir):
        if folder is not None:
            check_finished(folder)
    with atomic_dir(out_dir) as tmp:
        diffs = _export_into(model_dir, tmp, calibration, sampling, int8_bar)
        if fast_dir is not None:
            (tmp / FAST).mkdir()
            fast = _export_into(fast_dir, tmp / FAST, calibration, sampling, int8_bar)
            diffs.update({f"fast_{k}": v for k, v in fast.items()})
    log.info("ONNX parity (max abs diff): %s", diffs)
    return diffs


FAST = "fast"  # the exported folder's sub-folder for a distilled student


def _export_into(model_dir: Path, tmp: Path, calibration, sampling, int8_bar: bool) -> dict:
    from blossom.backends import OnnxBackend, TorchBackend

    torch_backend = TorchBackend(model_dir)
    if torch_backend.distilled:  # calibrate int8 on what the student is served with
        sampling = (torch_backend.distilled["sampler"], torch_backend.distilled["default_steps"], sampling[2])
    write_pipeline(torch_backend, tmp)
    for name in ("blossom.json", "train.json", "champion.json", "metrics.json", "samples.png"):
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, tmp / name)
    info = json.loads((tmp / "blossom.json").read_text())
    info["text"]["encoder"] = "text_encoder"  # self-contained: the folder carries its own encoder
    # the app, which has no params.yaml, starts from the sampling `blossom generate` uses
    info["sample"] = dict(zip(("sampler", "steps", "guidance"), sampling, strict=True))
    info["backends"] = ["onnx", "torch"]  # what it runs, the default first: the app reads it before any weights
    write_json(tmp / "blossom.json", info)
    (tmp / "onnx").mkdir()
    write_onnx(torch_backend, tmp / "onnx")
    onnx_backend = OnnxBackend(tmp)
    diffs = parity(torch_backend, onnx_backend)
    check_parity(diffs)
    if calibration:
        diffs["image_int8_psnr_db"] = write_int8_within_bar(
            tmp / "onnx", onnx_backend, calibration, sampling, INT8_MIN_PSNR_DB if int8_bar else float("-inf")
        )["psnr_db"]
    write_json(tmp / "onnx" / "parity.json", {k: float(np.float32(v)) for k, v in diffs.items()})
    return diffs
