"""`diffmix export`: a finished synthetic set out of the engine, for training code that reads image folders
or WebDataset shards (timm scripts, torchvision `ImageFolder`, `webdataset` loaders).

The rows are the ones a classifier would read (CLIP-filtered by default, an optional strength subset and
plan prefix), chosen on the driver from the set's metadata (no images). Ray tasks then read the shard files
they need and write:

- `imagefolder`: `<output>/<target class folder>/<plan index>.png`, plus `labels.jsonl` (one line per image: its
  path, plan index, strategy, strength, target and reference class and soft label for `export.gamma`). A class's
  folder is its name where that is a safe folder name, else a safe, unique one (engine.data.classnames:
  "T-shirt/top" -> "T-shirt_top"); `export.json` records every class's folder;
- `webdataset`: `<output>/shard-NNNNNN.tar`, `export.shard_rows` samples each, every sample a `<key>.png`
  and a `<key>.json` holding the same fields as a labels line.

Every file is written whole (one PUT / temp + rename), so a retried task rewrites the same names; `export.json`
is written last and says the export is complete.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

from engine.config import ExperimentConfig
from engine.data.classnames import ClassNameError, folder_names
from engine.data.shards import ShardError, SyntheticSet, read_shards, soft_labels
from engine.ray_local import Needs
from engine.storage import Storage, join, redact

log = logging.getLogger(__name__)

DONE_FILE = "export.json"
LABELS_FILE = "labels.jsonl"


def sample_key(index: int) -> str:
    return f"{index:08d}"


def label_records(rows: pa.Table, class_names: list[str], gamma: float) -> list[dict[str, Any]]:
    """What each exported image carries besides its pixels: where it came from and its soft label."""
    cols = {c: rows.column(c).to_pylist() for c in ("index", "strategy", "ref_label", "target_label", "strength")}
    targets = soft_labels(cols["strategy"], cols["ref_label"], cols["target_label"], cols["strength"], gamma,
                          len(class_names))
    return [label_record({c: v[i] for c, v in cols.items()}, targets[i], class_names) for i in range(rows.num_rows)]


def label_record(row: dict[str, Any], target: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    ref = row["ref_label"]
    return {"index": int(row["index"]), "strategy": row["strategy"], "strength": float(row["strength"]),
            "target": class_names[int(row["target_label"])], "reference": None if ref is None else class_names[ref],
            "soft_label": {class_names[c]: round(float(target[c]), 6) for c in np.flatnonzero(target)}}


def export_unit(batch: pa.Table, storage: Storage, output: str, fmt: str, class_names: list[str],
                gamma: float, folders: list[str] | None = None) -> pa.Table:
    """One Ray task: one work unit (its shard files, its plan indices) -> image files (in `folders`, one per
    class, from `class_folders`) or one tar shard."""
    (files,), (indices,), (unit,) = (batch.column(c).to_pylist() for c in ("files", "indices", "unit"))
    rows = read_shards(files, storage, np.asarray(indices, dtype=np.int64)).sort_by("index")
    records = label_records(rows, class_names, gamma)
    images = rows.column("image").to_pylist()
    lines = []
    if fmt == "imagefolder":
        folders = folders or class_folders(class_names)
        for rec, label, image in zip(records, rows.column("target_label").to_pylist(), images):
            path = f"{folders[label]}/{sample_key(rec['index'])}.png"
            storage.write_bytes(join(output, path), image)
            lines.append(json.dumps({"path": path, **rec}))
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for rec, image in zip(records, images):
                for name, data in ((f"{sample_key(rec['index'])}.png", image),
                                   (f"{sample_key(rec['index'])}.json", json.dumps(rec).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        storage.write_bytes(join(output, f"shard-{unit:06d}.tar"), buf.getvalue())
    return pa.table({"unit": [unit], "rows": [len(records)], "lines": ["\n".join(lines)]})


def class_folders(class_names: list[str]) -> list[str]:
    """Each class's folder in an image-folder export: never a path outside the export, one folder per class."""
    try:
        return folder_names(class_names)
    except ClassNameError as exc:
        raise ShardError(f"export: {exc}") from None


