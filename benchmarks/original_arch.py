"""Time to an image with the original system's architecture (random weights), in ONNX Runtime.

UNet2DConditionModel 192/384/576, two layers per block, DownBlock2D + 2 CrossAttnDownBlock2D,
cross-attention 768, 8 heads, 32x32x4 latents; a CLIP ViT-L/14-sized text encoder; the SD VAE
decoder to 256 px. Compares the original's path (DDIM 30, guidance as a batch of 2) with
blossom's faster samplers at the step counts where they held DDIM-50's adherence on blossom's
own model (benchmarks/samplers.py). Speed does not depend on the weights.

    .venv/bin/python benchmarks/original_arch.py [--rounds 1] [--torch] [--bf16] [--openvino]

blossom's fastest path is ONNX Runtime with the statically quantized int8 UNet and VAE decoder
(calibrated here on a few sampling trajectories; the random weights make calibration a formality,
the speed is what this measures); the fastest of all is a distilled student's graphs (guidance
embedded in the UNet, 4 steps, int8), shaped here as `blossom distill` shapes them; and that student
decoding with TAESD's architecture (`distill.tiny_decoder`), since the SD decoder is then most of
an image's time.
`--openvino` adds OpenVINO with bf16 inference (needs
`pip install openvino`; not a blossom backend, see the README).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from machine import machine_line
from timing import median_seconds

from blossom.backends import OnnxBackend, TorchBackend, physical_cores
from blossom.layout import unet_feed
from blossom.sampling import FAST_SAMPLER, sample

PROMPT = "a red flower with five round petals on green grass"
RUNS = [("ddim", 30), ("dpm++2m", 15), ("unipc", 10)]


def build(root: Path) -> Path:
    """A blossom model folder with the original's architecture, random weights, exported."""
    from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizerFast

    from blossom.export import export
    from blossom.fsutil import write_json

    torch.manual_seed(0)
    model = root / "model"
    UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(192, 384, 576),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    ).save_pretrained(model / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=256,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    ).save_pretrained(model / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False).save_pretrained(
        model / "scheduler"
    )
    # CLIP ViT-L/14's text tower: 12 layers, 768 wide, 77 tokens; a tokenizer over a tiny vocabulary
    # stands in (tokenizing costs microseconds either way).
    encoder = root / "clip"
    vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<|endoftext|>", *"abcdefghijklmnopqrstuvwxyz"])}
    import json

    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizerFast(str(root / "vocab.json"), str(root / "merges.txt")).save_pretrained(encoder)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
        )
    ).save_pretrained(encoder)
    write_json(
        model / "blossom.json",
        {"text": {"encoder": str(encoder), "max_tokens": 77}, "preset": "peer256", "image_size": 256},
    )
    write_json(model / "train.json", {"val_loss": None, "steps": 0})
    student = student_of(model, root / "student")
    calibration = [PROMPT, "a white flower at night"]
    export(model, root / "export", calibration, ("unipc", 10, 5.0), int8_bar=False, fast_dir=student)
    # the same student decoding with TAESD's architecture (diffusers AutoencoderTiny, distill.tiny_decoder)
    AutoencoderTiny().save_pretrained(root / "taesd")
    tiny = student_of(model, root / "student-tiny", tiny_decoder=root / "taesd")
    export(tiny, root / TINY, calibration, ("unipc", 10, 5.0), int8_bar=False)
    return root / "export"


TINY = "export-tiny-decoder"


