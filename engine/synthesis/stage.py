"""`diffmix synthesize`: plan -> Ray Data stream (references -> Translator pool -> ClipScorer pool -> sink)
-> filter threshold -> manifest. Resumable and exactly-once (DESIGN.md, "Exactly once, resumable").

On start the job reads the `index` column of the files already committed in its output folder and
streams only the missing windows; the manifest is written last. Stages run on the cluster; the
driver holds the dataset, the plan metadata and one small stats row per file, never images.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from engine import ray_local
from engine.config import ExperimentConfig
from engine.data import ImageDataset, load_dataset
from engine.data.shards import CARD, SyntheticSet, dataset_card
from engine.rates import rate, rate_note
from engine.errors import raise_original_errors, surfaced
from engine.models.sampler import sampler_identity
from engine.models.settings import model_settings
from engine.ray_local import Needs
from engine.storage import Storage, StorageError, join, redact
from engine.watchdog import Watchdog, free_resources, labels_for
from engine.synthesis import set_metrics
from engine.synthesis.filter import clip_threshold, kept_mask
from engine.synthesis.manifest import (LEGACY_FILES, PLAN_FILE, claim_output, read_manifest, retire_legacy,
                                      speed_record, versions, write_manifest)
from engine.synthesis.plan import PlanSpec, build_plan, is_gen, plain_prompts, uses_adapter
from engine.synthesis.references import check_references, load_references, reference_table
from engine.synthesis.score import ClipScorer
from engine.synthesis.sink import FileStats, read_committed, stats_from_rows, write_windows
from engine.synthesis.speed import SpeedOptions
from engine.synthesis.translate import ModelRef, SynthesisError, TranslateParams, Translator
from engine.synthesis.windows import make_windows, stream_row

log = logging.getLogger(__name__)
_SMALL_FILE = 1 << 20


# --- inputs ------------------------------------------------------------------------------------

def adapter_uri(config: ExperimentConfig) -> str:
    return config.synthesis.adapter or config.finetune.output or join(config.run.uri, "adapter")


@dataclass(frozen=True)
class AdapterRef:
    uri: str
    digest: str
    prompts: list[str]


def read_adapter(config: ExperimentConfig, storage: Storage, ds: ImageDataset) -> AdapterRef:
    """The fine-tuned adapter of a diff-* job, checked before any Ray work."""
    uri = adapter_uri(config)
    if not storage.exists(join(uri, "adapter.json")):
        raise SynthesisError(
            f"no fine-tuned adapter at {redact(uri)} (missing adapter.json): strategy "
            f"{config.synthesis.strategy!r} needs one. Run `diffmix finetune` first, point synthesis.adapter "
            "at an artifact, or use a real-* strategy (base model, plain class names)"
        )
    try:
        from engine.models.adapters import read_adapter_info
    except ImportError as exc:  # the fine-tuning stage's module is not installed in this checkout
        raise SynthesisError(f"diff-* strategies need engine.models.adapters: {exc}") from exc
    info = read_adapter_info(uri, storage)
    if list(info.class_names) != list(ds.class_names):
        raise SynthesisError(
            f"adapter {redact(uri)} was trained for classes {info.class_names[:5]}..., "
            f"the dataset has {ds.class_names[:5]}..."
        )
    digest = hashlib.sha256(storage.read_bytes(join(uri, "adapter.json"))).hexdigest()[:16]
    return AdapterRef(uri, digest, list(info.prompts))


def folder_fingerprint(path: str) -> str:
    """Names and sizes of every file plus the bytes of the small ones (configs): names a model version."""
    h = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            full = os.path.join(dirpath, name)
            size = os.path.getsize(full)
            h.update(f"{os.path.relpath(full, path)}\x1f{size}\x1e".encode())
            if size <= _SMALL_FILE:
                with open(full, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:16]


def remote_fingerprint(storage: Storage, uri: str) -> str:
    """Like folder_fingerprint for a model in object storage, from a listing: no multi-GB download on the driver."""
    h = hashlib.sha256()
    for path, size in storage.walk_files(uri, sizes=True):
        rel = path[len(uri.rstrip("/")) + 1:]
        h.update(f"{rel}\x1f{size}\x1e".encode())
        if size <= _SMALL_FILE and rel.endswith(".json"):
            h.update(storage.read_bytes(path))
    return h.hexdigest()[:16]


def model_identity(ref: ModelRef, storage: Storage) -> dict[str, Any]:
    """What names a base/CLIP model in the plan hash. Remote folders are fingerprinted by listing; local and
    tiny ones are resolved here (which also fails early on a missing folder); hub ids stand for themselves."""
    if "://" in ref.spec and not ref.spec.startswith("file://"):
        if not storage.exists(ref.spec):
            raise SynthesisError(f"model folder not found: {redact(ref.spec)}")
        return {"spec": redact(ref.spec), "fingerprint": remote_fingerprint(storage, ref.spec)}
    resolved = ref.resolve(storage)
    if os.path.isdir(resolved):
        return {"spec": ref.spec if ref.spec == "tiny" else os.path.basename(resolved),
                "fingerprint": folder_fingerprint(resolved)}
    return {"spec": ref.spec}


def resolved_settings(ref: ModelRef, kind: str, storage: Storage) -> dict[str, Any] | None:
    """The folder's own settings (engine.models.settings); remote folders are read in place, not copied."""
    remote = "://" in ref.spec and not ref.spec.startswith("file://")
    return model_settings(ref.spec if remote else ref.resolve(storage), kind, storage)


