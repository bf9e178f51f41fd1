"""The shard sink: one window -> one Parquet file `part-<start>-<end>.parquet`, written whole and atomically.

The name is the window's plan-index range, so a retried task rewrites the same file and a resumed
job never writes a row twice. The sink returns a small stats row per file (indices, strengths,
scores): the driver computes the filter threshold and the manifest from those, never from images.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.data.images import encode_png
from engine.data.shards import SHARD_SCHEMA, encode_table, parse_part_name, part_name
from engine.storage import Storage, StorageError, join, redact
from engine.synthesis.translate import SynthesisError
from engine.synthesis.windows import column_to_pixels, unpack

STATS_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("start", pa.int64()),
        ("end", pa.int64()),
        ("bytes", pa.int64()),
        ("index", pa.list_(pa.int64())),
        ("strength", pa.list_(pa.float64())),
        ("clip_score", pa.list_(pa.float64())),
    ]
)
STAT_COLUMNS = ["index", "strength", "clip_score"]


@dataclass
class FileStats:
    """What the driver keeps of one committed file."""

    name: str
    start: int
    end: int
    bytes: int
    index: np.ndarray
    strength: np.ndarray
    clip_score: np.ndarray

    def summary(self) -> dict:
        strengths, counts = np.unique(self.strength, return_counts=True)
        return {
            "name": self.name, "start": self.start, "end": self.end, "rows": int(len(self.index)),
            "bytes": self.bytes,
            "strengths": {f"{s:g}": int(c) for s, c in zip(strengths, counts)},
            "clip_min": float(self.clip_score.min()) if len(self.clip_score) else None,
            "clip_mean": float(self.clip_score.mean()) if len(self.clip_score) else None,
            "clip_max": float(self.clip_score.max()) if len(self.clip_score) else None,
        }


def shard_table(rows: pa.Table, resolution: int) -> pa.Table:
    """A scored window as a SHARD_SCHEMA table with PNG-encoded images (encoding happens here, on CPU)."""
    images = column_to_pixels(rows.column("pixels"), resolution)
    data = {name: rows.column(name) for name in SHARD_SCHEMA.names if name != "image"}
    data["image"] = pa.array([encode_png(img) for img in images], type=pa.binary())
    return pa.table({name: data[name] for name in SHARD_SCHEMA.names}).cast(SHARD_SCHEMA)


def write_window(storage: Storage, uri: str, start: int, end: int, rows: pa.Table, resolution: int,
                 class_names: list[str] | None = None) -> dict:
    indices = rows.column("index").to_numpy()
    if len(indices) != end - start or not np.array_equal(indices, np.arange(start, end)):
        raise SynthesisError(f"window [{start}, {end}) holds plan rows {indices.tolist()[:8]}...: refusing to write")
    blob = encode_table(shard_table(rows, resolution), class_names)
    name = part_name(start, end)
    storage.write_bytes(join(uri, name), blob)
    return {"name": name, "start": start, "end": end, "bytes": len(blob),
            "index": indices.tolist(), "strength": rows.column("strength").to_pylist(),
            "clip_score": rows.column("clip_score").to_pylist()}


def write_windows(batch: pa.Table, storage: Storage, uri: str, resolution: int,
                  class_names: list[str] | None = None) -> pa.Table:
    """Ray Data task (CPU): write every window of the batch; returns one stats row per file."""
    stats = []
    payload = batch.column("payload")
    for i, (start, end) in enumerate(zip(batch.column("start").to_pylist(), batch.column("end").to_pylist())):
        stats.append(write_window(storage, uri, start, end, unpack(payload[i].as_buffer()), resolution, class_names))
    return pa.Table.from_pylist(stats, schema=STATS_SCHEMA)


def stats_from_rows(row: dict) -> FileStats:
    return FileStats(row["name"], int(row["start"]), int(row["end"]), int(row["bytes"]),
                     np.asarray(row["index"], dtype=np.int64), np.asarray(row["strength"], dtype=np.float64),
                     np.asarray(row["clip_score"], dtype=np.float64))


def committed_files(storage: Storage, uri: str) -> list[str]:
    """URIs of the shard files already in `uri` (temp files and other names are ignored)."""
    return [f for f in storage.list(uri, "part-*.parquet") if parse_part_name(f) is not None]


def read_file_stats(storage: Storage, file_uri: str) -> FileStats:
    """Index/strength/score columns of one committed file, reading only those column chunks."""
    try:
        with storage.open_input(file_uri) as fh:
            size = fh.length
            table = pq.read_table(fh, columns=STAT_COLUMNS)
    except StorageError:
        raise
    except (OSError, pa.ArrowInvalid) as exc:
        raise SynthesisError(f"cannot read committed shard {redact(file_uri)}: {exc}") from exc
    start, end = parse_part_name(file_uri) or (-1, -1)
    return FileStats(file_uri.rsplit("/", 1)[-1], start, end, size, table.column("index").to_numpy(),
                     table.column("strength").to_numpy(), table.column("clip_score").to_numpy())


def read_committed(storage: Storage, uri: str, threads: int = 16) -> list[FileStats]:
    files = committed_files(storage, uri)
    if not files:
        return []
    with ThreadPoolExecutor(max_workers=min(threads, len(files))) as pool:
        return list(pool.map(lambda f: read_file_stats(storage, f), files))


def read_shard(storage: Storage, file_uri: str) -> pa.Table:
    """A whole committed file (tests and tools)."""
    return pq.read_table(io.BytesIO(storage.read_bytes(file_uri)))
