"""`diffmix pretrain`: train a small text-to-image Stable Diffusion from scratch on a dataset's train split.

The built-in demo needs a base model that draws its classes (random tiny weights draw noise). Two Ray
Train runs of the fine-tune stage's loop (engine.finetune.train_loop) train it: the VAE, then the UNet
and text encoder with the VAE frozen. The result is an ordinary diffusers SD folder (written with
`save_dtype` weights, `pretrain.json` last), so every later stage loads it like SD-1.5.

Always the full train split (the subset only applies to later stages: the base model plays the part of
SD's web-scale pre-training). Resumable at three grains: a finished output with the same key is reused,
a finished VAE phase is kept under `<run>/pretrain/<key>/vae`, and Ray Train resumes inside a phase.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from engine.config import ExperimentConfig
from engine.data import ImageDataset, load_dataset
from engine.finetune import ARTIFACT_SUBDIR, PROGRESS_FILE, decode_split, make_loop_config, train_loop
from engine.models.base import ModelRef
from engine.models.tiny import SDArch, TINY_BUILDER_VERSION, build_untrained_sd
from engine.ray_local import Needs, ensure_ray, join_checked
from engine.ray_train import fit_watched, make_trainer, train_labels, train_needs
from engine.ray_train import use_gpu as cluster_has_gpu
from engine.storage import Storage, is_local, join, redact

log = logging.getLogger(__name__)

PRETRAIN_JSON = "pretrain.json"
# PretrainConfig fields that change how the run executes or is checked, not the weights it produces.
OPERATIONAL_FIELDS = {"output", "num_workers", "use_gpu", "cpus_per_worker", "checkpoint_every", "log_every",
                      "max_failures", "keep_checkpoints", "eval_per_class", "eval_steps", "eval_guidance",
                      "worker_resources"}


class PretrainError(ValueError):
    """Pre-training cannot start with this config/dataset; raised before any Ray work."""


def arch_of(config: ExperimentConfig) -> SDArch:
    pt = config.pretrain
    return SDArch(vae_blocks=tuple(pt.vae_blocks), vae_norm_groups=pt.vae_norm_groups,
                  unet_blocks=tuple(pt.unet_blocks), layers_per_block=pt.layers_per_block,
                  attention_head_dim=pt.attention_head_dim)


def run_key(config: ExperimentConfig, dataset_fingerprint: str) -> str:
    """Names the weights a run produces: dataset version, result-relevant pretrain fields, seed, builder."""
    data = {"dataset": dataset_fingerprint, "builder": TINY_BUILDER_VERSION, "seed": config.run.seed,
            "pretrain": config.pretrain.model_dump(mode="json", exclude=OPERATIONAL_FIELDS)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def output_uri(config: ExperimentConfig) -> str:
    return config.pretrain.output or join(config.run.uri, "pretrained")


def resource_needs(config: ExperimentConfig) -> Needs:
    """The Train workers (the split is decoded once into the object store: no decode tasks)."""
    pt = config.pretrain
    return train_needs("pretrain", pt.num_workers, pt.cpus_per_worker, pt.use_gpu,
                       worker_resources=pt.worker_resources)


def validate_inputs(config: ExperimentConfig, ds: ImageDataset) -> None:
    pt = config.pretrain
    if ds.num_classes < 2:
        raise PretrainError(f"pre-training needs at least 2 classes; dataset {ds.name} has {ds.num_classes}")
    if ds.rows("train").num_rows < pt.batch_size:
        raise PretrainError(f"dataset {ds.name} has {ds.rows('train').num_rows} train images, fewer than "
                            f"pretrain.batch_size={pt.batch_size}")
    down = 2 ** (len(pt.vae_blocks) - 1) * 2 ** (len(pt.unet_blocks) - 1)
    if pt.resolution % down:
        raise PretrainError(f"pretrain.resolution {pt.resolution} must be a multiple of {down} "
                            f"(VAE and UNet downsampling of {pt.vae_blocks} / {pt.unet_blocks})")
    if any(b % pt.vae_norm_groups for b in pt.vae_blocks) or any(b % 32 for b in pt.unet_blocks):
        raise PretrainError(f"pretrain.vae_blocks {pt.vae_blocks} must be multiples of vae_norm_groups "
                            f"({pt.vae_norm_groups}) and unet_blocks {pt.unet_blocks} multiples of 32")


def read_info(uri: str, storage: Storage) -> dict[str, Any] | None:
    """The finished model's record, or None when `uri` holds no finished pre-training."""
    marker = join(uri, PRETRAIN_JSON)
    if not storage.exists(marker):
        return None
    return json.loads(storage.read_text(marker))


