"""Write small synthetic sets straight through the shard contract (tests and benchmarks).

Images are copies of real images (encoded bytes), so a set is valid input for the classifier
without running the diffusion model; labels and strengths follow the contract's columns.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pyarrow as pa

from engine.data.shards import CARD, MANIFEST, SHARD_SCHEMA, dataset_card, encode_table, part_name
from engine.storage import Storage, join


def write_synthetic_set(uri: str, storage: Storage, class_names: Sequence[str], images: Sequence[bytes],
                        labels: Sequence[int], num_rows: int, strengths: Sequence[float] = (0.5, 0.7, 0.9),
                        strategy: str = "diff-mix", rows_per_file: int = 64, num_train: int | None = None,
                        clip_threshold: float | None = None, seed: int = 0, run_length: int = 8,
                        row_group_bytes: int | None = None) -> dict:
    """Rows 0..num_rows-1 in plan order; strengths in runs of `run_length`; returns the manifest.

    `row_group_bytes` sets the files' row-group size as the sink's does (default: the sink's).
    The image of a row is a real image of its target class (when one exists), the reference one of
    another class; `clip_score` is uniform in [0, 1), so `clip_threshold` filters a known fraction.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.int64)
    by_class = {c: np.flatnonzero(labels == c) for c in range(len(class_names))}
    gen = strategy.endswith("-gen")
    cols: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    for i in range(num_rows):
        target = int(rng.integers(len(class_names)))
        ref = int(rng.integers(len(labels)))
        pool = by_class.get(target)
        img = images[int(rng.choice(pool))] if pool is not None and len(pool) else images[ref]
        cols["index"].append(i)
        cols["image"].append(img)
        cols["strategy"].append(strategy)
        cols["ref_id"].append(None if gen else f"real-{ref}")
        cols["ref_label"].append(None if gen else int(labels[ref]))
        cols["target_label"].append(target)
        cols["strength"].append(1.0 if gen else float(strengths[(i // run_length) % len(strengths)]))
        cols["seed"].append(seed * 1_000_003 + i)
        cols["prompt"].append(f"photo of a {class_names[target]}")
        cols["clip_score"].append(float(rng.random()))
    table = pa.table(cols, schema=SHARD_SCHEMA)
    files = []
    for start in range(0, num_rows, rows_per_file):
        end = min(start + rows_per_file, num_rows)
        name = part_name(start, end)
        storage.write_bytes(join(uri, name), encode_table(table.slice(start, end - start), class_names,
                                                                  **({} if row_group_bytes is None else
                                                                     {"row_group_bytes": row_group_bytes})))
        files.append({"name": name, "rows": end - start})
    manifest = {
        "class_names": list(class_names),
        "num_train": int(num_train if num_train is not None else len(labels)),
        "clip_threshold": clip_threshold,
        "files": files,
        "strategy": strategy,
        "strengths": sorted(set(float(s) for s in strengths)),
        "plan_hash": f"test-{seed}-{num_rows}-{'-'.join(str(s) for s in strengths)}",
        "num_rows": num_rows,
    }
    storage.write_text(join(uri, CARD), dataset_card(class_names, f"test set {manifest['plan_hash']}"))
    storage.write_text(join(uri, MANIFEST), json.dumps(manifest, indent=2))
    return manifest
