"""`diffmix evaluate`: a finished classifier on a second dataset (Diff-Mix Sec. 4.4: the CUB classifier on
Waterbirds), with per-group accuracy when that dataset has a `group` column.

The classifier is a classify run folder (`metrics.json` + Ray Train checkpoints under `train/`), local or
on object storage. Predictions are made by a Ray Data actor pool (`Predictor`: the model loaded once per
actor, images decoded and center-cropped there, as the classifier's own evaluation does); the driver only
sums small per-batch counts. A prediction is mapped to the second dataset's class names through
`evaluate.class_map` (classifier class -> evaluation class; by name when absent), so the same run can
score species (the official protocol: Waterbirds images keep their CUB species) or coarser labels
(species -> landbird / waterbird).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from engine.classify.metrics import EvalCounts, summarize
from engine.classify.train import METRICS_FILE, CHECKPOINT_FILE, absolute, output_uri
from engine.config import ExperimentConfig, validate
from engine.data import ImageDataset, load_dataset
from engine.ray_local import Needs, ensure_ray
from engine.storage import Storage, join, redact
from engine.weights import load_weights

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

log = logging.getLogger(__name__)


class EvaluateError(ValueError):
    """The classifier or the evaluation dataset cannot be used; the message names which and why."""


@dataclass(frozen=True)
class Classifier:
    """What evaluation needs of a classify run: its latest checkpoint and how it was trained."""

    uri: str
    checkpoint: str
    class_names: list[str]
    backbone: str
    resolution: int
    eval_crop: float
    epoch: int | None


def find_classifier(uri: str, storage: Storage) -> Classifier:
    """The classify run at `uri`: metrics.json (class names, settings) and its newest checkpoint."""
    metrics_uri = join(uri, METRICS_FILE)
    if not storage.exists(metrics_uri):
        raise EvaluateError(f"no finished classifier at {redact(uri)} (missing {METRICS_FILE}): run "
                            "`diffmix classify` first or point evaluate.classifier at a classify output folder")
    summary = json.loads(storage.read_text(metrics_uri))
    names = summary.get("class_names")
    if not names:
        raise EvaluateError(f"{redact(metrics_uri)} records no class_names (written before evaluate existed): "
                            "rerun `diffmix classify` for this run")
    checkpoints = sorted(f for f in storage.glob(join(uri, "train"), f"checkpoint_*/{CHECKPOINT_FILE}"))
    if not checkpoints:
        raise EvaluateError(f"classifier {redact(uri)} has no checkpoint under train/")
    # the actors load it again; refused here, the one line reaches the user (an actor's failed __init__ comes
    # back as Ray's ActorDiedError text)
    load_weights(storage.read_bytes(checkpoints[-1]), checkpoints[-1], EvaluateError, map_location="meta")
    cls = summary["classify"]
    return Classifier(uri, checkpoints[-1], list(names), cls["backbone"], int(cls["resolution"]),
                      float(cls["eval_crop"]), (summary.get("metrics") or {}).get("epoch"))


def label_lookup(classifier_names: list[str], eval_names: list[str], class_map: dict[str, str] | None) -> np.ndarray:
    """For each classifier class, the evaluation class its predictions count as (-1: none)."""
    mapping = dict(class_map) if class_map else {n: n for n in classifier_names}
    unknown = sorted(set(mapping) - set(classifier_names))
    if unknown:
        raise EvaluateError(f"evaluate.class_map names classes the classifier does not have: {unknown[:5]}")
    targets = sorted(set(mapping.values()) - set(eval_names))
    if class_map and targets:
        raise EvaluateError(f"evaluate.class_map maps to classes the evaluation dataset does not have: {targets[:5]}")
    missing = sorted(set(eval_names) - set(mapping.values()))
    if missing:
        raise EvaluateError(f"evaluation classes {missing[:5]} are not among the classifier's classes "
                            f"({classifier_names[:3]}...): give evaluate.class_map")
    index = {n: i for i, n in enumerate(eval_names)}
    return np.asarray([index.get(mapping.get(n, ""), -1) for n in classifier_names], dtype=np.int64)


class Predictor:
    """Ray Data actor: loads the classifier once, returns each row's predicted classifier class."""

    def __init__(self, classifier: Classifier, storage: Storage) -> None:
        import torch

        from engine.classify.models import build_model

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        state = load_weights(storage.read_bytes(classifier.checkpoint), classifier.checkpoint, EvaluateError)
        self.model = build_model(classifier.backbone, len(classifier.class_names), classifier.resolution)
        self.model.load_state_dict(state["model"])
        self.model.to(self.device).eval()
        self.classifier = classifier

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        import torch

        from engine.classify.augment import eval_images, to_model_input

        c = self.classifier
        x = eval_images(batch.column("image").to_pylist(), c.resolution, c.eval_crop,
                        sources=batch.column("id").to_pylist())
        with torch.no_grad():
            logits = self.model(to_model_input(torch.from_numpy(x).to(self.device)))
        groups = [-1 if g is None else int(g) for g in batch.column("group").to_pylist()]
        return {"pred": logits.argmax(dim=1).cpu().numpy().astype(np.int64),
                "label": batch.column("label").to_numpy().astype(np.int64), "group": np.asarray(groups, np.int64)}


