"""FID, KID and CLIP score for data that is not procedural (a folder of images, Oxford 102).

Standard numbers need standard networks, which cannot be downloaded here: `evaluate.clip` names a
local CLIP folder (transformers format), which gives CLIP score and the Fréchet and kernel
distances on CLIP image features (FD-CLIP, KID-CLIP: less tied to ImageNet classes than
Inception's); `evaluate.inception` names the FID Inception weights (torch-fidelity's
pt_inception-2015-12-05 file, or the same tensors as .safetensors) for the classic FID and KID,
which need the `fid` extra (torch-fidelity, and a torchvision built for the installed torch).
Each metric whose network is not given is skipped with one line saying which setting enables
it; the rest are still computed. Prompts are the validation captions; real images the
validation images. All distances go through torchmetrics.

The prompt effect (`prompt_effect`, for procedural data too) needs no network: it says whether
the text shows in the images at all.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from blossom.config import Config
from blossom.data.folder import load_images, read_metadata
from blossom.errors import BlossomError, first_line
from blossom.images import image_grid
from blossom.stats import mean_interval

log = logging.getLogger(__name__)

PROMPT_EFFECT_IMAGES = 64


def _inception_state(path: Path) -> dict[str, torch.Tensor]:
    """The weights as plain tensors, read without unpickling arbitrary objects."""
    if not path.is_file():
        raise BlossomError(
            f"evaluate.inception {path} is not a file: give the FID Inception weights (.pth or .safetensors)"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = first_line(e)
        raise BlossomError(
            f"evaluate.inception {path} is not readable weights ({first}): give the FID Inception file"
        ) from None


def inception(path: Path) -> torch.nn.Module:
    """torchmetrics' FID Inception (2048-d pool features) with the given weights."""
    state = _inception_state(path)
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics builds its Inception from it)
    except Exception as e:  # missing, or a torchvision that does not match torch
        first = first_line(e, 120)
        raise BlossomError(
            f"evaluate.inception needs torch-fidelity with a torchvision built for this torch ({first}): "
            "pip install 'blossom[fid]', or leave it empty (evaluate.clip gives FD and KID on CLIP features)"
        ) from None
    from torchmetrics.image.fid import NoTrainInceptionV3

    # torch-fidelity unpickles whatever file it is given; it gets one that this process wrote.
    with tempfile.TemporaryDirectory() as tmp:
        own = Path(tmp) / "inception.pth"
        torch.save({k: v.contiguous() for k, v in state.items()}, own)
        try:
            return NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(own)
            )
        except RuntimeError as e:
            first = first_line(e, default="mismatch")
            raise BlossomError(f"evaluate.inception {path} is not the FID Inception network ({first})") from None


class ClipImageFeatures(torch.nn.Module):
    """CLIP's projected image embedding for uint8 NCHW images: the feature network for FD/KID-CLIP."""

    def __init__(self, load):
        super().__init__()
        self.model, self.processor = load()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(x.cpu()), return_tensors="pt")["pixel_values"]
        return self.model.get_image_features(pixel_values=pixels).float()


def distances(features: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> tuple[float, dict]:
    """(Fréchet distance, KID mean/std) between real and fake images on the given features."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=features, input_img_size=tuple(real.shape[1:]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=features, subsets=50, subset_size=min(100, len(fake), len(real)))
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    torch.manual_seed(0)  # KID draws random subsets
    mean, std = kid.compute()
    return round(float(fid.compute()), 3), {"mean": round(float(mean), 5), "std": round(float(std), 5)}


def clip_loader(folder: Path):
    """A loader for torchmetrics' CLIPScore: a local CLIP model and processor."""
    if not (folder / "config.json").is_file():
        raise BlossomError(
            f"evaluate.clip {folder} is not a CLIP model folder (no config.json): give a local CLIP folder"
        )

    def load():
        from transformers import CLIPModel, CLIPProcessor

        class Projected(CLIPModel):
            # transformers 5 returns the projected embedding as an output's pooler_output;
            # torchmetrics (1.9) expects the tensor itself.
            def get_image_features(self, *args, **kwargs):
                return _tensor(super().get_image_features(*args, **kwargs))

            def get_text_features(self, *args, **kwargs):
                return _tensor(super().get_text_features(*args, **kwargs))

        return Projected.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)

    return load


def prompt_effect(generate, backend, cfg: Config, images: np.ndarray) -> tuple[dict, np.ndarray]:
    """How far the prompt moves an image: the mean absolute difference, in levels of 255, between
    each of the first images and the image the same seed draws with an empty prompt at guidance 1
    (the unconditional model alone), with a 95 % interval over the images; and those images. A
    model whose samples ignore their text scores near 0 whatever its FID."""
    k = min(PROMPT_EFFECT_IMAGES, len(images))
    plain = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, guidance=1.0))
    unprompted = generate(backend, [""] * k, plain, "evaluate: no prompt")
    diff = np.abs(images[:k].astype(np.float32) - unprompted.astype(np.float32)).mean(axis=(1, 2, 3))
    mean, lo, hi = mean_interval(diff.tolist())
    return {"levels": round(mean, 2), "lo": round(lo, 2), "hi": round(hi, 2), "n": k}, unprompted


def _tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def real_image_metrics(cfg: Config, backend, generate, data_dir: Path) -> tuple[dict, dict]:
    e = cfg.evaluate
    # the networks first: a wrong path fails in one line before minutes of sampling
    net = inception(Path(e.inception)) if e.inception else None
    clip = clip_loader(Path(e.clip)) if e.clip else None
    records = read_metadata(data_dir / "val")[: e.real_images]
    real, records = load_images(records, cfg.data.image_size)
    prompts = [r.text for r in records]
    fake = generate(backend, prompts, cfg, "evaluate: sampling")
    effect, unprompted = prompt_effect(generate, backend, cfg, fake)
    metrics: dict = {"images": len(fake), "skipped": {}}
    real_t = torch.from_numpy(real).permute(0, 3, 1, 2).contiguous()
    fake_t = torch.from_numpy(fake).permute(0, 3, 1, 2).contiguous()
    if net is not None:
        metrics["fid"], metrics["kid"] = distances(net, real_t, fake_t)
    else:
        metrics["skipped"]["fid, kid"] = "set evaluate.inception to the FID Inception weights file"
    if clip is not None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        metrics["fd_clip"], metrics["kid_clip"] = distances(ClipImageFeatures(clip), real_t, fake_t)
        for key, images in (("clip_score", fake_t), ("clip_score_real", real_t)):  # real: the captions' own images
            score = CLIPScore(model_name_or_path=clip)
            score.update(list(images), prompts)
            metrics[key] = round(float(score.compute()), 3)
    else:
        metrics["skipped"]["clip_score, fd_clip, kid_clip"] = "set evaluate.clip to a local CLIP model folder"
    for name, why in metrics["skipped"].items():
        log.warning("evaluate: %s not computed: %s", name, why)
    files = {  # rows: generated, the same seeds unprompted, the captions' own images
        "samples.png": image_grid(np.concatenate([fake[:8], unprompted[:8], real[:8]]), cols=8),
        "prompts.txt": "\n".join(prompts) + "\n",
    }
    return {"real_images": metrics, "prompt_effect": effect}, files