def student_of(model: Path, folder: Path, tiny_decoder: Path | None = None) -> Path:
    """A student-shaped copy: the same UNet with a guidance-embedding input and the student scheduler,
    laid out as `blossom distill` writes it (the weights are random either way)."""
    import json

    from diffusers import UNet2DConditionModel

    from blossom.config import Config
    from blossom.models import load_tiny_decoder, load_vae
    from blossom.train.distill import student_from, write_student_files

    cfg = Config()
    tiny = load_tiny_decoder(tiny_decoder, load_vae(model / "vae")) if tiny_decoder else None
    # every block, as the peer256 preset's student keeps them (pruning is measured on tiny only)
    student_from(
        UNet2DConditionModel.from_pretrained(model / "unet"), cfg.distill.guidance_embedding_dim, prune=False
    ).save_pretrained(folder / "unet")
    write_student_files(model, folder, cfg, json.loads((model / "blossom.json").read_text()), {}, tiny)
    return folder


class OpenVinoBackend(OnnxBackend):
    """The exported UNet and VAE decoder compiled by OpenVINO with bf16 inference; the rest as ONNX."""

    def __init__(self, folder: Path):
        import openvino as ov

        super().__init__(folder)
        core, cfg = ov.Core(), {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
        self.ov = {
            k: core.compile_model(
                core.read_model(str(folder / "onnx" / f"{k}.onnx")), "CPU", cfg
            ).create_infer_request()
            for k in ("unet", "vae_decoder")
        }

    def unet(self, latents, t, text):
        return torch.from_numpy(self.ov["unet"].infer(unet_feed(latents, t, text))[0].copy())

    def decode_float(self, latents, batch: int = 16):
        return torch.from_numpy(self.ov["vae_decoder"].infer({"latents": latents.float().numpy()})[0].copy())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1, help="blocks of 3 timed images per run, taking turns")
    ap.add_argument("--torch", action="store_true", help="also time PyTorch eager on DDIM 30 (the original's path)")
    ap.add_argument("--bf16", action="store_true", help="also time PyTorch in bfloat16 on UniPC 10")
    ap.add_argument(
        "--openvino", action="store_true", help="also time OpenVINO bf16 on UniPC 10 (pip install openvino)"
    )
    args = ap.parse_args()
    torch.set_num_threads(physical_cores())
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp))
        ort = OnnxBackend(folder)
        fns = {f"onnx {s}-{n}": (lambda seed, s=s, n=n: sample(ort, [PROMPT], s, n, 5.0, seed)) for s, n in RUNS}
        int8 = OnnxBackend(folder, precision="int8")
        fns["onnx int8 unipc-10"] = lambda seed: sample(int8, [PROMPT], "unipc", 10, 5.0, seed)
        # the few-step path: a distilled student's graphs (guidance embedded), 4 steps, int8
        fast = OnnxBackend(folder / "fast", precision="int8")
        fns[f"onnx int8 student {FAST_SAMPLER}-4"] = lambda seed: sample(fast, [PROMPT], FAST_SAMPLER, 4, 5.0, seed)
        tiny = OnnxBackend(folder.parent / TINY, precision="int8")
        fns[f"onnx int8 student {FAST_SAMPLER}-4 taesd"] = lambda seed: sample(
            tiny, [PROMPT], FAST_SAMPLER, 4, 5.0, seed
        )
        if args.torch:
            eager = TorchBackend(folder)
            fns["torch ddim-30"] = lambda seed: sample(eager, [PROMPT], "ddim", 30, 5.0, seed)
        if args.bf16:  # UNet and VAE decoder in bfloat16 (AVX512-BF16): the lower-precision path
            half = TorchBackend(folder, torch.bfloat16)
            fns["torch bf16 unipc-10"] = lambda seed: sample(half, [PROMPT], "unipc", 10, 5.0, seed)
        if args.openvino:
            vino = OpenVinoBackend(folder)
            fns["openvino bf16 unipc-10"] = lambda seed: sample(vino, [PROMPT], "unipc", 10, 5.0, seed)
        times = median_seconds(fns, rounds=args.rounds, per_round=3)
    base = times["onnx ddim-30"]
    for name, t in times.items():
        print(f"{name:>30}: {t:6.2f} s/image  ({base / t:.2f}x faster than ONNX DDIM-30)")


if __name__ == "__main__":
    main()
