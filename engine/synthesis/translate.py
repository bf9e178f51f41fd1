"""Translate plan rows into images: SDEdit-style img2img (or text-to-image for *-gen), batched by strength.

`Translator` is the Ray Data actor: it resolves and loads the pipeline (and the fine-tuned adapter for
diff-*) once in `__init__`, on the device it finds there (CUDA fp16, else CPU fp32). `translate_rows`
is the same work without Ray, used by the actor, the benchmark's bare loop and the tests.

Within a window, rows are grouped by strength (first appearance order) and each group is cut into
sub-batches of `batch_size` rows: one pipeline call per sub-batch with a list of prompts and one
`torch.Generator` per row, seeded from the row's seed on the CPU, so a row's noise does not depend on
its batch neighbours or the device. `num_inference_steps=T, strength=s` runs `int(T*s)` UNet steps.
With `pad_last_batch` a group's last short sub-batch is padded to `batch_size` rows (copies of its last
row, generated and discarded) so every call has one shape, as compiled graphs and CUDA graphs want.

Speed options (`synthesis.speed`, engine.synthesis.speed) are applied once in the actor after loading;
with a compiled UNet the actor runs one warm-up batch in `__init__` and logs its start-up times.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa

from engine.models.base import ModelRef  # noqa: F401  (re-exported: actors take it)
from engine.models.sampler import PAPER_SAMPLER, set_sampler
from engine.storage import Storage, redact
from engine.synthesis.speed import SpeedOptions, apply as apply_speed, resolve as resolve_speed
from engine.synthesis.windows import column_to_pixels, map_windows, pixels_to_column

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class SynthesisError(RuntimeError):
    """A synthesis job that cannot go on; the message names the file, row, key or URI."""


@dataclass(frozen=True)
class TranslateParams:
    num_inference_steps: int
    guidance_scale: float
    resolution: int
    batch_size: int
    sampler: str = PAPER_SAMPLER
    pad_last_batch: bool = False


def sub_batches(strengths: Sequence[float], has_ref: Sequence[bool], batch_size: int) -> list[np.ndarray]:
    """Row positions per pipeline call: grouped by (strength, has reference), in order, cut at batch_size."""
    groups: dict[tuple[float, bool], list[int]] = {}
    for i, key in enumerate(zip(strengths, has_ref)):
        groups.setdefault((float(key[0]), bool(key[1])), []).append(i)
    out = []
    for rows in groups.values():
        for lo in range(0, len(rows), batch_size):
            out.append(np.asarray(rows[lo: lo + batch_size], dtype=np.int64))
    return out


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline output in [0, 1] (n, H, W, 3) -> uint8, rounding; NaNs (fp16 overflow) become 0."""
    return np.clip(np.nan_to_num(images, nan=0.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def tensor_to_uint8(images: "torch.Tensor") -> np.ndarray:
    """(n, 3, H, W) in [0, 1] on any device -> (n, H, W, 3) uint8 numpy; converted on the device (4x less to copy)."""
    import torch

    out = torch.nan_to_num(images.float(), nan=0.0).mul_(255.0).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def encode_references(pipe: Any, pixels: np.ndarray, gens: "list[torch.Generator]") -> "torch.Tensor":
    """VAE latents of a batch of references in one encoder call, sampled with each row's own generator.

    The stock img2img pipeline encodes a list-of-generators batch one image at a time; this is the same
    computation (each generator's first draw is its latent sample, as there) at batch size n.
    """
    import torch

    x = torch.from_numpy(pixels).to(pipe._execution_device).permute(0, 3, 1, 2)
    x = x.to(pipe.vae.dtype).div_(127.5).sub_(1.0)  # [0, 255] -> [-1, 1], as the image processor does
    dist = pipe.vae.encode(x).latent_dist
    return dist.sample(generator=gens) * pipe.vae.config.scaling_factor


def generators(seeds: Sequence[int]) -> "list[torch.Generator]":
    import torch

    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


class Pipelines:
    """The img2img pipeline plus a text-to-image view over the same modules (for *-gen rows)."""

    def __init__(self, img2img: Any, speed: dict[str, Any] | None = None) -> None:
        self.img2img = img2img
        self.speed = speed or {}  # the applied speed options (engine.synthesis.speed.Effective.record)
        self._txt2img: Any = None

    @property
    def txt2img(self) -> Any:
        if self._txt2img is None:
            from diffusers import StableDiffusionPipeline

            comps = {k: v for k, v in self.img2img.components.items()
                     if k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker",
                              "feature_extractor", "image_encoder")}
            self._txt2img = StableDiffusionPipeline(**comps, requires_safety_checker=False)
            self._txt2img.set_progress_bar_config(disable=True)
        return self._txt2img


def translate_rows(pipes: Pipelines, rows: pa.Table, ref_pixels: np.ndarray | None, params: TranslateParams) -> np.ndarray:
    """Images (n, R, R, 3) uint8 for plan rows; `ref_pixels[i]` is row i's resized reference (None: *-gen)."""
    import torch

    n = rows.num_rows
    size = params.resolution
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    strengths = rows.column("strength").to_pylist()
    seeds = rows.column("seed").to_pylist()
    prompts = rows.column("prompt").to_pylist()
    has_ref = [ref_pixels is not None] * n
    for chunk in sub_batches(strengths, has_ref, params.batch_size):
        rows_in = padded(chunk, params.batch_size) if params.pad_last_batch else chunk
        gens = generators([seeds[i] for i in rows_in])
        common = dict(prompt=[prompts[i] for i in rows_in], num_inference_steps=params.num_inference_steps,
                      guidance_scale=params.guidance_scale, generator=gens, output_type="pt")
        with torch.inference_mode():
            if ref_pixels is None:
                result = pipes.txt2img(height=size, width=size, **common)
            else:
                latents = encode_references(pipes.img2img, ref_pixels[rows_in], gens)
                result = pipes.img2img(image=latents, strength=float(strengths[chunk[0]]), **common)
            out[chunk] = tensor_to_uint8(result.images[: len(chunk)])
    return out


def padded(chunk: np.ndarray, batch_size: int) -> np.ndarray:
    """`chunk` filled up to `batch_size` rows with copies of its last row (their images are discarded)."""
    return np.concatenate([chunk, np.repeat(chunk[-1:], max(batch_size - len(chunk), 0))])


def warm_up(pipes: Pipelines, params: TranslateParams) -> float:
    """One full batch through the img2img path (encoder, UNet with guidance, decoder) at the fewest steps:
    compiles every graph a strength run uses. Returns its seconds."""
    import pyarrow as pa

    n = params.batch_size
    strength = min(1.0, 1.5 / params.num_inference_steps)  # int(T * s) == 1 denoising step
    rows = pa.table({"strength": [strength] * n, "seed": list(range(n)), "prompt": [""] * n})
    refs = np.zeros((n, params.resolution, params.resolution, 3), dtype=np.uint8)
    t = time.perf_counter()
    translate_rows(pipes, rows, refs, params)
    return time.perf_counter() - t


def load_pipelines(model: ModelRef, storage: Storage, adapter_uri: str | None = None,
                   device: "str | torch.device | None" = None, cpu_threads: int | None = None,
                   sampler: str = PAPER_SAMPLER, speed: SpeedOptions | None = None) -> Pipelines:
    """Resolve the base model on this node, load it (CUDA fp16 / CPU fp32), apply the adapter if any,
    sample with `sampler` (the paper's DPM-Solver++ unless told otherwise; never the folder's by accident)
    and apply the speed options last (fused projections must see the adapter's fused weights)."""
    import torch

    from engine.models import load_img2img_pipeline, pick_device_dtype

    dev, dtype = pick_device_dtype(device)
    if dev.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    pipe = load_img2img_pipeline(model.resolve(storage), device=dev, dtype=dtype)
    if adapter_uri is not None:
        from engine.models.adapters import load_adapter

        info = load_adapter(pipe, adapter_uri, storage, fuse=True)
        log.info("translator uses adapter %s (%s)", redact(adapter_uri), info.strategy)
    set_sampler(pipe, sampler)
    effective = resolve_speed(speed or SpeedOptions(), dev.type)
    return Pipelines(pipe, apply_speed(pipe, effective, model.cache_dir))


class Translator:
    """Ray Data actor: one pipeline per actor, one window in, the same window with `pixels` out."""

    def __init__(self, model: ModelRef, storage: Storage, params: TranslateParams, adapter_uri: str | None = None,
                 cpu_threads: int | None = None, fail_after: int | None = None, fail_marker: str | None = None,
                 speed: SpeedOptions | None = None) -> None:
        t0 = time.perf_counter()
        self.pipes = load_pipelines(model, storage, adapter_uri, cpu_threads=cpu_threads, sampler=params.sampler,
                                    speed=speed)
        self.load_s = time.perf_counter() - t0
        if self.pipes.speed.get("pad_last_batch"):
            params = replace(params, pad_last_batch=True)
        self.params = params
        self.warmup_s = warm_up(self.pipes, params) if self.pipes.speed.get("compile", "off") != "off" else 0.0
        log.info("translator start-up: model load + speed options %.1f s, warm-up %.1f s (compile %s)",
                 self.load_s, self.warmup_s, self.pipes.speed.get("compile", "off"))
        self.fail_after = fail_after
        self.fail_marker = fail_marker
        self.calls = 0

    def _maybe_die(self) -> None:
        """Test hook (`synthesis.fail_actor_after`): the process exits once, mid-run, like a lost GPU node."""
        if self.fail_after is None or self.fail_marker is None or self.calls < self.fail_after:
            return
        if os.path.exists(self.fail_marker):
            return
        with open(self.fail_marker, "w") as fh:
            fh.write(str(os.getpid()))
        log.warning("fail_actor_after=%d: translator process %d exits now (test hook)", self.fail_after, os.getpid())
        os._exit(1)

    def translate_window(self, start: int, end: int, rows: pa.Table) -> pa.Table:
        refs = None
        if "ref_pixels" in rows.column_names and rows.column("ref_pixels").null_count == 0:
            refs = column_to_pixels(rows.column("ref_pixels"), self.params.resolution)
        images = translate_rows(self.pipes, rows, refs, self.params)
        if "ref_pixels" in rows.column_names:
            rows = rows.drop_columns(["ref_pixels"])
        return rows.append_column("pixels", pixels_to_column(images))

    def __call__(self, batch: pa.Table) -> pa.Table:
        self._maybe_die()
        self.calls += 1
        return map_windows(batch, self.translate_window)
