"""Long-tail baselines of the paper's Tables 2-3: CMO and DRW, as classifier options.

CMO (Park et al., "The Majority Can Help the Minority", CVPR 2022): each batch of the usual stream may get
a CutMix box pasted from a second batch whose real rows are drawn with replacement, a row of class k with
weight 1 / n_k^power (power 1: every class equally likely), so tail-class content lands on head-class
backgrounds. The second stream is an `EpochPlan` like the first (seeded by the classifier seed and epoch),
so it is deterministic and resumes exactly. DRW (Cao et al., NeurIPS 2019): after a fraction of the epochs
the loss weighs class k by (1 - beta) / (1 - beta^n_k), normalised to sum to the number of classes.
Epoch windows follow the CMO code the paper's long-tail results build on.
"""
from __future__ import annotations

import math

import numpy as np

from engine.classify.labels import smooth
from engine.classify.mixing import NO_SYNTHETIC, EpochPlan


def minority_weights(labels: np.ndarray, class_counts: np.ndarray, power: float) -> np.ndarray:
    """Per-row draw probabilities: a row of class k gets 1 / n_k^power, normalised to sum to 1."""
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
    w = 1.0 / counts[np.asarray(labels, dtype=np.int64)] ** power
    return w / w.sum()


def minority_plan(labels: np.ndarray, class_counts: np.ndarray, power: float, seed: int, epoch: int) -> EpochPlan:
    """One epoch of minority-oversampled real positions (as many as the real set, with replacement)."""
    n = len(labels)
    if n < 1:
        raise ValueError("the real train split is empty")
    rng = np.random.default_rng([seed, epoch, 0xC30])
    order = rng.choice(n, size=n, replace=True, p=minority_weights(labels, class_counts, power))
    return EpochPlan(order.astype(np.int64), np.full(n, NO_SYNTHETIC, dtype=np.int64))


def cmo_active(epoch: int, epochs: int, start_after: int, end_before: int) -> bool:
    """`epoch` counts from 1; the CMO code's rule, on epochs counted from 0: start < e < epochs - end."""
    e = epoch - 1
    return start_after < e < epochs - end_before


def drw_active(epoch: int, epochs: int, drw_from: float | None) -> bool:
    """From epoch (counted from 0) floor(drw_from x epochs) on: 160..199 of 200 for 0.8, as `epoch // 160`."""
    if drw_from is None:
        return False
    return epoch - 1 >= math.floor(drw_from * epochs + 1e-9)


def drw_weights(class_counts: np.ndarray, beta: float) -> np.ndarray:
    """Class-balanced weights (1 - beta) / (1 - beta^n_k) ("effective number"), summing to the class count.

    A class without train rows is weighed as one with a single row (it has no effect on the loss).
    """
    n = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
    w = (1.0 - beta) / (1.0 - np.power(beta, n)) if beta > 0 else np.ones_like(n)
    return w / w.sum() * len(n)


def weighted_soft_cross_entropy(logits, targets, class_weights, epsilon: float = 0.0):
    """Soft-target CE with per-class weights: sum_i sum_c w_c t'_ic (-log p_ic) / sum_i sum_c w_c t_ic.

    t' are the smoothed targets, t the unsmoothed ones; for one-hot targets and no smoothing this is
    torch's `cross_entropy(..., weight=w)` (mean over the batch's target weights), and for mixed targets
    (CutMix, soft labels) it is the same mix of the per-class weighted losses.
    """
    import torch
    import torch.nn.functional as F

    w = class_weights.to(device=logits.device, dtype=torch.float32)
    per_row = -(smooth(targets, epsilon) * w * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1)
    return per_row.sum() / (targets.float() * w).sum()
