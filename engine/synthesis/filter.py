"""The CLIP filter (DESIGN.md step 4): one global threshold that drops the lowest q of all scores.

The threshold is computed from the score column alone, after the stream, and stored in the manifest;
readers keep rows with `clip_score >= threshold` (`SyntheticSet.read`), so nothing is rewritten and
any strength subset or multiplier prefix is filtered by the same global rule.
"""
from __future__ import annotations

import math

import numpy as np


def drop_count(num_rows: int, quantile: float) -> int:
    """Rows to drop: floor(q * n), so exactly floor(q * n) rows fall below the threshold (no ties)."""
    if not 0 <= quantile < 1:
        raise ValueError(f"filter quantile {quantile} is outside [0, 1)")
    return int(math.floor(quantile * num_rows + 1e-9))


def clip_threshold(scores: np.ndarray, quantile: float) -> float | None:
    """The smallest kept score: rows scoring below it (the lowest floor(q*n)) are dropped; None keeps all.

    With ties at the boundary every tied row is kept, so at most floor(q*n) rows are dropped.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        raise ValueError("CLIP scores contain NaN")
    k = drop_count(len(scores), quantile)
    if k == 0:
        return None
    return float(np.partition(scores, k)[k])


def kept_mask(scores: np.ndarray, threshold: float | None) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    return np.ones(len(scores), dtype=bool) if threshold is None else scores >= threshold