@dataclass
class Job:
    """Everything the driver decided before streaming."""

    config: ExperimentConfig
    storage: Storage
    dataset: ImageDataset
    spec: PlanSpec
    plan: pa.Table
    plan_hash: str
    output: str
    base: ModelRef
    clip: ModelRef
    adapter: AdapterRef | None
    skipped: list[str]
    model_settings: dict[str, Any]

    @property
    def total(self) -> int:
        return self.plan.num_rows


def prepare(config: ExperimentConfig, dataset: ImageDataset | None = None) -> Job:
    """Load, check and plan; raises before any Ray work on bad inputs."""
    syn = config.synthesis
    storage = Storage.from_config(config)
    ds = dataset if dataset is not None else load_dataset(config, storage)
    adapter = read_adapter(config, storage, ds) if uses_adapter(syn.strategy) else None
    base = ModelRef.from_config(config, "sd", ds.class_names, ds.metaclass)
    clip = ModelRef.from_config(config, "clip", ds.class_names, ds.metaclass)
    base_id, clip_id = model_identity(base, storage), model_identity(clip, storage)
    settings = {"base": resolved_settings(base, "sd", storage), "clip": resolved_settings(clip, "clip", storage)}
    if is_gen(syn.strategy):
        usable, skipped = np.ones(ds.train_rows.num_rows, dtype=bool), []
    else:
        usable, skipped = check_references(ds.train_rows, config.dataset.skip_bad_images)
    identity = {
        "num_inference_steps": syn.num_inference_steps, "guidance_scale": syn.guidance_scale,
        "sampler": sampler_identity(syn.sampler),
        "resolution": syn.resolution, "base_model": base_id,
        "clip_model": clip_id, "adapter": adapter.digest if adapter else None,
        "dataset": ds.fingerprint(), "skipped_references": sorted(skipped), "metaclass": ds.metaclass,
    }
    spec = PlanSpec(syn.strategy, tuple(syn.strengths), syn.multiplier,
                    syn.seed if syn.seed is not None else config.run.seed, syn.strength_run,
                    syn.referable_classes, syn.long_tail, identity)
    prompts = adapter.prompts if adapter else plain_prompts(ds.class_names, ds.metaclass)
    plan = build_plan(spec, ds.train_rows.column("id").to_pylist(), ds.train_rows.column("label").to_numpy(),
                      ds.num_classes, prompts, usable)
    plan_hash = spec.hash()
    set_metrics.check_weights(config, storage)
    output = syn.output or join(config.run.uri, "synthetic", plan_hash)
    return Job(config, storage, ds, spec, plan, plan_hash, output, base, clip, adapter, skipped, settings)


