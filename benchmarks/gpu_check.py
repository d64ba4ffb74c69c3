"""The prepared GPU check: blossom's training loop on CUDA, fed by the memory-mapped cache.

For each precision (fp32, bf16, fp16 with its gradient scaler) it trains the preset's UNet on a
synthetic cache of the preset's shapes (random latents and 77 x 768 text states, as the original's
CLIP ViT-L/14 gives) and reports images/s; then it checks that an fp16 run resumed from a
mid-run checkpoint ends bit-equal to the uninterrupted run (the scaler's state is checkpointed),
and lists ONNX Runtime's execution providers. Also runs on CPU (`--device cpu`, tiny shapes) so
the script itself is tested where no GPU is.

    python benchmarks/gpu_check.py --preset peer256 --steps 30 --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cache_format import synthetic_cache  # noqa: E402  (benchmarks/ is on the path when run as a script)


def steady_steps(cfg, cache: Path, batch: int, cuda: bool, warm: int = 3, timed: int = 10) -> dict:
    """The UNet's forward + backward + AdamW step alone, synchronised, after warm-up: what the
    arithmetic costs, to set beside the whole loop's images/s (data, EMA, logging, checkpoints)."""
    import torch.nn.functional as F

    from blossom.data.cache import CacheSplit
    from blossom.models import build_unet

    data = CacheSplit(cache, "train")
    device = torch.device("cuda" if cuda else "cpu")
    x0, text = (v.to(device) for v in data.batch(torch.arange(batch) % len(data)))
    out = {}
    for precision, dtype in (("no", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        unet = build_unet(cfg, data.index["text_dim"], data.latent_shape).to(device)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        t = torch.randint(0, 1000, (batch,), device=device)

        for i in range(warm + timed):
            if i == warm:  # the clock starts once the warm-up steps have finished on the device
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.mse_loss(unet(x0, t, encoder_hidden_states=text).sample.float(), x0)
            opt.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
        if cuda:
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / timed * 1000
        out[precision] = {"ms_per_step": round(ms, 1), "images_per_s": round(batch * 1000 / ms, 1)}
        print("steady", precision, json.dumps(out[precision]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="peer256")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=0, help="0: the preset's")
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from blossom.config import load_config
    from blossom.models import build_vae
    from blossom.train.diffusion import train_diffusion

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device")
    report: dict = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "preset": args.preset,
    }
    print(json.dumps(report), flush=True)
    cfg = load_config(ROOT / "params.yaml", args.preset)
    latent = (cfg.vae.latent_channels, *(2 * [cfg.data.image_size // cfg.vae.downsampling]))
    text = (77, 768) if cuda else (8, 32)
    batch = args.batch or cfg.train.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_cache(tmp / "cache", args.samples, latent, text, cfg.text.encoder, val=64)
        build_vae(cfg.vae).save_pretrained(tmp / "vae")
        train = dataclasses.replace(
            cfg.train,
            steps=args.steps,
            batch_size=batch,
            warmup_steps=1,
            val_every=args.steps,
            checkpoint_every=max(1, args.steps // 2),
            log_every=max(1, args.steps // 3),
        )
        base = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, max_tokens=text[0]), train=train)
        runs = {}
        for precision in ("no", "bf16", "fp16"):
            run_cfg = dataclasses.replace(base, train=dataclasses.replace(train, mixed_precision=precision))
            out = tmp / f"run-{precision}"
            start = time.perf_counter()
            result = train_diffusion(run_cfg, tmp / "cache", tmp / "vae", out)
            wall = time.perf_counter() - start
            stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
            runs[precision] = {
                "images_per_s": stats[-1]["images_per_s"],
                "wall_s": round(wall, 1),
                "final_loss": stats[-1]["loss"],
                "val_loss": result["val_loss"],
                "unet_params_M": round(result["unet_params"] / 1e6, 1),
                "peak_gpu_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
            }
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            print(precision, json.dumps(runs[precision]), flush=True)
        report["train"] = runs

        # fp16 resume: the run above checkpointed half-way; continue from there and compare.
        from safetensors.torch import load_file

        full = tmp / "run-fp16"
        half = tmp / "resumed"
        shutil.copytree(full, half)
        ckpts = sorted((half / "checkpoints").glob("step-*"))
        shutil.rmtree(ckpts[-1])
        (half / "checkpoints" / "latest").write_text(ckpts[-2].name + "\n")
        fp16 = dataclasses.replace(base, train=dataclasses.replace(train, mixed_precision="fp16"))
        train_diffusion(fp16, tmp / "cache", tmp / "vae", half, resume="latest")
        last = ckpts[-1].name
        a = load_file(half / "checkpoints" / last / "model.safetensors")
        b = load_file(full / "checkpoints" / last / "model.safetensors")
        report["fp16_resume_bit_equal"] = all(torch.equal(a[k], b[k]) for k in b)
        print("fp16 resume bit-equal:", report["fp16_resume_bit_equal"], flush=True)

        report["steady"] = steady_steps(base, tmp / "cache", batch, cuda)

    try:
        import onnxruntime as ort

        report["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        report["onnxruntime"] = None
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
