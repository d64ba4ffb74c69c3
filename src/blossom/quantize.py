"""int8 for the exported graphs: static (QDQ format) for the UNet and VAE decoder, 8-bit
block-wise weights for the text encoder (ONNX Runtime).

Calibrated on the model's own work: the UNet's inputs along guided sampling trajectories for
captions like its training data's, and the final latents of those samples for the decoder. Each
activation's range is a percentile of its histogram, not its extremes (docs/inference.md).
Convolutions and matrix products go to int8 (unsigned 8-bit activations, signed weights per
output channel: the operand types of the VNNI dot-product instruction); attention's
activation-by-activation products, normalisations, softmax and the KEEP_FP32 modules stay fp32.
The original system's architecture, compute-bound, gains 2.7x per UNet call and 3.2x in the VAE
decoder (benchmarks/original_arch.py); per image the tiny preset, bound by per-operator overhead,
gains nothing and `small` 1.26x (benchmarks/precision.py, docs/benchmarks.md).

Weights use 7 of their 8 bits (ONNX Runtime's reduce_range: [-64, 64]). CPUs without VNNI (AVX2,
AVX-512 before VNNI) multiply u8 x s8 with VPMADDUBSW, which adds two products into a saturating
16-bit sum: 2 * 255 * 127 overflows it, 2 * 255 * 64 = 32640 does not. With full-range weights an
emulated AVX2 CPU (qemu -cpu Haswell) ran the micro UNet at 23.5 dB SNR against fp32, a VNNI CPU
at 34.7 dB; with 7-bit weights both give 33.4 dB, so one graph is right on every x86 CPU and
VNNI keeps its speed (tests/test_int8_cpus.py).

The text encoder's weight products go to ONNX Runtime's MatMulNBits instead: weights in 8 bits
with a scale per block of TEXT_BLOCK inputs, activations quantized per block at run time (accuracy
level 4: int8 dot products). Dynamic int8, one scale per tensor, moved its states 31-68 %; blocks
of 32 move them 3 % (4 % at most) and cut its call by a quarter (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from blossom.layout import INT8_FILES, INT8_TEXT_ENCODER, ONNX_FILES, remove_graph, unet_feed

log = logging.getLogger(__name__)

CALIBRATION_CAPTIONS = 32
# Blocks of 128 save the text encoder's call 0.4 ms more but move a student's image twice as far
# (31.9 against 33.6 dB from fp32 text states, tiny model).
TEXT_BLOCK = 32
# |weight| <= WEIGHT_LIMIT keeps VPMADDUBSW's pairwise 16-bit sums of u8 x s8 products unsaturated.
WEIGHT_LIMIT = 64
# Kept in fp32: the first and last convolutions (they touch the latents and the output directly) and
# the timestep/text-pooling embeddings (matrix-vector products: nothing to gain, range to lose).
KEEP_FP32 = ("conv_in", "conv_out", "time_embedding", "add_embedding", "time_emb_proj")
WEIGHT_MATRIX_OPS = ("MatMul", "Gemm")  # quantized only where their second operand is a weight
QUANTIZED_OPS = ("Conv", *WEIGHT_MATRIX_OPS)


class _Recorder:
    """A backend that passes every call through and keeps the UNet's inputs."""

    def __init__(self, backend):
        self.backend, self.unet_feeds = backend, []
        self.latent_shape, self.scheduler_config = backend.latent_shape, backend.scheduler_config
        self.distilled = getattr(backend, "distilled", None)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.backend.encode_text(prompts)

    def unet(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor, cond=None) -> torch.Tensor:
        self.unet_feeds.append({k: v.copy() for k, v in unet_feed(latents, t, text, cond).items()})
        return self.backend.unet(latents, t, text, cond)


def calibration_feeds(
    backend, prompts: list[str], sampler: str, steps: int, guidance: float, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """UNet and VAE-decoder inputs seen while sampling the prompts, one batch for all of them."""
    from blossom.sampling import denoise

    recorder = _Recorder(backend)
    latents = denoise(recorder, prompts, sampler, steps, guidance, seed)
    return recorder.unet_feeds, [{"latents": latents.float().numpy()}]


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._it, None)


def _scopes(node) -> str:
    return next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")


def nodes_to_quantize(graph, keep: tuple[str, ...] = ()) -> list[str]:
    """Convolutions, and matrix products with a weight (not attention's activation-by-activation
    products), outside the KEEP_FP32 modules and `keep`, by the module scopes the torch exporter records."""
    weights = {i.name for i in graph.initializer}
    names = []
    for node in graph.node:
        scopes = _scopes(node)
        if any(k in scopes for k in (*KEEP_FP32, *keep)):
            continue
        if node.op_type == "Conv" or (node.op_type in WEIGHT_MATRIX_OPS and node.input[1] in weights):
            names.append(node.name)
    return names