# --- the stream --------------------------------------------------------------------------------

def resource_needs(config: ExperimentConfig) -> Needs:
    """The least the stream must hold at once: the minimum Translator pool, one scorer, one task per CPU stage."""
    syn = config.synthesis
    return Needs(cpu=syn.min_actors * syn.cpus_per_actor + syn.cpus_per_actor + 2 * syn.cpus_per_task,
                 gpu=syn.min_actors * syn.num_gpus_per_actor + syn.clip_num_gpus, what="synthesis",
                 keys="synthesis.min_actors x synthesis.cpus_per_actor (Translators) + synthesis.cpus_per_actor "
                      "(one ClipScorer) + 2 x synthesis.cpus_per_task (reference and sink tasks); GPUs: "
                      "synthesis.min_actors x synthesis.num_gpus_per_actor + synthesis.clip_num_gpus")


def operator_labels(config: ExperimentConfig) -> dict[Any, str]:
    """The stream's operators by the resources each of their tasks/actors asks for (for stall warnings)."""
    syn = config.synthesis
    return labels_for([({"CPU": syn.cpus_per_task}, "reference-loading / shard-writing tasks"),
                       ({"CPU": syn.cpus_per_actor, "GPU": syn.num_gpus_per_actor, **syn.actor_resources},
                        "Translator actors"),
                       ({"CPU": syn.cpus_per_actor, "GPU": syn.clip_num_gpus}, "ClipScorer actors")])


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without importing torch (~0.5 GB of driver memory)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len([d for d in os.listdir("/dev") if d.startswith("nvidia") and d[len("nvidia"):].isdigit()])
    except OSError:
        return 0


def check_local_gpus(config: ExperimentConfig) -> None:
    """Before anything is written: a local run asking for more GPUs than the machine has fails now."""
    needs = resource_needs(config)
    if needs.gpu <= 0 or ray_local.joins_cluster():
        return
    gpus = visible_gpus()
    if needs.gpu > gpus:
        raise SynthesisError(
            f"synthesis needs {needs.gpu:g} GPU(s) (synthesis.min_actors x num_gpus_per_actor + clip_num_gpus) "
            f"but this machine has {gpus}: set synthesis.num_gpus_per_actor=0 and synthesis.clip_num_gpus=0 "
            "to run on CPU, or join a GPU cluster (RAY_ADDRESS / ray job submit)"
        )


def ensure_ray(config: ExperimentConfig) -> None:
    """Join the cluster in RAY_ADDRESS (or `ray job submit`'s, or the one this process runs), or start a
    local one that fits the stream; a cluster that can never hold the stream is an error (engine.ray_local)."""
    check_local_gpus(config)
    ray_local.ensure_ray(resource_needs(config), config=config)
    check_actor_resources(config)


def check_actor_resources(config: ExperimentConfig) -> None:
    """Translators asking for a custom resource (synthesis.actor_resources) the cluster lacks would wait for
    ever: fail now, naming the key, unless cluster.wait_for_nodes says nodes are coming."""
    import ray

    syn = config.synthesis
    if not syn.actor_resources or config.cluster.wait_for_nodes:
        return
    have = ray.cluster_resources()
    short = {k: v * syn.min_actors for k, v in syn.actor_resources.items() if have.get(k, 0.0) < v * syn.min_actors}
    if short:
        raise SynthesisError(
            f"synthesis.actor_resources x synthesis.min_actors needs {short} but the cluster has "
            f"{ {k: have.get(k, 0.0) for k in short} }: start nodes with `ray start --resources=...`, lower "
            "synthesis.min_actors, or set cluster.wait_for_nodes=true if nodes are coming")


