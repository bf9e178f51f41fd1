"""The built-in datasets: scikit-learn's handwritten digits (real scans, 10 classes), plain or on scenes.

They ship inside the scikit-learn wheel, so tests and the demo never download anything. 1,797 grey 8x8
images: `digits` upscales them to `image_size` RGB PNGs; `scenes` composites them on backgrounds
(engine.data.scenes). Metaclass "digit".
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from engine.data import scenes
from engine.data.images import encode_png

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
METACLASS = "digit"


def digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scans ([N, 8, 8], values 0..16) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def digit_id(index: int) -> str:
    return f"digits-{index:04d}"


def digit_index(row_id: str) -> int:
    return int(row_id.split("-")[1])


def load_digits_rows(image_size: int = 32) -> tuple[list[str], list[bytes], list[int]]:
    scans, targets = digit_scans()
    ids, images, labels = [], [], []
    for i, (pixels, label) in enumerate(zip(scans, targets)):
        grey = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB")
        ids.append(digit_id(i))
        images.append(encode_png(img))
        labels.append(int(label))
    return ids, images, labels


def scene_rows(indices: list[int], families: list[int], image_size: int, seed: int
               ) -> tuple[list[str], list[bytes], list[int], list[int]]:
    """Scans `indices[k]` on background `families[k]`: ids, PNG bytes, labels, groups (label x family)."""
    scans, targets = digit_scans()
    ids, images, labels, groups = [], [], [], []
    for i, family in zip(indices, families):
        label = int(targets[i])
        ids.append(f"{digit_id(i)}-bg{family}")
        images.append(scenes.render(scans[i], i, family, image_size, seed))
        labels.append(label)
        groups.append(label * scenes.FAMILIES + family)
    return ids, images, labels, groups
