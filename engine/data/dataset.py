"""A labelled image dataset: class names + metaclass + train/test rows.

Rows come in two forms. A dataset on storage (image folders, local or S3) holds INDEX_SCHEMA rows: ids,
labels, URIs and sizes, never bytes; the images stay where they are and are read by whoever needs the
pixels (Ray tasks, by URI). Inline data (the built-in digits, tables a caller builds, Parquet files
whose images are embedded) holds ROW_SCHEMA rows with the bytes.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from engine.data.classnames import ClassNameError, check_class_names
from engine.storage import Storage

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

    from engine.data.epochs import Block

log = logging.getLogger(__name__)

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("group", pa.int64()),
    ]
)

# A dataset on storage: where each image is, its size and content hash (read and checked on workers)
INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("uri", pa.string()),
        ("label", pa.int64()),
        ("group", pa.int64()),
        ("size", pa.int64()),
        ("sha256", pa.string()),
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


def make_index(ids: list[str], uris: list[str], labels: list[int], sizes: list[int], sha256: list[str]) -> pa.Table:
    """INDEX_SCHEMA rows of images on storage (no group: image folders have none)."""
    return pa.table({"id": ids, "uri": uris, "label": labels, "group": [None] * len(ids), "size": sizes,
                     "sha256": sha256}, schema=INDEX_SCHEMA)


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
    """Both splits of one dataset; labels index `class_names`.

    `train_rows` / `test_rows` are what the dataset holds: INDEX_SCHEMA rows (images on `storage`) or
    ROW_SCHEMA rows (bytes inline). `index(split)` is the byte-free view planners use; `train`, `test` and
    `split()` are ROW_SCHEMA tables with the bytes, read into this process on first use (for consumers
    that still decode on the driver) and kept.
    """

    class_names: list[str]
    metaclass: str
    train_rows: pa.Table
    test_rows: pa.Table
    name: str = "dataset"
    skipped: int = 0
    meta: dict = field(default_factory=dict)
    storage: Storage | None = None
    _with_bytes: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.class_names) < 1:
            raise DatasetError(f"dataset {self.name}: empty class list")
        try:
            check_class_names(self.class_names)
        except ClassNameError as exc:
            raise DatasetError(f"dataset {self.name}: {exc}") from None
        if self.on_storage and self.storage is None:
            raise DatasetError(f"dataset {self.name}: rows hold image URIs but no storage to read them with")
        for split in ("train", "test"):
            check_labels(self.rows(split), len(self.class_names), f"dataset {self.name} ({split})")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def on_storage(self) -> bool:
        """True when the images stay on storage (rows carry URIs, not bytes)."""
        return "image" not in self.train_rows.column_names

    def rows(self, name: str) -> pa.Table:
        """The split as held (URIs or bytes)."""
        if name not in ("train", "test"):
            raise DatasetError(f"unknown split {name!r} (allowed: train, test)")
        return self.train_rows if name == "train" else self.test_rows

    def index(self, name: str) -> pa.Table:
        """The split without image bytes: id, label, group (+ uri, size, sha256 on storage)."""
        table = self.rows(name)
        return table.drop_columns(["image"]) if "image" in table.column_names else table

    def split(self, name: str) -> pa.Table:
        """The split with its image bytes (ROW_SCHEMA), read from storage into this process once."""
        table = self.rows(name)
        if not self.on_storage:
            return table
        if name not in self._with_bytes:
            from engine.data.reads import read_table

            log.info("dataset %s: reading %d %s image(s) into this process", self.name, table.num_rows, name)
            assert self.storage is not None
            self._with_bytes[name] = read_table(table, self.storage, ROW_SCHEMA)
        return self._with_bytes[name]

    @property
    def train(self) -> pa.Table:
        return self.split("train")

    @property
    def test(self) -> pa.Table:
        return self.split("test")

    def class_counts(self, split: str = "train") -> np.ndarray:
        labels = self.rows(split).column("label").to_numpy()
        return np.bincount(labels, minlength=self.num_classes)

    def fingerprint(self) -> str:
        """Hash of class names, metaclass, and the (split, id, label) of every row: names a dataset version.

        From the index alone (no bytes): plan hashes, and so synthetic set folders, stay what they were."""
        h = hashlib.sha256()
        h.update(("\x1f".join(self.class_names) + "\x1e" + self.metaclass).encode())
        for split in ("train", "test"):
            table = self.rows(split)
            pairs = sorted(zip(table.column("id").to_pylist(), table.column("label").to_pylist()))
            h.update(f"\x1d{split}".encode())
            for row_id, label in pairs:
                h.update(f"{row_id}\x1f{label}\x1e".encode())
        return h.hexdigest()[:16]

    def with_train(self, train: pa.Table, suffix: str) -> "ImageDataset":
        return ImageDataset(self.class_names, self.metaclass, train, self.test_rows, f"{self.name}/{suffix}",
                            self.skipped, dict(self.meta), self.storage)

    def blocks(self, name: str, rows_per_block: int, order: np.ndarray | None = None) -> list["Block"]:
        """The split (rows in `order`) as object-store blocks with a `pos` column, for training loops. On
        storage, Ray tasks read the images into the object store: this process never holds the bytes."""
        from engine.data.epochs import put_blocks, read_blocks

        if not self.on_storage:
            table = self.split(name)
            return put_blocks(table if order is None else table.take(order), rows_per_block)
        rows = self.rows(name) if order is None else self.rows(name).take(order)
        assert self.storage is not None
        return read_blocks(rows, self.storage, ROW_SCHEMA, rows_per_block)

    def put(self, name: str, columns: list[str]) -> "ray.ObjectRef":
        """The split's `columns` (ROW_SCHEMA names) as one object-store table. On storage a Ray task reads the
        images, so this process never holds them."""
        import ray

        from engine.data.epochs import READ_TASK_CPUS
        from engine.data.reads import read_table

        if not self.on_storage:
            return ray.put(self.split(name).select(columns))
        schema = pa.schema([ROW_SCHEMA.field(c) for c in columns])
        return ray.remote(num_cpus=READ_TASK_CPUS)(read_table).remote(self.rows(name), self.storage, schema)

    def to_ray(self, split: str = "train") -> "ray.data.Dataset":
        """The split as a Ray Dataset (rows: id, image bytes, label, group); on storage, workers read the bytes."""
        import ray.data

        table = self.rows(split)
        if not self.on_storage:
            return ray.data.from_arrow(table)
        from engine.data.reads import ROWS_PER_TASK, attach_images

        blocks = [table.slice(i, ROWS_PER_TASK) for i in range(0, table.num_rows, ROWS_PER_TASK)] or [table]
        return ray.data.from_arrow(blocks).map_batches(
            attach_images, batch_size=ROWS_PER_TASK, batch_format="pyarrow",
            fn_kwargs={"storage": self.storage}).select_columns(ROW_SCHEMA.names)