class Progress:
    """A periodic log line next to Ray Data's progress bars: rows done/total, images/s, ETA."""

    def __init__(self, done: int, total: int, every_s: float) -> None:
        self.start_done, self.done, self.total, self.every_s = done, done, total, every_s
        self.t0 = self.last = time.perf_counter()

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.t0
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def update(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.rate
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("synthesis: %d/%d rows (%.1f%%), %.2f images/s, ETA %s", self.done, self.total,
                     100.0 * self.done / max(self.total, 1), rate, _duration(eta))


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


@dataclass
class RunningStream:
    """The dataset of a running stream, so that a stage that gives up (a Translator no node can hold) ends it
    instead of leaving its executor thread and actors waiting in the driver."""

    dataset: Any = None

    def stop(self) -> None:
        """Shut the stream's executor down (its actor pools killed), as Ray Data does when a Dataset is
        garbage-collected. Through `Dataset._current_executor`, a private attribute: Ray has no public call
        that ends a running iteration from another thread. Without it (another Ray version) the stream ends
        with the driver's Ray job."""
        executor = getattr(self.dataset, "_current_executor", None)
        if executor is not None:
            executor.shutdown(force=True)


def stream(job: Job, windows: list[tuple[int, int]], fail_marker: str | None = None,
           running: RunningStream | None = None) -> Iterator[FileStats]:
    """Run the Ray Data graph over `windows`; yields one FileStats per committed file, as they commit
    (`running` gets the dataset, to stop it)."""
    import ray
    from ray.data import ActorPoolStrategy

    raise_original_errors()
    syn = job.config.synthesis
    size = syn.resolution
    gen = is_gen(syn.strategy)
    train_ref = None if gen else ray.put(reference_table(job.dataset))  # ids + URIs on storage: no bytes
    blocks = [stream_row(s, e, job.plan.slice(s, e - s)) for s, e in windows]
    params = TranslateParams(syn.num_inference_steps, syn.guidance_scale, size, syn.batch_size, syn.sampler)
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(load_references, batch_size=1, batch_format="pyarrow", num_cpus=syn.cpus_per_task,
                        fn_kwargs={"train": [train_ref], "resolution": size, "storage": job.storage})
    ds = ds.map_batches(
        Translator, batch_size=1, batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=syn.min_actors, max_size=syn.max_actors),
        num_gpus=syn.num_gpus_per_actor, num_cpus=syn.cpus_per_actor, resources=syn.actor_resources or None,
        fn_constructor_kwargs={"model": job.base, "storage": job.storage, "params": params,
                               "adapter_uri": job.adapter.uri if job.adapter else None,
                               "cpu_threads": syn.cpu_threads, "fail_after": syn.fail_actor_after,
                               "fail_marker": fail_marker, "speed": SpeedOptions.from_config(syn.speed)})
    ds = ds.map_batches(
        ClipScorer, batch_size=1, batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=syn.clip_actors),
        num_gpus=syn.clip_num_gpus, num_cpus=syn.cpus_per_actor,
        fn_constructor_kwargs={"model": job.clip, "storage": job.storage, "metaclass": job.dataset.metaclass,
                               "resolution": size, "batch_size": syn.clip_batch_size, "cpu_threads": syn.cpu_threads})
    ds = ds.map_batches(write_windows, batch_size=1, batch_format="pyarrow", num_cpus=syn.cpus_per_task,
                        fn_kwargs={"storage": job.storage, "uri": job.output, "resolution": size,
                                   "class_names": list(job.dataset.class_names)})
    if running is not None:
        running.dataset = ds
    for row in ds.iter_rows():
        yield stats_from_rows(row)


