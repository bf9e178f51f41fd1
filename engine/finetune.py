"""Stage 1, `diffmix finetune`: personalise Stable Diffusion to the dataset's classes with Ray Train.

Driver: validate everything cheap (dataset, classes, base model, batch) before Ray does any work, return
the existing artifact when the same job already finished, else run a `TorchTrainer` (DDP over
`finetune.num_workers`) fed by Ray Data (decode, resize, random crop/flip on CPU workers) and write the
adapter artifact (engine.models.adapters) from the final checkpoint. Checkpoints go to
`<run>/finetune-ray/<key>` every `checkpoint_every` steps; a dead worker restarts the group from the
latest one (`FailureConfig(max_failures)`), and a re-launched driver picks it up too (Train V2 restores
a run with the same storage path and name).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from engine.config import ExperimentConfig
from engine.data import ImageDataset, decode, load_dataset
from engine.data.epochs import (InlineEpoch, WorkerBatches, balanced_copies, cached_get, epoch_order, locate, ordered,
                                worker_batches)
from engine.models.base import ModelRef
from engine.models.settings import model_settings
from engine.models.adapters import (ADAPTER_JSON, AdapterError, AdapterInfo, fingerprint_folder, read_adapter_info,
                                    write_adapter_info)
from engine.ray_local import ensure_ray, join_checked
from engine.rates import rate
from engine.ray_local import Needs
from engine.tracking import Tracker, check_tracking
from engine.ray_train import fit_watched, make_trainer, report_checkpoint, train_labels, train_needs
from engine.ray_train import use_gpu as cluster_has_gpu
from engine.storage import Storage, join, redact
from engine.weights import load_weights

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
PROGRESS_FILE = "progress.json"
ARTIFACT_SUBDIR = "artifact"  # in the final checkpoint: what the step model saves
# FinetuneConfig fields that change how a run executes, not what it produces: not part of the run key.
OPERATIONAL_FIELDS = {"num_workers", "use_gpu", "cpus_per_worker", "checkpoint_every", "log_every",
                      "max_failures", "output", "fail_at_step", "keep_checkpoints", "data_cpus", "rows_per_task",
                      "inline_rows", "worker_resources"}


class FinetuneError(ValueError):
    """Fine-tuning cannot start with this config/dataset; raised before any Ray work."""


# --- data ----------------------------------------------------------------------------------------
# Each epoch's rows, order, per-worker batches and augmentation seeds come from (run.seed, epoch)
# (engine.data.epochs); a batch decodes the same wherever it runs, so a config trains the same adapter.

def random_crop_flip(img: Image.Image, resolution: int, random_flip: bool, rng: np.random.Generator) -> np.ndarray:
    """Resize the short side to `resolution`, take a random square crop, maybe flip; uint8 CHW."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    x = int(rng.integers(0, nw - resolution + 1))
    y = int(rng.integers(0, nh - resolution + 1))
    arr = np.asarray(img.crop((x, y, x + resolution, y + resolution)), dtype=np.uint8)
    if random_flip and rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def augment(images: Sequence[bytes], resolution: int, random_flip: bool, seed: int) -> np.ndarray:
    """One batch: decode, resize, random crop (and flip) drawn from `seed`; uint8 [B, 3, R, R]."""
    rng = np.random.default_rng(seed)
    return np.stack([random_crop_flip(decode(bytes(b)), resolution, random_flip, rng) for b in images])


def load_batches(items: pa.Table, train: list[Any], resolution: int, random_flip: bool) -> dict[str, np.ndarray]:
    """Ray Data task (CPU): whole training batches, each given by its row positions and augmentation seed."""
    table = cached_get(train[0])
    pixels, labels = [], []
    for rows, seed in zip(items.column("rows").to_pylist(), items.column("seed").to_pylist()):
        take = pa.array(rows, type=pa.int64())
        pixels.append(augment(table.column("image").take(take).to_pylist(), resolution, random_flip, seed))
        labels.append(table.column("label").take(take).to_numpy())
    return {"pixels": np.concatenate(pixels), "label": np.concatenate(labels).astype(np.int64)}


_WORK_SCHEMA = pa.schema([("rows", pa.list_(pa.int64())), ("seed", pa.int64())])


