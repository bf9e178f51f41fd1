"""One typed experiment config, loaded from YAML with `a.b=value` overrides.

Every stage reads its own section; unknown keys, wrong types and impossible values fail here,
at load, with the dotted key named, before any expensive work starts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.locations import (Location, is_local_location, resolve_local, resolve_many, resolve_model_spec,
                              resolve_output, resolve_tracking_uri)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the offending key."""


def custom_resources(v: dict[str, float], own_keys: str) -> dict[str, float]:
    """Custom Ray resources (a node type's slot, an accelerator label): Ray's built-in ones have their own keys."""
    for name, amount in v.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{name!r} is not a custom resource: use {own_keys}")
        if amount <= 0:
            raise ValueError(f"resource {name!r} must be > 0, got {amount}")
    return v


WORKER_RESOURCES_HELP = ("Custom Ray resources each Train worker asks for, e.g. {spot_gpu: 1} to place workers "
                         "only on nodes started with that resource (a lost node's workers restart on another)")


# Fields that hold a path or URI (engine.locations): a relative local one is made absolute when the config is
# validated, in the process that loads it, so no Tune trial, Ray task, Train worker or job working directory
# resolves it against its own working directory. Defaults are validated too (run.output's `runs`).
InputUri = Annotated[str, Location(), AfterValidator(resolve_local)]
OptionalInputUri = Annotated[str | None, Location(), AfterValidator(resolve_local)]
OutputUri = Annotated[str, Location(output=True), AfterValidator(resolve_output)]
OptionalOutputUri = Annotated[str | None, Location(output=True), AfterValidator(resolve_output)]
InputUris = Annotated[list[str] | None, Location(), AfterValidator(resolve_many)]
ModelSpec = Annotated[str, Location(), AfterValidator(resolve_model_spec)]
NodeCache = Annotated[str, Location(shared=False), AfterValidator(resolve_local)]  # each node's own disk
DriverFile = Annotated[str, Location(shared=False), AfterValidator(resolve_local)]  # read on the driver only
TrackingUri = Annotated[str | None, Location(output=True), AfterValidator(resolve_tracking_uri)]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are re-validated, and defaults are
    validated (so a default path is made absolute like a given one)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, validate_default=True)


