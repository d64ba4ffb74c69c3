"""The adherence evaluation's prompts: balanced, enough to decide, and paraphrases the model never saw."""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest

from blossom.data import synthetic
from blossom.evalset import PHRASINGS, eval_items, nuisance
from blossom.stats import wilson


def caption_language() -> list[re.Pattern]:
    """Every caption the procedural generator can write, as one regular expression per template."""

    def alt(words) -> str:
        return "(?:" + "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True)) + ")"

    bgs = [p for ps in synthetic.BACKGROUND_PHRASES.values() for p in ps]
    slots = {
        "size": alt([f"{s} " for s in synthetic.SIZES] + [""]),
        "color": alt(w for ws in synthetic.COLOR_WORDS.values() for w in ws),
        "count": alt([*synthetic.NUMBER_WORDS.values(), *map(str, synthetic.PETAL_COUNTS)]),
        "shape": alt(w for ws in synthetic.SHAPE_WORDS.values() for w in ws),
        "center": alt(synthetic.CENTER_COLORS),
        "bg": alt(bgs),
        "bg_cap": alt(b[0].upper() + b[1:] for b in bgs),
    }
    patterns = []
    for template in synthetic.TEMPLATES:
        parts = re.split(r"(\{\w+\})", template)
        regex = "".join(slots[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts)
        patterns.append(re.compile(f"^{regex}$"))
    return patterns


def test_the_caption_language_covers_real_training_captions():
    # The check below is only as good as this regex: it must accept every caption the generator writes.
    language = caption_language()
    for i in range(300):
        _, _, text = synthetic.generate(0, i, 16)
        assert any(p.match(text) for p in language), text


def test_paraphrase_prompts_are_never_training_captions():
    language = caption_language()
    items = eval_items(16)
    for it in items:
        producible = any(p.match(it.prompt) for p in language)
        assert producible == (it.phrasing == "template"), (it.phrasing, it.prompt)
    # held-out pairs never occur in training at all, whatever the phrasing
    train = [synthetic.generate(0, i, 16)[1] for i in range(500)]
    assert not any((f.petal_color, f.background) in synthetic.HELD_OUT for f in train)


def test_evaluation_is_big_and_balanced_enough_to_decide():
    items = eval_items(16)
    held = [it for it in items if it.held_out]
    assert len(items) >= 480 and len(held) >= 120
    assert len(items) == 16 * (8 * 5 - 5) + 32 * 5 == 720
    pairs = collections.Counter((it.flower.petal_color, it.flower.background) for it in items)
    assert len(pairs) == 40 and set(pairs.values()) == {16, 32}
    for phrasing in PHRASINGS:
        group = [it for it in items if it.phrasing == phrasing]
        combos = collections.Counter((it.flower.petal_count, it.flower.petal_shape) for it in group)
        assert len(combos) == 18 and max(combos.values()) - min(combos.values()) <= 1, phrasing
    share = collections.Counter(it.phrasing for it in items)
    assert share == {"template": 360, "reordered": 180, "synonyms": 180}
    # Deterministic, and the real counterparts keep the asked attributes while varying the rest.
    assert [it.prompt for it in eval_items(16)] == [it.prompt for it in items]
    real = nuisance(items)
    for it, f in zip(items, real, strict=True):
        assert (f.petal_color, f.background, f.petal_count, f.petal_shape) == (
            it.flower.petal_color,
            it.flower.background,
            it.flower.petal_count,
            it.flower.petal_shape,
        )
        assert f.center_color != f.petal_color
    assert len({f.size for f in real}) == 3 and np.std([f.rotation for f in real]) > 1


def test_a_small_evaluation_leaves_groups_out_rather_than_failing():
    one = eval_items(1)
    assert len(one) == 35 + 2 * 5 and {it.phrasing for it in one} == {"template", "reordered"}


def test_prompts_name_each_attribute_in_their_own_words():
    items = eval_items(4)
    by_group = {p: [it for it in items if it.phrasing == p] for p in PHRASINGS}
    t = by_group["template"][0]
    assert t.flower.petal_color in t.prompt and synthetic.NUMBER_WORDS[t.flower.petal_count] in t.prompt
    training_colors = {w for ws in synthetic.COLOR_WORDS.values() for w in ws}
    bare = 0
    for it in by_group["synonyms"]:
        words = set(re.findall(r"[a-z]+", it.prompt.lower()))
        assert it.flower.petal_shape not in words
        bare += not (words & training_colors)
    assert bare >= len(by_group["synonyms"]) / 2  # half name the colour with no word training used


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (0, 10, 0.0, 0.2775),  # stays inside [0, 1] where mean ± 1.96 SE would not
        (10, 10, 0.7225, 1.0),
        (50, 100, 0.4038, 0.5962),
        (95, 100, 0.8882, 0.9785),
    ],
)
def test_wilson_interval(k, n, lo, hi):
    a, b = wilson(k, n)
    assert a == pytest.approx(lo, abs=1e-3) and b == pytest.approx(hi, abs=1e-3)
