"""An epoch's synthetic draws are read as row subsets: bytes fetched per epoch follow the rows drawn, not the
files those rows sit in (issue #13), on local disk and on the SeaweedFS S3 store.

Bytes are counted by `CountingStorage`, a Storage whose ranged reads go to the real store (local disk or S3
through s3fs) exactly as before and are only added up on the way back: every byte the reader uses crosses
`read_bytes` (RangedFile, the footer and row-group reads, whole-file reads all go through it), so the count is
what the store served. It replaces no part of the storage.
"""
from __future__ import annotations

import io
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.classify.mixing import SyntheticSelection, epoch_plan, synthetic_groups, worker_share
from engine.data.images import encode_png
from engine.data.shards import ROW_COLUMNS, SHARD_SCHEMA, SyntheticSet, read_shards, rows_per_group
from engine.storage import Storage
from engine.testing.s3server import S3_ACCESS_KEY, S3_SECRET_KEY
from engine.testing.synthetic import write_synthetic_set

NAMES = [f"c{i}" for i in range(8)]


class CountingStorage(Storage):
    """The real Storage, plus a tally of the bytes its reads returned (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bytes_read = 0
        self.lock = threading.Lock()

    def read_bytes(self, uri: str, start: int | None = None, end: int | None = None) -> bytes:
        data = super().read_bytes(uri, start, end)
        with self.lock:
            self.bytes_read += len(data)
        return data


def noise_images(count: int, side: int, seed: int = 0) -> list[bytes]:
    """Incompressible PNGs (~3 bytes per pixel), so a row's size is known and far above its metadata."""
    rng = np.random.default_rng(seed)
    return [encode_png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(count)]


def write_set(uri: str, storage: Storage, rows: int, rows_per_file: int, side: int = 128, **kw) -> dict:
    images = noise_images(16, side)
    labels = [i % len(NAMES) for i in range(16)]
    return write_synthetic_set(uri, storage, NAMES, images, labels, rows, rows_per_file=rows_per_file,
                               num_train=400, **kw)


def epoch_reads(uri: str, storage: CountingStorage, p: float, epoch: int) -> tuple[pa.Table, list[str], int]:
    """What one classify epoch reads for its synthetic draws (the mixing module's own plan and file groups):
    the rows, the files touched, and the bytes the store served."""
    selection = SyntheticSelection.from_set(SyntheticSet.open(uri, storage), filtered=False)
    plan = epoch_plan(400, len(selection), p, seed=3, epoch=epoch)
    share = worker_share(plan, len(selection), 0, 1)
    files = [f for group in synthetic_groups(selection, share, 4, np.random.default_rng(epoch)) for f in group]
    wanted = selection.index[share.synthetic_counts > 0]
    before = storage.bytes_read
    rows = read_shards(files, storage, wanted)
    return rows, files, storage.bytes_read - before


def whole_file_rows(files: list[str], storage: Storage, wanted: np.ndarray) -> pa.Table:
    """The old reader: every touched file whole, then filtered (the reference for rows and order)."""
    parts = [pq.read_table(io.BytesIO(storage.read_bytes(f)), columns=ROW_COLUMNS) for f in files]
    table = pa.concat_tables(parts)
    return table.filter(pa.compute.is_in(table.column("index"), value_set=pa.array(wanted, pa.int64())))


def test_rows_per_group_follows_image_bytes():
    assert rows_per_group(64 * 400_000, 64) == 2          # 512 px PNGs: two per ~1 MiB group
    assert rows_per_group(64 * 2_000, 64) == 64           # tiny images: one group per file, as before
    assert rows_per_group(16 * 12_000, 16, 16_000) == 1
    assert rows_per_group(0, 0) == 1


def test_epoch_bytes_follow_rows_drawn_not_files_touched(tmp_path):
    storage = CountingStorage()
    uri = str(tmp_path / "set")
    write_set(uri, storage, rows=640, rows_per_file=16, row_group_bytes=64_000)   # 40 files, a row per group
    sset = SyntheticSet.open(uri, storage)
    assert all(pq.read_metadata(f).num_row_groups == 16 for f in sset.files())
    file_bytes = {f: storage.size(f) for f in sset.files()}
    row_bytes = sum(file_bytes.values()) / 640

    results = {}
    for p in (0.05, 0.2):
        rows, files, fetched = epoch_reads(uri, storage, p, epoch=1)
        distinct = rows.num_rows
        results[p] = (distinct, len(files), fetched)
        # the same rows, in the same order, as reading every touched file whole
        assert rows.equals(whole_file_rows(files, Storage(), np.unique(rows.column("index").to_numpy())))
        # about one row's bytes per drawn row (+ a small footer per file), far below the files touched
        assert fetched < 1.5 * distinct * row_bytes, (p, fetched, distinct, row_bytes)
        assert fetched < 0.3 * sum(file_bytes[f] for f in files)
    (n_lo, files_lo, bytes_lo), (n_hi, files_hi, bytes_hi) = results[0.05], results[0.2]
    assert files_lo >= 0.3 * 40 and n_hi > 2 * n_lo                      # many files touched; 2-4x the rows
    per_row_lo, per_row_hi = bytes_lo / n_lo, bytes_hi / n_hi
    assert 0.75 < per_row_hi / per_row_lo < 1.25, results                # bytes per drawn row stay flat