class RunConfig(Section):
    name: str = Field(default="run", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    output: OutputUri = Field(default="runs", min_length=1, description="Output root URI; the run writes under "
                              "<output>/<name>. A relative path is relative to the working directory of the process "
                              "that loads the config")
    seed: int = Field(default=0, ge=0)

    @property
    def uri(self) -> str:
        return self.output.rstrip("/") + "/" + self.name


class ClusterConfig(Section):
    """How a job behaves on its Ray cluster (never changes a result, so no output hash includes it)."""

    wait_for_nodes: bool = Field(default=False, description="A cluster without an autoscaler that cannot hold a "
                                 "stage is an error, unless nodes will be added by hand (true)")
    stall_warn_s: float = Field(default=300.0, gt=0, description="Warn when Ray requests wait this long for "
                                "resources, or nothing commits this long before the first commit")
    stall_warn_factor: float = Field(default=5.0, ge=1, description="Warn when nothing commits for this many "
                                     "times the usual interval between commits")
    max_resource_wait_s: float | None = Field(default=3600.0, gt=0, description="A stage fails when one of its "
                                              "requests (an actor, a Train worker group, a task) has waited this "
                                              "long for resources while the stage made no progress, naming it and "
                                              "the resource; null: wait for ever (an autoscaler that is slow to "
                                              "deliver)")
    infeasible_grace_s: float = Field(default=30.0, gt=0, description="On a cluster without an autoscaler (and "
                                      "without wait_for_nodes), a request no live node can ever hold (the node "
                                      "with the only slot was lost) fails after this grace instead")


class StorageConfig(Section):
    """fsspec `storage_options` (e.g. endpoint_url for S3); credentials belong in the environment.

    Every storage call is bounded: sockets give up after the timeouts, failures are retried with backoff,
    and a call still failing or hanging after `max_stall_s` (all attempts) is an error naming the URI.
    """

    storage_options: dict[str, Any] = Field(default_factory=dict)
    retries: int = Field(default=3, ge=0, le=20)
    retry_wait_s: float = Field(default=0.5, ge=0)
    connect_timeout_s: float = Field(default=10.0, gt=0, description="S3: seconds to open a connection")
    read_timeout_s: float = Field(default=60.0, gt=0, description="S3: seconds without a byte from the server")
    max_stall_s: float = Field(default=300.0, gt=0, description="A call (all attempts) that has not succeeded "
                               "after this long fails; big transfers get 1 s more per MiB")
    shared_local: bool = Field(default=False, description="Local paths (run.output, dataset.uri, ...) name the "
                               "same shared disk (an NFS mount) on every node: without it, a local path on a "
                               "cluster of more than one node (or one an autoscaler can grow) is an error")


class SubsetConfig(Section):
    """Which part of the train split to use: all of it, k per class, or a long-tail profile."""

    kind: Literal["full", "few_shot", "long_tail"] = "full"
    shots: int | None = Field(default=None, ge=1, description="k images per class (few_shot)")
    imbalance_factor: float | None = Field(default=None, ge=1, description="IF = n_max / n_min (long_tail)")

    @model_validator(mode="after")
    def _needs_parameter(self) -> "SubsetConfig":
        if self.kind == "few_shot" and self.shots is None:
            raise ValueError("dataset.subset.shots is required when kind is 'few_shot'")
        if self.kind == "long_tail" and self.imbalance_factor is None:
            raise ValueError("dataset.subset.imbalance_factor is required when kind is 'long_tail'")
        return self


class ScenesConfig(Section):
    """The built-in scene miniature (`dataset.builtin: scenes`): digits on background families."""

    aligned: float = Field(default=0.9, ge=0, le=1, description="Fraction of each class's train images on "
                           "its own background family (the rest on the other families; 0.1 is independence). "
                           "The test split is always independent: every test digit on every family")
    seed: int = Field(default=0, ge=0, description="Seed of the backgrounds, digit sizes and places")


class DatasetConfig(Section):
    source: Literal["builtin", "imagefolder", "parquet"] = "builtin"
    builtin: Literal["digits", "scenes"] = Field(default="digits", description="Which built-in dataset "
                                                 "(source: builtin): plain digits, or digits on backgrounds "
                                                 "correlated with the class in train (dataset.scenes)")
    scenes: ScenesConfig = Field(default_factory=ScenesConfig)
    uri: OptionalInputUri = Field(default=None, description="Root URI for imagefolder/parquet sources")
    metaclass: str | None = Field(default=None, min_length=1, description="e.g. bird, car; builtin: digit")
    class_names: list[str] | None = Field(default=None, description="Override/declare class names (parquet)")
    test_fraction: float = Field(default=0.2, gt=0, lt=1, description="Used when the source has no test split")
    subset: SubsetConfig = Field(default_factory=SubsetConfig)
    skip_bad_images: bool = False
    image_size: int = Field(default=32, ge=8, le=1024, description="Builtin only: side of the stored images")

    @field_validator("class_names")
    @classmethod
    def _non_empty_unique(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("class list is empty")
        if len(set(v)) != len(v):
            raise ValueError("class names must be unique")
        return v

    @model_validator(mode="after")
    def _uri_when_needed(self) -> "DatasetConfig":
        if self.source != "builtin" and not self.uri:
            raise ValueError(f"dataset.uri is required when dataset.source is {self.source!r}")
        return self


class ModelConfig(Section):
    """Where base models come from: `tiny` (built offline), a local folder, an s3:// folder or a hub id."""

    base: ModelSpec = Field(default="tiny", min_length=1)
    clip: ModelSpec = Field(default="tiny", min_length=1)
    cache_dir: NodeCache = Field(default="~/.cache/diffmix", min_length=1, description="Each node's model cache "
                                 "(tiny models, copies of s3:// models)")
    tiny_seed: int = Field(default=0, ge=0)
    resolution: int = Field(default=512, ge=8, le=2048, description="Pixel size images are generated/trained at")


class PretrainConfig(Section):
    """Train a small SD from scratch on the dataset's train split (`diffmix pretrain`): the demo's base model.

    Phase 1 trains the VAE, phase 2 the UNet and text encoder on "photo of a <class> <metaclass>" prompts.
    Operational fields (workers, checkpoints, logging, eval) do not change the result's cache key.
    """

    output: OptionalOutputUri = Field(default=None, description="Model folder URI; default <run>/pretrained")
    resolution: int = Field(default=32, ge=8, le=512)
    vae_blocks: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=1, max_length=4)
    vae_norm_groups: int = Field(default=16, ge=1)
    unet_blocks: list[int] = Field(default_factory=lambda: [64, 128], min_length=2, max_length=4)
    layers_per_block: int = Field(default=2, ge=1, le=4)
    attention_head_dim: int = Field(default=8, ge=1)
    vae_steps: int = Field(default=1000, ge=1)
    vae_learning_rate: float = Field(default=1e-3, gt=0, le=1)
    kl_weight: float = Field(default=1e-6, ge=0)
    steps: int = Field(default=4000, ge=1, description="Denoiser (UNet + text encoder) steps")
    learning_rate: float = Field(default=5e-4, gt=0, le=1)
    batch_size: int = Field(default=128, ge=1, description="Total batch over all workers")
    prompt_dropout: float = Field(default=0.1, ge=0, lt=1, description="Share of empty prompts (for guidance)")
    weight_decay: float = Field(default=1e-2, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    mixed_precision: Literal["fp16", "bf16", "no"] = "fp16"
    save_dtype: Literal["fp16", "fp32"] = Field(default="fp16", description="Weights as written (fp16 halves size)")
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool | None = None
    cpus_per_worker: float = Field(default=1.0, gt=0)
    worker_resources: dict[str, float] = Field(default_factory=dict, description=WORKER_RESOURCES_HELP)
    checkpoint_every: int = Field(default=500, ge=1)
    log_every: int = Field(default=50, ge=1)
    max_failures: int = Field(default=1, ge=0)
    keep_checkpoints: int = Field(default=1, ge=1)
    eval_per_class: int = Field(default=10, ge=0, description="diff-gen samples per class for the quality check")
    eval_steps: int = Field(default=25, ge=1)
    eval_guidance: float = Field(default=3.0, ge=1)

    @field_validator("worker_resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return custom_resources(v, "cpus_per_worker / use_gpu")

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> "PretrainConfig":
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_workers ({self.num_workers})")
        return self


SYNTHESIS_STRATEGIES = ("diff-mix", "diff-aug", "diff-gen", "real-mix", "real-aug", "real-gen")


class FinetuneConfig(Section):
    """Personalise the base model to the classes (DESIGN.md step 1). Paper defaults."""

    strategy: Literal["ti", "db", "ti+db"] = "ti+db"
    lora_rank: int = Field(default=10, ge=1, le=512)
    steps: int = Field(default=35000, ge=1)
    batch_size: int = Field(default=8, ge=1, description="Total batch over all workers")
    learning_rate: float = Field(default=5e-5, gt=0, le=1)
    resolution: int = Field(default=512, ge=8, le=2048)
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool | None = Field(default=None, description="None: use GPUs when the cluster has them")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    worker_resources: dict[str, float] = Field(default_factory=dict, description=WORKER_RESOURCES_HELP)
    mixed_precision: Literal["fp16", "bf16", "no"] = "fp16"
    class_balanced: bool = False
    checkpoint_every: int = Field(default=500, ge=1)
    log_every: int = Field(default=50, ge=1)
    max_failures: int = Field(default=3, ge=0)
    output: OptionalOutputUri = Field(default=None, description="Adapter URI; default <run>/adapter")
    fail_at_step: int | None = Field(default=None, ge=1, description="Test-only: a worker raises once at this step")
    weight_decay: float = Field(default=1e-2, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    random_flip: bool = True
    keep_checkpoints: int = Field(default=2, ge=1, description="Newest checkpoints kept in storage")
    data_cpus: float = Field(default=1.0, gt=0, description="CPUs per Ray Data decode task")
    rows_per_task: int = Field(default=64, ge=1, description="Images per Ray Data decode task (whole batches)")
    inline_rows: int = Field(default=256, ge=0, description="Epochs of at most this many rows per worker are decoded "
                             "in the train worker (a Ray Data stream's start-up costs more); 0: always stream")

    @field_validator("worker_resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return custom_resources(v, "cpus_per_worker / use_gpu")

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> "FinetuneConfig":
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_workers ({self.num_workers})")
        return self


class SpeedConfig(Section):
    """Exact speed options of the Translator (engine.synthesis.speed): execution knobs, not in the plan hash;
    the applied values are recorded in the set's manifest. Each computes the same math with other kernels,
    so images may differ in the last bits (measured: tests/synthesis/test_speed_exactness.py and
    `python -m engine.bench synthesis --gpu`). CUDA-only ones are recorded as not applicable on a CPU."""

    compile: Literal["off", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"] = Field(
        default="off", description="torch.compile the UNet (and VAE encoder/decoder) with this Inductor mode; "
        "off by default: the first warm-up costs minutes on a CPU and tens of seconds per actor on a GPU (cached "
        "under <model.cache_dir>/inductor for restarts); reduce-overhead adds CUDA graphs (CPU: compiled "
        "without them)")
    compile_vae: bool = Field(default=True, description="With compile: also compile the VAE encoder and decoder")
    channels_last: bool | None = Field(default=None, description="UNet/VAE in channels-last memory format; "
                                       "default: on CUDA, off on CPU (no gain there)")
    fuse_qkv: bool | None = Field(default=None, description="Fused attention q/k/v projections "
                                  "(pipe.fuse_qkv_projections()); default: on CUDA, off on CPU")
    cudnn_benchmark: bool = Field(default=False, description="cuDNN autotuning (CUDA only): off by default, its "
                                  "per-process choice of kernels makes images differ in the last bits between actors")
    pad_last_batch: bool | None = Field(default=None, description="Pad a strength run's last short batch to "
                                        "batch_size (padded rows are generated and dropped) so shapes stay static; "
                                        "default: on when compile is on")

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        """YAML reads a bare `off` (and `false`) as a boolean: both mean compile off."""
        return "off" if v is False else v


class SynthesisConfig(Section):
    """Generate the synthetic set (DESIGN.md steps 2-4).

    Plan knobs (strategy ... resolution, seed, strength_run, referable_classes, long_tail) change the
    images and are in the plan hash; execution knobs (batch sizes, actors, files) are not.
    """

    strategy: Literal["diff-mix", "diff-aug", "diff-gen", "real-mix", "real-aug", "real-gen"] = "diff-mix"
    strengths: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.9], min_length=1,
                                   description="Translation strengths s in (0, 1]; *-gen rows always use 1")
    multiplier: float = Field(default=5.0, gt=0, le=100, description="Plan rows = multiplier x |train|")
    num_inference_steps: int = Field(default=25, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=0)
    sampler: Literal["dpmsolver++", "ddim", "pndm", "euler", "model"] = Field(
        default="dpmsolver++", description="The paper's DPM-Solver++ (Table 7), built from the model's noise "
        "schedule; 'model' keeps whatever scheduler the model folder ships (SD-1.5: PNDM)")
    resolution: int = Field(default=512, ge=8, le=2048, description="Side of generated images (multiple of 8)")
    seed: int | None = Field(default=None, ge=0, description="Plan seed; default run.seed")
    strength_run: int = Field(default=8, ge=1, description="Consecutive plan rows sharing one strength")
    batch_size: int = Field(default=8, ge=1, description="Images per pipeline call (one strength per call)")
    referable_classes: int | None = Field(default=None, ge=1, description="Limit of reference classes per target")
    long_tail: bool = Field(default=False, description="Targets follow the reversed class distribution")
    adapter: OptionalInputUri = Field(default=None, description="Adapter URI; default finetune.output or "
                                      "<run>/adapter (diff-* only)")
    output: OptionalOutputUri = Field(default=None, description="Shard folder URI; default <run>/synthetic/<plan hash>")
    rows_per_file: int = Field(default=64, ge=1, description="Plan rows per Parquet file (files align to the plan)")
    num_gpus_per_actor: float = Field(default=1.0, ge=0, description="GPUs per Translator actor; 0 runs on CPU")
    cpus_per_actor: float = Field(default=1.0, gt=0, description="CPUs reserved per Translator / ClipScorer actor")
    cpus_per_task: float = Field(default=0.5, gt=0, description="CPUs per reference-loading and sink task")
    cpu_threads: int | None = Field(default=None, ge=1, description="torch threads per actor on CPU; default Ray's")
    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    actor_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each Translator actor asks for, e.g. {gpu_slot: 1} "
        "to place Translators only on nodes started with that resource; CPU/GPU have their own keys")
    clip_batch_size: int = Field(default=32, ge=1)
    clip_num_gpus: float = Field(default=0.0, ge=0)
    clip_actors: int = Field(default=1, ge=1, description="Upper size of the ClipScorer pool")
    filter_quantile: float = Field(default=0.1, ge=0, lt=1)
    overwrite: bool = False
    log_every_s: float = Field(default=30.0, gt=0)
    fail_actor_after: int | None = Field(default=None, ge=1, description="Test-only: an actor dies once after N batches")
    speed: SpeedConfig = Field(default_factory=SpeedConfig, description="Exact Translator speed options (not in "
                               "the plan hash)")

    @field_validator("strengths")
    @classmethod
    def _strengths_in_range(cls, v: list[float]) -> list[float]:
        for s in v:
            if not 0 < s <= 1:
                raise ValueError(f"strength {s} is outside (0, 1]")
        if len(set(v)) != len(v):
            raise ValueError("strengths must be distinct")
        return v

    @field_validator("resolution")
    @classmethod
    def _multiple_of_eight(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"resolution {v} is not a multiple of 8 (the VAE downsamples by 8)")
        return v

    @field_validator("actor_resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return custom_resources(v, "cpus_per_actor / num_gpus_per_actor")

    @model_validator(mode="after")
    def _at_least_one_step(self) -> "SynthesisConfig":
        for s in self.strengths:
            if int(self.num_inference_steps * s) < 1:
                raise ValueError(
                    f"strength {s} with num_inference_steps={self.num_inference_steps} gives int(T*s) = 0 denoising steps"
                )
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        return self


class ClassifyConfig(Section):
    """Train a classifier on real + synthetic data (DESIGN.md steps 3, 5)."""

    backbone: Literal["small_cnn", "resnet18", "resnet50", "vit_b_16"] = "resnet50"
    pretrained: OptionalInputUri = Field(default=None, description="URI/path of torchvision weights; None = random "
                                         "init")
    resolution: int = Field(default=448, ge=8, le=2048)
    batch_size: int = Field(default=32, ge=1, description="Total batch over all workers")
    epochs: int = Field(default=128, ge=1)
    learning_rate: float = Field(default=0.05, gt=0, le=10)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    warmup_epochs: int = Field(default=0, ge=0)
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    cutmix_prob: float = Field(default=0.0, ge=0, le=1)
    cutmix_alpha: float = Field(default=1.0, gt=0)
    mixup_prob: float = Field(default=0.0, ge=0, le=1)
    mixup_alpha: float = Field(default=0.2, gt=0)
    cmo_prob: float = Field(default=0.0, ge=0, le=1, description="CMO: probability a batch gets a box pasted "
                            "from a minority-oversampled real batch (Park et al. 2022: 0.5); 0 = off")
    cmo_alpha: float = Field(default=1.0, gt=0, description="CMO: Beta(alpha, alpha) of the kept area")
    cmo_weight_power: float = Field(default=1.0, ge=0, description="CMO: real rows drawn with weight 1/n_k^power")
    cmo_start_after: int = Field(default=3, ge=0, description="CMO runs in epochs e (from 0) with "
                                 "start_after < e < epochs - end_before (the CMO code's start/end_data_aug)")
    cmo_end_before: int = Field(default=3, ge=0)
    drw_from: float | None = Field(default=None, gt=0, lt=1, description="DRW: class-balanced loss weights "
                                   "after this fraction of the epochs (the CMO code: 160 of 200 = 0.8); None = off")
    drw_beta: float = Field(default=0.9999, ge=0, lt=1, description="DRW: weights (1 - beta) / (1 - beta^n_k)")
    amp: bool = True
    seed: int | None = Field(default=None, ge=0, description="Classifier seed (init, draws, shuffles); None: run.seed")
    p: float = Field(default=0.1, ge=0, le=1, description="Probability a real sample is replaced by a synthetic one")
    gamma: float = Field(default=0.5, ge=0, description="Soft-label exponent: target gets s**gamma (0: the "
                         "whole label, Table 6's gamma = 0 row)")
    synthetic: OptionalInputUri = Field(default=None, description="Synthetic shard folder URI; default: this run's")
    strengths: list[float] | None = Field(default=None, description="Use only these strengths")
    multiplier: float | None = Field(default=None, gt=0, description="Use only the plan prefix of this multiplier")
    eval_every: int = Field(default=1, ge=1)
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool | None = None
    cpus_per_worker: float = Field(default=1.0, gt=0)
    worker_resources: dict[str, float] = Field(default_factory=dict, description=WORKER_RESOURCES_HELP)
    many_shot_threshold: int = Field(default=100, ge=1, description="Long-tail: classes with more train images are 'many'")
    few_shot_threshold: int = Field(default=20, ge=1, description="Long-tail: classes with fewer train images are 'few'")
    checkpoint_every: int = Field(default=1, ge=1, description="Epochs between checkpoints")
    max_failures: int = Field(default=3, ge=0)
    output: OptionalOutputUri = Field(default=None, description="Default <run>/classify/<hash>")
    fail_at_epoch: int | None = Field(default=None, ge=1, description="Test-only: a worker raises once at this epoch")
    filtered: bool = Field(default=True, description="Use only synthetic rows kept by the CLIP filter")
    crop_scale_min: float = Field(default=0.08, gt=0, le=1, description="RandomResizedCrop: smallest area fraction")
    hflip: bool = Field(default=True, description="Random horizontal flips in training")
    eval_crop: float = Field(default=0.875, gt=0, le=1, description="Eval: resize to resolution/eval_crop, center crop")
    data_cpus: float = Field(default=1.0, gt=0, description="CPUs per Ray Data decode/augment task")
    prefetch_batches: int = Field(default=2, ge=0)
    rows_per_task: int = Field(default=64, ge=1, description="Images per Ray Data decode task (raise for small images)")
    inline_rows: int = Field(default=256, ge=0, description="Epochs/evals of at most this many rows per worker are "
                             "decoded in the train worker (a Ray Data stream's start-up costs more); 0: always stream")
    keep_checkpoints: int = Field(default=2, ge=1, description="Checkpoints kept in the run folder")

    @field_validator("worker_resources")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        return custom_resources(v, "cpus_per_worker / use_gpu")

    @field_validator("strengths")
    @classmethod
    def _strengths_in_range(cls, v: list[float] | None) -> list[float] | None:
        for s in v or []:
            if not 0 < s <= 1:
                raise ValueError(f"strength {s} is outside (0, 1]")
        if v is not None and not v:
            raise ValueError("strengths is empty (leave it out to use every strength)")
        return v

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> "ClassifyConfig":
        if self.few_shot_threshold > self.many_shot_threshold:
            raise ValueError(
                f"few_shot_threshold ({self.few_shot_threshold}) > many_shot_threshold ({self.many_shot_threshold})"
            )
        return self


class SweepConfig(Section):
    """Ray Tune grid over the method's knobs; strengths may need synthesis first."""

    gamma: list[float] = Field(default_factory=lambda: [0.5], min_length=1)
    p: list[float] = Field(default_factory=lambda: [0.1], min_length=1)
    seeds: list[int] | None = Field(default=None, description="Classifier seeds (classify.seed), crossed with "
                                    "the other axes; results add each grid point's mean and sample std over them")
    multiplier: list[float] | None = None
    strengths: list[list[float]] | None = Field(default=None, description="Each item is one strength set")
    metric: str = "top1"
    mode: Literal["max", "min"] = "max"
    asha: bool = False
    max_concurrent_trials: int = Field(default=1, ge=1)
    include_baseline: bool = True
    grace_period: int = Field(default=1, ge=1, description="ASHA: epochs before a trial can be stopped")
    trial_cpus: float = Field(default=1.0, gt=0, description="CPUs of each Tune trial's driver (besides its workers)")
    output: OptionalOutputUri = Field(default=None, description="Default <run>/sweep/<hash>")

    @field_validator("multiplier")
    @classmethod
    def _multiplier_positive(cls, v: list[float] | None) -> list[float] | None:
        for m in v or []:
            if m <= 0:
                raise ValueError(f"multiplier {m} must be > 0")
        if v is not None and not v:
            raise ValueError("multiplier list is empty (leave it out to use the whole set)")
        return v

    @field_validator("strengths")
    @classmethod
    def _strength_sets(cls, v: list[list[float]] | None) -> list[list[float]] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("strengths is empty (leave it out to use the configured synthetic set)")
        for group in v:
            if not group:
                raise ValueError("a strength set is empty")
            for s in group:
                if not 0 < s <= 1:
                    raise ValueError(f"strength {s} is outside (0, 1]")
        return v

    @field_validator("metric")
    @classmethod
    def _metric_named(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("metric is empty")
        return v

    @field_validator("gamma")
    @classmethod
    def _gamma_non_negative(cls, v: list[float]) -> list[float]:
        for g in v:
            if not g >= 0:  # 0 is Table 6's hard-label row; NaN fails too
                raise ValueError(f"gamma {g} must be >= 0")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds_distinct(cls, v: list[int] | None) -> list[int] | None:
        """Repeated seeds would train the same classifier twice and shrink the reported spread."""
        if v is None:
            return v
        if not v:
            raise ValueError("seeds is empty (leave it out to train each grid point once, with classify.seed)")
        if any(s < 0 for s in v):
            raise ValueError(f"seeds {v} must be >= 0")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds {v} repeat a seed")
        return v

    @field_validator("p")
    @classmethod
    def _p_in_range(cls, v: list[float]) -> list[float]:
        for p in v:
            if not 0 <= p <= 1:
                raise ValueError(f"p {p} is outside [0, 1]")
        return v


class EvaluateConfig(Section):
    """`diffmix evaluate`: a finished classifier on a second dataset (e.g. the CUB classifier on Waterbirds)."""

    classifier: OptionalInputUri = Field(default=None, description="A classify output folder; default this config's")
    dataset: DatasetConfig | None = Field(default=None, description="The dataset to evaluate on (same keys as "
                                          "`dataset`); its `group` column gives per-group accuracy")
    split: Literal["test", "train", "all"] = Field(default="test", description="Which of its rows to evaluate")
    class_map: dict[str, str] | None = Field(default=None, description="Classifier class -> evaluation class "
                                             "(many to one); default: the same names")
    batch_size: int = Field(default=64, ge=1)
    max_actors: int = Field(default=1, ge=1, description="Upper size of the predictor actor pool")
    cpus_per_actor: float = Field(default=1.0, gt=0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    output: OptionalOutputUri = Field(default=None, description="Default <run>/evaluate/<hash>")


class TrackingConfig(Section):
    """Where training curves go besides metrics.json (engine.tracking); never part of an output hash."""

    tensorboard: bool = Field(default=True, description="TensorBoard event files in each run's tensorboard/")
    mlflow_uri: TrackingUri = Field(default=None, description="MLflow tracking URI (e.g. file:///path/mlruns or "
                                   "http://host:5000); needs the `mlflow` extra")
    mlflow_experiment: str = Field(default="diffmix", min_length=1)


class ExportConfig(Section):
    """`diffmix export`: a finished synthetic set as an image folder (+ labels.jsonl) or WebDataset shards."""

    format: Literal["imagefolder", "webdataset"] = "imagefolder"
    output: OptionalOutputUri = Field(default=None, description="Folder URI to export to (required)")
    synthetic: OptionalInputUri = Field(default=None, description="The set's folder; default this run's one set")
    filtered: bool = Field(default=True, description="Only rows the CLIP filter keeps")
    strengths: list[float] | None = Field(default=None, description="Only these strengths")
    multiplier: float | None = Field(default=None, gt=0, description="Only the plan prefix of this multiplier")
    gamma: float | None = Field(default=None, ge=0, description="Soft labels' exponent; default classify.gamma")
    shard_rows: int = Field(default=1000, ge=1, description="WebDataset: samples per tar shard")
    rows_per_task: int = Field(default=256, ge=1, description="Image folder: images written per Ray task")
    cpus_per_task: float = Field(default=0.5, gt=0)


class MetricsConfig(Section):
    """Synthetic-set metrics against the real train set (engine.synthesis.set_metrics): CLIP-space Fréchet
    distance and per-class diversity, Inception FID with local weights. Measuring never changes a set."""

    enabled: bool = Field(default=True, description="Measure each synthetic set when it completes (manifest)")
    inception_weights: OptionalInputUri = Field(default=None, description="URI of a torchvision inception_v3 state "
                                          "dict: adds Inception FID (never downloaded)")
    filtered: bool = Field(default=True, description="Measure the rows the CLIP filter keeps (what classify uses)")
    sets: InputUris = Field(default=None, description="`diffmix compare-sets`: set folders; default every "
                                   "set under <run>/synthetic")
    batch_size: int = Field(default=32, ge=1)
    max_actors: int = Field(default=1, ge=1, description="Upper size of the feature actor pool")
    cpus_per_actor: float = Field(default=1.0, gt=0)
    cpus_per_task: float = Field(default=0.5, gt=0, description="CPUs per shard-reading task")
    num_gpus_per_actor: float = Field(default=0.0, ge=0)


class NodePrice(Section):
    """One cloud instance type: what an hour of it costs and how many GPUs it has."""

    usd_per_hour: float = Field(gt=0)
    gpus: int = Field(default=0, ge=0)
    gpu: str | None = Field(default=None, description="GPU model, for the printout")


# Illustrative defaults for the instance types cluster.yaml names: AWS on-demand Linux list prices
# (us-east-1 / us-west-2) as recorded by the engine's authors from AWS's public price pages in 2024, NOT
# looked up at run time and not current: edit `cost.node_types` (or override it) before relying on a figure.
# cluster.yaml asks for spot capacity for the GPU group, which is usually cheaper than these.
DEFAULT_NODE_PRICES: dict[str, dict[str, Any]] = {
    "m5.2xlarge": {"usd_per_hour": 0.384, "gpus": 0},
    "g5.2xlarge": {"usd_per_hour": 1.212, "gpus": 1, "gpu": "A10G"},
    "p4d.24xlarge": {"usd_per_hour": 32.7726, "gpus": 8, "gpu": "A100 40GB"},
}


class CostConfig(Section):
    """`diffmix plan`: the dry run that sizes and prices a synthesis job before any GPU works."""

    cluster_yaml: DriverFile = Field(default="cluster.yaml", min_length=1,
                              description="Ray cluster launcher config whose node types are priced")
    node_types: dict[str, NodePrice] = Field(
        default_factory=lambda: {k: NodePrice(**v) for k, v in DEFAULT_NODE_PRICES.items()},
        description="Instance type -> hourly price and GPUs (illustrative 2024 AWS list prices: edit them)")
    rate: float | None = Field(default=None, gt=0, description="Images per GPU-hour to plan with (default: the "
                               "recorded GPU benchmark, engine.synthesis.recorded_rates, scaled by work per image)")
    deadline_h: float | None = Field(default=None, gt=0, description="Hours the synthesis must finish in")
    train_images: int | None = Field(default=None, ge=1, description="|train| to plan with instead of counting "
                                     "the dataset (after dataset.subset)")
    png_bytes_per_pixel: float = Field(default=1.5, gt=0, description="Stored PNG bytes per pixel (RGB photos "
                                       "compress losslessly to about 10-14 bits per pixel)")


class DemoConfig(Section):
    """The built-in demo's comparison: which methods to train, over which seeds, and the report."""

    methods: list[Literal["real-only", "real-aug", "real-mix", "diff-aug", "diff-mix", "diff-gen"]] = Field(
        default_factory=lambda: ["real-only", "diff-aug", "diff-mix", "diff-gen"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    report_pairs: int = Field(default=4, ge=1, le=20, description="Class pairs in the translation grid")
    concurrent_runs: int = Field(default=2, ge=1, le=16, description="Classifiers trained at once (each its own "
                                 "Ray Train run, seeded by its config, so the results do not depend on it): one run's "
                                 "start-up overlaps another's epochs; the local instance is sized for this many")


class ExperimentConfig(Section):
    preset: str | None = Field(default=None, description="A named method (engine.presets): its values are set "
                               "over the YAML's, below key=value overrides; `diffmix presets` lists them")
    run: RunConfig = Field(default_factory=RunConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)
    cost: CostConfig = Field(default_factory=CostConfig)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str | None) -> str | None:
        from engine.presets import PRESETS

        if v is not None and v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; known: {', '.join(sorted(PRESETS))}")
        return v

    def hash(self, *sections: str) -> str:
        """Stable hash of the given sections (all when none): names outputs that depend on them."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _locations(section: BaseModel, prefix: str) -> Iterator[tuple[str, Location, Any]]:
    """(dotted key, marker, value) of every path field under `section` (nested sections included)."""
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        marker = next((m for m in info.metadata if isinstance(m, Location)), None)
        if marker is not None:
            yield f"{prefix}{name}", marker, value
        elif isinstance(value, BaseModel):
            yield from _locations(value, f"{prefix}{name}.")


def shared_local_paths(config: ExperimentConfig) -> list[tuple[str, str]]:
    """(key, path) of the set path fields that every node must reach and that point at local disk (per-node
    caches and driver-only files left out)."""
    out = []
    for key, marker, value in _locations(config, ""):
        values = value if isinstance(value, list) else [value]
        out += [(key, v) for v in values if marker.shared and isinstance(v, str) and is_local_location(v)]
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), with the value parsed as YAML (numbers, lists, bools)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
    return path, value


def set_value(data: dict[str, Any], path: list[str], value: Any, what: str) -> None:
    """Set `data[a][b]... = value`, creating sections; `what` names the setting in errors."""
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        set_value(data, path, value, f"override {text!r}")
    return data


def apply_preset(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The named preset's values over the YAML (`preset:` there, or a `preset=` override, which wins)."""
    from engine.presets import preset_values

    name = data.get("preset")
    for text in overrides:
        path, value = parse_override(text)
        if path == ["preset"]:
            name = value
    if name is None:
        return data
    if not isinstance(name, str):
        raise ConfigError(f"preset must be a name (got {name!r})")
    try:
        values = preset_values(name)
    except ValueError as exc:
        raise ConfigError(f"preset: {exc}") from None
    for dotted, value in values.items():
        set_value(data, dotted.split("."), value, f"preset {name!r}")
    data["preset"] = name
    return data


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg} (got {err.get('input')!r})" if err["type"] != "missing" else f"  {key}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def validate(data: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load YAML (or defaults when no path), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at top level")
        data = loaded or {}
    data = apply_preset(data, list(overrides or []))
    data = apply_overrides(data, list(overrides or []))
    return validate(data)
