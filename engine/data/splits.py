"""Deterministic splits and subsets of the train split (few-shot, long-tail)."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa

from engine.data.dataset import DatasetError, take


def _stable_key(row_id: str) -> str:
    return hashlib.sha256(row_id.encode()).hexdigest()


def stratified_split(table: pa.Table, test_fraction: float, num_classes: int) -> tuple[pa.Table, pa.Table]:
    """Per class, the rows with the smallest id-hashes go to test: stable when rows are added elsewhere."""
    ids = table.column("id").to_pylist()
    labels = table.column("label").to_numpy()
    train_idx, test_idx = [], []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        members = sorted(members.tolist(), key=lambda i: _stable_key(ids[i]))
        n_test = int(round(len(members) * test_fraction))
        if len(members) > 1:
            n_test = min(max(n_test, 1), len(members) - 1)
        else:
            n_test = 0
        test_idx += members[:n_test]
        train_idx += members[n_test:]
    return take(table, sorted(train_idx)), take(table, sorted(test_idx))


def few_shot(table: pa.Table, shots: int, num_classes: int, seed: int) -> pa.Table:
    """k rows per class, drawn with the run seed; a class with fewer than k rows is an error."""
    labels = table.column("label").to_numpy()
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise DatasetError(f"few-shot: class {c} has {len(members)} train images, fewer than shots={shots}")
        keep += rng.choice(members, size=shots, replace=False).tolist()
    return take(table, sorted(keep))


def long_tail_counts(class_counts: np.ndarray, imbalance_factor: float) -> np.ndarray:
    """Images kept per class: the k'-th largest class keeps max(n_mean * (1/IF)^(k'/(N-1)), 1)."""
    n = len(class_counts)
    n_mean = float(np.mean(class_counts))
    order = np.argsort(-class_counts, kind="stable")  # k' = rank by size, largest first
    keep = np.zeros(n, dtype=np.int64)
    for rank, c in enumerate(order):
        exponent = rank / (n - 1) if n > 1 else 0.0
        target = max(int(math.floor(n_mean * (1.0 / imbalance_factor) ** exponent)), 1)
        keep[c] = min(target, int(class_counts[c]))
    return keep


def long_tail(table: pa.Table, imbalance_factor: float, num_classes: int, seed: int) -> pa.Table:
    labels = table.column("label").to_numpy()
    counts = np.bincount(labels, minlength=num_classes)
    keep_counts = long_tail_counts(counts, imbalance_factor)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        keep += rng.choice(members, size=int(keep_counts[c]), replace=False).tolist()
    return take(table, sorted(keep))