def test_files_without_row_groups_or_statistics_still_read(tmp_path):
    """Sets written before bounded row groups (one group per file) and files without statistics read the same
    rows; their cost is the file's columns, as before."""
    storage = CountingStorage()
    uri = str(tmp_path / "old")
    write_set(uri, storage, rows=64, rows_per_file=32, side=16)                   # default: one group per file
    files = SyntheticSet.open(uri, storage).files()
    assert all(pq.read_metadata(f).num_row_groups == 1 for f in files)
    wanted = np.array([1, 2, 40, 63])
    assert read_shards(files, storage, wanted).equals(whole_file_rows(files, storage, wanted))
    bare = tmp_path / "bare.parquet"                                             # no statistics at all
    table = pq.read_table(files[1])
    pq.write_table(table.cast(SHARD_SCHEMA), bare, row_group_size=8, write_statistics=False)
    got = read_shards([str(bare)], storage, np.array([33, 50, 51]))
    assert got.column("index").to_pylist() == [33, 50, 51]
    assert got.equals(whole_file_rows([str(bare)], storage, np.array([33, 50, 51])))
    assert read_shards([str(bare)], storage, np.array([5])).num_rows == 0


def test_row_subset_reads_on_s3(s3_server, s3_bucket):
    """On the SeaweedFS S3 store: the ranged reads fetch about the drawn rows' bytes, and the same rows."""
    options = {"key": S3_ACCESS_KEY, "secret": S3_SECRET_KEY, **s3_server["storage_options"]}
    storage = CountingStorage(storage_options=options)
    uri = f"{s3_bucket}/syn"
    write_set(uri, storage, rows=160, rows_per_file=16, row_group_bytes=64_000)  # 10 files
    row_bytes = sum(storage.size(f) for f in SyntheticSet.open(uri, storage).files()) / 160
    rows, files, fetched = epoch_reads(uri, storage, 0.1, epoch=2)
    assert rows.num_rows > 10 and len(files) >= 5
    assert rows.equals(whole_file_rows(files, storage, np.unique(rows.column("index").to_numpy())))
    assert fetched < 1.5 * rows.num_rows * row_bytes


def test_a_corrupt_or_truncated_shard_is_named_by_both_readers(tmp_path):
    """The metadata scan (SyntheticSet.read) and the row reader (read_shards) name a damaged file in a
    ShardError; storage failures stay StorageErrors (their own exit code), not shard errors."""
    import pytest

    from engine.data.shards import ShardError

    storage = Storage()
    uri = str(tmp_path / "set")
    write_set(uri, storage, rows=32, rows_per_file=16, side=16)
    files = SyntheticSet.open(uri, storage).files()
    data = open(files[1], "rb").read()
    for damaged in (data[: len(data) // 2], data[:-12] + b"\0" * 8 + b"PAR1"):  # truncated; footer garbled
        open(files[1], "wb").write(damaged)
        with pytest.raises(ShardError, match=r"cannot read shard .*part-"):
            SyntheticSet.open(uri, storage).read(filtered=False)
        with pytest.raises(ShardError, match=r"cannot read shard .*part-"):
            read_shards(files, storage, np.arange(32))


def test_a_stalled_store_under_the_shard_readers_stays_a_storage_error(s3_server, s3_bucket):
    """SeaweedFS paused (SIGSTOP) while a shard's footer is being read: both readers fail with the storage's
    own error (bounded by storage.max_stall_s, naming the URI), not with a "cannot read shard" ShardError."""
    import pytest

    from engine.data.shards import ShardError
    from engine.storage import StorageError

    server = s3_server["server"]
    options = {"key": S3_ACCESS_KEY, "secret": S3_SECRET_KEY, **s3_server["storage_options"]}
    uri = f"{s3_bucket}/syn"
    write_set(uri, Storage(storage_options=options), rows=32, rows_per_file=16, side=16)

    class StallsOnRead(Storage):
        """The real store, paused for the duration of each ranged read (a footer read comes first)."""

        def read_bytes(self, uri: str, start: int | None = None, end: int | None = None) -> bytes:
            with server.stalled():
                return super().read_bytes(uri, start, end)

    stalling = StallsOnRead(storage_options=options, retries=0, connect_timeout_s=1, read_timeout_s=1,
                            max_stall_s=2)
    files = SyntheticSet.open(uri, Storage(storage_options=options)).files()
    for read in (lambda: read_shards(files[:1], stalling, np.arange(32)),
                 lambda: SyntheticSet(uri, stalling, SyntheticSet.open(uri, Storage(storage_options=options))
                                      .manifest).read(filtered=False)):
        with pytest.raises(StorageError, match=r"storage stalled: read .*part-") as err:
            read()
        assert not isinstance(err.value, ShardError)
