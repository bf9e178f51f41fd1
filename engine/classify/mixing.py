"""Real + synthetic mixing: a seeded per-epoch replacement plan, and the Ray Data stream it drives.

Every epoch each real position is kept, or (with probability p) replaced by a synthetic row drawn
uniformly from the selected, filtered synthetic rows; the epoch keeps the real set's length.
The synthetic set's metadata is read once, without images (`SyntheticSelection`). Each epoch is
one Ray Dataset whose tasks decode a block of kept real rows (already in the object store) and
fetch, from storage through the Storage's fsspec filesystem, just the shard files holding drawn
rows, keeping only the drawn plan indices. The loop routes real and synthetic rows so that every
batch holds exactly the plan's mix. Nothing is copied to local disk; p = 0 reads no shard.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from engine.classify.augment import eval_images, train_images
from engine.classify.labels import check_gamma, one_hot, synthetic_targets
from engine.data.epochs import Block, InlineEpoch
from engine.data.shards import ShardError, SyntheticSet, read_shards
from engine.storage import Storage, redact

log = logging.getLogger(__name__)

NO_SYNTHETIC = -1


def check_p(p: float) -> None:
    if not 0 <= p <= 1:
        raise ValueError(f"classify.p must be in [0, 1], got {p}")


# --- the plan ----------------------------------------------------------------------------------
@dataclass
class EpochPlan:
    """One epoch: `order` (a permutation of real positions) and `source[pos]`, the synthetic row
    (position in the selection) that replaces real position `pos`, or -1 to keep it."""

    order: np.ndarray
    source: np.ndarray

    @property
    def num_synthetic(self) -> int:
        return int((self.source != NO_SYNTHETIC).sum())


def epoch_plan(num_real: int, num_synthetic: int, p: float, seed: int, epoch: int) -> EpochPlan:
    """Seeded by (seed, epoch) only: every worker, and a resumed run, computes the same plan."""
    check_p(p)
    if num_real < 1:
        raise ValueError("the real train split is empty")
    if p > 0 and num_synthetic < 1:
        raise ShardError(f"p = {p} needs synthetic rows, but the selection is empty")
    rng = np.random.default_rng([seed, epoch, 0x0D1FF])
    order = rng.permutation(num_real)
    source = np.full(num_real, NO_SYNTHETIC, dtype=np.int64)
    if p > 0:
        replace = rng.random(num_real) < p
        source[replace] = rng.integers(0, num_synthetic, size=int(replace.sum()))
    return EpochPlan(order, source)


@dataclass
class WorkerShare:
    """What one worker trains on in one epoch: slots (real positions), and how many of each row."""

    slots: np.ndarray             # (L,) real positions, in the epoch's order
    synthetic_slot: np.ndarray    # (L,) bool: slot replaced by a synthetic row
    real_counts: np.ndarray       # (N,) times each real row is used
    synthetic_counts: np.ndarray  # (K,) times each selected synthetic row is used

    def __len__(self) -> int:
        return len(self.slots)

    def batch_mix(self, batch_size: int) -> list[tuple[int, int]]:
        """(real rows, synthetic rows) of each batch of the epoch."""
        out = []
        for start in range(0, len(self.slots), batch_size):
            syn = int(self.synthetic_slot[start:start + batch_size].sum())
            out.append((min(batch_size, len(self.slots) - start) - syn, syn))
        return out


def worker_share(plan: EpochPlan, num_synthetic: int, rank: int, world: int) -> WorkerShare:
    """Worker `rank` takes every world-th slot; the order wraps so all workers get ceil(N/world) slots
    (equal step counts keep DDP in lockstep; with one worker the epoch is exactly the real set)."""
    n = len(plan.order)
    length = -(-n // world)
    slots = plan.order[(rank + world * np.arange(length)) % n]
    src = plan.source[slots]
    is_syn = src != NO_SYNTHETIC
    real_counts = np.bincount(slots[~is_syn], minlength=n)
    synthetic_counts = np.bincount(src[is_syn], minlength=num_synthetic) if num_synthetic else np.zeros(0, np.int64)
    return WorkerShare(slots, is_syn, real_counts, synthetic_counts)


# --- the synthetic selection (metadata only) ----------------------------------------------------
@dataclass
class SyntheticSelection:
    """Selected, filtered synthetic rows: plan indices (sorted) and the file holding each, no images."""

    uri: str
    files: list[str]
    index: np.ndarray
    file_pos: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    @classmethod
    def empty(cls) -> "SyntheticSelection":
        return cls("", [], np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def from_set(cls, sset: SyntheticSet, strengths: list[float] | None = None, multiplier: float | None = None,
                 filtered: bool = True) -> "SyntheticSelection":
        meta = sset.read(strengths=strengths, multiplier=multiplier, filtered=filtered, with_file=True)
        order = np.argsort(meta.column("index").to_numpy(), kind="stable")
        index = meta.column("index").to_numpy()[order]
        if len(np.unique(index)) != len(index):
            raise ShardError(f"synthetic set {redact(sset.uri)} holds duplicate plan indices")
        file_col = np.asarray(meta.column("file").to_pylist(), dtype=object)[order]
        files = sorted(set(file_col.tolist()))
        lookup = {f: i for i, f in enumerate(files)}
        file_pos = np.asarray([lookup[f] for f in file_col], dtype=np.int64)
        return cls(sset.uri, files, index.astype(np.int64), file_pos)


def open_selection(uri: str, storage: Storage, class_names: list[str], strengths: list[float] | None,
                   multiplier: float | None, filtered: bool, p: float) -> SyntheticSelection:
    """Open and check a synthetic set, read its metadata once; an empty selection with p > 0 is an error."""
    check_p(p)
    sset = SyntheticSet.open(uri, storage)
    sset.check_classes(class_names)
    selection = SyntheticSelection.from_set(sset, strengths, multiplier, filtered)
    if p > 0 and len(selection) == 0:
        raise ShardError(
            f"synthetic set {redact(uri)} has no rows left after selection (filtered={filtered}, "
            f"strengths={strengths}, multiplier={multiplier}, CLIP threshold={sset.threshold}); "
            f"p = {p} needs at least one"
        )
    log.info("synthetic set %s: %d selected rows in %d files", redact(uri), len(selection), len(selection.files))
    return selection


# --- per-batch transforms (run in Ray Data tasks) -----------------------------------------------
def _repeat(counts: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts)


def _empty(resolution: int, num_classes: int) -> dict[str, np.ndarray]:
    return {"x": np.zeros((0, resolution, resolution, 3), np.uint8), "y": np.zeros((0, num_classes), np.float32),
            "index": np.zeros(0, np.int64)}


@dataclass
class StreamSettings:
    """What the per-batch transforms need besides the rows."""

    num_classes: int
    resolution: int
    scale_min: float = 0.08
    hflip: bool = True
    gamma: float = 0.5
    data_cpus: float = 1.0
    rows_per_task: int = 64
    inline_rows: int = 0


def real_batch(batch: pa.Table, counts: np.ndarray, settings: StreamSettings,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Kept real rows (each as often as the plan uses it): augmented images (crops and flips drawn
    from `rng`), one-hot targets."""
    take = _repeat(counts[batch.column("pos").to_numpy()])
    if take.size == 0:
        return _empty(settings.resolution, settings.num_classes)
    rows = batch.take(pa.array(take))
    x = train_images(rows.column("image").to_pylist(), settings.resolution, settings.scale_min, settings.hflip,
                     rng, sources=rows.column("id").to_pylist())
    return {"x": x, "y": one_hot(rows.column("label").to_numpy(), settings.num_classes),
            "index": np.full(len(take), NO_SYNTHETIC, np.int64)}