def stall_watchdog(job: Job) -> Watchdog:
    """Warns when no shard commits for `cluster.stall_warn_factor` x the usual interval (`cluster.stall_warn_s` before
    the first), or when stream requests wait that long for resources, naming the operators."""
    run_cfg = job.config.cluster

    def idle(seconds: float) -> str:
        return (f"nothing committed to {redact(job.output)} for {seconds:.0f} s; shard writes and reads are bounded "
                f"by storage.max_stall_s ({job.storage.max_stall_s:g} s), so a stalled store fails the job; "
                f"resources free now: {free_resources()}")

    return Watchdog("synthesis", run_cfg.stall_warn_s, run_cfg.stall_warn_factor, operator_labels(job.config), idle,
                    cluster=run_cfg)


# --- finishing ---------------------------------------------------------------------------------

def check_exactly_once(files: list[FileStats], total: int) -> np.ndarray:
    """All committed indices, sorted; an error if any row is missing, foreign or committed twice."""
    indices = np.concatenate([f.index for f in files]) if files else np.empty(0, dtype=np.int64)
    uniq, counts = np.unique(indices, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][:10].tolist()
        raise SynthesisError(f"plan rows {dup} are committed more than once")
    if len(uniq) and (uniq[0] < 0 or uniq[-1] >= total):
        raise SynthesisError(f"committed rows outside the plan [0, {total}): {uniq[(uniq < 0) | (uniq >= total)][:10].tolist()}")
    return uniq


def manifest_config(config: ExperimentConfig) -> dict[str, Any]:
    """The config as recorded: storage options (endpoints, maybe keys) are left out; URIs are redacted."""
    data = config.model_dump(mode="json")
    data.pop("storage", None)
    for section, key in (("run", "output"), ("dataset", "uri"), ("synthesis", "output"), ("synthesis", "adapter")):
        if data.get(section, {}).get(key):
            data[section][key] = redact(data[section][key])
    return {k: data[k] for k in ("run", "dataset", "model", "synthesis") if k in data}


@dataclass(frozen=True)
class StreamTiming:
    """What the driver measured of this call's stream: files and rows written, the whole stream's time,
    and the window after the first commit (start-up excluded) for the steady rate."""

    files: int = 0
    rows: int = 0
    stream_s: float = 0.0
    steady_rows: int = 0
    steady_s: float = 0.0

    def rates(self) -> dict[str, Any]:
        """images/s over the stream and in steady state, each None (with a note) below the minimum window."""
        steady_files = max(self.files - 1, 0)
        notes = [n for n in (rate_note(self.stream_s, self.files, "images_per_s"),
                             rate_note(self.steady_s, steady_files, "steady_images_per_s")) if n]
        return {"images_per_s": rate(self.rows, self.stream_s, self.files),
                "steady_images_per_s": rate(self.steady_rows, self.steady_s, steady_files),
                "rate_note": "; ".join(notes) or None}


def finish(job: Job, files: list[FileStats], elapsed_s: float, timing: StreamTiming) -> dict[str, Any]:
    syn = job.config.synthesis
    files = sorted(files, key=lambda f: f.start)
    indices = check_exactly_once(files, job.total)
    if len(indices) != job.total:
        raise SynthesisError(f"{job.total - len(indices)} planned rows are not committed in {redact(job.output)}")
    scores = np.concatenate([f.clip_score for f in files])
    threshold = clip_threshold(scores, syn.filter_quantile)
    kept = int(kept_mask(scores, threshold).sum())
    manifest = {
        "plan_hash": job.plan_hash,
        "plan": job.spec.to_dict(),
        "strategy": syn.strategy,
        "strengths": list(job.spec.effective_strengths),
        "multiplier": syn.multiplier,
        "num_train": int(job.dataset.train_rows.num_rows),
        "class_names": list(job.dataset.class_names),
        "metaclass": job.dataset.metaclass,
        "resolution": syn.resolution,
        "config": manifest_config(job.config),
        "sampler": job.spec.identity["sampler"],
        "model_settings": job.model_settings,
        "speed": speed_record(syn),
        "versions": versions(),
        "counts": {"planned": job.total, "rows": int(len(indices)), "files": len(files), "kept": kept,
                   "dropped": int(len(indices)) - kept, "skipped_references": len(job.skipped),
                   "written_last_run": timing.rows},
        "skipped_references": job.skipped,
        "filter_quantile": syn.filter_quantile,
        "clip_threshold": threshold,
        "files": [f.summary() for f in files],
        "elapsed_s": round(elapsed_s, 3),
        "stream_s": round(timing.stream_s, 3),
        **timing.rates(),
    }
    write_card(job, manifest)
    write_manifest(job.storage, job.output, manifest)  # last: its presence says the set is complete
    return manifest


