"""Image files read where they live: by URI, on Ray workers, many at a time.

The driver lists a dataset (names) and keeps ids, labels, URIs and sizes; the bytes are read and
validated by Ray Data tasks through the engine's Storage (fsspec), each task fetching its files
concurrently (object stores answer one GET in milliseconds, not microseconds). Only a small
(position, size, sha256, error) row per file comes back to the driver.

Without a Ray cluster (no RAY_ADDRESS and Ray not started in this process, e.g. `diffmix check` on a
laptop) the same per-file function runs in a thread pool of this process, which then is the whole
cluster; bytes are dropped as soon as each file is checked either way.
"""
from __future__ import annotations

import hashlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from engine.data.images import BadImageError, decode
from engine.storage import Storage, redact

log = logging.getLogger(__name__)

READ_THREADS = 16          # concurrent GETs per task: S3 latency, not CPU, bounds a small-file read
ROWS_PER_TASK = 256        # files per Ray Data task: amortises task overhead, spreads 1k files over 4+ tasks
LISTING_THREADS = 8        # folders listed at once without a cluster
LISTING_TASK_CPUS = 0.25   # a listing waits on storage

CHECK_SCHEMA = pa.schema([("pos", pa.int64()), ("size", pa.int64()), ("sha256", pa.string()), ("error", pa.string())])


def read_many(storage: Storage, uris: list[str], threads: int = READ_THREADS) -> list[bytes]:
    """The bytes of every URI, in order, `threads` reads at a time (worker side)."""
    if len(uris) <= 1:
        return [storage.read_bytes(u) for u in uris]
    with ThreadPoolExecutor(max_workers=min(threads, len(uris))) as pool:
        return list(pool.map(storage.read_bytes, uris))


def check_bytes(data: bytes, source: str) -> tuple[int, str, str | None]:
    """(size, sha256, error message or None): decodes fully, as every stage will."""
    try:
        decode(data, source)
        error = None
    except BadImageError as exc:
        error = str(exc)
    return len(data), hashlib.sha256(data).hexdigest(), error


def check_files(batch: pa.Table, storage: Storage) -> pa.Table:
    """Ray Data task: read and decode each file of the batch (columns pos, uri); CHECK_SCHEMA rows back."""
    uris = batch.column("uri").to_pylist()
    checked = [check_bytes(data, redact(uri)) for uri, data in zip(uris, read_many(storage, uris))]
    return pa.table({"pos": batch.column("pos"), "size": [c[0] for c in checked],
                     "sha256": [c[1] for c in checked], "error": [c[2] for c in checked]}, schema=CHECK_SCHEMA)


def walk_many(storage: Storage, folders: list[str], threads: int = LISTING_THREADS) -> list[list[str]]:
    """The files below each folder (storage.walk_files), listed off the driver: one Ray task per folder on a
    cluster (an object store's listing builds a metadata dict per object; only the names come back), else
    `threads` folders at a time in this process."""
    if not folders:
        return []
    if on_cluster():
        import ray

        from engine import ray_local

        ray_local.ensure_ray()
        task = ray.remote(num_cpus=LISTING_TASK_CPUS)(walk_files)
        return ray.get([task.remote(storage, f) for f in folders])
    with ThreadPoolExecutor(max_workers=min(threads, len(folders))) as pool:
        return list(pool.map(lambda f: walk_files(storage, f), folders))


def walk_files(storage: Storage, folder: str) -> list[str]:
    """Ray task (or thread): the file URIs below `folder`."""
    return storage.walk_files(folder)


def on_cluster() -> bool:
    """True when this process is on (or addressed to) a Ray cluster: reads then run as Ray tasks."""
    from engine import ray_local

    return ray_local.joins_cluster()


def _ray_check(table: pa.Table, storage: Storage) -> pa.Table:
    import ray

    from engine import ray_local

    ray_local.ensure_ray()  # joins the running / addressed cluster (on_cluster() was true)
    n = table.num_rows
    blocks = [table.slice(i, ROWS_PER_TASK) for i in range(0, n, ROWS_PER_TASK)]
    ds = ray.data.from_arrow(blocks).map_batches(
        check_files, batch_size=ROWS_PER_TASK, batch_format="pyarrow", fn_kwargs={"storage": storage})
    return pa.concat_tables(ray.get(ds.to_arrow_refs())).cast(CHECK_SCHEMA)


def _local_check(table: pa.Table, storage: Storage) -> pa.Table:
    parts = [check_files(table.slice(i, ROWS_PER_TASK), storage) for i in range(0, table.num_rows, ROWS_PER_TASK)]
    return pa.concat_tables(parts) if parts else CHECK_SCHEMA.empty_table()


def check_uris(uris: list[str], storage: Storage) -> pa.Table:
    """Read and validate every file (CHECK_SCHEMA rows, in the order of `uris`), in parallel, off the driver."""
    table = pa.table({"pos": pa.array(range(len(uris)), type=pa.int64()), "uri": pa.array(uris, type=pa.string())})
    if not uris:
        return CHECK_SCHEMA.empty_table()
    cluster = on_cluster()
    tasks = math.ceil(len(uris) / ROWS_PER_TASK)
    log.info("reading and checking %d image file(s) in %d %s", len(uris), tasks,
             "Ray tasks" if cluster else "batches in this process (no Ray cluster)")
    out = _ray_check(table, storage) if cluster else _local_check(table, storage)
    return out.sort_by("pos")


def attach_images(rows: pa.Table, storage: Storage) -> pa.Table:
    """`rows` (with a `uri` column) plus their `image` bytes: for work that needs pixels in this process."""
    images = pa.array(read_many(storage, rows.column("uri").to_pylist()), type=pa.binary())
    return rows.append_column("image", images)


def read_table(rows: pa.Table, storage: Storage, schema: pa.Schema) -> pa.Table:
    """`rows` (a `uri` column) as `schema`, with their image bytes read in (in this process, or as a Ray task
    that keeps the bytes off the driver)."""
    return attach_images(rows, storage).select(schema.names).cast(schema)
