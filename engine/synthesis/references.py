"""Reference images: read, decoded and resized on CPU workers inside the stream.

Stream rows carry only plan metadata; a CPU task fetches each window's references by position in a small
reference table put once from the driver. For a dataset on storage that table holds ids and URIs, and the
task reads the images it needs from storage (they were decoded once at load, on workers); inline data
(the built-in digits, a table a caller built) ships its bytes in the table and is checked here first.
The images handed to the Translator are the same bytes, decoded and resized the same way, either way.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from engine.data.dataset import ImageDataset
from engine.data.images import BadImageError, decode, to_array
from engine.data.reads import read_many
from engine.storage import Storage
from engine.synthesis.translate import SynthesisError
from engine.synthesis.windows import map_windows, pixels_to_column

log = logging.getLogger(__name__)

# One cached train table per worker process (Ray reuses workers across tasks).
_TRAIN_CACHE: dict[str, pa.Table] = {}


class ReferenceImageError(SynthesisError):
    """A reference image that does not decode; the message names its id."""


def check_references(train: pa.Table, skip: bool) -> tuple[np.ndarray, list[str]]:
    """(usable mask, ids of bad images): decode every inline train image once, before any Ray work.

    A bad image is an error naming its id, unless `dataset.skip_bad_images` is on: then it is
    left out of the reference pools and counted. Rows on storage (no `image` column) were decoded on
    workers when the dataset was loaded (bad ones raised or were dropped there): nothing to read here.
    """
    ids = train.column("id").to_pylist()
    usable = np.ones(len(ids), dtype=bool)
    bad: list[str] = []
    if "image" not in train.column_names:
        return usable, bad
    for i, (row_id, data) in enumerate(zip(ids, train.column("image").to_pylist())):
        try:
            if data is None:
                raise BadImageError(f"cannot decode image {row_id}: no bytes")
            decode(data, row_id)
        except BadImageError as exc:
            if not skip:
                raise ReferenceImageError(
                    f"reference image {row_id!r} does not decode ({exc}); set dataset.skip_bad_images: true to skip it"
                ) from None
            usable[i] = False
            bad.append(row_id)
            log.warning("skipping reference %s: %s", row_id, exc)
    return usable, bad


def _train(ref: Any) -> pa.Table:
    import ray

    obj = ref[0]
    key = obj.hex()
    if key not in _TRAIN_CACHE:
        _TRAIN_CACHE.clear()
        _TRAIN_CACHE[key] = ray.get(obj)
    return _TRAIN_CACHE[key]


def reference_table(ds: ImageDataset) -> pa.Table:
    """What the reference tasks look references up in, by train position: (id, uri) on storage, else (id, image)."""
    return ds.train_rows.select(["id", "uri" if ds.on_storage else "image"])


def reference_bytes(train: pa.Table, positions: pa.Array, storage: Storage | None) -> list[bytes]:
    """The encoded references at `positions`: from the table's bytes, or read from storage by URI."""
    if "image" in train.column_names:
        return train.column("image").take(positions).to_pylist()
    if storage is None:
        raise SynthesisError("references on storage need a Storage to read them with")
    return read_many(storage, train.column("uri").take(positions).to_pylist())


def attach_references(rows: pa.Table, train: pa.Table | None, resolution: int,
                      storage: Storage | None = None) -> pa.Table:
    """Add `ref_pixels` (raw RxRx3 bytes, null for *-gen rows) to a window of plan rows."""
    positions = rows.column("ref_pos")
    if positions.null_count == rows.num_rows:
        return rows.append_column("ref_pixels", pa.nulls(rows.num_rows, type=pa.binary()))
    if positions.null_count or train is None:
        raise SynthesisError("a window mixes rows with and without references")
    images = reference_bytes(train, positions, storage)
    ids = rows.column("ref_id").to_pylist()
    arrays = []
    for row_id, data in zip(ids, images):
        try:
            arrays.append(to_array(data, resolution, source=row_id))
        except BadImageError as exc:
            raise ReferenceImageError(f"reference image {row_id!r} does not decode: {exc}") from None
    return rows.append_column("ref_pixels", pixels_to_column(np.stack(arrays)))


def load_references(batch: pa.Table, train: list[Any], resolution: int, storage: Storage | None = None) -> pa.Table:
    """Ray Data task (CPU): every window of the batch gets its resized reference pixels.

    `train` is `[ObjectRef of the reference_table]`, or `[None]` for *-gen plans (no references).
    """
    table = _train(train) if train[0] is not None else None
    return map_windows(batch, lambda start, end, rows: attach_references(rows, table, resolution, storage))
