"""Reference images: checked once on the driver, decoded and resized on CPU workers inside the stream.

The train images travel to the cluster once (`ray.put` of an id/image table); stream rows carry only
plan metadata, and a CPU task fetches each window's references by position, so the driver never holds
more than the dataset itself whatever the multiplier.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from engine.data.images import BadImageError, decode, to_array
from engine.synthesis.translate import SynthesisError
from engine.synthesis.windows import map_windows, pixels_to_column

log = logging.getLogger(__name__)

# One cached train table per worker process (Ray reuses workers across tasks).
_TRAIN_CACHE: dict[str, pa.Table] = {}


class ReferenceImageError(SynthesisError):
    """A reference image that does not decode; the message names its id."""


def check_references(train: pa.Table, skip: bool) -> tuple[np.ndarray, list[str]]:
    """(usable mask, ids of bad images): decode every train image once, before any Ray work.

    A bad image is an error naming its id, unless `dataset.skip_bad_images` is on: then it is
    left out of the reference pools and counted.
    """
    ids = train.column("id").to_pylist()
    usable = np.ones(len(ids), dtype=bool)
    bad: list[str] = []
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


def attach_references(rows: pa.Table, train: pa.Table | None, resolution: int) -> pa.Table:
    """Add `ref_pixels` (raw RxRx3 bytes, null for *-gen rows) to a window of plan rows."""
    positions = rows.column("ref_pos")
    if positions.null_count == rows.num_rows:
        return rows.append_column("ref_pixels", pa.nulls(rows.num_rows, type=pa.binary()))
    if positions.null_count or train is None:
        raise SynthesisError("a window mixes rows with and without references")
    images = train.column("image").take(positions)
    ids = rows.column("ref_id").to_pylist()
    arrays = []
    for row_id, data in zip(ids, images.to_pylist()):
        try:
            arrays.append(to_array(data, resolution, source=row_id))
        except BadImageError as exc:
            raise ReferenceImageError(f"reference image {row_id!r} does not decode: {exc}") from None
    return rows.append_column("ref_pixels", pixels_to_column(np.stack(arrays)))


def load_references(batch: pa.Table, train: list[Any], resolution: int) -> pa.Table:
    """Ray Data task (CPU): every window of the batch gets its resized reference pixels.

    `train` is `[ObjectRef of the id/image table]`, or `[None]` for *-gen plans (no references).
    """
    table = _train(train) if train[0] is not None else None
    return map_windows(batch, lambda start, end, rows: attach_references(rows, table, resolution))