def decoder_blocks(source: Path) -> list[str]:
    """The UNet's mid block and up blocks by scope name, the candidates to keep in fp32 when int8
    moves the image too far (their errors reach the output with the least left to correct them)."""
    import onnx

    graph = onnx.load(str(source), load_external_data=False).graph
    found = {m for node in graph.node for m in re.findall(r"\.(mid_block|up_blocks\.\d+)'", _scopes(node))}
    return sorted(found, key=lambda n: (n != "mid_block", n))


def quantize_graph(source: Path, target: Path, feeds: list[dict], keep: tuple[str, ...] = ()) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    nodes = nodes_to_quantize(onnx.load(str(source), load_external_data=False).graph, keep)
    remove_graph(target)  # onnx appends external weights to an existing file
    quantize_static(
        str(source),
        str(target),
        _Reader(feeds),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=True,
        nodes_to_quantize=nodes,
        # ranges from histograms (0.001 % of values clipped at each end), not extremes: a few outlier
        # activations stretched min-max ranges until small's UNet ran 18.6 dB from fp32 (30.8 with this)
        calibrate_method=CalibrationMethod.Percentile,
        op_types_to_quantize=list(QUANTIZED_OPS),  # histograms for these ops' inputs only: 3x faster calibration
        use_external_data_format=True,
        calibration_providers=["CPUExecutionProvider"],
    )


def quantize_text_encoder(source: Path, target: Path) -> None:
    """The text encoder with its weight products in 8-bit blocks (MatMulNBits): no calibration,
    the embeddings, normalisations and attention's own products stay fp32."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(source)), bits=8, block_size=TEXT_BLOCK, is_symmetric=True, accuracy_level=4
    )
    noisy = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = noisy.level
    noisy.setLevel(logging.WARNING)  # a line per node otherwise
    try:
        quantizer.process()
    finally:
        noisy.setLevel(level)
    save_graph(quantizer.model.model, target)


def save_graph(model, target: Path) -> None:
    """`model` at `target`, its weights in `<target>.data`, replacing what was there (onnx appends
    external weights to a file that exists)."""
    import onnx

    remove_graph(target)
    onnx.save_model(model, str(target), save_as_external_data=True, location=target.name + ".data")


def int8_operand_ranges(path: Path) -> tuple[int, set[int]]:
    """(largest |weight| among the graph's int8 weights, element types its activations are quantized to)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))  # external weights are read from beside the graph
    inits = {i.name: i for i in model.graph.initializer}
    largest, activation_types = 0, set()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            w = numpy_helper.to_array(inits[node.input[0]])
            if w.dtype == np.int8:
                largest = max(largest, int(np.abs(w.astype(np.int32)).max()))
        elif node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in inits:
            activation_types.add(inits[node.input[2]].data_type)
    return largest, activation_types


def saturates_without_vnni(path: Path) -> bool:
    """Whether u8 x s8 products of this graph can overflow a 16-bit pair sum (an export made before
    weights were limited to 7 bits)."""
    from onnx import TensorProto

    largest, activation_types = int8_operand_ranges(path)
    return largest > WEIGHT_LIMIT or not activation_types <= {TensorProto.UINT8}


def write_int8(onnx_dir: Path, backend, prompts: list[str], sampler: str, steps: int, guidance: float) -> list[dict]:
    """onnx_dir/unet.int8.onnx and vae_decoder.int8.onnx, calibrated by sampling the prompts with
    `backend`, and text_encoder.int8.onnx; returns the UNet's calibration feeds, for a
    re-quantization that keeps a block."""
    unet_feeds, vae_feeds = calibration_feeds(backend, prompts, sampler, steps, guidance)
    log.info(
        "int8 calibration: %d UNet batches, %d decoder batch over %d captions",
        len(unet_feeds),
        len(vae_feeds),
        len(prompts),
    )
    quantize_graph(onnx_dir / ONNX_FILES["unet"], onnx_dir / INT8_FILES["unet"], unet_feeds)
    quantize_graph(onnx_dir / ONNX_FILES["vae_decoder"], onnx_dir / INT8_FILES["vae_decoder"], vae_feeds)
    quantize_text_encoder(onnx_dir / ONNX_FILES["text_encoder"], onnx_dir / INT8_TEXT_ENCODER)
    return unet_feeds
