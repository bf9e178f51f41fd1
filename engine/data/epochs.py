"""Seeded training epochs shared by the training loops (fine-tuning, classification).

An epoch's rows, their order, each worker's share and every augmentation seed are a pure function of
(seed, epoch): two runs of one config, and a run resumed mid-epoch, see the same batches. Decoding
happens either in the train worker (small epochs: `InlineEpoch`) or in a Ray Data stream whose output
order is pinned (`ordered`), so where and in which order tasks finish changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from engine.storage import Storage

# One object per worker process for tables put once by the driver (Ray reuses worker processes).
_OBJECT_CACHE: dict[str, Any] = {}


def cached_get(ref: Any) -> Any:
    """`ray.get(ref)`, kept for the next task in this process (the newest object only)."""
    import ray

    key = ref.hex()
    if key not in _OBJECT_CACHE:
        _OBJECT_CACHE.clear()
        _OBJECT_CACHE[key] = ray.get(ref)
    return _OBJECT_CACHE[key]


def balanced_copies(labels: np.ndarray, num_classes: int, seed: int, epoch: int) -> np.ndarray:
    """Copies of each row in one class-balanced epoch: floor(r) or ceil(r) with expectation r = N/C / n_class,
    drawn from (seed, epoch), so every class fills about 1/C of the epoch."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    rates = np.where(counts > 0, len(labels) / num_classes / np.maximum(counts, 1), 0.0)[labels]
    extra = np.random.default_rng([seed, epoch, 0xBA1]).random(len(labels)) < (rates - np.floor(rates))
    return np.floor(rates).astype(np.int64) + extra


def epoch_order(num_rows: int, seed: int, epoch: int, copies: np.ndarray | None = None) -> np.ndarray:
    """Row positions of one epoch in training order (each row `copies[i]` times, default once)."""
    rows = np.arange(num_rows, dtype=np.int64) if copies is None else np.repeat(np.arange(num_rows), copies)
    return rows[np.random.default_rng([seed, epoch]).permutation(len(rows))]


@dataclass(frozen=True)
class WorkerBatches:
    """One worker's batches of one epoch: `rows[b]` are the row positions of batch b, `seeds[b]` the seed
    of its augmentations. Every worker gets the same number of batches (DDP steps in lockstep)."""

    rows: np.ndarray   # (n_batches, batch) int64
    seeds: np.ndarray  # (n_batches,) int64

    def __len__(self) -> int:
        return len(self.rows)

    def skip(self, batches: int) -> "WorkerBatches":
        return WorkerBatches(self.rows[batches:], self.seeds[batches:])


def worker_batches(order: np.ndarray, rank: int, world: int, batch: int, seed: int, epoch: int) -> WorkerBatches:
    """Worker `rank` takes every world-th row of the epoch; full batches only (the remainder is dropped)."""
    share = len(order) // world
    n_batches = share // batch
    rows = order[rank::world][: n_batches * batch].reshape(n_batches, batch)
    seeds = np.random.default_rng([seed, epoch, rank, 0xA06]).integers(0, 2**62, size=n_batches)
    return WorkerBatches(rows, seeds)


def locate(step: int, batches_in_epoch: Callable[[int], int]) -> tuple[int, int]:
    """(epoch, batch within it) of global step `step`, so a resumed run continues exactly where it was."""
    epoch, done = 0, 0
    while True:
        n = batches_in_epoch(epoch)
        if n <= 0:
            raise RuntimeError(f"epoch {epoch} has no full batch: the dataset is smaller than the batch")
        if step < done + n:
            return epoch, step - done
        done += n
        epoch += 1


def ordered() -> None:
    """Ray Data streams created in this process yield rows in input order (not task completion order),
    and their tasks' errors arrive as themselves (engine.errors.raise_original_errors)."""
    import ray.data

    from engine.errors import raise_original_errors

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    raise_original_errors()


# --- blocks of rows in the object store --------------------------------------------------------
READ_TASK_CPUS = 0.25  # a block read waits on storage (concurrent GETs), it barely uses a core
@dataclass
class Block:
    """Rows [start, end) of a table put in the object store, with a `pos` column."""

    ref: Any
    start: int
    end: int


def put_blocks(table: pa.Table, rows_per_block: int) -> list[Block]:
    """Split into blocks (adding `pos`) once, so each epoch streams them without copying."""
    import ray

    table = table.append_column("pos", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    blocks = []
    for start in range(0, table.num_rows, rows_per_block):
        end = min(start + rows_per_block, table.num_rows)
        blocks.append(Block(ray.put(table.slice(start, end - start)), start, end))
    return blocks


def read_block(rows: pa.Table, storage: Storage, schema: pa.Schema, start: int) -> pa.Table:
    """Ray task: `reads.read_table`, plus `pos` from `start`."""
    from engine.data.reads import read_table

    table = read_table(rows, storage, schema)
    return table.append_column("pos", pa.array(np.arange(start, start + table.num_rows, dtype=np.int64)))


def read_blocks(rows: pa.Table, storage: Storage, schema: pa.Schema, rows_per_block: int) -> list[Block]:
    """`put_blocks` for rows whose images are on storage: each block is read by a Ray task, so the bytes go
    from storage into the object store without passing through this process. The blocks are the same
    tables `put_blocks` makes of the rows with bytes; a lost block is rebuilt from its task (lineage)."""
    import ray

    task = ray.remote(num_cpus=READ_TASK_CPUS)(read_block)
    blocks = []
    for start in range(0, rows.num_rows, rows_per_block):
        end = min(start + rows_per_block, rows.num_rows)
        blocks.append(Block(task.remote(rows.slice(start, end - start), storage, schema, start), start, end))
    return blocks


class InlineEpoch:
    """A small epoch decoded in the train worker itself, behind the slice of the Ray Dataset API the loops use.

    Below an `inline_rows` setting a Ray Data stream's start-up (seconds per epoch) costs more than
    decoding the rows; the rows, augmentations and targets are the same functions' output either way.
    """

    def __init__(self, load: Callable[[], dict[str, np.ndarray]]) -> None:
        self.load = load

    def iter_torch_batches(self, batch_size: int, prefetch_batches: int = 0, device: str = "cpu",
                           local_shuffle_buffer_size: int | None = None,
                           local_shuffle_seed: int | None = None) -> Iterator[dict]:
        import torch

        columns = self.load()
        n = len(next(iter(columns.values())))
        order = np.random.default_rng(local_shuffle_seed).permutation(n) if local_shuffle_buffer_size else np.arange(n)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            yield {k: torch.from_numpy(np.ascontiguousarray(v[rows])).to(device) for k, v in columns.items()}
