"""The classifier stage: a Ray Train `TorchTrainer` (DDP) over real + synthetic rows with soft targets.

`run(config)` loads the dataset, reads the synthetic set's metadata once, trains with one
`TorchTrainer`, and writes `metrics.json` under the run folder. `fit(...)` is the same minus
dataset loading, so Tune trials reuse the driver's tables (see `engine.classify.tune`).
Checkpoints go to `<output>/train` through Ray Train; a rerun with the same output, or a worker
restart after a failure, resumes from the latest one (`ray.train.get_checkpoint()`); `run` returns a
finished run's summary without starting Train (`finished_run`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.classify.labels import check_gamma, soft_cross_entropy
from engine.classify.metrics import EvalCounts, summarize
from engine.classify.mixing import (
    StreamSettings,
    SyntheticSelection,
    check_p,
    epoch_batches,
    epoch_dataset,
    epoch_plan,
    eval_dataset,
    open_selection,
    worker_share,
)
from engine.config import ExperimentConfig
from engine.data.dataset import ImageDataset
from engine.data.epochs import Block, ordered
from engine.data.shards import ShardError, complete_sets
from engine.locations import absolute_path
from engine.models.errors import ModelError
from engine.ray_local import ensure_ray
from engine.rates import rate
from engine.ray_local import Needs
from engine.ray_train import fit_watched, make_trainer, report_checkpoint, train_labels, train_needs
from engine.ray_train import use_gpu as cluster_has_gpu
from engine.storage import Storage, join, redact
from engine.tracking import check_tracking
from engine.weights import load_weights

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
METRICS_FILE = "metrics.json"
HISTORY = "history"  # <output>/history/epoch-NNNN.json: each epoch's metrics (rewritten, not appended, on resume)


# --- driver side ---------------------------------------------------------------------------------
@dataclass
class Inputs:
    """The dataset as the workers need it: blocks in the object store plus a few numbers."""

    class_names: list[str]
    train_blocks: list[Block]
    test_blocks: list[Block]
    num_train: int
    train_counts: list[int]
    group_ids: list[int] = field(default_factory=list)
    train_labels: list[int] = field(default_factory=list)  # by position in the blocks (CMO's sampler)
    long_tail: bool = False


def resource_needs(config: ExperimentConfig) -> Needs:
    """The Train workers and one decode task (epochs and evals above `classify.inline_rows` stream)."""
    cfg = config.classify
    return train_needs("classify", cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu, cfg.data_cpus,
                       worker_resources=cfg.worker_resources)


def classifier_seed(config: ExperimentConfig) -> int:
    """`classify.seed` when set (repeat a classifier over seeds on one synthetic set), else `run.seed`."""
    return config.run.seed if config.classify.seed is None else config.classify.seed


def prepare_inputs(config: ExperimentConfig, dataset: ImageDataset, rows_per_block: int | None = None) -> Inputs:
    """Shuffle the train rows once (so blocks mix classes) and put both splits in the object store (read
    there by Ray tasks when the images are on storage: the driver handles ids and labels only).

    A block is one decode task's worth of real rows (`classify.rows_per_task` unless given)."""
    rows_per_block = rows_per_block or config.classify.rows_per_task
    rng = np.random.default_rng([classifier_seed(config), 0x7A1])
    order = rng.permutation(dataset.rows("train").num_rows)
    train = dataset.index("train").take(order)
    groups = sorted({g for g in dataset.index("test").column("group").to_pylist() if g is not None})
    return Inputs(
        class_names=list(dataset.class_names),
        train_blocks=dataset.blocks("train", rows_per_block, order),
        test_blocks=dataset.blocks("test", rows_per_block),
        num_train=train.num_rows,
        train_counts=[int(c) for c in dataset.class_counts("train")],
        group_ids=[int(g) for g in groups],
        train_labels=train.column("label").to_numpy().astype(np.int64).tolist(),
        long_tail=config.dataset.subset.kind == "long_tail",
    )


