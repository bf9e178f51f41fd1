"""`diffmix check`: a cheap preflight of a config before any expensive stage runs.

Validates the config, loads the dataset (so bad images and labels surface now), resolves the base
models (building tiny ones offline, copying s3:// ones into the node cache) and proves the output
storage is writable. Returns a summary a user can read before launching a cluster job.
"""
from __future__ import annotations

import logging
import time

from engine.config import ExperimentConfig
from engine.data import load_dataset
from engine.models.base import ModelRef
from engine.ray_local import join_checked
from engine.storage import Storage, join, redact

log = logging.getLogger(__name__)


def run(config: ExperimentConfig) -> dict:
    join_checked(config)  # on a cluster of several nodes, local paths must be a shared mount
    storage = Storage.from_config(config)
    t0 = time.perf_counter()
    ds = load_dataset(config, storage)
    base = ModelRef.from_config(config, "sd", ds.class_names, ds.metaclass).resolve(storage)
    clip = ModelRef.from_config(config, "clip", ds.class_names, ds.metaclass).resolve(storage)
    probe = join(config.run.uri, ".check")
    storage.write_text(probe, "ok")
    storage.remove(probe)
    counts = ds.class_counts("train")
    summary = {
        "run": redact(config.run.uri),
        "dataset": ds.name,
        "metaclass": ds.metaclass,
        "classes": len(ds.class_names),
        "train_images": int(ds.rows("train").num_rows),  # counts from the index: no image read into the driver
        "test_images": int(ds.rows("test").num_rows),
        "train_per_class": {"min": int(counts.min()), "max": int(counts.max())},
        "skipped_bad_images": ds.skipped,
        "fingerprint": ds.fingerprint(),
        "base_model": base,
        "clip_model": clip,
        "config_hash": config.hash(),
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    log.info("check ok: %d classes, %d train / %d test images; outputs go to %s",
             summary["classes"], summary["train_images"], summary["test_images"], summary["run"])
    return summary
