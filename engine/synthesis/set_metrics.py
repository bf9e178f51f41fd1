"""Synthetic-set metrics: how far a synthetic set sits from the real train set, and how varied it is.

- `clip_frechet`: the Fréchet distance between Gaussians fitted to the image embeddings of the configured
  CLIP model (ViT-B/32 on clusters, the tiny CLIP in tests): the paper's FID comparison (Table 5,
  Diff-Gen vs Diff-Mix) in a feature space that needs no extra weights.
- `inception_fid`: the same with Inception-v3 pool features, when `metrics.inception_weights` points at a
  local (or object-storage) torchvision `inception_v3` state dict; never downloaded. torchvision's weights
  are not the TF-ported ones of pytorch-fid / the paper's tools, so compare these numbers with each other,
  not with published FIDs.
- `diversity`: per class, the mean pairwise cosine distance of the CLIP embeddings (1 - mean cosine
  similarity over pairs); reported for the synthetic set and the real set (mean over classes), per class
  for the synthetic set.

Features are computed by a Ray Data actor pool (`SetFeatures`: the models loaded once per actor) over the
real train rows and over the synthetic shards (read by tasks, the CLIP filter applied there); the driver
folds each batch into sums (`Moments`: count, sum, sum of outer products, per-class sums of unit vectors),
so its memory stays at a few D x D matrices however large the set. The Fréchet distance uses scipy's
matrix square root; streams keep input order, so a config gives the same figures bit for bit.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.config import ExperimentConfig
from engine.data.images import decode
from engine.data.shards import SyntheticSet, complete_sets
from engine.ray_local import Needs
from engine.storage import Storage, join, redact
from engine.synthesis.translate import ModelRef
from engine.weights import load_weights

log = logging.getLogger(__name__)

INCEPTION_SIZE = 299


class MetricsError(ValueError):
    """A set or a feature model cannot be measured; the message names which."""


# --- the maths (driver side) ---------------------------------------------------------------------
@dataclass
class Moments:
    """Running sums of one set's features: enough for its mean, covariance and per-class diversity."""

    dim: int
    num_classes: int
    n: int = 0
    total: np.ndarray = field(init=False)
    outer: np.ndarray = field(init=False)
    class_n: np.ndarray = field(init=False)
    class_unit: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.total = np.zeros(self.dim)
        self.outer = np.zeros((self.dim, self.dim))
        self.class_n = np.zeros(self.num_classes, dtype=np.int64)
        self.class_unit = np.zeros((self.num_classes, self.dim))

    def add(self, features: np.ndarray, labels: np.ndarray) -> None:
        x = np.asarray(features, dtype=np.float64)
        self.n += len(x)
        self.total += x.sum(axis=0)
        self.outer += x.T @ x
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        np.add.at(self.class_unit, np.asarray(labels, dtype=np.int64), unit)
        self.class_n += np.bincount(labels, minlength=self.num_classes)

    def mean(self) -> np.ndarray:
        return self.total / self.n

    def cov(self) -> np.ndarray:
        """Sample covariance (ddof = 1), as numpy's np.cov and the FID tools use."""
        if self.n < 2:
            raise MetricsError(f"a covariance needs at least 2 images, got {self.n}")
        mu = self.mean()
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def diversity(self) -> np.ndarray:
        """Per class: 1 - mean cosine similarity over distinct pairs (NaN for classes with < 2 images).

        The sum over pairs i != j of u_i . u_j is |sum u|^2 - n for unit vectors u."""
        n = self.class_n.astype(np.float64)
        pairs = n * (n - 1)
        sims = (np.einsum("cd,cd->c", self.class_unit, self.class_unit) - n)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(pairs > 0, 1.0 - sims / np.where(pairs > 0, pairs, 1.0), np.nan)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^1/2), the FID formula (scipy's matrix square root; a tiny
    ridge when the product is singular, as pytorch-fid does)."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        ridge = np.eye(len(mu1)) * 1e-6
        covmean = linalg.sqrtm((cov1 + ridge) @ (cov2 + ridge))
    covmean = np.real(covmean)
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean), 0.0))


# --- feature models (actor side) -----------------------------------------------------------------
def decode_rgb(blobs: list[bytes]) -> list[Any]:
    """RGB images through the engine's one decoder (an undecodable or oversized image is a BadImageError)."""
    return [decode(b, "synthetic or real image in a set-metrics batch") for b in blobs]