def absolute(uri: str) -> str:
    """Local paths become absolute: Train workers run in their own working directory (the config's paths
    already are, engine.locations; this covers the paths a stage derives from them)."""
    return absolute_path(uri)


def output_uri(config: ExperimentConfig) -> str:
    if config.classify.output:
        return absolute(config.classify.output)
    return absolute(join(config.run.uri, "classify", config.hash("run", "dataset", "classify")))


def resolve_synthetic(config: ExperimentConfig, storage: Storage) -> str:
    """`classify.synthetic`, or else the one synthetic set under `<run>/synthetic/`."""
    if config.classify.synthetic:
        return absolute(config.classify.synthetic)
    root = absolute(join(config.run.uri, "synthetic"))
    found = complete_sets(root, storage)
    if len(found) != 1:
        what = "no synthetic set" if not found else f"{len(found)} synthetic sets"
        raise ShardError(
            f"classify.p = {config.classify.p} needs synthetic images, but there is {what} under {redact(root)}: "
            "set classify.synthetic to the set's folder (or run `diffmix synthesize` first)"
        )
    return found[0]


def fit(config: ExperimentConfig, inputs: Inputs, output: str | None = None,
        callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train once with a `TorchTrainer`; returns (and writes to `<output>/metrics.json`) the summary."""
    cfg = config.classify
    check_p(cfg.p)
    check_gamma(cfg.gamma)
    check_tracking(config.tracking)
    storage = Storage.from_config(config)
    output = absolute(output or output_uri(config))
    synthetic_uri = None
    selection = SyntheticSelection.empty()
    if cfg.p > 0:
        synthetic_uri = resolve_synthetic(config, storage)
        selection = open_selection(synthetic_uri, storage, inputs.class_names, cfg.strengths, cfg.multiplier,
                                   cfg.filtered, cfg.p)
    loop_config = {"config": config.model_dump(mode="json"), "inputs": inputs, "selection": selection,
                   "output": output}
    gpu = cluster_has_gpu(cfg.use_gpu)
    trainer = make_trainer(train_loop, loop_config, name="train", uri=output, storage=storage,
                           num_workers=cfg.num_workers, gpu=gpu,
                           cpus_per_worker=cfg.cpus_per_worker, max_failures=cfg.max_failures,
                           keep_checkpoints=cfg.keep_checkpoints,
                           worker_resources=cfg.worker_resources, callbacks=list(callbacks or []))
    log.info("classify: %s @%dpx, %d epochs, p=%s gamma=%s, %d train rows, %d synthetic rows selected -> %s",
             cfg.backbone, cfg.resolution, cfg.epochs, cfg.p, cfg.gamma, inputs.num_train, len(selection),
             redact(output))
    result = fit_watched(trainer, "classify", config.cluster,
                         train_labels("classify", cfg.cpus_per_worker, gpu, cfg.data_cpus, cfg.worker_resources),
                         join(output, "train"))
    metrics = {k: v for k, v in (result.metrics or {}).items() if _jsonable(v)}
    history = [json.loads(storage.read_text(f)) for f in sorted(storage.glob(join(output, HISTORY), "epoch-*.json"))]
    summary = {
        "output": output,
        "synthetic": synthetic_uri,
        "num_train": inputs.num_train,
        "num_synthetic_selected": len(selection),
        "class_names": list(inputs.class_names),
        "classify": cfg.model_dump(mode="json"),
        "metrics": metrics,
        "history": [h for h in history if h.get("epoch", 0) <= cfg.epochs],
    }
    storage.write_text(join(output, METRICS_FILE), json.dumps(summary, indent=2, sort_keys=True))
    log.info("classify: top1 %.4f after %s epochs (%s)", metrics.get("top1", float("nan")), metrics.get("epoch"),
             redact(join(output, METRICS_FILE)))
    return summary


def _jsonable(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) and not (isinstance(value, float) and math.isnan(value))


def finished_run(config: ExperimentConfig, inputs: Inputs, storage: Storage) -> dict[str, Any] | None:
    """The summary a finished run of this config wrote, when it trained on these inputs to the last epoch.

    A rerun (a pipeline or demo run again after a later stage failed) then costs no Train worker group,
    which would only restore the last checkpoint to report it again."""
    output = output_uri(config)
    path = join(output, METRICS_FILE)
    if not storage.exists(path):
        return None
    summary = json.loads(storage.read_text(path))
    cfg = config.classify
    synthetic = resolve_synthetic(config, storage) if cfg.p > 0 else None
    same = (summary.get("classify") == cfg.model_dump(mode="json") and summary.get("synthetic") == synthetic
            and summary.get("num_train") == inputs.num_train and summary.get("class_names") == inputs.class_names
            and summary.get("metrics", {}).get("epoch") == cfg.epochs)
    return summary if same else None


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Stage entry (`diffmix classify`): load the dataset, train, write metrics.json; a finished run of the
    same config and inputs is reused (`"reused": true`)."""
    from engine.data import load_dataset

    ensure_ray(resource_needs(config), config=config)
    storage = Storage.from_config(config)
    dataset = load_dataset(config, storage)
    inputs = prepare_inputs(config, dataset)
    done = finished_run(config, inputs, storage)
    if done is not None:
        log.info("classify already done for this config: top1 %.4f after %s epochs (%s)",
                 done["metrics"].get("top1", float("nan")), done["metrics"].get("epoch"),
                 redact(join(done["output"], METRICS_FILE)))
        return {**done, "reused": True}
    return {**fit(config, inputs), "reused": False}


# --- worker side ---------------------------------------------------------------------------------
def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR factor per step: linear warm-up, then cosine decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))
    return factor


