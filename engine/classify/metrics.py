"""Evaluation metrics from per-class and per-group hit counts (summable across workers).

top-1 always; many/medium/few-shot accuracy for long-tail runs (buckets by train class counts);
per-group and worst-group accuracy when the test split has a `group` column (Waterbirds-style).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class EvalCounts:
    """Hits and totals per class and per group; every field is a fixed-size array, so all-reduce is a sum."""

    correct_class: np.ndarray
    total_class: np.ndarray
    correct_group: np.ndarray
    total_group: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int, num_groups: int) -> "EvalCounts":
        return cls(np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64),
                   np.zeros(num_groups, np.int64), np.zeros(num_groups, np.int64))

    def add(self, preds: np.ndarray, labels: np.ndarray, group_pos: np.ndarray | None = None) -> None:
        """`group_pos`: each row's position in the run's group list, -1 where the row has no group."""
        hit = (preds == labels).astype(np.int64)
        num_classes = len(self.total_class)
        self.correct_class += np.bincount(labels, weights=hit, minlength=num_classes).astype(np.int64)
        self.total_class += np.bincount(labels, minlength=num_classes)
        if group_pos is not None and len(self.total_group):
            has = group_pos >= 0
            num_groups = len(self.total_group)
            self.correct_group += np.bincount(group_pos[has], weights=hit[has], minlength=num_groups).astype(np.int64)
            self.total_group += np.bincount(group_pos[has], minlength=num_groups)

    def as_vector(self) -> np.ndarray:
        return np.concatenate([self.correct_class, self.total_class, self.correct_group, self.total_group])

    @classmethod
    def from_vector(cls, v: np.ndarray, num_classes: int, num_groups: int) -> "EvalCounts":
        c, g = num_classes, num_groups
        v = np.asarray(v, dtype=np.int64)
        return cls(v[:c], v[c:2 * c], v[2 * c:2 * c + g], v[2 * c + g:2 * c + 2 * g])


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def shot_buckets(train_counts: np.ndarray, many_threshold: int, few_threshold: int) -> dict[str, np.ndarray]:
    """Class masks: many (> many_threshold train images), few (< few_threshold), medium (the rest)."""
    counts = np.asarray(train_counts)
    many = counts > many_threshold
    few = counts < few_threshold
    return {"many": many, "medium": ~many & ~few, "few": few}


def summarize(counts: EvalCounts, group_ids: list[int], train_counts: np.ndarray | None = None,
              long_tail: bool = False, many_threshold: int = 100, few_threshold: int = 20) -> dict[str, float | None]:
    """Metric dict: top1; acc_many/acc_medium/acc_few (long tail); acc_group_<g>, worst_group_acc (groups)."""
    out: dict[str, float | None] = {"top1": _ratio(counts.correct_class.sum(), counts.total_class.sum())}
    if long_tail and train_counts is not None:
        for name, mask in shot_buckets(train_counts, many_threshold, few_threshold).items():
            out[f"acc_{name}"] = _ratio(counts.correct_class[mask].sum(), counts.total_class[mask].sum())
    if group_ids:
        accs = []
        for pos, gid in enumerate(group_ids):
            acc = _ratio(counts.correct_group[pos], counts.total_group[pos])
            out[f"acc_group_{gid}"] = acc
            if acc is not None:
                accs.append(acc)
        out["worst_group_acc"] = min(accs) if accs else None
    return out
