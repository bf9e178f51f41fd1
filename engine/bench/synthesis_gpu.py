"""SD-1.5-sized synthesis throughput on one CUDA GPU (`python -m engine.bench synthesis --gpu`).

Random weights with SD-1.5's published shapes (UNet 860M, VAE 84M, CLIP-L text encoder 123M), fp16,
512 px, DPM-Solver++ with T = 25, s in {0.5, 0.7, 0.9}, guidance 7.5: the paper's setting, reported as
images per GPU-hour next to its 4,179 diff-mix images per RTX 3090-hour. Three contenders share the model:

* (a) a naive loop with one image per pipeline call (the reference implementation's loop);
* (b) the engine's Translator code alone (`translate_rows`: one strength per call, batched prompts, one
  generator per row), no Ray, no scoring, no sink: the GPU's best case for that batch;
* the engine stream: `diffmix synthesize` end to end in a fresh driver with its own local Ray (references
  -> one Translator actor on the GPU -> ClipScorer -> Parquet sink) on the same model saved as a diffusers
  folder; its steady rate (after the first file) and its rate including Ray and model start-up.

Without Ray installed (`--no-stream`), (a) and (b) still run on a bare GPU box:
`python -m engine.bench.synthesis_gpu --no-stream`.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from typing import Any

import numpy as np

from engine.bench.table import Row

log = logging.getLogger(__name__)

PAPER_IMAGES_PER_GPU_HOUR = 4179.0  # RTX 3090, fp16, 512 px, T = 25, batch 1
STRENGTHS = (0.5, 0.7, 0.9)
STEPS = 25
GUIDANCE = 7.5
SIZE = 512


def sd15_pipeline(device: str = "cuda") -> Any:
    """A StableDiffusionImg2ImgPipeline with SD-1.5's architecture and random weights, fp16 on `device`."""
    import torch
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.models.tokenizer import make_clip_tokenizer

    tokenizer = make_clip_tokenizer(["bird", "albatross", "sparrow"])
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, norm_num_groups=32, sample_size=SIZE)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon", steps_offset=1)
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    log.info("SD-1.5-sized pipeline: unet %.0fM, vae %.0fM, text %.0fM parameters",
             *(sum(p.numel() for p in m.parameters()) / 1e6 for m in (unet, vae, text_encoder)))
    return pipe.to(device, torch.float16)