def _maybe_fail(epoch: int, fail_at: int | None, rank: int, output: str, storage: Storage) -> None:
    """Test hook: rank 0 raises once at `fail_at` (a marker file in the output makes it once)."""
    if fail_at is None or epoch != fail_at or rank != 0:
        return
    marker = join(output, f".fail_at_epoch_{fail_at}")
    if storage.exists(marker):
        return
    storage.write_text(marker, str(time.time()))
    raise RuntimeError(f"injected failure at epoch {epoch} (classify.fail_at_epoch)")


def _evaluate(model, inputs: Inputs, cfg, rank: int, world: int, device, batch_size: int) -> dict[str, float]:
    import torch

    from engine.classify.augment import to_model_input

    counts = EvalCounts.zeros(len(inputs.class_names), len(inputs.group_ids))
    ds = eval_dataset(inputs.test_blocks, rank, world, inputs.group_ids, cfg.resolution, cfg.eval_crop,
                      cfg.data_cpus, cfg.rows_per_task, cfg.inline_rows)
    model.eval()
    with torch.no_grad():
        for batch in ds.iter_torch_batches(batch_size=batch_size, device="cpu"):
            if not len(batch["x"]):
                continue
            logits = model(to_model_input(batch["x"].to(device)))
            counts.add(logits.argmax(dim=1).cpu().numpy(), batch["label"].numpy(), batch["group_pos"].numpy())
    if world > 1:
        import torch.distributed as dist

        vec = torch.as_tensor(counts.as_vector(), dtype=torch.float64, device=device)
        dist.all_reduce(vec)
        counts = EvalCounts.from_vector(vec.cpu().numpy().round(), len(inputs.class_names), len(inputs.group_ids))
    out = summarize(counts, inputs.group_ids, np.asarray(inputs.train_counts), inputs.long_tail,
                    cfg.many_shot_threshold, cfg.few_shot_threshold)
    return {k: v for k, v in out.items() if v is not None}


