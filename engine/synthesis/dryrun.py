"""`diffmix plan`: gather what the cost model needs (train size, model shapes, recorded rate, cluster node
types and prices) and estimate a synthesis job before any GPU is used. No Ray, no images.

Inputs: |train| from `cost.train_images` (`--train-images`) or by listing the dataset; the plan's rows per
strength from the plan's own strength rule; the model's shapes from its folder's JSON configs (a local
folder, an s3:// folder read in place, the tiny model) or the known SD-1.5 shapes for SD-1.5 hub ids; the
node types from `cost.cluster_yaml` and their prices from `cost.node_types`.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import yaml

from engine.config import ExperimentConfig
from engine.storage import Storage, redact
from engine.synthesis import cost
from engine.synthesis.model_flops import SD15_IDS, SD15_RESOLUTION, SD15_SHAPES, ModelShapes, component_flops
from engine.synthesis.plan import PlanSpec, is_gen, num_rows, row_strengths
from engine.synthesis.recorded_rates import closest_rate

log = logging.getLogger(__name__)


def count_train(config: ExperimentConfig) -> int:
    """|train| after dataset.subset, as the plan sees it."""
    if config.cost.train_images is not None:
        return config.cost.train_images
    from engine.data import load_dataset

    ds = load_dataset(config)
    rows = getattr(ds, "train_rows", None)
    return int((rows if rows is not None else ds.train).num_rows)


def rows_per_strength(config: ExperimentConfig, num_train: int) -> dict[float, int]:
    """Plan rows of each strength: the plan's own strength runs, counted (no references needed)."""
    syn = config.synthesis
    spec = PlanSpec(syn.strategy, tuple(syn.strengths), syn.multiplier,
                    syn.seed if syn.seed is not None else config.run.seed, syn.strength_run)
    values, counts = np.unique(row_strengths(spec, num_rows(syn.multiplier, num_train)), return_counts=True)
    return {float(v): int(c) for v, c in zip(values, counts)}


def model_shapes(config: ExperimentConfig, storage: Storage) -> tuple[ModelShapes, str | None]:
    """The base model's component configs; SD-1.5 hub ids (and hub ids in general, with a note) use SD-1.5's."""
    from engine.models.base import SHIPPED_MODELS, looks_like_path, resolve_model
    from engine.models.settings import folder_reader

    spec = config.model.base.strip()
    if spec in SD15_IDS:
        return SD15_SHAPES, None
    if spec == "tiny" or spec in SHIPPED_MODELS:
        folder = resolve_model(spec, config.model.cache_dir, storage, "sd", config.model.tiny_seed,
                               config.model.resolution)
    elif "://" in spec or looks_like_path(spec) or os.path.isdir(os.path.expanduser(spec)):
        folder = spec  # read in place: only three small JSON files
    else:
        return SD15_SHAPES, f"model.base {spec!r} is a hub id this machine cannot read: SD-1.5 shapes assumed"
    read = folder_reader(folder, storage)
    unet, vae, text = read("unet/config.json"), read("vae/config.json"), read("text_encoder/config.json")
    if unet is None or vae is None or text is None:
        from engine.models.errors import ModelError

        raise ModelError(f"base model folder {redact(folder)} lacks unet/, vae/ or text_encoder/config.json")
    tokens = (read("tokenizer/tokenizer_config.json") or {}).get("model_max_length") or text.get(
        "max_position_embeddings", 77)
    return ModelShapes(unet, vae, text, int(min(tokens, text.get("max_position_embeddings", tokens))),
                       f"{redact(spec)} configs"), None


def cluster_nodes(path: str) -> list[dict[str, Any]]:
    """Worker node types of a Ray cluster launcher YAML: name, instance type, max_workers."""
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    head = data.get("head_node_type")
    return [{"name": name, "instance": (spec.get("node_config") or {}).get("InstanceType", name),
             "max_workers": spec.get("max_workers"), "gpus": (spec.get("resources") or {}).get("GPU")}
            for name, spec in (data.get("available_node_types") or {}).items() if name != head]


def recorded_work_per_image(rate: Any) -> float:
    """TFLOP per image of the benchmark the rate was recorded on (SD-1.5 shapes, equal rows per strength)."""
    flops = component_flops(SD15_SHAPES, rate.resolution)
    w = cost.work({s: 1 for s in rate.strengths}, rate.num_inference_steps, rate.guidance_scale, False,
                  rate.sampler, flops)
    return w.tflop_per_image