def write_card(job: Job, manifest: dict[str, Any]) -> None:
    """.huggingface.yaml: the set as a Hugging Face dataset (`datasets.load_dataset(<folder>)`), and what it
    holds (as comments)."""
    get = manifest.get
    summary = (f"Diff-Mix synthetic set {job.plan_hash}\n{(get('counts') or {}).get('rows')} images, strategy "
               f"{get('strategy')}, strengths {get('strengths')}, {len(job.dataset.class_names)} classes "
               f"({job.dataset.metaclass}); plan and settings in .manifest.json.\nRows with clip_score below "
               f"{get('clip_threshold')} are the ones the CLIP filter drops (filter_quantile "
               f"{get('filter_quantile')}).\n"
               "Soft labels: diff-mix / real-mix rows put strength**gamma on target_label and the rest on "
               "ref_label; other rows are target_label.")
    job.storage.write_text(join(job.output, CARD), dataset_card(job.dataset.class_names, summary))


def move_to_hidden_names(job: Job, manifest: dict[str, Any]) -> None:
    """A complete set written before the hidden names: its card and manifest moved to them, so the folder
    opens as a Parquet dataset (the shards, the plan and the manifest's content stay as they are)."""
    if not any(job.storage.exists(join(job.output, name)) for name in LEGACY_FILES):
        return
    log.info("synthesis: %s moves to the hidden metadata names (.manifest.json, .plan.json, %s)",
             redact(job.output), CARD)
    write_card(job, manifest)
    retire_legacy(job.storage, job.output)


def with_set_metrics(job: Job, manifest: dict[str, Any]) -> dict[str, Any]:
    """The complete set measured against the real train set (`metrics.enabled`), its figures added to the
    manifest; a manifest that already holds figures of the same identity is kept as it is."""
    if not job.config.metrics.enabled:
        return manifest
    known = manifest.get("set_metrics") or {}
    identity = set_metrics.metrics_identity(job.config, job.clip)
    if known and all(known.get(k) == v for k, v in identity.items()):
        return manifest
    ensure_ray(job.config)
    figures = set_metrics.measure_cached(job.config, SyntheticSet(job.output, job.storage, manifest),
                                         job.dataset, job.clip, job.storage)
    manifest = {k: v for k, v in manifest.items() if k not in ("manifest_version", "written_at")}
    manifest["set_metrics"] = figures
    write_manifest(job.storage, job.output, manifest)
    return manifest


def summary(job: Job, manifest: dict[str, Any], written: int, files_written: int, resumed: int,
            elapsed_s: float, injected_failures: int = 0) -> dict[str, Any]:
    """What `diffmix synthesize` prints: this call's work, and the state of the set."""
    counts = manifest["counts"]
    return {
        "output": redact(job.output), "plan_hash": job.plan_hash, "planned": job.total, "rows": counts["rows"],
        "files": counts["files"], "kept": counts["kept"], "dropped": counts["dropped"],
        "clip_threshold": manifest["clip_threshold"], "written": written, "files_written": files_written,
        "resumed_rows": resumed, "skipped_references": counts["skipped_references"],
        "elapsed_s": round(elapsed_s, 3), "images_per_s": manifest["images_per_s"] if written else None,
        "steady_images_per_s": manifest.get("steady_images_per_s") if written else None,
        "rate_note": manifest.get("rate_note") if written else None,
        "injected_actor_failures": injected_failures,
        "set_metrics": set_metrics.brief(manifest.get("set_metrics")),
    }


