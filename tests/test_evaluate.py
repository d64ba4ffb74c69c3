import numpy as np
import pytest
from conftest import PARAMS

from blossom.config import load_config
from blossom.data import synthetic
from blossom.evaluate import HEADS, adherence, eval_flowers, load_classifier, train_classifier


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    cfg = load_config(
        PARAMS,
        overrides=[
            "data.image_size=32",
            "evaluate.classifier_train_size=2000",
            "evaluate.classifier_test_size=400",
            "evaluate.classifier_epochs=3",
        ],
    )
    folder = tmp_path_factory.mktemp("classifier")
    ceiling = train_classifier(cfg, folder)
    model, saved = load_classifier(folder)
    assert saved == ceiling
    return model, ceiling


def test_classifier_ceiling_on_fresh_procedural_images(classifier):
    # Colour and background are what adherence is judged on: the classifier must read them from
    # clean procedural images almost without error, or its scores of generated images mean little.
    _, ceiling = classifier
    assert ceiling["petal_color"] >= 0.95
    assert ceiling["background"] >= 0.95
    assert ceiling["petal_count"] > 1 / len(synthetic.PETAL_COUNTS)  # better than chance, even after 3 short epochs


def render(flowers, size=32):
    rng = np.random.default_rng(0)
    return np.stack([np.asarray(synthetic.render(f, size, rng)) for f in flowers])


def test_adherence_is_high_for_faithful_images_and_chance_for_wrong_ones(classifier):
    model, _ = classifier
    flowers = eval_flowers(images_per_prompt=2)
    faithful = adherence(model, render(flowers), flowers)
    assert faithful["all"]["petal_color"] >= 0.95 and faithful["all"]["background"] >= 0.95
    assert faithful["held_out"]["n"] == 2 * len(synthetic.HELD_OUT)
    assert faithful["seen"]["n"] + faithful["held_out"]["n"] == len(flowers) == 80
    # The same images scored against prompts whose colour is rotated by one palette step.
    colors = list(synthetic.PETAL_COLORS)
    wrong = [
        f.__class__(**{**f.__dict__, "petal_color": colors[(colors.index(f.petal_color) + 1) % len(colors)]})
        for f in flowers
    ]
    scored = adherence(model, render(flowers), wrong)
    assert scored["all"]["petal_color"] <= 0.1
    assert set(scored["all"]) == {*HEADS, "n"}
