"""Static int8 for the exported UNet and VAE decoder (ONNX Runtime, QDQ format).

Calibrated on the model's own work: the UNet's inputs along guided sampling trajectories for
captions like its training data's, and the final latents of those samples for the decoder.
Convolutions and matrix products go to int8 (unsigned 8-bit activations, signed 8-bit weights
per output channel: the operand types of the VNNI dot-product instruction); attention's
activation-by-activation products, normalisations, softmax and the KEEP_FP32 modules stay fp32.
The original system's architecture, compute-bound, gains 2.7x per UNet call and 3.2x in the VAE
decoder (benchmarks/original_arch.py); the tiny preset, bound by per-operator overhead, 1.3x per
image (benchmarks/precision.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from blossom.backends import unet_feed

log = logging.getLogger(__name__)

CALIBRATION_CAPTIONS = 32
INT8_FILES = {"unet": "unet.int8.onnx", "vae_decoder": "vae_decoder.int8.onnx"}
# Kept in fp32: the first and last convolutions (they touch the latents and the output directly) and
# the timestep/text-pooling embeddings (matrix-vector products: nothing to gain, range to lose).
KEEP_FP32 = ("conv_in", "conv_out", "time_embedding", "add_embedding", "time_emb_proj")


class _Recorder:
    """A backend that passes every call through and keeps the UNet's inputs."""

    def __init__(self, backend):
        self.backend, self.unet_feeds = backend, []
        self.latent_shape, self.scheduler_config = backend.latent_shape, backend.scheduler_config

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.backend.encode_text(prompts)

    def unet(self, latents: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        self.unet_feeds.append({k: v.copy() for k, v in unet_feed(latents, t, text).items()})
        return self.backend.unet(latents, t, text)


def calibration_feeds(backend, prompts: list[str], sampler: str, steps: int, guidance: float,
                      seed: int = 0) -> tuple[list[dict], list[dict]]:
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


def nodes_to_quantize(graph) -> list[str]:
    """Convolutions, and matrix products with a weight (not attention's activation-by-activation
    products), outside the KEEP_FP32 modules, by the module scopes the torch exporter records."""
    weights = {i.name for i in graph.initializer}
    names = []
    for node in graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        if any(k in scopes for k in KEEP_FP32):
            continue
        if node.op_type == "Conv" or (node.op_type in ("MatMul", "Gemm") and node.input[1] in weights):
            names.append(node.name)
    return names


def quantize_graph(source: Path, target: Path, feeds: list[dict]) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    nodes = nodes_to_quantize(onnx.load(str(source), load_external_data=False).graph)
    quantize_static(str(source), str(target), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                    calibration_providers=["CPUExecutionProvider"])


def write_int8(onnx_dir: Path, backend, prompts: list[str], sampler: str = "unipc", steps: int = 15,
               guidance: float = 5.0) -> None:
    """onnx_dir/unet.int8.onnx and vae_decoder.int8.onnx, calibrated by sampling the prompts with `backend`."""
    from blossom.export import ONNX_FILES

    unet_feeds, vae_feeds = calibration_feeds(backend, prompts, sampler, steps, guidance)
    log.info("int8 calibration: %d UNet batches, %d decoder batch over %d captions", len(unet_feeds), len(vae_feeds),
             len(prompts))
    quantize_graph(onnx_dir / ONNX_FILES["unet"], onnx_dir / INT8_FILES["unet"], unet_feeds)
    quantize_graph(onnx_dir / ONNX_FILES["vae_decoder"], onnx_dir / INT8_FILES["vae_decoder"], vae_feeds)
