"""Decode + augment on CPU (inside Ray Data tasks), and CutMix / Mixup on the batch in the train loop.

Images leave the CPU workers as uint8 HWC arrays at the training resolution: 4x smaller than
float32 on the way to the trainer; normalisation happens on the device.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from engine.data.images import decode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_resized_box(width: int, height: int, scale_min: float, rng: np.random.Generator,
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a RandomResizedCrop box (torchvision's sampling rule)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    side = min(width, height)  # fallback: the central square
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def train_images(images: Sequence[bytes], resolution: int, scale_min: float, hflip: bool,
                 rng: np.random.Generator, sources: Sequence[str] | None = None) -> np.ndarray:
    """Decode, random-resized-crop to resolution, random flip: (n, res, res, 3) uint8."""
    out = np.empty((len(images), resolution, resolution, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        img = decode(data, sources[i] if sources is not None else f"<row {i}>")
        box = random_resized_box(img.width, img.height, scale_min, rng)
        arr = np.asarray(img.resize((resolution, resolution), Image.BILINEAR, box=box), dtype=np.uint8)
        if hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        out[i] = arr
    return out


def eval_images(images: Sequence[bytes], resolution: int, crop: float,
                sources: Sequence[str] | None = None) -> np.ndarray:
    """Decode, resize the short side to resolution / crop, center-crop resolution: (n, res, res, 3) uint8."""
    out = np.empty((len(images), resolution, resolution, 3), dtype=np.uint8)
    for i, data in enumerate(images):
        img = decode(data, sources[i] if sources is not None else f"<row {i}>")
        short = max(resolution, int(round(resolution / crop)))
        scale = short / min(img.width, img.height)
        w, h = max(resolution, int(round(img.width * scale))), max(resolution, int(round(img.height * scale)))
        img = img.resize((w, h), Image.BILINEAR)
        left, top = (w - resolution) // 2, (h - resolution) // 2
        out[i] = np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)
    return out


def to_model_input(x, dtype=None):
    """uint8 NHWC (on the device) -> normalised float NCHW."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    out = (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    return out.to(dtype) if dtype is not None else out


def mixup(x, y, alpha: float, rng: np.random.Generator):
    """Blend the batch with a shuffled copy of itself (images and soft targets by the same lambda)."""
    import torch

    lam = float(rng.beta(alpha, alpha))
    perm = torch.as_tensor(rng.permutation(x.shape[0]), device=x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def cutmix(x, y, alpha: float, rng: np.random.Generator, source=None):
    """Paste a random box from a shuffled copy of the batch, or from `source` = (x2, y2) row for row
    (CMO's minority batch); targets mix by the box's exact area."""
    import torch

    n, _, h, w = x.shape
    lam = float(rng.beta(alpha, alpha))
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    if source is None:
        perm = torch.as_tensor(rng.permutation(n), device=x.device)
        x_src, y_src = x[perm], y[perm]
    else:
        x_src, y_src = source
        if x_src.shape != x.shape or y_src.shape != y.shape:
            raise ValueError(f"CutMix source batch {tuple(x_src.shape)} does not match {tuple(x.shape)}")
    x = x.clone()
    x[:, :, top:bottom, left:right] = x_src[:, :, top:bottom, left:right]
    kept = 1.0 - (bottom - top) * (right - left) / float(h * w)
    return x, kept * y + (1 - kept) * y_src