def plan_rows(n: int, batch: int, seed: int = 0) -> Any:
    """n diff-mix-like rows in strength runs of `batch` (as the engine's plan lays them out)."""
    import pyarrow as pa

    strengths = [STRENGTHS[(i // batch) % len(STRENGTHS)] for i in range(n)]
    return pa.table({"index": np.arange(n), "strength": strengths, "seed": np.arange(n) + seed,
                     "prompt": ["photo of a albatross bird"] * n})


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


def engine_rate(pipe: Any, batch: int, windows: int) -> float:
    """images/s of the engine's batched translate, after one warm-up window."""
    from engine.synthesis.translate import Pipelines, TranslateParams, translate_rows

    pipes = Pipelines(pipe)
    params = TranslateParams(STEPS, GUIDANCE, SIZE, batch)
    n = batch * len(STRENGTHS)
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)
    translate_rows(pipes, plan_rows(n, batch), refs, params)  # warm-up: kernels, cuDNN autotune, allocator
    _sync()
    t = time.perf_counter()
    for w in range(windows):
        out = translate_rows(pipes, plan_rows(n, batch, seed=1000 * (w + 1)), refs, params)
    _sync()
    assert out.shape == (n, SIZE, SIZE, 3)
    return windows * n / (time.perf_counter() - t)


def naive_rate(pipe: Any, rows: int) -> float:
    """images/s of one image per pipeline call (the reference implementation's loop)."""
    import torch

    rng = np.random.default_rng(1)
    refs = torch.from_numpy(rng.integers(0, 256, size=(rows, 3, SIZE, SIZE), dtype=np.uint8)).float() / 255.0

    def one(i: int) -> None:
        pipe("photo of a albatross bird", image=refs[i: i + 1], strength=STRENGTHS[i % 3], num_inference_steps=STEPS,
             guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(i), output_type="np")

    for i in range(2):
        one(i)
    _sync()
    t = time.perf_counter()
    for i in range(rows):
        one(i)
    _sync()
    return rows / (time.perf_counter() - t)


def gpu_stream_overrides(out: str, cache: str, model: str, batch: int, rows: int) -> list[str]:
    """The CPU benchmark's plan (engine.bench.synthesis.overrides: digits references, here upscaled to
    512 px) on the SD-1.5-sized folder `model`, one Translator actor holding the GPU."""
    from engine.bench.synthesis import overrides

    return [*overrides(out, cache, rows / 20, resolution=SIZE, batch=batch, clip_batch=32, gpus_per_actor=1),
            f"model.base={model}", "synthesis.min_actors=1", "synthesis.max_actors=1", "synthesis.clip_actors=2"]


def stream_summary(pipe: Any, work: str, batch: int, rows: int) -> dict[str, Any]:
    """`diffmix synthesize` in a fresh driver (its own local Ray) on `pipe` saved as a diffusers folder."""
    import torch

    from engine.bench.synthesis import run_driver

    model = os.path.join(work, "sd15-random")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        pipe.save_pretrained(model)
    torch.cuda.empty_cache()  # hand this process's cached blocks back before the actor loads its copy
    out = os.path.join(work, f"stream-b{batch}")
    return run_driver(gpu_stream_overrides(out, os.path.join(work, "cache"), model, batch, rows), timeout_s=600,
                      log_file=os.path.join(work, f"stream-b{batch}.log"))


def run(args: argparse.Namespace) -> list[Row]:
    import torch

    if not torch.cuda.is_available():
        log.warning("synthesis --gpu: CUDA is not available here; GPU rows skipped")
        return []
    card = torch.cuda.get_device_name(0)
    pipe = sd15_pipeline()
    naive = naive_rate(pipe, rows=int(getattr(args, "naive_rows", 12)))
    rows = [Row("synthesis-gpu", "(a) naive loop, 1 image/call, fp16 512px T=25", naive * 3600, "images/GPU-hour",
                baseline="paper (RTX 3090)", ratio=naive * 3600 / PAPER_IMAGES_PER_GPU_HOUR, device=card)]
    work = tempfile.mkdtemp(prefix="bench-synthesis-gpu-", dir=os.path.abspath(getattr(args, "out", "runs/bench")))
    for batch in getattr(args, "batches", (16, 32)):
        bare = engine_rate(pipe, batch, windows=int(getattr(args, "windows", 2)))
        rows += [Row("synthesis-gpu", f"(b) engine translate alone, batch {batch}", bare * 3600, "images/GPU-hour",
                     baseline="(a) naive loop", ratio=bare / naive, device=card),
                 Row("synthesis-gpu", f"(b) engine translate alone, batch {batch}", bare * 3600, "images/GPU-hour",
                     baseline="paper (RTX 3090)", ratio=bare * 3600 / PAPER_IMAGES_PER_GPU_HOUR, device=card)]
        log.info("batch %d: naive %.2f images/s, translate alone %.2f images/s", batch, naive, bare)
        if not getattr(args, "stream", True):
            continue
        summary = stream_summary(pipe, work, batch, rows=int(getattr(args, "stream_rows", 320)))
        steady = summary["steady_images_per_s"] or summary["images_per_s"]
        log.info("batch %d: stream %s", batch, summary)
        label = f"engine stream (Ray), batch {batch}, {summary['written']} rows"
        rows += [Row("synthesis-gpu", f"{label}, steady", steady * 3600, "images/GPU-hour",
                     baseline="(a) naive loop", ratio=steady / naive, target=">= 4x", ok=steady / naive >= 4,
                     device=card),
                 Row("synthesis-gpu", f"{label}, steady", steady * 3600, "images/GPU-hour",
                     baseline="(b) translate alone", ratio=steady / bare, target=">= 0.85x",
                     ok=steady / bare >= 0.85, device=card),
                 Row("synthesis-gpu", f"{label}, steady", steady * 3600, "images/GPU-hour",
                     baseline="paper (RTX 3090)", ratio=steady * 3600 / PAPER_IMAGES_PER_GPU_HOUR, device=card),
                 Row("synthesis-gpu", f"{label}, incl. Ray and model start-up", summary["images_per_s"] * 3600,
                     "images/GPU-hour", baseline="(b) translate alone", ratio=summary["images_per_s"] / bare,
                     device=card)]
    return rows


if __name__ == "__main__":
    import sys

    from engine.bench.table import format_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m engine.bench.synthesis_gpu")
    parser.add_argument("--batches", type=int, nargs="*", default=[16, 32])
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--naive-rows", type=int, default=12)
    parser.add_argument("--stream-rows", type=int, default=320, help="plan rows of each engine stream run")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="skip the Ray stream (no Ray here)")
    parser.add_argument("--out", default="runs/bench")
    print(format_table(run(parser.parse_args(sys.argv[1:]))), flush=True)