def work_units(selection: pa.Table, rows_per_unit: int) -> list[dict[str, Any]]:
    """Consecutive plan rows in groups of `rows_per_unit`, each with the shard files that hold them."""
    order = np.argsort(selection.column("index").to_numpy(), kind="stable")
    index = selection.column("index").to_numpy()[order]
    files = np.asarray(selection.column("file").to_pylist(), dtype=object)[order]
    return [{"unit": u, "indices": index[lo:lo + rows_per_unit].tolist(),
             "files": sorted(set(files[lo:lo + rows_per_unit].tolist()))}
            for u, lo in enumerate(range(0, len(index), rows_per_unit))]


def resource_needs(config: ExperimentConfig) -> Needs:
    return Needs(cpu=config.export.cpus_per_task, what="export", keys="export.cpus_per_task")


def set_uri(config: ExperimentConfig, storage: Storage) -> str:
    from engine.classify.train import absolute, resolve_synthetic

    return absolute(config.export.synthetic) if config.export.synthetic else resolve_synthetic(config, storage)


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Export the selected rows of a finished synthetic set; returns (and writes as export.json) a summary."""
    import ray.data

    from engine.data.epochs import ordered
    from engine.ray_local import ensure_ray

    t0 = time.perf_counter()
    ex = config.export
    storage = Storage.from_config(config)
    if not ex.output:
        raise ShardError("export.output is not set: name the folder (any URI) to export to")
    uri = set_uri(config, storage)
    sset = SyntheticSet.open(uri, storage)
    gamma = config.classify.gamma if ex.gamma is None else ex.gamma
    selection = sset.read(strengths=ex.strengths, multiplier=ex.multiplier, filtered=ex.filtered, with_file=True)
    if selection.num_rows == 0:
        raise ShardError(f"synthetic set {redact(uri)}: no rows left to export (filtered={ex.filtered}, "
                         f"strengths={ex.strengths}, multiplier={ex.multiplier})")
    units = work_units(selection, ex.shard_rows if ex.format == "webdataset" else ex.rows_per_task)
    folders = class_folders(sset.class_names) if ex.format == "imagefolder" else None
    ensure_ray(resource_needs(config), config=config)
    ordered()
    log.info("export: %d rows of %s as %s in %d tasks -> %s", selection.num_rows, redact(uri), ex.format,
             len(units), redact(ex.output))
    out = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        export_unit, batch_format="pyarrow", batch_size=1, num_cpus=ex.cpus_per_task,
        fn_kwargs={"storage": storage, "output": ex.output, "fmt": ex.format, "class_names": sset.class_names,
                   "gamma": gamma, "folders": folders})
    done = out.take_all()
    written = sum(int(d["rows"]) for d in done)
    if ex.format == "imagefolder":
        lines = [d["lines"] for d in sorted(done, key=lambda d: d["unit"]) if d["lines"]]
        storage.write_text(join(ex.output, LABELS_FILE), "\n".join(lines) + "\n")
    summary = {"output": redact(ex.output), "format": ex.format, "set": redact(uri),
               "plan_hash": sset.manifest.get("plan_hash"), "rows": written, "files": len(units),
               "filtered": ex.filtered, "strengths": ex.strengths, "multiplier": ex.multiplier, "gamma": gamma,
               "class_names": sset.class_names, "elapsed_s": round(time.perf_counter() - t0, 2)}
    if folders is not None:
        summary["class_folders"] = dict(zip(sset.class_names, folders))
    storage.write_text(join(ex.output, DONE_FILE), json.dumps(summary, indent=1))
    log.info("export: %d images -> %s (%s)", written, redact(ex.output), ex.format)
    return summary