def _build_init(uri: str, config: ExperimentConfig, ds: ImageDataset, storage: Storage) -> None:
    """The randomly initialised folder both phases start from (seeded: the same config, the same start)."""
    if storage.exists(join(uri, "model_index.json")):
        return
    with tempfile.TemporaryDirectory(prefix="diffmix-pt-init-") as tmp:
        folder = os.path.join(tmp, "model")
        build_untrained_sd(folder, arch_of(config), config.run.seed, config.pretrain.resolution,
                           [*ds.class_names, ds.metaclass])
        storage.upload_dir(folder, uri)


def _phase(config: ExperimentConfig, ds: ImageDataset, storage: Storage, phase: str, base_uri: str,
           work: str, key: str, use_gpu: bool, arrays: Any) -> tuple[str, list[list[float]]]:
    """One Ray Train run of the shared loop: (local temp folder holding the phase's SD folder, loss history)."""
    pt = config.pretrain
    vae = phase == "vae"
    spec = {"phase": phase, "class_names": list(ds.class_names), "metaclass": ds.metaclass,
            "learning_rate": pt.vae_learning_rate if vae else pt.learning_rate, "weight_decay": pt.weight_decay,
            "max_grad_norm": pt.max_grad_norm, "mixed_precision": pt.mixed_precision,
            "prompt_dropout": pt.prompt_dropout, "kl_weight": pt.kl_weight}
    steps = pt.vae_steps if vae else pt.steps
    # workers run in another cwd: a relative local run folder must reach them as an absolute path
    base = ModelRef(os.path.abspath(base_uri.removeprefix("file://")) if is_local(base_uri) else base_uri,
                    config.model.cache_dir)
    loop_config = make_loop_config(config, spec, base, trainer="pretrain", steps=steps, batch_size=pt.batch_size,
                                   num_workers=pt.num_workers, log_every=pt.log_every,
                                   checkpoint_every=pt.checkpoint_every, cpus_per_worker=pt.cpus_per_worker,
                                   use_gpu=use_gpu, labels=ds.rows("train").column("label").to_numpy(),
                                   num_classes=ds.num_classes, arrays=arrays,
                                   checkpoints=join(work, "ray", f"pt-{phase}-{key}"))
    name = f"pt-{phase}-{key}"
    trainer = make_trainer(train_loop, loop_config, name=name, uri=join(work, "ray"), storage=storage,
                           num_workers=pt.num_workers, gpu=use_gpu, cpus_per_worker=pt.cpus_per_worker,
                           max_failures=pt.max_failures, keep_checkpoints=pt.keep_checkpoints,
                           worker_resources=pt.worker_resources, datasets=None)
    log.info("pretrain %s phase %s: %d steps, batch %d over %d %s worker(s)", key, phase, steps, pt.batch_size,
             pt.num_workers, "GPU" if use_gpu else "CPU")
    result = fit_watched(trainer, f"pretrain ({phase})", config.cluster,
                         train_labels("pretrain", pt.cpus_per_worker, use_gpu, None, pt.worker_resources),
                         join(work, "ray", name))
    if result.checkpoint is None:
        raise RuntimeError(f"pretrain phase {phase} finished without a checkpoint ({redact(join(work, 'ray', name))})")
    local = tempfile.mkdtemp(prefix=f"diffmix-pt-{phase}-")
    with result.checkpoint.as_directory() as folder:
        with open(os.path.join(folder, PROGRESS_FILE)) as fh:
            progress = json.load(fh)
        if "files" not in progress:
            raise RuntimeError(f"pretrain phase {phase}: the latest checkpoint (step {progress['step']}) is not final")
        shutil.copytree(os.path.join(folder, ARTIFACT_SUBDIR), local, dirs_exist_ok=True)
    return local, progress["history"]