def eval_splits(split: str) -> list[str]:
    return ["train", "test"] if split == "all" else [split]


def eval_rows(ds: ImageDataset, split: str) -> "ray.data.Dataset":
    """The rows to evaluate (id, image, label, group); for a dataset on storage, workers read the images."""
    parts = [ds.to_ray(s) for s in eval_splits(split)]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def resource_needs(config: ExperimentConfig) -> Needs:
    ev = config.evaluate
    return Needs(cpu=ev.cpus_per_actor + 1, gpu=ev.num_gpus_per_actor, what="evaluate",
                 keys="evaluate.cpus_per_actor (+1 for the read task); GPUs: evaluate.num_gpus_per_actor")


def evaluation_dataset(config: ExperimentConfig, storage: Storage) -> ImageDataset:
    if config.evaluate.dataset is None:
        raise EvaluateError("evaluate.dataset is not set: name the dataset to evaluate on (e.g. Waterbirds)")
    data = config.model_dump(mode="json")
    data["dataset"] = config.evaluate.dataset.model_dump(mode="json")
    return load_dataset(validate(data), storage, apply_subset=False, for_training=False)


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Evaluate the configured classifier on `evaluate.dataset`; writes and returns the metrics."""
    from ray.data import ActorPoolStrategy

    t0 = time.perf_counter()
    ev = config.evaluate
    storage = Storage.from_config(config)
    classifier = find_classifier(absolute(ev.classifier) if ev.classifier else output_uri(config), storage)
    ds = evaluation_dataset(config, storage)
    lookup = label_lookup(classifier.class_names, ds.class_names, ev.class_map)
    index = pa.concat_tables([ds.index(s).select(["id", "label", "group"]) for s in eval_splits(ev.split)])
    group_ids = sorted({int(g) for g in index.column("group").to_pylist() if g is not None})
    ensure_ray(resource_needs(config), config=config)
    rows = eval_rows(ds, ev.split).map_batches(
        Predictor, batch_format="pyarrow", batch_size=ev.batch_size,
        compute=ActorPoolStrategy(min_size=1, max_size=ev.max_actors), num_cpus=ev.cpus_per_actor,
        num_gpus=ev.num_gpus_per_actor, fn_constructor_kwargs={"classifier": classifier, "storage": storage})
    counts = EvalCounts.zeros(len(ds.class_names), len(group_ids))
    position = {g: i for i, g in enumerate(group_ids)}
    for batch in rows.iter_batches(batch_format="numpy", batch_size=None):
        groups = np.asarray([position.get(int(g), -1) for g in batch["group"]], np.int64)
        counts.add(lookup[batch["pred"]], batch["label"], groups)
    metrics = {k: v for k, v in summarize(counts, group_ids).items() if v is not None}
    out = ev.output or join(config.run.uri, "evaluate", config.hash("run", "dataset", "classify", "evaluate"))
    summary = {"classifier": redact(classifier.uri), "checkpoint": redact(classifier.checkpoint),
               "classifier_epoch": classifier.epoch, "dataset": ds.name, "split": ev.split,
               "images": int(index.num_rows), "classes": len(ds.class_names), "groups": group_ids,
               "class_map": bool(ev.class_map), "metrics": metrics, "elapsed_s": round(time.perf_counter() - t0, 2)}
    storage.write_text(join(out, "metrics.json"), json.dumps(summary, indent=2))
    log.info("evaluate: top1 %.4f on %d images of %s (%s)%s -> %s", metrics["top1"], index.num_rows, ds.name,
             ev.split, "".join(f", {k} {v:.4f}" for k, v in metrics.items() if k != "top1"),
             redact(join(out, "metrics.json")))
    return {**summary, "output": redact(out)}
