"""What the adherence evaluation asks for: balanced attribute draws, each under one phrasing.

Every (petal colour, background) pair is asked for, the held-out pairs twice as often (so that
their accuracy has an interval narrow enough to read). Within each phrasing group every
(petal count, petal shape) combination appears equally often. Three phrasing groups:
- ``template``: the training captions' own phrasing (the first caption template);
- ``reordered``: the training vocabulary in word orders no caption template produces;
- ``synonyms``: words no caption template uses (``ruby``, ``meadow``, ``spiky``).
The two paraphrase groups are checked (tests/test_evalset.py) never to be producible by the
caption generator, so they measure what a user typing their own words gets.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from blossom.data import synthetic

PHRASINGS = ("template", "reordered", "synonyms")
# Position j of a pair's draws gets phrasing CYCLE[j % 4]: half template, a quarter each other.
CYCLE = ("template", "reordered", "template", "synonyms")
HELD_OUT_WEIGHT = 2

REORDERED = (
    "{bg_cap}: a flower whose {count} {shape} petals are {color}",
    "{count} {shape} petals, {color}, {bg}",
    "{color} petals, {count} of them, {shape}, on a flower {bg}",
)
SYNONYM_TEMPLATES = (
    "a {color} blossom with {count} {shape} petals {bg}",
    "{bg_cap}, a bloom with {count} {shape} {color} petals",
)
COLOR_SYNONYMS = {
    "red": ("ruby", "cherry red"),
    "orange": ("amber", "apricot"),
    "yellow": ("lemon", "canary yellow"),
    "green": ("emerald", "leaf green"),
    "blue": ("sapphire", "cobalt"),
    "purple": ("plum", "lilac"),
    "pink": ("blush", "bubblegum pink"),
    "white": ("ivory", "milky white"),
}
SHAPE_SYNONYMS = {"round": ("circular", "oval"), "pointed": ("sharp", "spiky"), "thin": ("skinny", "needle-like")}
BACKGROUND_SYNONYMS = {
    "sky": ("beneath the open sky", "with blue air behind it"),
    "grass": ("in a meadow", "on a green field"),
    "night": ("at midnight", "under a black sky"),
    "sand": ("on a beach", "in dry sand"),
    "stone": ("on granite", "on a rocky ledge"),
}


@dataclass(frozen=True)
class EvalItem:
    flower: synthetic.Flower
    phrasing: str
    prompt: str

    @property
    def held_out(self) -> bool:
        return (self.flower.petal_color, self.flower.background) in synthetic.HELD_OUT


def phrase(f: synthetic.Flower, phrasing: str, k: int) -> str:
    """The prompt for flower f in a phrasing group; k picks among the group's variants."""
    count = synthetic.NUMBER_WORDS[f.petal_count]
    if phrasing == "template":
        return synthetic.EVAL_TEMPLATE.format(
            color=f.petal_color, count=count, shape=f.petal_shape, bg=synthetic.BACKGROUND_PHRASES[f.background][0]
        )
    if phrasing == "reordered":
        template = REORDERED[k % len(REORDERED)]
        color, shape = f.petal_color, f.petal_shape
        bg = synthetic.BACKGROUND_PHRASES[f.background][k % len(synthetic.BACKGROUND_PHRASES[f.background])]
    elif phrasing == "synonyms":
        template = SYNONYM_TEMPLATES[k % len(SYNONYM_TEMPLATES)]
        color = COLOR_SYNONYMS[f.petal_color][k // 2 % 2]
        shape = SHAPE_SYNONYMS[f.petal_shape][k // 2 % 2]
        bg = BACKGROUND_SYNONYMS[f.background][k // 4 % 2]
    else:
        raise ValueError(f"unknown phrasing {phrasing!r}")
    return template.format(color=color, count=count, shape=shape, bg=bg, bg_cap=bg[0].upper() + bg[1:])


def eval_items(images_per_pair: int, seed: int = 4242) -> list[EvalItem]:
    """images_per_pair draws of every seen pair, HELD_OUT_WEIGHT times as many of every held-out pair."""
    slots: list[tuple[str, str, str]] = []  # (colour, background, phrasing)
    for color, bg in itertools.product(synthetic.PETAL_COLORS, synthetic.BACKGROUNDS):
        n = images_per_pair * (HELD_OUT_WEIGHT if (color, bg) in synthetic.HELD_OUT else 1)
        slots += [(color, bg, CYCLE[j % len(CYCLE)]) for j in range(n)]
    rng = np.random.default_rng(seed)
    combos = list(itertools.product(synthetic.PETAL_COUNTS, synthetic.PETAL_SHAPES))
    items: list[EvalItem | None] = [None] * len(slots)
    for phrasing in PHRASINGS:
        where = [i for i, s in enumerate(slots) if s[2] == phrasing]
        if not where:  # a small evaluation (images_per_pair < 4) leaves a group out
            continue
        # every combination equally often within the group (up to one round), in a seeded order
        order = np.concatenate([rng.permutation(len(combos)) for _ in range(-(-len(where) // len(combos)))])
        for k, (i, c) in enumerate(zip(where, order, strict=False)):
            count, shape = combos[c]
            color, bg, _ = slots[i]
            f = synthetic.Flower(color, "yellow", int(count), shape, "large", bg, 0.5, 0.5, 0.0)
            items[i] = EvalItem(f, phrasing, phrase(f, phrasing, k))
    return [it for it in items if it is not None]


def nuisance(items: list[EvalItem], seed: int = 99) -> list[synthetic.Flower]:
    """The asked-for flowers with what the prompts leave open (size, centre, place, rotation) drawn at random:
    the real images the evaluation's generated ones are compared with."""
    rng = np.random.default_rng(seed)
    out = []
    for it in items:
        r = synthetic.sample_flower(rng, "any")
        f = it.flower
        center = r.center_color if r.center_color != f.petal_color else "brown"
        out.append(
            synthetic.Flower(
                f.petal_color, center, f.petal_count, f.petal_shape, r.size, f.background, r.cx, r.cy, r.rotation
            )
        )
    return out