def run(config: ExperimentConfig, dataset: ImageDataset | None = None) -> dict[str, Any]:
    """Synthesize (or finish, or verify) the configured synthetic set; returns a JSON-able summary.

    `dataset` lets a caller (the pipeline, tests) pass the dataset it already loaded.
    """
    t0 = time.perf_counter()
    ray_local.join_checked(config)
    job = prepare(config, dataset)
    syn = config.synthesis
    plan_doc = {"plan_hash": job.plan_hash, "plan": job.spec.to_dict(), "num_rows": job.total,
                "num_train": int(job.dataset.train_rows.num_rows)}
    claim_output(job.storage, job.output, job.plan_hash, plan_doc, syn.overwrite)
    committed = read_committed(job.storage, job.output)
    done = check_exactly_once(committed, job.total)
    missing = np.setdiff1d(np.arange(job.total, dtype=np.int64), done, assume_unique=True)
    manifest = read_manifest(job.storage, job.output)
    if (missing.size == 0 and manifest is not None and manifest.get("plan_hash") == job.plan_hash
            and manifest.get("filter_quantile") == syn.filter_quantile):
        log.info("synthesis: %s is complete (%d rows, plan %s): nothing to do", redact(job.output), job.total, job.plan_hash)
        move_to_hidden_names(job, manifest)
        manifest = with_set_metrics(job, manifest)
        return summary(job, manifest, 0, 0, int(done.size), time.perf_counter() - t0)
    check_local_gpus(config)
    windows = make_windows(missing.tolist(), syn.rows_per_file)
    log.info("synthesis: plan %s, %d rows (%d committed, %d to generate in %d files) -> %s", job.plan_hash,
             job.total, done.size, missing.size, len(windows), redact(job.output))
    new: list[FileStats] = []
    injected = 0
    t_stream = time.perf_counter()
    first: tuple[float, int] | None = None
    if windows:
        ensure_ray(config)
        t_stream = time.perf_counter()
        marker = os.path.join(tempfile.gettempdir(), f"diffmix-fail-{uuid.uuid4().hex}") if syn.fail_actor_after else None
        progress = Progress(int(done.size), job.total, syn.log_every_s)
        with stall_watchdog(job) as watchdog, surfaced(StorageError):
            running = RunningStream()
            for stats in watchdog.watch(stream(job, windows, marker, running), stop=running.stop):
                new.append(stats)
                watchdog.beat()
                progress.update(len(stats.index))
                if first is None:
                    first = (time.perf_counter(), len(stats.index))
        if marker and os.path.exists(marker):  # the test hook fired: an actor died and Ray replaced it
            injected = 1
            os.unlink(marker)
    t_end = time.perf_counter()
    written = int(sum(len(f.index) for f in new))
    timing = StreamTiming(len(new), written, t_end - t_stream, written - first[1] if first else 0,
                          t_end - first[0] if first else 0.0)
    manifest = with_set_metrics(job, finish(job, committed + new, t_end - t0, timing))
    log.info("synthesis: %d rows in %d files, CLIP threshold %s keeps %d; %s", job.total, len(committed) + len(new),
             manifest["clip_threshold"], manifest["counts"]["kept"], redact(job.output))
    return summary(job, manifest, written, len(new), int(done.size), time.perf_counter() - t0, injected)


__all__ = ["Job", "PLAN_FILE", "adapter_uri", "prepare", "run", "stream"]
