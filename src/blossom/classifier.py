"""The attribute classifier that scores prompt adherence on procedural flowers.

A small CNN reads petal colour, background, petal count and petal shape from an image. It is
trained on fresh procedural flowers (its own seed: it never sees the diffusion model's training
images), and its accuracy on more fresh flowers is the ceiling of any adherence it reports.

The judge for the default settings ships with blossom (assets/classifier): every run and every
machine is then scored by the same weights, and a fresh `make run` spends its minutes on the
model instead. Other settings (another image size, more images) train one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from blossom.config import Config
from blossom.data import synthetic
from blossom.errors import BlossomError
from blossom.fsutil import atomic_dir, write_json
from blossom.images import to_tensor

log = logging.getLogger(__name__)

HEADS: dict[str, list] = {
    "petal_color": list(synthetic.PETAL_COLORS),
    "background": list(synthetic.BACKGROUNDS),
    "petal_count": list(synthetic.PETAL_COUNTS),
    "petal_shape": list(synthetic.PETAL_SHAPES),
}
HEADS_AS_SAVED = json.loads(json.dumps(HEADS))  # how classifier.json holds them, to compare with what it says
CLASSIFIER_SEED = 777
SHIPPED = Path(__file__).parent / "assets" / "classifier"
FORMAT = 2  # format 1 (2x2 pooled features, 6,000 training images) read petal count at 0.80


class AttributeClassifier(nn.Module):
    """Four conv stages (1/2, 1/4, 1/8, 1/16 of the image side), a 4x4 pooled grid, one linear head per attribute.

    The pooled grid keeps where things are (petals lie around a centre). What made petal count
    readable was data, not width or resolution: with this network, 6,000 fresh images read count
    at 0.70, 24,000 at 0.97 and 32,000 at 0.99 (docs/evaluation.md).
    """

    def __init__(self, width: int = 16):
        super().__init__()
        chans = [width, width * 2, width * 4, width * 8]
        layers: list[nn.Module] = []
        cin = 3
        for cout in chans:
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1, stride=2),
                nn.BatchNorm2d(cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.SiLU(),
            ]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.neck = nn.Sequential(nn.Linear(chans[-1] * 16, 256), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.pool(self.body(x)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


class UInt8Features(nn.Module):
    """The classifier's features for uint8 NCHW images: the feature network torchmetrics' KID takes."""

    def __init__(self, model: AttributeClassifier):
        super().__init__()
        self.model = model

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.eval().features(x.float().div(127.5).sub(1))


def render(flowers: list[synthetic.Flower], size: int, seed: int) -> np.ndarray:
    """Procedural images of the given flowers (nuisances such as jitter drawn from `seed`)."""
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(synthetic.render(f, size, rng)) for f in flowers])


def labels(flowers: list[synthetic.Flower]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([values.index(getattr(f, k)) for f in flowers]) for k, values in HEADS.items()}


def _draw(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[synthetic.Flower]]:
    seed, start, stop, size = args
    drawn = [synthetic.generate(seed, i, size, "any") for i in range(start, stop)]
    return np.stack([np.asarray(img) for img, _, _ in drawn]), [f for _, f, _ in drawn]


def _procedural(seed: int, n: int, size: int, workers: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n random flowers of every combination, each a pure function of (seed, index): drawn in parallel."""
    import concurrent.futures
    import multiprocessing
    import os

    workers = workers or len(os.sched_getaffinity(0))
    step = 1000
    chunks = [(seed, i, min(i + step, n), size) for i in range(0, n, step)]
    if workers > 1 and len(chunks) > 1:
        # spawn: the parent's torch thread pool must not be forked into the drawing processes
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(chunks)), mp_context=ctx) as pool:
            parts = list(tqdm(pool.map(_draw, chunks), total=len(chunks), desc="classifier data", unit="k img"))
    else:
        parts = [_draw(c) for c in chunks]
    images = np.concatenate([p[0] for p in parts])
    return to_tensor(images), labels([f for p in parts for f in p[1]])


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur and noise, so that the VAE's softer generated images do not fool the classifier."""
    if torch.rand(1, generator=gen).item() < 0.5:
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    return x + 0.05 * torch.randn(x.shape, generator=gen)