def synthetic_batch(batch: pa.Table, selected_index: np.ndarray, counts: np.ndarray,
                    settings: StreamSettings, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Drawn synthetic rows (each as often as drawn): augmented images, soft targets computed here."""
    index = batch.column("index").to_numpy()
    if len(selected_index) == 0 or len(index) == 0:
        return _empty(settings.resolution, settings.num_classes)
    pos = np.minimum(np.searchsorted(selected_index, index), len(selected_index) - 1)
    take = _repeat(np.where(selected_index[pos] == index, counts[pos], 0))
    if take.size == 0:
        return _empty(settings.resolution, settings.num_classes)
    rows = batch.take(pa.array(take))
    x = train_images(rows.column("image").to_pylist(), settings.resolution, settings.scale_min, settings.hflip,
                     rng, sources=[f"synthetic row {i}" for i in rows.column("index").to_pylist()])
    y = synthetic_targets(rows.column("strategy").to_pylist(), rows.column("ref_label").to_pylist(),
                          rows.column("target_label").to_pylist(), rows.column("strength").to_pylist(),
                          settings.gamma, settings.num_classes)
    return {"x": x, "y": y.astype(np.float32), "index": rows.column("index").to_numpy().astype(np.int64)}


# one row per task: its real blocks, its shard files, and the seed of its augmentations
_WORK_SCHEMA = pa.schema([("blocks", pa.list_(pa.int64())), ("files", pa.list_(pa.string())), ("seed", pa.int64())])


def load_work(items: pa.Table, blocks: list[Any], real_counts: np.ndarray, storage: Storage,
              selected_index: np.ndarray, synthetic_counts: np.ndarray,
              settings: StreamSettings) -> dict[str, np.ndarray]:
    """One task: real blocks (from the object store) and shard files (from storage), decoded and labelled.

    The shard GETs start first and run while the real block decodes, so their latency is hidden.
    Augmentations draw from the task's own seed (from the epoch's generator), so a config gives the same
    crops and flips wherever and in whatever order its tasks run.
    """
    from concurrent.futures import ThreadPoolExecutor

    import ray

    wanted = selected_index[synthetic_counts > 0] if len(selected_index) else np.zeros(0, np.int64)
    work = list(zip(items.column("blocks").to_pylist(), items.column("files").to_pylist(),
                    items.column("seed").to_pylist()))
    outs = []
    with ThreadPoolExecutor(max_workers=1) as fetcher:
        fetches = [fetcher.submit(read_shards, files, storage, wanted) if files else None for _, files, _ in work]
        for (block_ids, _, seed), fetch in zip(work, fetches):
            rng = np.random.default_rng(seed)
            for b in block_ids:
                outs.append(real_batch(ray.get(blocks[b]), real_counts, settings, rng))
            if fetch is not None:
                outs.append(synthetic_batch(fetch.result(), selected_index, synthetic_counts, settings, rng))
    outs = [o for o in outs if len(o["x"])]
    if not outs:
        return _empty(settings.resolution, settings.num_classes)
    return {key: np.concatenate([o[key] for o in outs]) for key in outs[0]}


def eval_batch(batch: pa.Table, rank: int, world: int, group_ids: list[int], resolution: int,
               crop: float) -> dict[str, np.ndarray]:
    """This worker's share of the test rows: center-cropped images, labels, group positions."""
    keep = np.flatnonzero(batch.column("pos").to_numpy() % world == rank)
    rows = batch.take(pa.array(keep, type=pa.int64()))
    lookup = {g: i for i, g in enumerate(group_ids)}
    groups = [lookup.get(g, -1) if g is not None else -1 for g in rows.column("group").to_pylist()]
    x = eval_images(rows.column("image").to_pylist(), resolution, crop, sources=rows.column("id").to_pylist())
    return {"x": x, "label": rows.column("label").to_numpy().astype(np.int64),
            "group_pos": np.asarray(groups, np.int64)}