def load_inception(uri: str, storage: Storage, device: Any) -> Any:
    """torchvision Inception-v3 from a local or storage state dict, its classifier removed (2048-d pool)."""
    import torch
    from torchvision.models import inception_v3

    try:
        state = load_weights(storage.read_bytes(uri), f"metrics.inception_weights {uri}", MetricsError)
    except FileNotFoundError:
        raise MetricsError(f"metrics.inception_weights: {redact(uri)} does not exist") from None
    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MetricsError(f"metrics.inception_weights: {redact(uri)} is not a torchvision inception_v3 "
                           f"state dict ({str(exc).splitlines()[0]})") from None
    model.fc = torch.nn.Identity()
    return model.eval().to(device)


class SetFeatures:
    """Ray Data actor: `source` + `image` + `label` rows in, `source` + `label` + CLIP (and Inception) features
    out. Each block is one unit (a shard file's kept rows, or a fixed slice of the real rows) cut into
    sub-batches from its start, so a row's features never depend on how Ray Data grouped the blocks."""

    def __init__(self, clip: ModelRef, storage: Storage, inception_weights: str | None, batch_size: int) -> None:
        import torch

        from engine.models import load_clip, pick_device_dtype

        self.device, self.dtype = pick_device_dtype()
        self.clip, self.processor = load_clip(clip.resolve(storage), device=self.device, dtype=self.dtype)
        self.inception = load_inception(inception_weights, storage, self.device) if inception_weights else None
        self.batch_size = batch_size
        self.torch = torch

    def clip_features(self, images: list[Any]) -> np.ndarray:
        torch = self.torch
        pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self.clip.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 / 5
        return out.float().cpu().numpy()

    def inception_features(self, images: list[Any]) -> np.ndarray:
        from engine.classify.augment import to_model_input

        torch = self.torch
        x = np.stack([np.asarray(im.resize((INCEPTION_SIZE, INCEPTION_SIZE), resample=2)) for im in images])
        with torch.inference_mode():
            out = self.inception(to_model_input(torch.from_numpy(x).to(self.device)))
        return out.float().cpu().numpy()

    def features(self, blobs: list[bytes]) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {"clip": [], "inception": []}
        for lo in range(0, len(blobs), self.batch_size):
            images = decode_rgb(blobs[lo: lo + self.batch_size])
            parts["clip"].append(self.clip_features(images))
            if self.inception is not None:
                parts["inception"].append(self.inception_features(images))
        return {k: np.concatenate(v) for k, v in parts.items() if v}

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        out = {"source": batch.column("source").to_numpy().astype(np.int8),
               "label": batch.column("label").to_numpy().astype(np.int64)}
        if batch.num_rows:
            out.update(self.features(batch.column("image").to_pylist()))
        return out


def read_kept(batch: pa.Table, storage: Storage, threshold: float | None) -> pa.Table:
    """One task per shard file: the rows the CLIP filter keeps, as synthetic (source 1) image + label rows."""
    (uri,) = batch.column("file").to_pylist()
    t = pq.read_table(io.BytesIO(storage.read_bytes(uri)), columns=["image", "target_label", "clip_score"])
    if threshold is not None:
        t = t.filter(pc.greater_equal(t.column("clip_score"), threshold))
    return pa.table({"source": pa.array(np.ones(t.num_rows, np.int8)), "image": t.column("image"),
                     "label": t.column("target_label").cast(pa.int64())})


# --- the job -------------------------------------------------------------------------------------
@dataclass
class SetMoments:
    clip: Moments
    inception: Moments | None = None

    def add(self, batch: dict[str, np.ndarray], pick: np.ndarray) -> None:
        self.clip.add(batch["clip"][pick], batch["label"][pick])
        if self.inception is not None:
            self.inception.add(batch["inception"][pick], batch["label"][pick])


@contextlib.contextmanager
def preserved_order() -> Iterator[None]:
    """Streams started inside keep input order (so the float sums are the same every run); restored after,
    so a synthesis stream started later in this process keeps its own setting."""
    import ray.data

    options = ray.data.DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = before


def real_blocks(train: pa.Table, rows: int) -> list[pa.Table]:
    """The real train rows as source-0 blocks of `rows` rows (fixed cuts, so fixed sub-batches)."""
    table = pa.table({"source": pa.array(np.zeros(train.num_rows, np.int8)), "image": train.column("image"),
                      "label": train.column("label").cast(pa.int64())})
    return [table.slice(lo, rows) for lo in range(0, table.num_rows, rows)]


