"""The built-in scene miniature: the digits composited on backgrounds, a Waterbirds in small.

Diff-Mix's argument is about context: a translation keeps the reference's background and redraws the
foreground as another class, so a classifier sees each class in many contexts. Plain digits have no
context to keep, so the engine ships a second built-in dataset where they do:

- ten background *families* (two saturated colours and a coarse pattern each, varied per image), family
  k belonging to class k;
- each digit drawn in near-white over its background (the digit's grey level is its alpha), at a random
  size and place;
- the train split correlated: a fraction `aligned` of each class's images sits on its own family, the rest
  on the other nine families uniformly (`aligned = 0.1` is independence);
- the test split independent of the class: every test digit on every family, so each (class, family)
  group holds the same digits and aligned / counterfactual accuracy compare like with like.

`group = label * FAMILIES + family`; a group is *aligned* when its family is its class's own.
Everything is drawn from `seed` and the digit's index: the same seed gives the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.data.images import encode_png

FAMILIES = 10
# Two colours per family (RGB in [0, 1], kept dark/saturated: the min over channels stays low, so the
# near-white digit stays legible and separable) and a pattern. Neighbouring classes get unlike families.
_FAMILY_COLOURS = [
    ((0.55, 0.08, 0.08), (0.30, 0.02, 0.05)),   # red
    ((0.06, 0.35, 0.10), (0.02, 0.18, 0.05)),   # green
    ((0.08, 0.12, 0.55), (0.03, 0.05, 0.30)),   # blue
    ((0.55, 0.42, 0.04), (0.32, 0.20, 0.02)),   # ochre
    ((0.42, 0.06, 0.45), (0.20, 0.02, 0.25)),   # purple
    ((0.04, 0.40, 0.42), (0.02, 0.20, 0.22)),   # teal
    ((0.58, 0.24, 0.04), (0.10, 0.06, 0.30)),   # orange on navy
    ((0.18, 0.18, 0.20), (0.05, 0.05, 0.06)),   # grey
    ((0.30, 0.45, 0.05), (0.40, 0.08, 0.20)),   # olive on wine
    ((0.05, 0.22, 0.50), (0.40, 0.30, 0.02)),   # blue on gold
]
_PATTERNS = ["hstripes", "vstripes", "diagonal", "checker", "rings",
             "blobs", "diagonal", "checker", "hstripes", "vstripes"]
# family k's pattern for class k; colours alone would make the shortcut a single channel mean


@dataclass(frozen=True)
class SceneLayout:
    """Where a digit sits in its scene: what the translation measures need to tell foreground from background."""

    family: int
    size: int
    top: int
    left: int


def family_of_class(label: int) -> int:
    """The background family a class is correlated with in the train split."""
    return int(label) % FAMILIES


def is_aligned(group: int) -> bool:
    """A group (label * FAMILIES + family) whose background is its class's own."""
    return family_of_class(group // FAMILIES) == group % FAMILIES


def background(family: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size, 3] float background of `family`: its pattern at a drawn period and phase, its colours
    jittered in brightness."""
    a, b = (np.asarray(c, np.float32) for c in _FAMILY_COLOURS[family])
    gain = rng.uniform(0.8, 1.2)
    a, b = np.clip(a * gain, 0, 1), np.clip(b * gain, 0, 1)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(7.0, 11.0) * size / 32.0
    phase = rng.uniform(0, 2 * np.pi)
    pattern = _PATTERNS[family]
    if pattern == "hstripes":
        t = np.sin(2 * np.pi * y / period + phase)
    elif pattern == "vstripes":
        t = np.sin(2 * np.pi * x / period + phase)
    elif pattern == "diagonal":
        t = np.sin(2 * np.pi * (x + y) / (period * 1.4) + phase)
    elif pattern == "checker":
        t = np.sin(2 * np.pi * x / period + phase) * np.sin(2 * np.pi * y / period + rng.uniform(0, 2 * np.pi))
    elif pattern == "rings":
        cy, cx = rng.uniform(0, size, 2)
        t = np.sin(2 * np.pi * np.hypot(y - cy, x - cx) / period + phase)
    else:  # blobs: a few soft discs of colour a on b
        t = -np.ones((size, size), np.float32)
        for cy, cx, r in zip(rng.uniform(0, size, 4), rng.uniform(0, size, 4), rng.uniform(3, 7, 4) * size / 32):
            t = np.maximum(t, 1.0 - 2.0 * np.clip(np.hypot(y - cy, x - cx) / r - 0.5, 0, 1))
    w = ((np.tanh(2.5 * t) + 1) / 2)[..., None]  # soft two-tone
    return w * a + (1 - w) * b


def layout(family: int, image_size: int, rng: np.random.Generator) -> SceneLayout:
    """The digit's drawn size (55-75% of the side) and place (inside the image)."""
    size = int(round(image_size * rng.uniform(0.55, 0.75)))
    top, left = (int(v) for v in rng.integers(0, image_size - size + 1, 2))
    return SceneLayout(family, size, top, left)


def compose(digit: np.ndarray, where: SceneLayout, image_size: int, rng: np.random.Generator) -> Image.Image:
    """The 8x8 digit (values 0..16) in near-white over a `where.family` background."""
    back = background(where.family, image_size, rng)
    alpha8 = Image.fromarray(np.clip(digit * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
    alpha = np.zeros((image_size, image_size), np.float32)
    glyph = np.asarray(alpha8.resize((where.size, where.size), Image.BICUBIC), np.float32) / 255.0
    alpha[where.top:where.top + where.size, where.left:where.left + where.size] = glyph
    ink = np.asarray([rng.uniform(0.88, 1.0)] * 3, np.float32)
    out = alpha[..., None] * ink + (1 - alpha[..., None]) * back
    return Image.fromarray(np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def render(digit: np.ndarray, index: int, family: int, image_size: int, seed: int) -> bytes:
    """One scene as PNG bytes; the draws depend only on (seed, digit index, family)."""
    rng = np.random.default_rng([seed, index, family])
    return encode_png(compose(digit, layout(family, image_size, rng), image_size, rng))


def train_families(labels: np.ndarray, aligned: float, seed: int) -> np.ndarray:
    """Each train image's family: per class, round(aligned * n) images on the class's own family (which ones
    drawn from `seed`), the rest on the other families uniformly."""
    rng = np.random.default_rng([seed, 1])
    families = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        own = family_of_class(int(c))
        n_own = int(round(aligned * len(members)))
        families[members[:n_own]] = own
        others = [f for f in range(FAMILIES) if f != own]
        families[members[n_own:]] = rng.choice(others, size=len(members) - n_own)
    return families


def foreground_mask(image: np.ndarray, threshold: float = 0.6) -> np.ndarray:
    """Where the near-white digit is: every channel bright (backgrounds keep at least one channel dark)."""
    return image.min(axis=-1) > threshold


__all__ = ["FAMILIES", "SceneLayout", "background", "compose", "family_of_class",
           "foreground_mask", "is_aligned", "layout", "render", "train_families"]
