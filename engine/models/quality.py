"""Does a base model draw the classes? Generate `diff-gen` samples per class, label them with a classifier
trained on real images only, report how often the label is the prompted class (chance = 1 / classes).

The classifier is an RBF SVM on 8x8 thumbnails of the near-white foreground cropped to its box: seconds to
fit, ~99% on real digits plain or on the scene miniature's backgrounds, and blind to anything a generated
image could get right by accident (background colour and texture, where the digit is drawn). A sanity check
of the demo's base model, not a metric for photographs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from engine.data import decode
from engine.data.scenes import foreground_mask
from engine.models.adapters import class_prompts

log = logging.getLogger(__name__)

THUMB = 8


def thumbnail(image: Image.Image) -> np.ndarray:
    """[64] the near-white foreground (min over channels), cropped to its bounding box, at 8x8 in [0, 1]: blind
    to a coloured background and to where and how large the digit is drawn (plain digits are grey: the same)."""
    pixels = np.asarray(image.convert("RGB"), np.float32) / 255.0
    ink = pixels.min(axis=-1)
    mask = foreground_mask(pixels)
    if mask.any():
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    small = Image.fromarray((ink * 255).astype(np.uint8)).resize((THUMB, THUMB), Image.BILINEAR)
    return np.asarray(small, np.float32).ravel() / 255.0


def thumbnails(images: Sequence[Image.Image]) -> np.ndarray:
    """[N, 64] foreground thumbnails: the classifier's features."""
    return np.stack([thumbnail(img) for img in images])


def fit_real_classifier(train: pa.Table) -> Any:
    """An SVM on the real train images' thumbnails (the `image` / `label` columns of a split)."""
    from sklearn.svm import SVC

    images = [decode(bytes(b)) for b in train.column("image").to_pylist()]
    return SVC(gamma="scale", C=10.0).fit(thumbnails(images), np.asarray(train.column("label").to_pylist()))


@dataclass(frozen=True)
class GenerationCheck:
    accuracy: float
    chance: float
    per_class: list[float]
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "chance": self.chance, "per_class": self.per_class, "samples": self.samples}


def generate(folder: str, prompts: Sequence[str], per_prompt: int, steps: int, guidance: float, seed: int,
             resolution: int, device: str | None = None, batch: int = 100) -> list[Image.Image]:
    """`per_prompt` text-to-image samples of each prompt with stock diffusers, image i seeded with seed + i."""
    import torch
    from diffusers import StableDiffusionPipeline

    from engine.models.base import _diffusers_dtype_kwarg, pick_device_dtype

    dev, dtype = pick_device_dtype(device)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False,
                                                   **{_diffusers_dtype_kwarg(): dtype}).to(dev)
    pipe.set_progress_bar_config(disable=True)
    wanted = [p for p in prompts for _ in range(per_prompt)]
    images: list[Image.Image] = []
    for start in range(0, len(wanted), batch):
        chunk = wanted[start:start + batch]
        generators = [torch.Generator(device=dev).manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(list(chunk), height=resolution, width=resolution, num_inference_steps=steps,
                   guidance_scale=guidance, generator=generators, output_type="pil")
        images.extend(out.images)
    return images


def check_generation(folder: str, train: pa.Table, class_names: Sequence[str], metaclass: str, per_class: int,
                     steps: int = 25, guidance: float = 3.0, seed: int = 0, resolution: int = 32,
                     device: str | None = None) -> GenerationCheck:
    """Accuracy of a real-data classifier on `per_class` plain-prompt samples of every class."""
    classifier = fit_real_classifier(train)
    images = generate(folder, class_prompts("db", class_names, metaclass), per_class, steps, guidance, seed,
                      resolution, device)
    predicted = classifier.predict(thumbnails(images))
    wanted = np.repeat(np.arange(len(class_names)), per_class)
    per = [float(np.mean(predicted[wanted == c] == c)) for c in range(len(class_names))]
    check = GenerationCheck(float(np.mean(predicted == wanted)), 1.0 / len(class_names), per, len(images))
    log.info("generation check: %.1f%% of %d samples labelled as prompted by a real-data classifier (chance %.1f%%)",
             100 * check.accuracy, check.samples, 100 * check.chance)
    return check


__all__ = ["GenerationCheck", "check_generation", "fit_real_classifier", "generate", "thumbnails"]
