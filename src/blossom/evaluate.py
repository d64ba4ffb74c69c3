"""Prompt adherence: does a generated image show what its prompt asked for?

A small CNN learns to read the procedural flowers' attributes (petal colour, background, petal
count, petal shape) from images. Its accuracy on fresh procedural images is the ceiling; its
accuracy on generated images, against the attributes their prompts named, is the model's
adherence, reported apart for attribute combinations held out of training.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from blossom.config import Config
from blossom.data import synthetic
from blossom.fsutil import atomic_dir, write_json
from blossom.images import image_grid, to_tensor
from blossom.sampling import sample

log = logging.getLogger(__name__)

HEADS: dict[str, list] = {
    "petal_color": list(synthetic.PETAL_COLORS),
    "background": list(synthetic.BACKGROUNDS),
    "petal_count": list(synthetic.PETAL_COUNTS),
    "petal_shape": list(synthetic.PETAL_SHAPES),
}
CLASSIFIER_SEED = 777  # its own seed: the classifier never sees the diffusion model's training images


class AttributeClassifier(nn.Module):
    """A small CNN with one linear head per attribute."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = [width, width * 2, width * 4, width * 4]
        # A strided stem halves the resolution at once: most of the cost of a CNN is at full size.
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, stride=2), nn.BatchNorm2d(width), nn.SiLU()]
        for cin, cout in zip(chans, chans[1:], strict=False):
            layers += [
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1, stride=2),
                nn.BatchNorm2d(cout),
                nn.SiLU(),
            ]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleDict({k: nn.Linear(chans[-1] * 4, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


def _procedural(seed: int, n: int, size: int, held_out: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images, labels = [], {k: [] for k in HEADS}
    for i in tqdm(range(n), desc="classifier data", unit="img", leave=False, mininterval=1):
        img, flower, _ = synthetic.generate(seed, i, size, held_out)
        images.append(np.asarray(img))
        for k, values in HEADS.items():
            labels[k].append(values.index(getattr(flower, k)))
    return to_tensor(np.stack(images)), {k: torch.tensor(v) for k, v in labels.items()}


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


def train_classifier(cfg: Config, out_dir: Path) -> dict:
    """Train on fresh procedural images (all combinations); the test set's accuracy is the ceiling."""
    e, size = cfg.evaluate, cfg.data.image_size
    torch.manual_seed(CLASSIFIER_SEED)
    x, y = _procedural(CLASSIFIER_SEED, e.classifier_train_size, size, "any")
    xt, yt = _procedural(CLASSIFIER_SEED + 1, e.classifier_test_size, size, "any")
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = e.classifier_epochs * (len(x) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(CLASSIFIER_SEED)
    model.train()
    for _ in tqdm(range(steps), desc="classifier", unit="step"):
        idx = torch.randint(len(x), (64,), generator=gen)
        logits = model(_augment(x[idx], gen))
        loss = sum(F.cross_entropy(logits[k], y[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    pred = predict(model, xt)
    ceiling = {k: round(float((pred[k] == yt[k]).float().mean()), 4) for k in HEADS}
    with atomic_dir(out_dir) as tmp:
        save_file(model.state_dict(), tmp / "classifier.safetensors")
        write_json(tmp / "classifier.json", {"ceiling": ceiling, "image_size": size})
    log.info("attribute classifier ceiling: %s", ceiling)
    return ceiling


def load_classifier(folder: Path) -> tuple[AttributeClassifier, dict]:
    model = AttributeClassifier()
    model.load_state_dict(load_file(folder / "classifier.safetensors"))
    return model.eval(), json.loads((folder / "classifier.json").read_text())["ceiling"]


def eval_flowers(images_per_prompt: int, seed: int = 4242) -> list[synthetic.Flower]:
    """Every (petal colour, background) pair, held-out pairs included, each with several count/shape draws."""
    rng = np.random.default_rng(seed)
    flowers = []
    for color in synthetic.PETAL_COLORS:
        for bg in synthetic.BACKGROUNDS:
            for _ in range(images_per_prompt):
                flowers.append(
                    synthetic.Flower(
                        color,
                        "yellow",
                        int(rng.choice(synthetic.PETAL_COUNTS)),
                        str(rng.choice(synthetic.PETAL_SHAPES)),
                        "large",
                        bg,
                        0.5,
                        0.5,
                        0.0,
                    )
                )
    return flowers


def adherence(classifier: AttributeClassifier, images: np.ndarray, flowers: list[synthetic.Flower]) -> dict:
    pred = predict(classifier, to_tensor(images))
    held = torch.tensor([(f.petal_color, f.background) in synthetic.HELD_OUT for f in flowers])
    result = {}
    for group, mask in (("seen", ~held), ("held_out", held), ("all", torch.ones_like(held))):
        result[group] = {
            k: round(
                float(
                    (pred[k][mask] == torch.tensor([HEADS[k].index(getattr(f, k)) for f in flowers])[mask])
                    .float()
                    .mean()
                ),
                4,
            )
            for k in HEADS
        }
        result[group]["n"] = int(mask.sum())
    return result


def evaluate(cfg: Config, backend, classifier_dir: Path, out_dir: Path, train_info: dict | None = None) -> dict:
    info = classifier_dir / "classifier.json"
    if not info.exists() or json.loads(info.read_text())["image_size"] != cfg.data.image_size:
        train_classifier(cfg, classifier_dir)  # trained once per image size, then reused by every run
    classifier, ceiling = load_classifier(classifier_dir)
    s, e = cfg.sample, cfg.evaluate
    flowers = eval_flowers(e.images_per_prompt)
    prompts = [synthetic.eval_caption(f) for f in flowers]
    start = time.time()
    images = np.concatenate(
        [
            sample(backend, prompts[i : i + e.batch_size], s.sampler, s.steps, s.guidance, seed=s.seed + i)
            for i in tqdm(range(0, len(prompts), e.batch_size), desc="evaluate: sampling", unit="batch")
        ]
    )
    seconds = time.time() - start
    scores = adherence(classifier, images, flowers)
    metrics = {
        "adherence": scores,
        "ceiling": ceiling,
        "val_loss": (train_info or {}).get("val_loss"),
        "sampler": s.sampler,
        "steps": s.steps,
        "guidance": s.guidance,
        "images": len(images),
        "seconds_per_image": round(seconds / len(images), 4),
    }
    # The grid: one image per (colour row, background column), first draw of each pair.
    first = images[:: e.images_per_prompt]
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        Image.fromarray(image_grid(first, cols=len(synthetic.BACKGROUNDS))).save(tmp / "samples.png")
        with open(tmp / "prompts.txt", "w") as fh:
            fh.write("\n".join(prompts[:: e.images_per_prompt]) + "\n")
    return metrics


def format_table(metrics: dict) -> str:
    rows = [f"{'attribute':<12} {'seen':>6} {'held-out':>9} {'ceiling':>8}"]
    for k in HEADS:
        rows.append(
            f"{k:<12} {metrics['adherence']['seen'][k]:>6.2f} {metrics['adherence']['held_out'][k]:>9.2f} "
            f"{metrics['ceiling'][k]:>8.2f}"
        )
    a = metrics["adherence"]
    rows.append(
        f"(images: {a['seen']['n']} seen, {a['held_out']['n']} held-out; "
        f"{metrics['sampler']} {metrics['steps']} steps, guidance {metrics['guidance']}; "
        f"val loss {metrics['val_loss']})"
    )
    return "\n".join(rows)