SYNTHETIC, REAL = 1, 0


def measure(config: ExperimentConfig, clip: ModelRef, storage: Storage, num_classes: int,
            sset: SyntheticSet | None, train: pa.Table | None) -> dict[int, SetMoments]:
    """One Ray Data job over the synthetic set's kept rows and/or the real train rows; the sums by source.
    One job for both, so the feature actors start once."""
    import ray.data
    from ray.data import ActorPoolStrategy

    m = config.metrics
    out: dict[int, SetMoments] = {}
    with preserved_order():  # Ray Data takes the context when a dataset is made: make them inside
        parts = []
        if sset is not None:
            files = ray.data.from_items([{"file": f} for f in sset.files()], override_num_blocks=len(sset.files()))
            parts.append(files.map_batches(read_kept, batch_format="pyarrow", batch_size=1,
                                           num_cpus=m.cpus_per_task, fn_kwargs={
                                               "storage": storage, "threshold": sset.threshold if m.filtered else None}))
        if train is not None:
            parts.append(ray.data.from_arrow(real_blocks(train, m.batch_size)))
        rows = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        features = rows.map_batches(
            SetFeatures, batch_format="pyarrow", batch_size=None,
            compute=ActorPoolStrategy(min_size=1, max_size=m.max_actors), num_cpus=m.cpus_per_actor,
            num_gpus=m.num_gpus_per_actor,
            fn_constructor_kwargs={"clip": clip, "storage": storage, "inception_weights": m.inception_weights,
                                   "batch_size": m.batch_size})
        for batch in features.iter_batches(batch_format="numpy", batch_size=None):
            for source in np.unique(batch["source"]).tolist():
                if source not in out:
                    out[source] = SetMoments(Moments(batch["clip"].shape[1], num_classes), Moments(
                        batch["inception"].shape[1], num_classes) if "inception" in batch else None)
                out[source].add(batch, batch["source"] == source)
    for source, wanted, what in ((SYNTHETIC, sset is not None, "the synthetic set"),
                                 (REAL, train is not None, "the real train set")):
        if wanted and (source not in out or out[source].clip.n < 2):
            raise MetricsError(f"{what} has fewer than 2 images to measure")
    return out


def compare(real: SetMoments, synthetic: SetMoments, class_names: list[str]) -> dict[str, Any]:
    """The figures written into a manifest and the report."""
    syn_div, real_div = synthetic.clip.diversity(), real.clip.diversity()
    out: dict[str, Any] = {
        "images": {"synthetic": synthetic.clip.n, "real": real.clip.n},
        "clip_frechet": frechet_distance(synthetic.clip.mean(), synthetic.clip.cov(), real.clip.mean(), real.clip.cov()),
        "diversity": {"synthetic": _nanmean(syn_div), "real": _nanmean(real_div),
                      "per_class": {n: (None if np.isnan(v) else float(v)) for n, v in zip(class_names, syn_div)}},
    }
    if synthetic.inception is not None and real.inception is not None:
        out["inception_fid"] = frechet_distance(synthetic.inception.mean(), synthetic.inception.cov(),
                                                real.inception.mean(), real.inception.cov())
    return out


def _nanmean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def resource_needs(config: ExperimentConfig) -> Needs:
    m = config.metrics
    return Needs(cpu=m.cpus_per_actor + m.cpus_per_task, gpu=m.num_gpus_per_actor, what="set metrics",
                 keys="metrics.cpus_per_actor (one feature actor) + metrics.cpus_per_task (a shard read); "
                      "GPUs: metrics.num_gpus_per_actor")


def check_weights(config: ExperimentConfig, storage: Storage) -> None:
    """Before any work: a named Inception file that is not there is an error now, not after synthesis."""
    uri = config.metrics.inception_weights
    if uri and not storage.exists(uri):
        raise MetricsError(f"metrics.inception_weights: {redact(uri)} does not exist (a torchvision "
                           "inception_v3 state dict, e.g. inception_v3_google-0cc3c7bd.pth; it is never downloaded)")


def metrics_identity(config: ExperimentConfig, clip: ModelRef) -> dict[str, Any]:
    """What the figures depend on besides the two sets: a manifest whose identity differs is measured again."""
    return {"clip": redact(clip.spec), "inception_weights": redact(config.metrics.inception_weights or "") or None,
            "filtered": config.metrics.filtered}