def minority_batches(inputs: Inputs, config: ExperimentConfig, epoch: int, rank: int, world: int, batch_size: int,
                     storage: Storage, settings: StreamSettings):
    """CMO's second stream: this worker's batches of minority-oversampled real rows, as many as the first's."""
    from engine.classify.rebalance import minority_plan

    cfg = config.classify
    seed = classifier_seed(config)
    plan = minority_plan(np.asarray(inputs.train_labels), np.asarray(inputs.train_counts), cfg.cmo_weight_power,
                         seed, epoch)
    share = worker_share(plan, 0, rank, world)
    rng = np.random.default_rng([seed, epoch, rank, 0xC30])
    data = epoch_dataset(inputs.train_blocks, SyntheticSelection.empty(), share, storage, settings, rng)
    return iter(epoch_batches(share, data, batch_size, cfg.prefetch_batches, seed=int(rng.integers(2**31))))


def train_loop(loop_config: dict[str, Any]) -> None:
    """Per worker: SGD + warm-up/cosine, soft-target CE with smoothing, CutMix/Mixup, AMP on CUDA."""
    import ray.data
    import ray.train
    import ray.train.torch
    import torch

    from engine.classify.augment import cutmix, mixup, to_model_input
    from engine.classify.models import build_model
    from engine.classify.rebalance import cmo_active, drw_active, drw_weights, weighted_soft_cross_entropy
    from engine.tracking import Tracker

    config = ExperimentConfig.model_validate(loop_config["config"])
    cfg = config.classify
    inputs: Inputs = loop_config["inputs"]
    selection: SyntheticSelection = loop_config["selection"]
    output: str = loop_config["output"]
    ray.data.DataContext.get_current().enable_progress_bars = False
    ordered()  # streamed epochs yield rows in plan order: the same config trains the same weights
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    storage = Storage.from_config(config)
    num_classes = len(inputs.class_names)

    torch.manual_seed(classifier_seed(config))  # the same config gives the same initial weights
    model = build_model(cfg.backbone, num_classes, cfg.resolution, cfg.pretrained, storage)
    model = ray.train.torch.prepare_model(model)
    module = getattr(model, "module", model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    batch_size = max(1, cfg.batch_size // world)
    worker_rows = -(-inputs.num_train // world)
    steps_per_epoch = -(-worker_rows // batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, resumed_from = 1, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            state = load_weights(os.path.join(path, CHECKPOINT_FILE), f"classify checkpoint {checkpoint.path}/"
                                 f"{CHECKPOINT_FILE}", ModelError, map_location=device)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        resumed_from = int(state["epoch"])
        start_epoch = resumed_from + 1
        log.info("resumed from checkpoint at epoch %d", resumed_from)
        if start_epoch > cfg.epochs:  # a finished run: report its final metrics again, train nothing
            ray.train.report(dict(state.get("metrics", {}), resumed_from_epoch=resumed_from))
            return

    settings = StreamSettings(num_classes=num_classes, resolution=cfg.resolution, scale_min=cfg.crop_scale_min,
                              hflip=cfg.hflip, gamma=cfg.gamma, data_cpus=cfg.data_cpus,
                              rows_per_task=cfg.rows_per_task, inline_rows=cfg.inline_rows)
    tracker = Tracker(config.tracking, output, storage, f"classify-{os.path.basename(output.rstrip('/'))}",
                      params=cfg.model_dump(mode="json")) if rank == 0 else None
    class_weights = torch.as_tensor(drw_weights(np.asarray(inputs.train_counts), cfg.drw_beta), dtype=torch.float32)
    throughput: list[tuple[int, float, int]] = []  # (samples, seconds, steps) of each epoch of this attempt
    last_eval: dict[str, float] = {}
    for epoch in range(start_epoch, cfg.epochs + 1):
        _maybe_fail(epoch, cfg.fail_at_epoch, rank, output, storage)
        plan = epoch_plan(inputs.num_train, len(selection), cfg.p, classifier_seed(config), epoch)
        share = worker_share(plan, len(selection), rank, world)
        rng = np.random.default_rng([classifier_seed(config), epoch, rank])
        mix_rng = np.random.default_rng([classifier_seed(config), rank, epoch, 0xC0C])  # CutMix/Mixup draws
        data = epoch_dataset(inputs.train_blocks, selection, share, storage, settings, rng)
        cmo = cfg.cmo_prob > 0 and cmo_active(epoch, cfg.epochs, cfg.cmo_start_after, cfg.cmo_end_before)
        minority = minority_batches(inputs, config, epoch, rank, world, batch_size, storage, settings) if cmo else None
        drw = drw_active(epoch, cfg.epochs, cfg.drw_from)
        model.train()
        loss_sum, rows, steps, cmo_batches = 0.0, 0, 0, 0
        start = time.perf_counter()
        for batch in epoch_batches(share, data, batch_size, cfg.prefetch_batches, seed=int(rng.integers(2**31))):
            x = to_model_input(batch["x"].to(device, non_blocking=True))
            y = batch["y"].to(device, non_blocking=True)
            paired = next(minority) if minority is not None else None
            if paired is not None and mix_rng.random() < cfg.cmo_prob:
                source = (to_model_input(paired["x"].to(device, non_blocking=True)), paired["y"].to(device))
                x, y = cutmix(x, y, cfg.cmo_alpha, mix_rng, source=source)
                cmo_batches += 1
            elif cfg.cutmix_prob > 0 and mix_rng.random() < cfg.cutmix_prob:
                x, y = cutmix(x, y, cfg.cutmix_alpha, mix_rng)
            elif cfg.mixup_prob > 0 and mix_rng.random() < cfg.mixup_prob:
                x, y = mixup(x, y, cfg.mixup_alpha, mix_rng)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits = model(x)
            loss = (weighted_soft_cross_entropy(logits, y, class_weights, cfg.label_smoothing) if drw
                    else soft_cross_entropy(logits, y, cfg.label_smoothing))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(y)
            rows += len(y)
            steps += 1
        elapsed = time.perf_counter() - start
        throughput.append((rows * world, elapsed, steps))
        # the first epoch of an attempt carries start-up costs; the mean leaves it out when it can
        later = throughput[1:] or throughput
        metrics: dict[str, Any] = {
            "epoch": epoch, "train_loss": loss_sum / max(rows, 1), "train_rows": rows * world,
            "synthetic_rows": int(share.synthetic_counts.sum()) * world, "steps": steps,
            "lr": scheduler.get_last_lr()[0], "train_samples_per_s": rate(rows * world, elapsed, steps),
            # what this trainer actually used, so a sweep can check every trial got its own point
            "trained_gamma": settings.gamma, "trained_p": cfg.p, "trained_seed": classifier_seed(config),
            "cmo_batches": cmo_batches * world, "drw": drw,
            "train_samples_per_s_mean": rate(sum(t[0] for t in later), sum(t[1] for t in later),
                                             sum(t[2] for t in later)),
        }
        if resumed_from is not None:
            metrics["resumed_from_epoch"] = resumed_from
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            last_eval = _evaluate(module, inputs, cfg, rank, world, device, batch_size)
            metrics.update(last_eval)
            metrics["eval_epoch"] = epoch
        log.info("epoch %d/%d: loss %.4f, %d rows (%d synthetic)%s%s", epoch, cfg.epochs,
                 metrics["train_loss"], rows, int(share.synthetic_counts.sum()),
                 f", {metrics['train_samples_per_s']:.1f} samples/s" if metrics["train_samples_per_s"] else "",
                 f", top1 {last_eval['top1']:.4f}" if "eval_epoch" in metrics and "top1" in last_eval else "")
        if tracker is not None:
            storage.write_text(join(output, HISTORY, f"epoch-{epoch:04d}.json"), json.dumps(metrics, sort_keys=True))
            tracker.log(metrics, epoch)
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                                "metrics": metrics}, os.path.join(tmp, CHECKPOINT_FILE))
                    report_checkpoint(metrics, tmp, join(output, "train"))
                else:
                    ray.train.report(metrics)
        else:
            ray.train.report(metrics)
    if tracker is not None:
        tracker.close()