def epoch_batches(cfg: dict[str, Any], epoch: int, rank: int, world: int) -> WorkerBatches:
    """This worker's batches of one epoch (class-balanced copies when configured)."""
    labels = cfg["labels"]
    copies = balanced_copies(labels, cfg["num_classes"], cfg["seed"], epoch) if cfg["class_balanced"] else None
    order = epoch_order(len(labels), cfg["seed"], epoch, copies)
    return worker_batches(order, rank, world, cfg["worker_batch"], cfg["seed"], epoch)


# --- worker --------------------------------------------------------------------------------------

def _worker_logging() -> None:
    """Ray workers start with bare logging: send this package's INFO lines to stderr (streamed to the driver)."""
    root = logging.getLogger("engine")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


def step_seed(seed: int, rank: int, step: int) -> int:
    """Noise/timestep seed of one step on one worker: the same after a resume as in an unbroken run."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()[:8], "little") % (2**63)


def _mean_across_workers(value: float, count: int, world: int) -> float:
    import torch
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return value / max(count, 1)
    t = torch.tensor([value, float(count)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1))


def _maybe_inject_failure(cfg: dict[str, Any], step: int, rank: int, world: int) -> None:
    """Test hook: the last worker raises once when about to run `fail_at_step` (a marker makes it once)."""
    if cfg["fail_at_step"] is None or step + 1 != cfg["fail_at_step"] or rank != world - 1:
        return
    storage = Storage(**cfg["storage"])
    marker = cfg["failure_marker"]
    if storage.exists(marker):
        return
    storage.write_text(marker, f"failure injected at step {step + 1}\n")
    raise RuntimeError(f"injected failure at step {step + 1} (finetune.fail_at_step)")


class _Progress:
    """Loss and throughput bookkeeping of one worker: windows of `log_every` steps, history across resumes."""

    def __init__(self, step: int, history: list[list[float]], world: int) -> None:
        self.start_step, self.world = step, world
        self.history = history  # [step, mean loss over the window], restored from the checkpoint
        self.rates: list[float | None] = []  # steps/s of each window (None: too short) of this attempt (each pays the previous report)
        self.loss_sum, self.n = 0.0, 0
        self.t_start = self.t_window = time.perf_counter()
        self.steady: tuple[int, float] | None = None  # (step, time) after the first window: past warm-up

    def add(self, loss: float) -> None:
        self.loss_sum += loss
        self.n += 1

    def close_window(self, step: int, resumed_from: int) -> dict[str, Any]:
        """Mean loss over the window (all workers) and rates; the metrics every worker reports."""
        loss = _mean_across_workers(self.loss_sum, self.n, self.world)
        now = time.perf_counter()
        window = rate(self.n, now - self.t_window, self.n)
        self.history.append([step, loss])
        self.rates.append(window)
        metrics = {"step": step, "loss": loss, "steps_per_s": window, "resumed_from_step": resumed_from,
                   "run_steps_per_s": rate(step - self.start_step, now - self.t_start, step - self.start_step)}
        if self.steady is not None:
            metrics["steady_steps_per_s"] = rate(step - self.steady[0], now - self.steady[1], step - self.steady[0])
        self.steady = self.steady or (step, now)
        self.loss_sum, self.n, self.t_window = 0.0, 0, now
        return metrics


def _report(p: Any, step: int, progress: _Progress, metrics: dict[str, Any], rank: int, checkpoint: bool,
            final: bool, uri: str) -> None:
    """ray.train.report on every worker (a barrier); rank 0 attaches a checkpoint when asked."""
    import ray.train
    import torch

    if not checkpoint or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="diffmix-ft-ckpt-") as tmp:
        torch.save({**p.train_state(), "step": step, "history": progress.history}, os.path.join(tmp, STATE_FILE))
        summary: dict[str, Any] = {"step": step, "history": progress.history, "rates": progress.rates}
        if final:
            summary["files"] = p.save_artifact_files(os.path.join(tmp, ARTIFACT_SUBDIR))
        with open(os.path.join(tmp, PROGRESS_FILE), "w") as fh:
            json.dump(summary, fh)
        report_checkpoint(metrics, tmp, uri)


def decode_split(train: pa.Table, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """A split decoded and resized once: (uint8 [N, 3, R, R] pixels, int64 labels), no augmentation.

    Put in the object store as `make_loop_config(arrays=...)` for small datasets trained many epochs
    (pre-training), where decoding every epoch would cost more than keeping the pixels.
    """
    rng = np.random.default_rng(0)
    pixels = np.stack([random_crop_flip(decode(bytes(b)), resolution, False, rng)
                       for b in train.column("image").to_pylist()])
    return pixels, train.column("label").to_numpy().astype(np.int64)


def _epoch_source(cfg: dict[str, Any], batches: WorkerBatches) -> Iterator[dict[str, Any]]:
    """The epoch's batches as tensors: from `decode_split` arrays, decoded here (small epochs), or from an
    ordered Ray Data stream of decode tasks (`finetune.data_cpus` each)."""
    import ray
    import ray.data
    import torch

    if cfg.get("arrays") is not None:
        pixels, labels = cached_get(cfg["arrays"])
        for rows in batches.rows:
            rows = np.sort(rows)
            yield {"pixels": torch.from_numpy(pixels[rows]), "label": torch.from_numpy(labels[rows])}
        return
    if not len(batches):
        return
    items = pa.table({"rows": [r.tolist() for r in batches.rows], "seed": batches.seeds.tolist()}, schema=_WORK_SCHEMA)
    kwargs = {"train": cfg["train"], "resolution": cfg["resolution"], "random_flip": cfg["random_flip"]}
    if batches.rows.size <= cfg["inline_rows"]:
        yield from InlineEpoch(lambda: load_batches(items, **kwargs)).iter_torch_batches(cfg["worker_batch"])
        return
    ordered()
    per_task = max(1, cfg["rows_per_task"] // cfg["worker_batch"])
    ds = ray.data.from_arrow([items.slice(i, per_task) for i in range(0, items.num_rows, per_task)])
    ds = ds.map_batches(load_batches, batch_format="pyarrow", batch_size=None, num_cpus=cfg["data_cpus"],
                        fn_kwargs=kwargs)
    yield from ds.iter_torch_batches(batch_size=cfg["worker_batch"], prefetch_batches=2)


def make_step_model(cfg: dict[str, Any], base: str, device: Any) -> Any:
    """What the loop trains: the fine-tuning Personalizer, or a pre-training phase (engine.pretrain)."""
    spec = {**cfg["spec"], "base_folder": base, "class_names": tuple(cfg["spec"]["class_names"])}
    if cfg.get("trainer", "personalize") == "pretrain":
        from engine.models.pretrain import PretrainSpec, make_phase_trainer

        return make_phase_trainer(PretrainSpec(**spec), device)
    from engine.models.personalize import PersonalizeSpec, Personalizer

    return Personalizer(PersonalizeSpec(**spec), device)


def train_loop(cfg: dict[str, Any]) -> None:
    """Per-worker Ray Train loop: resume from the latest checkpoint, train to `steps`, checkpoint on the way."""
    import ray.train
    import ray.train.torch
    import torch

    _worker_logging()
    if cfg["cpu_threads"]:
        torch.set_num_threads(cfg["cpu_threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    storage = Storage(**cfg["storage"])
    torch.manual_seed(cfg["seed"])  # initial trainable weights (e.g. LoRA A, gaussian) from the config's seed
    p = make_step_model(cfg, cfg["base"].resolve(storage), ray.train.torch.get_device())
    total, log_every, ckpt_every = cfg["steps"], cfg["log_every"], cfg["checkpoint_every"]
    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_weights(os.path.join(folder, STATE_FILE), f"{cfg['trainer']} checkpoint "
                                 f"{checkpoint.path}/{STATE_FILE}", FinetuneError)
        p.load_train_state(state)
        step, history = int(state["step"]), [list(h) for h in state["history"]]
        log.info("rank %d resumed from checkpoint at step %d", rank, step)
    resumed_from = step
    if world > 1:
        p.wrap(lambda m: ray.train.torch.prepare_model(m, move_to_device=False))
    progress = _Progress(step, history, world)
    tracker = Tracker(cfg["tracking"], cfg["checkpoints"], storage,
                      f"{cfg['trainer']}-{os.path.basename(cfg['checkpoints'].rstrip('/'))}",
                      params={"steps": total, "seed": cfg["seed"], **{k: v for k, v in cfg["spec"].items()
                                                                        if isinstance(v, (int, float, str))}}
                      ) if rank == 0 and cfg["checkpoints"] else None
    metrics: dict[str, Any] = {"step": step, "resumed_from_step": resumed_from}
    epoch, skip = locate(step, lambda e: len(epoch_batches(cfg, e, rank, world))) if step < total else (0, 0)
    while step < total:
        epoch_steps = 0
        for batch in _epoch_source(cfg, epoch_batches(cfg, epoch, rank, world).skip(skip)):
            _maybe_inject_failure(cfg, step, rank, world)
            progress.add(p.step(batch["pixels"], batch["label"], p.generator(step_seed(cfg["seed"], rank, step))))
            step += 1
            epoch_steps += 1
            final = step == total
            is_ckpt = step % ckpt_every == 0 or final
            if is_ckpt or step % log_every == 0:
                metrics = progress.close_window(step, resumed_from)
                if tracker is not None:
                    log.info("step %d/%d loss %.4f%s", step, total, metrics["loss"],
                             f", {metrics['steps_per_s']:.2f} steps/s" if metrics["steps_per_s"] else "")
                    tracker.log(metrics, step)
                _report(p, step, progress, metrics, rank, checkpoint=is_ckpt, final=final, uri=cfg["checkpoints"])
            if final:
                break
        epoch, skip = epoch + 1, 0
        if epoch_steps == 0 and step < total:
            raise RuntimeError("an epoch of the train shard gave no full batch: dataset smaller than the batch")
    if step == resumed_from and step > 0:  # restored at the end already (e.g. the artifact was deleted)
        _report(p, step, progress, {**metrics, "loss": history[-1][1] if history else None}, rank,
                checkpoint=True, final=True, uri=cfg["checkpoints"])
    if tracker is not None:
        tracker.close()


# --- driver --------------------------------------------------------------------------------------

def run_key(config: ExperimentConfig, dataset_fingerprint: str, base_hash: str) -> str:
    """Names what a run produces: dataset version, base model content, the result-relevant finetune fields."""
    data = {
        "dataset": dataset_fingerprint,
        "base_hash": base_hash,
        "finetune": config.finetune.model_dump(mode="json", exclude=OPERATIONAL_FIELDS),
        "seed": config.run.seed,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def artifact_uri(config: ExperimentConfig) -> str:
    return config.finetune.output or join(config.run.uri, "adapter")


def resource_needs(config: ExperimentConfig) -> Needs:
    """The Train workers and one decode task: what fine-tuning holds at once."""
    ft = config.finetune
    return train_needs("finetune", ft.num_workers, ft.cpus_per_worker, ft.use_gpu, ft.data_cpus,
                       worker_resources=ft.worker_resources)


def validate_inputs(config: ExperimentConfig, ds: ImageDataset) -> None:
    """What would only fail inside Ray workers, checked on the driver first."""
    ft = config.finetune
    if ds.num_classes < 2:
        raise FinetuneError(f"fine-tuning needs at least 2 classes; dataset {ds.name} has {ds.num_classes} "
                            f"({ds.class_names})")
    if ds.rows("train").num_rows < ft.batch_size:
        raise FinetuneError(f"dataset {ds.name} has {ds.rows('train').num_rows} train images, fewer than "
                            f"finetune.batch_size={ft.batch_size}")


def _summary(info: AdapterInfo, reused: bool, **extra: Any) -> dict[str, Any]:
    return {"artifact": redact(info.uri), "reused": reused, "strategy": info.strategy, "steps": info.steps,
            "final_loss": info.final_loss, "config_hash": info.config_hash, "classes": len(info.class_names),
            "tokens": info.tokens, "prompts": info.prompts, "loss_history": info.loss_history, **extra}


def _existing(uri: str, key: str, storage: Storage) -> AdapterInfo | None:
    if not storage.exists(join(uri, ADAPTER_JSON)):
        return None
    try:
        info = read_adapter_info(uri, storage)
    except AdapterError as exc:
        log.warning("replacing unreadable adapter at %s: %s", redact(uri), exc)
        return None
    if info.config_hash != key:
        log.warning("adapter at %s was trained with another config (%s); it will be replaced", redact(uri),
                    info.config_hash)
        return None
    return info


def _write_artifact(checkpoint: Any, uri: str, storage: Storage,
                    info_fields: dict[str, Any]) -> tuple[AdapterInfo, dict[str, Any]]:
    """Copy the final checkpoint's adapter files to `uri`, then adapter.json last (its presence = complete).

    Returns the AdapterInfo and the checkpoint's progress record (loss history, per-window steps/s)."""
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, PROGRESS_FILE)) as fh:
            progress = json.load(fh)
        if "files" not in progress:
            raise RuntimeError(f"latest checkpoint (step {progress['step']}) holds no adapter files")
        storage.remove(join(uri, ADAPTER_JSON))
        storage.remove(uri, recursive=True)
        storage.upload_dir(os.path.join(folder, ARTIFACT_SUBDIR), uri)
    history = progress["history"]
    info = AdapterInfo(**info_fields, **progress["files"], steps=int(progress["step"]), uri=uri,
                       final_loss=history[-1][1] if history else None, loss_history=history)
    write_adapter_info(uri, info, storage)
    return info, progress


