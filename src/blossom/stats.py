"""Confidence intervals for accuracies read off a finite number of images."""

from __future__ import annotations

import math

Z95 = 1.959964


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval: unlike mean ± 1.96·SE it stays inside [0, 1] and holds near 0 and 1,
    where adherence accuracies live."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float, float]:
    """The mean and mean ± z·SE (sample standard deviation): for averages over dozens of images."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return mean, mean - z * se, mean + z * se


def fmt(acc: float, lo: float, hi: float) -> str:
    return f"{acc:.2f} [{lo:.2f}, {hi:.2f}]"


ATTRIBUTES = (
    ("petal_color", "petal colour"),
    ("background", "background"),
    ("petal_count", "petal count"),
    ("petal_count_pm1", "petal count ±1"),
    ("petal_shape", "petal shape"),
)


def flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics as dotted names -> numbers (MLflow's and DVC's view of metrics.json)."""
    out: dict[str, float] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif isinstance(v, bool) or not isinstance(v, int | float):
            continue
        else:
            out[f"{prefix}{k}"] = float(v)
    return out


def adherence_table(metrics: dict) -> list[list[str]]:
    """Header and rows: each attribute's accuracy [95 % interval] in each column that was measured."""
    a, c = metrics["adherence"], metrics.get("ceiling", {})
    cols = [("seen pairs", a["template"]["seen"]), ("held-out pairs", a["template"]["held_out"])]
    cols += [(f"{p} phrasing", a[p]["all"]) for p in ("reordered", "synonyms") if p in a]
    names = ("eval_prompts", "through_vae", "through_vae_held_out")
    cols += [(f"ceiling {name.replace('_', ' ')}", c[name]) for name in names if name in c]
    rows = [["attribute", *(name for name, _ in cols)]]
    for key, label in ATTRIBUTES:
        rows.append([label, *(fmt(col[key]["acc"], col[key]["lo"], col[key]["hi"]) for _, col in cols)])
    return rows


def adherence_note(metrics: dict) -> str:
    a, fd = metrics["adherence"], metrics.get("fd_classifier")
    note = (
        f"95 % Wilson intervals; {a['template']['seen']['n']} seen + {a['template']['held_out']['n']} held-out images "
        f"in the template phrasing, {metrics.get('images')} in all; {metrics.get('sampler')} {metrics.get('steps')} "
        f"steps, guidance {metrics.get('guidance')}"
    )
    if fd is not None:
        note += f"; Fréchet distance to real flowers on the classifier's features {fd:.2f}"
    if "prompt_effect" in metrics:
        note += f"; {effect_note(metrics['prompt_effect'])}"
    return note


def effect_note(effect: dict) -> str:
    return (
        f"the prompt moves an image {effect['levels']:.1f} [{effect['lo']:.1f}, {effect['hi']:.1f}] levels of 255 "
        f"from its seed's unprompted image ({effect['n']} images)"
    )
