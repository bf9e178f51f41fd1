"""Soft targets for the classifier: one-hot for real rows, s**gamma mixes for synthetic rows, smoothing.

Synthetic labels come from the shard contract's `soft_labels`, computed when rows are read, so
gamma is a training-time knob that costs no synthesis.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from engine.data.shards import soft_labels


def check_gamma(gamma: float) -> None:
    """gamma >= 0: Table 6 runs gamma = 0 (s**0 = 1, a hard target label); a negative one would put more
    than 1 on the target (s < 1) and a negative weight on the reference."""
    if not gamma >= 0:  # also rejects NaN
        raise ValueError(f"classify.gamma must be >= 0, got {gamma}")


def one_hot(labels: Iterable[int], num_classes: int) -> np.ndarray:
    labels = np.asarray(list(labels), dtype=np.int64)
    out = np.zeros((len(labels), num_classes), dtype=np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


def synthetic_targets(strategy: Iterable[str], ref_label: Iterable[int | None], target_label: Iterable[int],
                      strength: Iterable[float], gamma: float, num_classes: int) -> np.ndarray:
    """(n, C) targets summing to 1: diff-mix/real-mix rows split s**gamma / 1 - s**gamma, others one-hot."""
    check_gamma(gamma)
    return soft_labels(strategy, ref_label, target_label, strength, gamma, num_classes)


def smooth(targets, epsilon: float):
    """Label smoothing on soft targets: (1 - eps) * t + eps / C. Works on numpy arrays and torch tensors."""
    if not 0 <= epsilon < 1:
        raise ValueError(f"label smoothing must be in [0, 1), got {epsilon}")
    num_classes = targets.shape[-1]
    return targets * (1.0 - epsilon) + epsilon / num_classes


def soft_cross_entropy(logits, targets, epsilon: float = 0.0):
    """Cross-entropy against soft targets (after smoothing), averaged over the batch."""
    import torch.nn.functional as F

    smoothed = smooth(targets, epsilon)
    return -(smoothed * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()