def set_latent_scale(folder: str, pixels: np.ndarray, seed: int) -> float:
    """SD's `scaling_factor` = 1 / std of the train set's latents, so diffused latents have unit variance."""
    import torch
    from diffusers import AutoencoderKL

    from engine.models.personalize import to_unit_range

    vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae")).eval()
    with torch.no_grad():
        x = to_unit_range(torch.from_numpy(pixels), torch.device("cpu"), torch.float32)
        gen = torch.Generator().manual_seed(seed)
        latents = torch.cat([vae.encode(c).latent_dist.sample(generator=gen) for c in x.split(256)])
    scale = float(1.0 / latents.std())
    path = os.path.join(folder, "vae", "config.json")
    with open(path) as fh:
        cfg = json.load(fh)
    cfg["scaling_factor"] = scale
    with open(path, "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
    return scale


def cast_weights(folder: str, save_dtype: str) -> None:
    """Rewrite the UNet's and VAE's weights in `save_dtype` (fp16 halves the folder).

    diffusers up-casts fp16 files when asked for fp32; transformers would load an fp16 text encoder as
    fp16 on CPU and break stock pipelines there, and it is tiny, so it stays fp32.
    """
    if save_dtype == "fp32":
        return
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        model = cls.from_pretrained(os.path.join(folder, sub))
        model.to(torch.float16).save_pretrained(os.path.join(folder, sub), safe_serialization=True)


def _summary(info: dict[str, Any], uri: str, reused: bool, **extra: Any) -> dict[str, Any]:
    return {"model": redact(uri), "reused": reused, "key": info["key"], "check": info.get("check"),
            "final_loss": info.get("final_loss"), **extra}


def run(config: ExperimentConfig) -> dict[str, Any]:
    """Pre-train (or reuse a finished pre-training) and return a summary naming the model folder."""
    from engine.finetune import _versions
    from engine.models.quality import check_generation

    t0 = time.perf_counter()
    pt = config.pretrain
    join_checked(config)
    storage = Storage.from_config(config)
    ds = load_dataset(config, storage, apply_subset=False)
    validate_inputs(config, ds)
    fingerprint = ds.fingerprint()
    key = run_key(config, fingerprint)
    out = output_uri(config)
    done = read_info(out, storage)
    if done is not None and done.get("key") == key:
        log.info("pretrain already done for this config (%s): model at %s", key, redact(out))
        return _summary(done, out, reused=True, elapsed_s=round(time.perf_counter() - t0, 2))
    if done is not None:
        log.warning("model at %s was pre-trained with another config (%s); it will be replaced", redact(out),
                    done.get("key"))

    ensure_ray(resource_needs(config), config=config)
    import ray

    use_gpu = cluster_has_gpu(pt.use_gpu)
    pixels, labels = decode_split(ds.train, pt.resolution)  # once: both phases and the latent scale use it
    arrays = ray.put((pixels, labels))
    work = join(config.run.uri, "pretrain", key)
    init_uri, vae_uri = join(work, "init"), join(work, "vae")
    _build_init(init_uri, config, ds, storage)
    if not storage.exists(join(vae_uri, "model_index.json")):
        local, _ = _phase(config, ds, storage, "vae", init_uri, work, key, use_gpu, arrays)
        scale = set_latent_scale(local, pixels, config.run.seed)
        log.info("VAE trained; latent scaling factor %.4f", scale)
        storage.upload_dir(local, vae_uri)
        shutil.rmtree(local, ignore_errors=True)
    local, history = _phase(config, ds, storage, "denoiser", vae_uri, work, key, use_gpu, arrays)
    cast_weights(local, pt.save_dtype)
    check = None
    if pt.eval_per_class:
        check = check_generation(local, ds.train, ds.class_names, ds.metaclass, pt.eval_per_class, pt.eval_steps,
                                 pt.eval_guidance, config.run.seed, pt.resolution).as_dict()
    info = {"key": key, "dataset": ds.name, "dataset_fingerprint": fingerprint, "train_rows": ds.rows("train").num_rows,
            "class_names": list(ds.class_names), "metaclass": ds.metaclass,
            "pretrain": pt.model_dump(mode="json"), "seed": config.run.seed,
            "final_loss": history[-1][1] if history else None, "loss_history": history, "check": check,
            "versions": _versions(), "elapsed_s": round(time.perf_counter() - t0, 1)}
    storage.remove(join(out, PRETRAIN_JSON))
    storage.remove(out, recursive=True)
    storage.upload_dir(local, out)
    storage.write_text(join(out, PRETRAIN_JSON), json.dumps(info, indent=1))  # last: its presence = complete
    shutil.rmtree(local, ignore_errors=True)
    log.info("pretrain done: model at %s (%s)", redact(out),
             f"{100 * check['accuracy']:.0f}% of samples labelled as prompted" if check else "no generation check")
    return _summary(info, out, reused=False, elapsed_s=info["elapsed_s"])


__all__ = ["PRETRAIN_JSON", "PretrainError", "arch_of", "cast_weights", "output_uri", "read_info", "run", "run_key",
           "set_latent_scale", "validate_inputs"]
