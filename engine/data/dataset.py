"""A labelled image dataset: class names + metaclass + train/test rows (id, image, label, group)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("group", pa.int64()),
    ]
)


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file, row or class."""


def make_table(ids: list[str], images: list[bytes], labels: list[int], groups: list[int | None] | None = None) -> pa.Table:
    groups = groups if groups is not None else [None] * len(ids)
    return pa.table(
        {"id": ids, "image": images, "label": labels, "group": groups},
        schema=ROW_SCHEMA,
    )


def check_labels(table: pa.Table, num_classes: int, where: str) -> None:
    """Every label must index the class list; the error names the first offending row."""
    if table.num_rows == 0:
        return
    labels = table.column("label").to_numpy()
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        row_id = table.column("id")[int(bad[0])].as_py()
        raise DatasetError(
            f"{where}: row {row_id!r} has label {int(labels[bad[0]])} outside the class list (0..{num_classes - 1})"
        )


def take(table: pa.Table, indices: list[int]) -> pa.Table:
    """Rows by position (an empty selection keeps the schema)."""
    return table.take(pa.array(indices, type=pa.int64()))


@dataclass
class ImageDataset:
    """Both splits of one dataset. Tables follow ROW_SCHEMA; labels index `class_names`."""

    class_names: list[str]
    metaclass: str
    train: pa.Table
    test: pa.Table
    name: str = "dataset"
    skipped: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.class_names) < 1:
            raise DatasetError(f"dataset {self.name}: empty class list")
        for split in ("train", "test"):
            check_labels(getattr(self, split), len(self.class_names), f"dataset {self.name} ({split})")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> pa.Table:
        if name not in ("train", "test"):
            raise DatasetError(f"unknown split {name!r} (allowed: train, test)")
        return getattr(self, name)

    def class_counts(self, split: str = "train") -> np.ndarray:
        labels = self.split(split).column("label").to_numpy()
        return np.bincount(labels, minlength=self.num_classes)

    def fingerprint(self) -> str:
        """Hash of class names, metaclass, and the (split, id, label) of every row: names a dataset version."""
        h = hashlib.sha256()
        h.update(("\x1f".join(self.class_names) + "\x1e" + self.metaclass).encode())
        for split in ("train", "test"):
            table = self.split(split)
            pairs = sorted(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))
            h.update(f"\x1d{split}".encode())
            for row_id, label in pairs:
                h.update(f"{row_id}\x1f{label}\x1e".encode())
        return h.hexdigest()[:16]

    def with_train(self, train: pa.Table, suffix: str) -> "ImageDataset":
        return ImageDataset(self.class_names, self.metaclass, train, self.test, f"{self.name}/{suffix}",
                            self.skipped, dict(self.meta))

    def to_ray(self, split: str = "train") -> "ray.data.Dataset":
        """The split as a Ray Dataset (rows: id, image bytes, label, group)."""
        import ray.data

        return ray.data.from_arrow(self.split(split))
