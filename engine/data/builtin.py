"""The built-in default dataset: scikit-learn's handwritten digits (real scans, 10 classes).

It ships inside the scikit-learn wheel, so tests and the demo never download anything.
1,797 grey 8x8 images are upscaled to `image_size` RGB PNGs; metaclass "digit".
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from engine.data.images import encode_png

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
METACLASS = "digit"


def load_digits_rows(image_size: int = 32) -> tuple[list[str], list[bytes], list[int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    ids, images, labels = [], [], []
    for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)
        img = Image.fromarray(grey, mode="L").resize((image_size, image_size), Image.BICUBIC).convert("RGB")
        ids.append(f"digits-{i:04d}")
        images.append(encode_png(img))
        labels.append(int(label))
    return ids, images, labels