@torch.no_grad()
def predict(model: AttributeClassifier, x: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    model.eval()
    outs = [model(x[i : i + batch]) for i in range(0, len(x), batch)]
    return {k: torch.cat([o[k] for o in outs]).argmax(1) for k in HEADS}


def accuracy(model: AttributeClassifier, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
    pred = predict(model, x)
    return {k: round(float((pred[k] == y[k]).float().mean()), 4) for k in HEADS}


def train_classifier(cfg: Config, out_dir: Path) -> dict:
    """Train on fresh procedural images of every combination; return the accuracy on fresh test images."""
    e, size = cfg.evaluate, cfg.data.image_size
    torch.manual_seed(CLASSIFIER_SEED)
    x, y = _procedural(CLASSIFIER_SEED, e.classifier_train_size, size)
    xt, yt = _procedural(CLASSIFIER_SEED + 1, e.classifier_test_size, size)
    model = AttributeClassifier()
    batch = 64
    steps = max(1, e.classifier_epochs * (len(x) // batch))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(CLASSIFIER_SEED)
    model.train()
    for _ in tqdm(range(steps), desc="classifier", unit="step", mininterval=2):
        idx = torch.randint(len(x), (batch,), generator=gen)
        logits = model(_augment(x[idx], gen))
        loss = sum(F.cross_entropy(logits[k], y[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    ceiling = accuracy(model, xt, yt)
    with atomic_dir(out_dir) as tmp:
        save_file(model.state_dict(), tmp / "classifier.safetensors")
        write_json(
            tmp / "classifier.json",
            {"format": FORMAT, **judge_settings(cfg), "heads": HEADS, "ceiling": ceiling},
        )
    log.info("attribute classifier accuracy on fresh random flowers: %s", ceiling)
    return ceiling


def judge_settings(cfg: Config) -> dict:
    """What decides the judge's weights: the same settings train the same judge."""
    e = cfg.evaluate
    return {
        "image_size": cfg.data.image_size,
        "train_images": e.classifier_train_size,
        "test_images": e.classifier_test_size,
        "epochs": e.classifier_epochs,
    }


def shipped_info(cfg: Config) -> dict | None:
    """The shipped judge's classifier.json when it was trained with these settings, else None
    (then a judge is trained: other settings, or an install without the package's data files)."""
    path = SHIPPED / "classifier.json"
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    fits = (
        info["format"] == FORMAT
        and info["heads"] == HEADS_AS_SAVED
        and all(info.get(k) == v for k, v in judge_settings(cfg).items())
    )
    return info if fits else None


def provide_classifier(cfg: Config, out_dir: Path, retrain: bool = False) -> tuple[dict, str]:
    """The judge in out_dir: the shipped one where the settings fit (unless retrain), else a trained one."""
    shipped = None if retrain else shipped_info(cfg)
    if shipped is None:
        return train_classifier(cfg, out_dir), "trained"
    with atomic_dir(out_dir) as tmp:
        for name in ("classifier.safetensors", "classifier.json"):
            shutil.copyfile(SHIPPED / name, tmp / name)
    return shipped["ceiling"], "shipped with blossom"


def load_classifier(folder: Path, image_size: int) -> tuple[AttributeClassifier, dict]:
    """The saved classifier, refused in one line if it cannot score images of this size or vocabulary."""
    info_path = folder / "classifier.json"
    if not info_path.exists():
        raise BlossomError(f"no attribute classifier in {folder}: run `blossom classifier` first")
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT:
        raise BlossomError(f"the classifier in {folder} is an older format: run `blossom classifier` again")
    if info["image_size"] != image_size:
        raise BlossomError(
            f"the classifier in {folder} reads {info['image_size']} px images but the model draws {image_size} px: "
            f"run `blossom classifier` with data.image_size={image_size}"
        )
    if info["heads"] != HEADS_AS_SAVED:
        raise BlossomError(
            f"the classifier in {folder} knows other attribute values than the procedural flowers: "
            "run `blossom classifier` again"
        )
    model = AttributeClassifier()
    model.load_state_dict(load_file(folder / "classifier.safetensors"))
    return model.eval(), info