# --- the datasets ------------------------------------------------------------------------------
def synthetic_groups(selection: SyntheticSelection, share: WorkerShare, num_groups: int,
                     rng: np.random.Generator) -> list[list[str]]:
    """The shard files holding this share's drawn rows, in a fresh random order, dealt into at most
    `num_groups` groups of about equal drawn-row counts."""
    drawn = np.flatnonzero(share.synthetic_counts)
    if drawn.size == 0:
        return []
    per_file = np.bincount(selection.file_pos[drawn], weights=share.synthetic_counts[drawn],
                           minlength=len(selection.files))
    files = rng.permutation(np.flatnonzero(per_file))
    groups: list[list[str]] = [[] for _ in range(max(1, min(num_groups, len(files))))]
    load = np.zeros(len(groups))
    for f in files:  # greedy: each file to the group with the fewest drawn rows so far
        g = int(np.argmin(load))
        groups[g].append(selection.files[int(f)])
        load[g] += per_file[f]
    return groups


def epoch_dataset(blocks: list[Block], selection: SyntheticSelection, share: WorkerShare, storage: Storage,
                  settings: StreamSettings, rng: np.random.Generator):
    """One Ray Dataset for this worker's epoch, one operator: each task decodes one real block (from the
    object store) and, when there are synthetic draws, one group of shard files (from storage).

    Spreading the synthetic reads over the real blocks' tasks keeps the task count of a p = 0 epoch
    (task overhead dominates small images), spreads the GET latency, and mixes both kinds in every
    task's output. (A `read_parquet` stream would add seconds of per-epoch listing and planning.)
    Rows come out as x (uint8 NHWC), y (soft targets) and index (plan index; -1 for real rows), in task
    order whatever order the tasks finish in: the batches (and so the weights) follow from the seed alone.
    """
    import ray.data

    check_gamma(settings.gamma)
    real = [i for i, b in enumerate(blocks) if share.real_counts[b.start:b.end].any()]
    real = [real[i] for i in rng.permutation(len(real))]
    drawn_rows = int(share.synthetic_counts.sum())
    groups = synthetic_groups(selection, share, max(len(real), -(-drawn_rows // settings.rows_per_task)), rng)
    tasks = max(len(real), len(groups))
    seeds = rng.integers(0, 2**62, size=tasks)
    tables = [pa.table({"blocks": [real[t:t + 1]], "files": [groups[t] if t < len(groups) else []],
                        "seed": [int(seeds[t])]}, schema=_WORK_SCHEMA) for t in range(tasks)]
    if len(share) <= settings.inline_rows:
        return InlineEpoch(lambda: load_work(pa.concat_tables(tables), [b.ref for b in blocks], share.real_counts,
                                             storage, selection.index, share.synthetic_counts, settings))
    ds = ray.data.from_arrow(tables).map_batches(
        load_work, batch_format="pyarrow", batch_size=None, num_cpus=settings.data_cpus,
        fn_kwargs={"blocks": [b.ref for b in blocks], "real_counts": share.real_counts, "storage": storage,
                   "selected_index": selection.index, "synthetic_counts": share.synthetic_counts,
                   "settings": settings},
    )
    ds.context.execution_options.preserve_order = True  # this dataset's own copy of the process's context
    return ds


def eval_dataset(blocks: list[Block], rank: int, world: int, group_ids: list[int], resolution: int, crop: float,
                 data_cpus: float = 1.0, rows_per_task: int = 64, inline_rows: int = 0):
    import ray
    import ray.data

    if blocks and blocks[-1].end <= inline_rows:
        def decode_all() -> dict[str, np.ndarray]:
            table = pa.concat_tables([ray.get(b.ref) for b in blocks])
            return eval_batch(table, rank, world, group_ids, resolution, crop)
        return InlineEpoch(decode_all)
    return ray.data.from_arrow_refs([b.ref for b in blocks]).map_batches(
        eval_batch, batch_format="pyarrow", batch_size=rows_per_task, num_cpus=data_cpus,
        fn_kwargs={"rank": rank, "world": world, "group_ids": group_ids, "resolution": resolution, "crop": crop},
    )


# --- one epoch of batches ----------------------------------------------------------------------
class _Router:
    """Splits a stream of torch batches into real and synthetic rows, and takes any number of each."""

    def __init__(self, batches: Iterator[dict]) -> None:
        self.batches = batches
        self.pending: dict[bool, list[dict]] = {False: [], True: []}
        self.available = {False: 0, True: 0}

    def _pull(self) -> None:
        nxt = next(self.batches, None)
        if nxt is None:
            raise RuntimeError(f"the epoch stream ended early (buffered: {self.available})")
        synthetic = nxt["index"] != NO_SYNTHETIC
        for kind in (False, True):
            mask = synthetic if kind else ~synthetic
            n = int(mask.sum())
            if n:
                self.pending[kind].append({k: v[mask] for k, v in nxt.items()})
                self.available[kind] += n

    def take(self, k: int, synthetic: bool) -> dict | None:
        import torch

        if k == 0:
            return None
        while self.available[synthetic] < k:
            self._pull()
        parts = self.pending[synthetic]
        merged = {key: torch.cat([b[key] for b in parts]) for key in parts[0]} if len(parts) > 1 else parts[0]
        self.available[synthetic] -= k
        self.pending[synthetic] = [{key: v[k:] for key, v in merged.items()}] if self.available[synthetic] else []
        return {key: v[:k] for key, v in merged.items()}


def epoch_batches(share: WorkerShare, ds, batch_size: int, prefetch_batches: int = 2,
                  seed: int | None = None) -> Iterator[dict]:
    """Batches of `batch_size` rows (x uint8 NHWC, y soft targets, index), each with the plan's mix."""
    import torch

    total = int(share.real_counts.sum() + share.synthetic_counts.sum())
    buffer = min(total, 4 * batch_size)
    router = _Router(iter(ds.iter_torch_batches(
        batch_size=batch_size, prefetch_batches=prefetch_batches, device="cpu",
        local_shuffle_buffer_size=buffer if buffer > 1 else None, local_shuffle_seed=seed)))
    for n_real, n_syn in share.batch_mix(batch_size):
        parts = [b for b in (router.take(n_real, False), router.take(n_syn, True)) if b is not None]
        yield {key: torch.cat([b[key] for b in parts]) for key in parts[0]} if len(parts) > 1 else parts[0]