def estimate(config: ExperimentConfig, storage: Storage | None = None) -> cost.PlanEstimate:
    """The dry run's numbers for this config (cost.rate / cost.deadline_h / cost.train_images included)."""
    storage = storage or Storage.from_config(config)
    syn, cfg = config.synthesis, config.cost
    notes: list[str] = []
    num_train = count_train(config)
    shapes, note = model_shapes(config, storage)
    notes += [note] if note else []
    flops = component_flops(shapes, syn.resolution)
    sampler = syn.sampler if syn.sampler != "model" else "pndm"
    if syn.sampler == "model":
        notes.append("sampler 'model': counted as PNDM (what SD-1.5 folders ship)")
    work = cost.work(rows_per_strength(config, num_train), syn.num_inference_steps, syn.guidance_scale,
                     is_gen(syn.strategy), sampler, flops)
    if cfg.rate is not None:
        rate, source = cfg.rate, "given (--rate / cost.rate)"
    else:
        recorded, rate_note = closest_rate(syn.batch_size, syn.resolution)
        rate = cost.scaled_rate(recorded.images_per_gpu_hour, recorded_work_per_image(recorded), work.tflop_per_image)
        source = (f"{recorded.images_per_gpu_hour:,.0f}/h recorded on {recorded.card} {recorded.date}, batch "
                  f"{recorded.batch_size}, {recorded.resolution} px, scaled by TFLOP per image")
        notes += [rate_note] if rate_note else []
        if not shapes.is_sd15():
            notes.append("the recorded rate is for SD-1.5 shapes; a smaller model runs further below the GPU's "
                         "peak, so measure it and pass --rate")
        notes.append(f"rates are per {recorded.card}; for another card pass --rate measured on it")
    gpu_hours = work.rows / rate
    gpus = cost.gpus_for_deadline(gpu_hours, cfg.deadline_h) if cfg.deadline_h is not None else None
    nodes: list[cost.NodeCost] = []
    if os.path.isfile(cfg.cluster_yaml):
        prices = {k: v.model_dump() for k, v in cfg.node_types.items()}
        found = cluster_nodes(cfg.cluster_yaml)
        nodes = cost.node_costs(gpu_hours, gpus, found, prices)
        unpriced = [n["instance"] for n in found if n["instance"] not in prices]
        if unpriced:
            notes.append(f"no price in cost.node_types for {', '.join(unpriced)}")
        notes.append("prices: cost.node_types (illustrative 2024 AWS on-demand list prices unless you edited them)")
    else:
        notes.append(f"no cluster file at {cfg.cluster_yaml} (cost.cluster_yaml): no node costs")
    return cost.PlanEstimate(
        strategy=syn.strategy, num_train=num_train, multiplier=syn.multiplier, resolution=syn.resolution,
        batch_size=syn.batch_size, num_inference_steps=syn.num_inference_steps, guidance_scale=syn.guidance_scale,
        sampler=syn.sampler, work=work, flops=flops, rate=rate, rate_source=source, gpu_hours=gpu_hours,
        bytes_written=cost.stored_bytes(work.rows, syn.resolution, cfg.png_bytes_per_pixel),
        deadline_h=cfg.deadline_h, gpus_for_deadline=gpus, nodes=nodes, notes=notes)


def run(config: ExperimentConfig) -> dict[str, Any]:
    """`diffmix plan`: the estimate as JSON, with `lines`, the printout (`cost.format_estimate`)."""
    est = estimate(config)
    return {**est.to_dict(), "lines": cost.format_estimate(est)}


def log_estimate(config: ExperimentConfig) -> None:
    """What `diffmix pipeline` logs at start: the lines `diffmix plan` prints for SD-1.5 shapes at 512 px.

    Any other model's FLOPs are counted by building it on the meta device (diffusers import + trace: tens of
    seconds on a small CPU), which a pipeline should not pay at every start: for those it logs the rows and UNet
    evaluations per strength and points at `diffmix plan` for FLOPs, GPU-hours and cost.
    """
    storage = Storage.from_config(config)
    shapes, _ = model_shapes(config, storage)
    if shapes.is_sd15() and config.synthesis.resolution == SD15_RESOLUTION:
        lines = cost.format_estimate(estimate(config, storage))
    else:
        syn = config.synthesis
        sampler = syn.sampler if syn.sampler != "model" else "pndm"
        per_strength = rows_per_strength(config, count_train(config))
        evals = {s: n * cost.denoise_steps(syn.num_inference_steps, s, is_gen(syn.strategy), sampler)
                 * cost.guidance_copies(syn.guidance_scale) for s, n in per_strength.items()}
        lines = [f"plan: {syn.strategy}, {sum(per_strength.values()):,} rows, {sum(evals.values()):,} UNet evaluations "
                 f"({', '.join(f's={s:g}: {n:,} rows' for s, n in sorted(per_strength.items()))}); "
                 f"`diffmix plan` counts this model's FLOPs and prices the run"]
    for line in lines:
        log.info("%s", line)
