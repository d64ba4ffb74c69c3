"""Procedural flowers: the embedded default data set, with exact captions and attributes.

Every image is a pure function of (seed, index), so a data set is reproducible, can be
generated in any order, and its captions are true by construction. Because the attributes are
known, a classifier trained on these images can score whether generated images obey prompts.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PETAL_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 36, 40),
    "orange": (246, 138, 28),
    "yellow": (247, 214, 42),
    "green": (64, 178, 72),
    "blue": (44, 84, 224),
    "purple": (138, 58, 188),
    "pink": (246, 132, 192),
    "white": (246, 246, 246),
}
CENTER_COLORS: dict[str, tuple[int, int, int]] = {
    "yellow": (250, 200, 30),
    "brown": (110, 64, 30),
    "black": (28, 24, 24),
    "white": (240, 240, 240),
}
BACKGROUNDS = ("sky", "grass", "night", "sand", "stone")
PETAL_SHAPES = ("round", "pointed", "thin")
PETAL_COUNTS = (3, 4, 5, 6, 7, 8)
SIZES = ("small", "medium", "large")

# Attribute combinations that never appear in training data; evaluation asks for them to test
# whether the model composes words it learned apart.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "night"),
    ("blue", "sand"),
    ("yellow", "stone"),
    ("purple", "grass"),
    ("white", "sky"),
)

COLOR_WORDS = {
    "red": ["red", "red", "red", "crimson", "scarlet"],
    "orange": ["orange", "orange", "orange", "tangerine"],
    "yellow": ["yellow", "yellow", "yellow", "golden"],
    "green": ["green", "green", "green", "lime green"],
    "blue": ["blue", "blue", "blue", "deep blue"],
    "purple": ["purple", "purple", "purple", "violet"],
    "pink": ["pink", "pink", "pink", "rose pink"],
    "white": ["white", "white", "white", "snow white"],
}
BACKGROUND_PHRASES = {
    "sky": ["against a blue sky", "under a clear sky", "in front of the sky", "with sky behind it"],
    "grass": ["on green grass", "in a grassy field", "on a lawn", "on grass"],
    "night": ["at night", "against a dark night sky", "under the stars", "in the dark"],
    "sand": ["on sand", "in the desert", "on a sandy beach", "on sand dunes"],
    "stone": ["on grey stone", "against a stone wall", "on rocks", "on grey rock"],
}
NUMBER_WORDS = {3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
SHAPE_WORDS = {
    "round": ["round", "rounded", "round"],
    "pointed": ["pointed", "pointy", "pointed"],
    "thin": ["thin", "narrow", "slender"],
}
# Every template names all four scored attributes, in different words and orders: when half the
# captions left count or shape out, the model drew both far worse in the same minutes
# (docs/quality.md, "Captions that name every attribute").
TEMPLATES = (
    "a {size}{color} flower with {count} {shape} petals {bg}",
    "a {color} flower {bg}, {count} {shape} petals, {center} center",
    "{count} {color} {shape} petals around a {center} center, {bg}",
    "a photo of a {size}{color} flower with {count} {shape} petals {bg}",
    "a {color} flower with {count} {shape} petals and a {center} center {bg}",
    "{bg_cap}, a {color} flower with {count} {shape} petals",
)
# The evaluation prompt: what a person would type, naming every attribute plainly.
EVAL_TEMPLATE = "a {color} flower with {count} {shape} petals {bg}"


@dataclass(frozen=True)
class Flower:
    petal_color: str
    center_color: str
    petal_count: int
    petal_shape: str
    size: str
    background: str
    cx: float  # centre position as a fraction of the image side
    cy: float
    rotation: float  # radians


def sample_flower(rng: np.random.Generator, held_out: str = "exclude") -> Flower:
    """Draw random attributes. held_out: 'exclude' (training), 'only' (evaluation), 'any'."""
    while True:
        color = str(rng.choice(list(PETAL_COLORS)))
        background = str(rng.choice(BACKGROUNDS))
        is_held = (color, background) in HELD_OUT
        if held_out == "any" or (held_out == "exclude") != is_held:
            break
    center = str(rng.choice(list(CENTER_COLORS)))
    if center == color:  # a white centre on white petals is invisible, so its caption would lie
        center = "brown"
    size = str(rng.choice(SIZES))
    radius = {"small": 0.28, "medium": 0.36, "large": 0.44}[size]
    slack = 0.5 - radius * 0.9
    return Flower(
        petal_color=color,
        center_color=center,
        petal_count=int(rng.choice(PETAL_COUNTS)),
        petal_shape=str(rng.choice(PETAL_SHAPES)),
        size=size,
        background=background,
        cx=float(0.5 + rng.uniform(-slack, slack)),
        cy=float(0.5 + rng.uniform(-slack, slack)),
        rotation=float(rng.uniform(0, 2 * math.pi)),
    )


def caption(f: Flower, rng: np.random.Generator, background_dropout: float = 0.0) -> str:
    """background_dropout: the share of captions that leave the background out. Drawn after every
    other choice, so the captions it keeps are the ones it would write without it."""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    bg = str(rng.choice(BACKGROUND_PHRASES[f.background]))
    count = NUMBER_WORDS[f.petal_count] if rng.random() < 0.8 else str(f.petal_count)
    words = dict(
        size=f"{f.size} " if rng.random() < 0.3 else "",
        color=str(rng.choice(COLOR_WORDS[f.petal_color])),
        count=count,
        shape=str(rng.choice(SHAPE_WORDS[f.petal_shape])),
        center=f.center_color,
    )
    if background_dropout and rng.random() < background_dropout:
        # the phrase goes with the separator that joined it: "..., at night", "At night, ...", "... at night"
        return re.sub(r",? \0|\0, ", "", template.format(**words, bg="\0", bg_cap="\0"))
    return template.format(**words, bg=bg, bg_cap=bg[0].upper() + bg[1:])


def eval_caption(f: Flower) -> str:
    return EVAL_TEMPLATE.format(
        color=f.petal_color,
        count=NUMBER_WORDS[f.petal_count],
        shape=f.petal_shape,
        bg=BACKGROUND_PHRASES[f.background][0],
    )


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _background(name: str, side: int, rng: np.random.Generator) -> Image.Image:
    if name == "sky":
        top, bottom = np.array([92, 156, 232]), np.array([182, 216, 250])
        ramp = np.linspace(0, 1, side)[:, None, None]
        arr = (top * (1 - ramp) + bottom * ramp).repeat(side, axis=1)
        img = Image.fromarray(arr.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(0, 3))):  # a few soft clouds
            x, y = rng.uniform(0, side, 2)
            w, h = rng.uniform(0.15, 0.3) * side, rng.uniform(0.05, 0.1) * side
            draw.ellipse([x - w, y - h, x + w, y + h], fill=(240, 246, 252))
        return img
    base = {"grass": (58, 128, 46), "night": (14, 18, 48), "sand": (222, 196, 142), "stone": (122, 122, 126)}
    img = Image.new("RGB", (side, side), _jitter(base[name], rng, 8))
    draw = ImageDraw.Draw(img)
    if name == "grass":
        for _ in range(60):
            x, y = rng.uniform(0, side, 2)
            shade = _jitter((40, 150, 40), rng, 25)
            draw.line([x, y, x + rng.uniform(-3, 3), y - rng.uniform(6, 14) * side / 128], fill=shade, width=2)
    elif name == "night":
        for _ in range(25):
            x, y = rng.uniform(0, side, 2)
            r = rng.uniform(0.5, 1.5) * side / 128
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(250, 250, 220))
    elif name == "sand":
        for _ in range(3):  # dune ridges
            y = rng.uniform(0, side)
            draw.arc([-side * 0.5, y, side * 1.5, y + side * 0.6], 180, 360, fill=(200, 170, 112), width=3)
    else:  # stone: irregular darker and lighter slabs
        for _ in range(12):
            x, y = rng.uniform(0, side, 2)
            r = rng.uniform(6, 16) * side / 128
            grey = int(122 + rng.integers(-22, 23))
            draw.ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=(grey, grey, grey + 4))
    return img


def _petal_polygon(shape: str, length: float, n: int, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    # A petal is a closed curve in its own frame (x along the petal), rotated into place.
    width_ratio = {"round": 0.5, "pointed": 0.36, "thin": 0.16}[shape]
    half_width = min(length * width_ratio, length * math.sin(math.pi / n) * 0.95)
    s = np.linspace(0, math.pi, 24)
    x = length * (1 - np.cos(s)) / 2
    profile = np.sin(s) if shape != "pointed" else np.sin(s) ** 0.7 * (1 - (s / math.pi) ** 3)
    pts = np.concatenate([np.stack([x, half_width * profile], 1), np.stack([x[::-1], -half_width * profile[::-1]], 1)])
    c, si = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -si], [si, c]])
    pts = pts @ rot.T + np.array([cx, cy])
    return [tuple(p) for p in pts]


def render(f: Flower, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw at 2x and downsample, for anti-aliased edges."""
    side = size * 2
    img = _background(f.background, side, rng)
    draw = ImageDraw.Draw(img)
    radius = {"small": 0.28, "medium": 0.36, "large": 0.44}[f.size] * side
    cx, cy = f.cx * side, f.cy * side
    petal = _jitter(PETAL_COLORS[f.petal_color], rng, 10)
    edge = tuple(int(c * 0.78) for c in petal)
    for k in range(f.petal_count):
        angle = f.rotation + 2 * math.pi * k / f.petal_count
        draw.polygon(_petal_polygon(f.petal_shape, radius, f.petal_count, angle, cx, cy), fill=petal, outline=edge)
    r = radius * 0.22
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter(CENTER_COLORS[f.center_color], rng, 8))
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    return img.resize((size, size), Image.Resampling.BOX)


def generate(
    seed: int, index: int, size: int, held_out: str = "exclude", background_dropout: float = 0.0
) -> tuple[Image.Image, Flower, str]:
    rng = np.random.default_rng([seed, index])
    flower = sample_flower(rng, held_out)
    return render(flower, size, rng), flower, caption(flower, rng, background_dropout)


def attributes(f: Flower) -> dict:
    d = asdict(f)
    for k in ("cx", "cy", "rotation"):
        d[k] = round(d[k], 4)
    return d