def measure_set(config: ExperimentConfig, sset: SyntheticSet, train: pa.Table, clip: ModelRef, storage: Storage,
                real: SetMoments | None = None) -> tuple[dict[str, Any], SetMoments]:
    """One set against the real train rows (`real` reuses the real set's sums); returns (figures, real sums)."""
    t0 = time.perf_counter()
    sums = measure(config, clip, storage, len(sset.class_names), sset, None if real else train)
    real = real or sums[REAL]
    figures = compare(real, sums[SYNTHETIC], sset.class_names)
    figures.update(metrics_identity(config, clip), elapsed_s=round(time.perf_counter() - t0, 2))
    log.info("set metrics %s: CLIP Frechet %.4g, diversity %.3f (real %.3f)%s", redact(sset.uri),
             figures["clip_frechet"], figures["diversity"]["synthetic"] or float("nan"),
             figures["diversity"]["real"] or float("nan"),
             f", Inception FID {figures['inception_fid']:.4g}" if "inception_fid" in figures else "")
    return figures, real


# the real train set's sums by what they depend on: the sets a process makes one after another (the demo,
# a pipeline, a sweep's strength sets) measure the real images once
_REAL_SUMS: dict[tuple[Any, ...], SetMoments] = {}


def measure_cached(config: ExperimentConfig, sset: SyntheticSet, dataset: Any, clip: ModelRef,
                   storage: Storage) -> dict[str, Any]:
    """`measure_set` with the real set's sums kept for the next set of the same dataset and models."""
    m = config.metrics
    key = (dataset.fingerprint(), clip, m.inception_weights, m.batch_size)
    figures, _REAL_SUMS[key] = measure_set(config, sset, dataset.train, clip, storage, _REAL_SUMS.get(key))
    return figures


def brief(figures: dict[str, Any] | None) -> dict[str, Any]:
    """A set's figures for a summary line: the diversity as two numbers, no per-class table."""
    if not figures:
        return {}
    out = {k: v for k, v in figures.items() if k != "diversity"}
    return {**out, "diversity": figures["diversity"]["synthetic"], "real_diversity": figures["diversity"]["real"]}


def set_folders(config: ExperimentConfig, storage: Storage) -> list[str]:
    """`metrics.sets`, else every complete set under `<run>/synthetic/`."""
    if config.metrics.sets:
        return list(config.metrics.sets)
    root = join(config.run.uri, "synthetic")
    found = complete_sets(root, storage)
    if not found:
        raise MetricsError(f"no synthetic set under {redact(root)}: set metrics.sets or run `diffmix synthesize`")
    return found


def run(config: ExperimentConfig) -> dict[str, Any]:
    """`diffmix compare-sets`: every listed set against the real train set, in one table (the paper's Table 5
    FID comparison); each set's manifest gains its figures; writes `<run>/set-metrics/<hash>.json`."""
    from engine.data import load_dataset
    from engine.ray_local import ensure_ray, join_checked
    from engine.synthesis.manifest import write_manifest

    join_checked(config)
    storage = Storage.from_config(config)
    check_weights(config, storage)
    folders = set_folders(config, storage)
    sets = [SyntheticSet.open(f, storage) for f in folders]
    dataset = load_dataset(config, storage)
    for s in sets:
        s.check_classes(dataset.class_names)
    clip = ModelRef.from_config(config, "clip", dataset.class_names, dataset.metaclass)
    ensure_ray(resource_needs(config), config=config)
    rows, real = [], None
    for sset in sets:
        figures, real = measure_set(config, sset, dataset.train, clip, storage, real)
        manifest = {k: v for k, v in sset.manifest.items() if k not in ("manifest_version", "written_at")}
        write_manifest(storage, sset.uri, {**manifest, "set_metrics": figures})
        rows.append({"set": redact(sset.uri), "strategy": sset.manifest.get("strategy"),
                     "strengths": sset.manifest.get("strengths"), **figures})
    out = join(config.run.uri, "set-metrics", config.hash("run", "dataset", "model", "metrics") + ".json")
    storage.write_text(out, json.dumps(rows, indent=2))
    for r in rows:
        log.info("%-12s %-18s CLIP Frechet %10.4g  diversity %.3f%s", r["strategy"], r["strengths"],
                 r["clip_frechet"], r["diversity"]["synthetic"] or float("nan"),
                 f"  Inception FID {r['inception_fid']:.4g}" if "inception_fid" in r else "")
    return {"output": redact(out), "sets": [brief(r) for r in rows]}