def _versions() -> dict[str, str]:
    import diffusers
    import peft
    import ray
    import torch
    import transformers

    return {m.__name__: m.__version__ for m in (torch, diffusers, transformers, peft, ray)}


def make_loop_config(config: ExperimentConfig, spec: dict[str, Any], base: ModelRef, *, steps: int,
                     batch_size: int, num_workers: int, log_every: int, checkpoint_every: int,
                     cpus_per_worker: float, use_gpu: bool, labels: np.ndarray, num_classes: int,
                     trainer: str = "personalize", train: Any = None, arrays: Any = None,
                     fail_at_step: int | None = None, failure_marker: str = "", checkpoints: str = "") -> dict[str, Any]:
    """The settings `train_loop` reads (plain values, object refs and a ModelRef: pickled to every worker).

    The images come as `train` (an object ref of the id/image/label table, decoded per batch) or `arrays`
    (an object ref of `decode_split` output); `labels` decide each epoch's rows either way."""
    ft = config.finetune
    return {
        "trainer": trainer, "spec": spec, "base": base, "train": [train], "arrays": arrays,
        "labels": np.asarray(labels, dtype=np.int64), "num_classes": num_classes,
        "class_balanced": ft.class_balanced and trainer == "personalize", "resolution": ft.resolution,
        "random_flip": ft.random_flip, "inline_rows": ft.inline_rows, "data_cpus": ft.data_cpus,
        "rows_per_task": ft.rows_per_task, "storage": dataclasses.asdict(Storage.from_config(config)),
        "steps": steps, "worker_batch": batch_size // num_workers, "seed": config.run.seed,
        "log_every": log_every, "checkpoint_every": checkpoint_every, "fail_at_step": fail_at_step,
        "failure_marker": failure_marker, "checkpoints": checkpoints, "tracking": config.tracking,
        # CPU training: one torch thread per reserved CPU, whatever OMP_NUM_THREADS the worker inherited
        "cpu_threads": None if use_gpu else max(1, round(cpus_per_worker)),
    }


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Fine-tune (or reuse a finished fine-tune) and return a summary naming the adapter artifact."""
    from engine.models.adapters import class_prompts, placeholder_tokens, trains_embeddings

    t0 = time.perf_counter()
    ft = config.finetune
    check_tracking(config.tracking)
    join_checked(config)
    storage = Storage.from_config(config)
    ds = load_dataset(config, storage)
    validate_inputs(config, ds)
    base_ref = ModelRef.from_config(config, "sd", ds.class_names, ds.metaclass)
    base = base_ref.resolve(storage)
    base_hash = fingerprint_folder(base)
    fingerprint = ds.fingerprint()
    key = run_key(config, fingerprint, base_hash)
    out = artifact_uri(config)
    done = _existing(out, key, storage)
    if done is not None:
        log.info("finetune already done for this config (%s): adapter artifact at %s", key, redact(out))
        return _summary(done, reused=True, elapsed_s=round(time.perf_counter() - t0, 2))

    ensure_ray(resource_needs(config), config=config)
    use_gpu = cluster_has_gpu(ft.use_gpu)
    ray_uri = join(config.run.uri, "finetune-ray")
    name = f"ft-{key}"
    spec = {"strategy": ft.strategy, "class_names": list(ds.class_names), "metaclass": ds.metaclass,
            "lora_rank": ft.lora_rank, "learning_rate": ft.learning_rate, "weight_decay": ft.weight_decay,
            "max_grad_norm": ft.max_grad_norm, "mixed_precision": ft.mixed_precision}
    loop_config = make_loop_config(config, spec, base_ref, steps=ft.steps, batch_size=ft.batch_size,
                                   num_workers=ft.num_workers, log_every=ft.log_every,
                                   checkpoint_every=ft.checkpoint_every, cpus_per_worker=ft.cpus_per_worker,
                                   use_gpu=use_gpu, labels=ds.rows("train").column("label").to_numpy(),
                                   num_classes=ds.num_classes, train=ds.put("train", ["image", "label"]),
                                   fail_at_step=ft.fail_at_step, checkpoints=join(ray_uri, name),
                                   failure_marker=join(ray_uri, name, f"injected-failure-{ft.fail_at_step}"))
    trainer = make_trainer(train_loop, loop_config, name=name, uri=ray_uri, storage=storage,
                           num_workers=ft.num_workers, gpu=use_gpu, cpus_per_worker=ft.cpus_per_worker,
                           max_failures=ft.max_failures, keep_checkpoints=ft.keep_checkpoints,
                           worker_resources=ft.worker_resources)
    log.info("finetune %s: %s on %d classes, %d steps, batch %d over %d %s worker(s); checkpoints in %s",
             key, ft.strategy, ds.num_classes, ft.steps, ft.batch_size, ft.num_workers,
             "GPU" if use_gpu else "CPU", redact(join(ray_uri, name)))
    result = fit_watched(trainer, "finetune", config.cluster,
                         train_labels("finetune", ft.cpus_per_worker, use_gpu, ft.data_cpus, ft.worker_resources),
                         join(ray_uri, name))
    if result.checkpoint is None:
        raise RuntimeError(f"finetune {key} finished without a checkpoint (see {redact(join(ray_uri, name))})")
    metrics = dict(result.metrics or {})
    resumed_from = int(metrics.get("resumed_from_step") or 0)
    if resumed_from:
        log.info("training resumed from checkpoint at step %d after a failure", resumed_from)
    info, progress = _write_artifact(result.checkpoint, out, storage, {
        "strategy": ft.strategy, "base_model": config.model.base, "base_model_hash": base_hash,
        "class_names": list(ds.class_names), "metaclass": ds.metaclass,
        "tokens": placeholder_tokens(ds.class_names) if trains_embeddings(ft.strategy) else [],
        "prompts": class_prompts(ft.strategy, ds.class_names, ds.metaclass), "resolution": ft.resolution,
        "config_hash": key, "dataset_fingerprint": fingerprint, "versions": _versions(),
        "model_settings": model_settings(base, "sd")})
    summary = _summary(info, reused=False, resumed_from_step=resumed_from, device="GPU" if use_gpu else "CPU",
                       steps_per_s=metrics.get("run_steps_per_s"),
                       steady_steps_per_s=metrics.get("steady_steps_per_s"),
                       window_steps_per_s=progress.get("rates", []), elapsed_s=round(time.perf_counter() - t0, 2),
                       checkpoints=redact(join(ray_uri, name)))
    log.info("finetune done: %d steps, final loss %s; adapter artifact at %s", info.steps,
             f"{info.final_loss:.4f}" if info.final_loss is not None else "n/a", redact(out))
    return summary


__all__ = ["FinetuneError", "artifact_uri", "resource_needs", "augment", "epoch_batches", "load_batches", "decode_split", "make_loop_config", "make_step_model", "random_crop_flip", "run", "run_key", "step_seed", "train_loop", "validate_inputs"]
