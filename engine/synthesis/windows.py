"""Plan windows: the unit that flows through the Ray Data stream and becomes one shard file.

A window is a contiguous range of plan indices `[start, end)` inside one `rows_per_file`-aligned
block of the plan. Each stream row carries one window (its rows packed as an Arrow IPC table), and
every stage maps one window to one window. So GPU sub-batches are a pure function of the plan
(deterministic images), and a retried task rewrites the same `part-<start>-<end>.parquet`, whatever
Ray Data does with block sizes, bundling or actor restarts.
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import pyarrow as pa

# One stream row = one window.
STREAM_SCHEMA = pa.schema([("start", pa.int64()), ("end", pa.int64()), ("payload", pa.large_binary())])


def make_windows(indices: Iterable[int], rows_per_file: int) -> list[tuple[int, int]]:
    """Split sorted missing indices into contiguous runs that never cross a `rows_per_file` boundary."""
    idx = np.unique(np.fromiter(indices, dtype=np.int64))
    if idx.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(idx) != 1) | (np.diff(idx // rows_per_file) != 0)) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(idx, breaks)]


def pack(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def unpack(payload: bytes | pa.Buffer) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(payload) if isinstance(payload, bytes) else payload).read_all()


def stream_row(start: int, end: int, table: pa.Table) -> pa.Table:
    return pa.table({"start": [start], "end": [end], "payload": [pack(table)]}, schema=STREAM_SCHEMA)


def map_windows(batch: pa.Table, fn: Callable[[int, int, pa.Table], pa.Table]) -> pa.Table:
    """Apply `fn(start, end, rows)` to every window of a stream batch; returns the stream batch."""
    out = []
    payload = batch.column("payload")
    for i, (start, end) in enumerate(zip(batch.column("start").to_pylist(), batch.column("end").to_pylist())):
        rows = unpack(payload[i].as_buffer())  # zero-copy view of the packed window
        out.append(stream_row(start, end, fn(start, end, rows)))
    return pa.concat_tables(out) if out else STREAM_SCHEMA.empty_table()


def pixels_to_column(images: np.ndarray) -> pa.Array:
    """(n, H, W, 3) uint8 -> binary column of raw HWC bytes (no encoding cost on GPU actors)."""
    return pa.array([img.tobytes() for img in images], type=pa.binary())


def column_to_pixels(column: pa.ChunkedArray | pa.Array, size: int) -> np.ndarray:
    """Inverse of pixels_to_column for square `size` images; null entries are not allowed."""
    values = column.to_pylist() if isinstance(column, (pa.ChunkedArray, pa.Array)) else list(column)
    return np.stack([np.frombuffer(v, dtype=np.uint8).reshape(size, size, 3) for v in values])
