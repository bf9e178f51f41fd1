"""How far a speed option's images are from eager PyTorch's on the same plan rows (issue #14).

An exact option computes the same math with other kernels, so images may differ in the last bits;
these figures say by how much: mean absolute difference in 8-bit levels, the fraction of pixel values
off by more than 2 levels (2/255), and whether the CLIP filter would still rank the images the same.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# The stated tolerance of an exact option: at most half a level on average and at most 1% of the values
# off by more than 2/255 (fp16 GPU kernels reorder sums; CPU fp32 is usually bit-identical).
MAX_MEAN_ABS_LEVELS = 0.5
MAX_FRACTION_OFF = 0.01
OFF_LEVELS = 2


@dataclass(frozen=True)
class Exactness:
    mean_abs_levels: float
    max_abs_levels: int
    fraction_off: float
    clip_order_same: bool | None = None

    @property
    def within_tolerance(self) -> bool:
        return (self.mean_abs_levels <= MAX_MEAN_ABS_LEVELS and self.fraction_off <= MAX_FRACTION_OFF
                and self.clip_order_same is not False)

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "within_tolerance": self.within_tolerance}

    def brief(self) -> str:
        order = "" if self.clip_order_same is None else f", CLIP order {'same' if self.clip_order_same else 'CHANGED'}"
        return (f"MAD {self.mean_abs_levels:.3f}/255, {100 * self.fraction_off:.2f}% > {OFF_LEVELS}/255, "
                f"max {self.max_abs_levels}/255{order}")


def same_order(a: np.ndarray, b: np.ndarray) -> bool:
    """The two score vectors sort the images the same way (stable sort: ties keep plan order)."""
    return bool(np.array_equal(np.argsort(a, kind="stable"), np.argsort(b, kind="stable")))


def compare(reference: np.ndarray, candidate: np.ndarray, reference_scores: np.ndarray | None = None,
            candidate_scores: np.ndarray | None = None) -> Exactness:
    """Figures of `candidate` uint8 images against `reference` (same shape, same plan rows)."""
    if reference.shape != candidate.shape:
        raise ValueError(f"image batches differ in shape: {reference.shape} vs {candidate.shape}")
    diff = np.abs(reference.astype(np.int16) - candidate.astype(np.int16))
    order = None
    if reference_scores is not None and candidate_scores is not None:
        order = same_order(np.asarray(reference_scores), np.asarray(candidate_scores))
    return Exactness(float(diff.mean()), int(diff.max(initial=0)), float((diff > OFF_LEVELS).mean()), order)
