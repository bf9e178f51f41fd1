"""Synthesis throughput of the Translator's speed options (`python -m engine.bench synthesis --gpu`, issue #14).

On CUDA: random weights with SD-1.5's published shapes (UNet 860M, VAE 84M, CLIP-L text encoder 123M),
fp16, 512 px, DPM-Solver++ with T = 25, s in {0.5, 0.7, 0.9}, guidance 7.5: the paper's setting, as images
per GPU-hour next to its 4,179 per RTX 3090-hour and the ~93,000/hour compute floor (DESIGN.md). One run
prints, on the same model:

* (a) a naive loop with one image per pipeline call (the reference implementation's loop);
* (b) the engine's Translator code alone (`translate_rows`: one strength per call, batched prompts, one
  generator per row), no Ray, eager, then with each speed option (engine.synthesis.speed) on its own and
  with the best exact combination; each option's warm-up (first batch, compile included) and its
  exactness against eager on the same plan rows (engine.synthesis.exactness, CLIP order by the tiny CLIP);
* the engine stream, eager and with the best options: `diffmix synthesize` end to end in a fresh driver
  with its own local Ray (references -> one Translator actor -> ClipScorer -> Parquet sink) on the same model
  saved as a diffusers folder; its steady rate (after the first file) and its rate including start-up;
* actor start-up (model load + options + warm-up) in a fresh process with a cold, then a warm, compile cache.

`--device cpu --tiny` runs the same code on the tiny offline model (fp32, 32 px) so the path is tested
without a GPU (tests/bench/test_synthesis_gpu_bench.py); without Ray (`--no-stream`) (a) and (b) still run:
`python -m engine.bench.synthesis_gpu --no-stream`.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from engine.bench.table import Row
from engine.synthesis.speed import SpeedOptions

log = logging.getLogger(__name__)

PAPER_IMAGES_PER_GPU_HOUR = 4179.0  # RTX 3090, fp16, 512 px, T = 25, batch 1
FLOOR_IMAGES_PER_GPU_HOUR = 93000.0  # DESIGN.md: ~31 TFLOP per image at an H100's ~800 TFLOP/s
GOAL_IMAGES_PER_GPU_HOUR = 46000.0  # issue #14: half the floor, in the engine stream, exact
STRENGTHS = (0.5, 0.7, 0.9)
STEPS = 25
GUIDANCE = 7.5
SIZE = 512
TINY_SIZE = 32
TINY_WORDS = ("bird", "albatross", "sparrow")
PROMPT = "photo of a albatross bird"
EAGER = SpeedOptions(channels_last=False, fuse_qkv=False, pad_last_batch=False)


@dataclass(frozen=True)
class Setup:
    """Where and on what the benchmark runs: CUDA + the SD-1.5-sized model, or any device + the tiny one."""

    device: str
    tiny: bool
    work: str

    @property
    def size(self) -> int:
        return TINY_SIZE if self.tiny else SIZE

    @property
    def cache(self) -> str:
        return os.path.join(self.work, "cache")

    @property
    def unit(self) -> str:
        return "images/GPU-hour" if self.device == "cuda" else "images/CPU-hour"

    @property
    def label(self) -> str:
        if not self.tiny:
            return "SD-1.5-sized fp16 512px T=25"
        return f"tiny SD {'fp16' if self.device == 'cuda' else 'fp32'} {TINY_SIZE}px T=25"


def sd15_pipeline(device: str = "cuda") -> Any:
    """A StableDiffusionImg2ImgPipeline with SD-1.5's architecture and random weights, fp16 on `device`."""
    import torch
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from engine.models.tokenizer import make_clip_tokenizer

    tokenizer = make_clip_tokenizer(list(TINY_WORDS))
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


def model_ref(setup: Setup) -> Any:
    """How a Translator (the stream's actor, the start-up probe) finds the benchmark's model."""
    from engine.models.base import ModelRef

    if setup.tiny:
        return ModelRef("tiny", setup.cache, "sd", 0, TINY_SIZE, TINY_WORDS)
    return ModelRef(os.path.join(setup.work, "sd15-random"), setup.cache, "sd")


def base_pipeline(setup: Setup) -> Any:
    """The eager pipeline every variant starts from (a deep copy each), with the paper's sampler; the SD-1.5
    one is also saved as a diffusers folder for the stream and the start-up probe."""
    from engine.models import load_img2img_pipeline

    if setup.tiny:
        pipe = load_img2img_pipeline(model_ref(setup).resolve(), device=setup.device)
    else:
        pipe = sd15_pipeline(setup.device)
        folder = model_ref(setup).spec
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            pipe.save_pretrained(folder)
    from engine.models.sampler import PAPER_SAMPLER, set_sampler

    set_sampler(pipe, PAPER_SAMPLER)
    return pipe


def plan_rows(n: int, batch: int, seed: int = 0) -> Any:
    """n diff-mix-like rows in strength runs of `batch` (as the engine's plan lays them out)."""
    import pyarrow as pa

    strengths = [STRENGTHS[(i // batch) % len(STRENGTHS)] for i in range(n)]
    return pa.table({"index": np.arange(n), "strength": strengths, "seed": np.arange(n) + seed,
                     "prompt": [PROMPT] * n})


def references(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def naive_rate(pipe: Any, setup: Setup, rows: int) -> float:
    """images/s of one image per pipeline call (the reference implementation's loop)."""
    import torch

    size = setup.size
    refs = torch.from_numpy(references(rows, size, 1)).permute(0, 3, 1, 2).float() / 255.0

    def one(i: int) -> None:
        with torch.inference_mode():
            pipe(PROMPT, image=refs[i: i + 1], strength=STRENGTHS[i % 3], num_inference_steps=STEPS,
                 guidance_scale=GUIDANCE, generator=torch.Generator("cpu").manual_seed(i), output_type="np")

    for i in range(min(2, rows)):
        one(i)
    _sync(setup.device)
    t = time.perf_counter()
    for i in range(rows):
        one(i)
    _sync(setup.device)
    return rows / (time.perf_counter() - t)


@dataclass
class Variant:
    """One set of speed options measured on the bare translate: rate, warm-up and images for exactness."""

    name: str
    options: SpeedOptions
    rate: float = 0.0
    warmup_s: float = 0.0
    images: np.ndarray | None = None
    scores: np.ndarray | None = None
    exactness: dict[str, Any] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return bool(self.exactness.get("within_tolerance", True))


def variants(setup: Setup, compile_modes: list[str]) -> list[Variant]:
    """Eager, then each option alone (cuDNN autotuning only where it exists; each compile mode pads the last batch)."""
    out = [Variant("eager", EAGER), Variant("channels_last", replace(EAGER, channels_last=True)),
           Variant("fuse_qkv", replace(EAGER, fuse_qkv=True))]
    if setup.device == "cuda":
        out.append(Variant("cudnn_benchmark", replace(EAGER, cudnn_benchmark=True)))
    out += [Variant(f"compile={m}", replace(EAGER, compile=m, pad_last_batch=True)) for m in compile_modes]
    return out


def best_options(measured: list[Variant]) -> SpeedOptions:
    """Every option that was exact and faster than eager on its own; of the compile modes, the fastest such."""
    eager = measured[0].rate
    wins = [v for v in measured[1:] if v.exact and v.rate > eager]
    best = EAGER
    for v in wins:
        o = v.options
        if o.compile != "off":
            continue
        best = replace(best, channels_last=best.channels_last or o.channels_last, fuse_qkv=best.fuse_qkv or o.fuse_qkv,
                       cudnn_benchmark=best.cudnn_benchmark or o.cudnn_benchmark)
    compiled = [v for v in wins if v.options.compile != "off"]
    if compiled:
        fastest = max(compiled, key=lambda v: v.rate).options
        best = replace(best, compile=fastest.compile, pad_last_batch=True)
    return best


def describe(options: SpeedOptions) -> str:
    on = [k for k in ("channels_last", "fuse_qkv", "cudnn_benchmark") if getattr(options, k)]
    if options.compile != "off":
        on.append(f"compile={options.compile}")
    return "+".join(on) or "eager"


def measure_variant(base: Any, setup: Setup, variant: Variant, batch: int, windows: int, exact_rows: int) -> None:
    """Options applied to a deep copy of `base`; warm-up = the first full-batch window (compile included)."""
    import torch

    from engine.synthesis.speed import apply, resolve
    from engine.synthesis.translate import Pipelines, TranslateParams, translate_rows

    torch._dynamo.reset()  # each compiled variant starts from empty in-memory caches (the disk cache stays)
    pipe = copy.deepcopy(base)
    eff = resolve(variant.options, setup.device)
    pipes = Pipelines(pipe, apply(pipe, eff, setup.cache))
    params = TranslateParams(STEPS, GUIDANCE, setup.size, batch, pad_last_batch=eff.pad_last_batch)
    n = batch * len(STRENGTHS)
    refs = references(n, setup.size)
    t = time.perf_counter()
    translate_rows(pipes, plan_rows(n, batch), refs, params)  # warm-up: compile, kernels, autotune, allocator
    _sync(setup.device)
    variant.warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    for w in range(windows):
        out = translate_rows(pipes, plan_rows(n, batch, seed=1000 * (w + 1)), refs, params)
    _sync(setup.device)
    assert out.shape == (n, setup.size, setup.size, 3)
    variant.rate = windows * n / (time.perf_counter() - t)
    variant.images = translate_rows(pipes, plan_rows(exact_rows, batch, seed=7), references(exact_rows, setup.size, 7),
                                    params)
    torch.backends.cudnn.benchmark = False  # a process-wide flag: the next variant starts without it
    del pipes, pipe
    if setup.device == "cuda":
        torch.cuda.empty_cache()


def score_and_compare(measured: list[Variant], setup: Setup) -> None:
    """CLIP scores of every variant's exactness images (tiny CLIP: only their order matters), and each
    variant against eager."""
    from engine.models.base import ModelRef
    from engine.storage import Storage
    from engine.synthesis.exactness import compare
    from engine.synthesis.score import load_scorer

    scorer = load_scorer(ModelRef("tiny", setup.cache, "clip", 0, TINY_SIZE, TINY_WORDS), Storage(), "bird")
    for v in measured:
        v.scores = scorer(v.images, 32)
    for v in measured:
        v.exactness = compare(measured[0].images, v.images, measured[0].scores, v.scores).record()


def stream_overrides(setup: Setup, out: str, batch: int, rows: int, options: SpeedOptions) -> list[str]:
    """The CPU benchmark's plan (engine.bench.synthesis.overrides: digits references, upscaled to 512 px on
    the SD-1.5-sized folder) with one Translator actor and `options` as `synthesis.speed.*` overrides."""
    from engine.bench.synthesis import overrides

    gpus = 1 if setup.device == "cuda" else 0
    argv = overrides(out, setup.cache, rows / 20, resolution=setup.size, batch=batch, clip_batch=32,
                     gpus_per_actor=gpus)
    if not setup.tiny:
        argv.append(f"model.base={model_ref(setup).spec}")
    argv += ["synthesis.min_actors=1", "synthesis.max_actors=1", f"synthesis.clip_actors={2 if gpus else 1}"]
    argv += [f"synthesis.speed.{k}={'null' if v is None else v}" for k, v in asdict(options).items()]
    return argv


def stream_summary(setup: Setup, batch: int, rows: int, options: SpeedOptions, tag: str) -> dict[str, Any]:
    """`diffmix synthesize` in a fresh driver (its own local Ray)."""
    from engine.bench.synthesis import run_driver

    if setup.device == "cuda":
        import torch

        torch.cuda.empty_cache()  # hand this process's cached blocks back before the actor loads its copy
    out = os.path.join(setup.work, f"stream-b{batch}-{tag}")
    return run_driver(stream_overrides(setup, out, batch, rows, options), timeout_s=600,
                      log_file=os.path.join(setup.work, f"stream-b{batch}-{tag}.log"))


def startup_probe(setup: Setup, batch: int, options: SpeedOptions, inductor_dir: str) -> dict[str, float]:
    """Actor start-up without Ray in a fresh process: imports, model load + options, warm-up (engine Translator)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=inductor_dir, PYTHONUNBUFFERED="1")
    if setup.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    spec = {"setup": asdict(setup), "batch": batch, "options": asdict(options)}
    cmd = [sys.executable, "-m", "engine.bench.synthesis_gpu", "--startup-probe", json.dumps(spec)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STARTUP ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"start-up probe failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {**json.loads(lines[-1][len("STARTUP "):]), "process_s": time.perf_counter() - t}


def probe_main(spec_json: str) -> int:
    """Child process of `startup_probe`."""
    t0 = time.perf_counter()
    from engine.storage import Storage
    from engine.synthesis.translate import TranslateParams, Translator

    spec = json.loads(spec_json)
    setup = Setup(**spec["setup"])
    imported = time.perf_counter() - t0
    translator = Translator(model_ref(setup), Storage(), TranslateParams(STEPS, GUIDANCE, setup.size, spec["batch"]),
                            speed=SpeedOptions(**spec["options"]))
    print("STARTUP " + json.dumps({"import_s": imported, "load_s": translator.load_s,
                                   "warmup_s": translator.warmup_s}), flush=True)
    return 0


def _rows_for_variants(setup: Setup, measured: list[Variant], batch: int, naive: float, card: str) -> list[Row]:
    unit, scale = setup.unit, 3600.0
    eager = measured[0]
    rows = []
    for v in measured:
        case = f"(b) translate, batch {batch}, {v.name} (warm-up {v.warmup_s:.1f} s)"
        rows.append(Row("synthesis-gpu", case, v.rate * scale, unit, baseline="(a) naive loop" if v is eager
                        else "(b) eager", ratio=v.rate / (naive if v is eager else eager.rate), device=card))
        if v is not eager:
            ex = v.exactness
            rows.append(Row("synthesis-gpu", f"exactness {v.name} vs eager: MAD/255, {100 * ex['fraction_off']:.2f}% "
                            f"> 2/255, max {ex['max_abs_levels']}, CLIP order "
                            f"{'same' if ex['clip_order_same'] else 'CHANGED'}", ex["mean_abs_levels"], "levels",
                            target="MAD <= 0.5, <= 1% off, order same", ok=ex["within_tolerance"], device=card))
    return rows


def _stream_rows(setup: Setup, summary: dict[str, Any], label: str, bare: float, naive: float, card: str) -> list[Row]:
    steady = summary["steady_images_per_s"] or summary["images_per_s"]
    if steady is None or summary["images_per_s"] is None:  # engine.rates: the run was too short to give a rate
        log.warning("engine stream, %s: no rate (%s); raise --stream-rows", label, summary.get("rate_note"))
        return []
    case = f"engine stream (Ray), {label}, {summary['written']} rows, steady"
    rows = [Row("synthesis-gpu", case, steady * 3600, setup.unit, baseline="(a) naive loop", ratio=steady / naive,
                device=card),
            Row("synthesis-gpu", case, steady * 3600, setup.unit, baseline="(b) translate, same options",
                ratio=steady / bare, target=">= 0.85x", ok=steady / bare >= 0.85, device=card),
            Row("synthesis-gpu", f"engine stream (Ray), {label}, incl. Ray start and actor start-up",
                summary["images_per_s"] * 3600, setup.unit, baseline="(b) translate, same options",
                ratio=summary["images_per_s"] / bare, device=card)]
    if not setup.tiny:
        rows += [Row("synthesis-gpu", case, steady * 3600, setup.unit, baseline="paper (RTX 3090)",
                     ratio=steady * 3600 / PAPER_IMAGES_PER_GPU_HOUR, device=card),
                 Row("synthesis-gpu", case, steady * 3600, setup.unit, baseline="floor 93,000/h",
                     ratio=steady * 3600 / FLOOR_IMAGES_PER_GPU_HOUR, target=">= 46,000/h (0.49x)",
                     ok=steady * 3600 >= GOAL_IMAGES_PER_GPU_HOUR, device=card)]
    return rows


def _startup_rows(setup: Setup, cold: dict[str, float], warm: dict[str, float], label: str, card: str) -> list[Row]:
    ratio = cold["warmup_s"] / max(warm["warmup_s"], 1e-9)
    return [Row("synthesis-gpu", f"actor start-up, cold compile cache ({label}): import {cold['import_s']:.1f} + "
                f"load {cold['load_s']:.1f} + warm-up", cold["warmup_s"], "s", device=card),
            Row("synthesis-gpu", f"actor start-up, warm compile cache ({label}): import {warm['import_s']:.1f} + "
                f"load {warm['load_s']:.1f} + warm-up", warm["warmup_s"], "s", baseline="cold warm-up / warm",
                ratio=ratio, target=">= 3x", ok=ratio >= 3, device=card)]


def resolve_setup(args: argparse.Namespace) -> Setup | None:
    import torch

    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    tiny = bool(getattr(args, "tiny", False))
    if device == "cuda" and not torch.cuda.is_available():
        log.warning("synthesis --gpu: CUDA is not available here; GPU rows skipped (--device cpu --tiny runs "
                    "the same code on the tiny model)")
        return None
    if device == "cpu" and not tiny:
        log.warning("synthesis --gpu on cpu: the SD-1.5-sized model in fp32 takes hours here; using --tiny")
        tiny = True
    work = tempfile.mkdtemp(prefix="bench-synthesis-gpu-", dir=os.path.abspath(getattr(args, "out", "runs/bench")))
    return Setup(device, tiny, work)


def default_compile_modes(setup: Setup) -> list[str]:
    return ["max-autotune-no-cudagraphs", "reduce-overhead"] if setup.device == "cuda" else ["default"]


def run(args: argparse.Namespace) -> list[Row]:
    import torch

    setup = resolve_setup(args)
    if setup is None:
        return []
    card = torch.cuda.get_device_name(0) if setup.device == "cuda" else f"cpu x{os.cpu_count()} ({setup.label})"
    modes = getattr(args, "compile_modes", None)
    modes = default_compile_modes(setup) if modes is None else list(modes)
    base = base_pipeline(setup)
    naive = naive_rate(base, setup, rows=int(getattr(args, "naive_rows", 12)))
    rows = [Row("synthesis-gpu", f"(a) naive loop, 1 image/call, {setup.label}", naive * 3600, setup.unit,
                baseline="paper (RTX 3090)" if not setup.tiny else "",
                ratio=naive * 3600 / PAPER_IMAGES_PER_GPU_HOUR if not setup.tiny else None, device=card)]
    for batch in getattr(args, "batches", (16, 32)):
        measured = variants(setup, modes)
        for v in measured:
            log.info("batch %d: measuring %s", batch, v.name)
            measure_variant(base, setup, v, batch, int(getattr(args, "windows", 2)),
                            int(getattr(args, "exact_rows", 2 * batch)))
        score_and_compare(measured, setup)
        best = best_options(measured)
        if best != EAGER:
            combo = Variant(f"best: {describe(best)}", best)
            measure_variant(base, setup, combo, batch, int(getattr(args, "windows", 2)),
                            int(getattr(args, "exact_rows", 2 * batch)))
            measured.append(combo)
            score_and_compare(measured, setup)
        rows += _rows_for_variants(setup, measured, batch, naive, card)
        log.info("batch %d: %s", batch, {v.name: (round(v.rate, 3), v.exactness) for v in measured})
        rates = {describe(v.options): v.rate for v in measured}
        if getattr(args, "stream", True):
            wanted = getattr(args, "streams", ("eager", "best"))
            runs = {"eager": EAGER, **({"best": best} if best != EAGER or "eager" not in wanted else {})}
            for tag, options in ((t, o) for t, o in runs.items() if t in wanted):
                summary = stream_summary(setup, batch, int(getattr(args, "stream_rows", 320)), options, tag)
                log.info("batch %d: stream %s: %s", batch, tag, summary)
                rows += _stream_rows(setup, summary, f"batch {batch}, {describe(options)}",
                                     rates[describe(options)], naive, card)
        if getattr(args, "startup", True):
            probe = best if best.compile != "off" else replace(EAGER, compile=modes[0] if modes else "off")
            inductor = os.path.join(setup.work, f"inductor-b{batch}")
            cold = startup_probe(setup, batch, probe, inductor)
            warm = startup_probe(setup, batch, probe, inductor)
            rows += _startup_rows(setup, cold, warm, f"batch {batch}, {describe(probe)}", card)
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.bench.synthesis_gpu")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--tiny", action="store_true", help="the tiny offline model at 32 px (tests the path on a CPU)")
    p.add_argument("--batches", type=int, nargs="*", default=[16, 32])
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--naive-rows", type=int, default=12)
    p.add_argument("--exact-rows", type=int, default=None, help="plan rows compared with eager (default 2 x batch)")
    p.add_argument("--compile-modes", nargs="*", default=None,
                   help="Inductor modes to measure (default: cuda max-autotune-no-cudagraphs and "
                   "reduce-overhead; cpu default)")
    p.add_argument("--stream-rows", type=int, default=320, help="plan rows of each engine stream run")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="skip the Ray stream (no Ray here)")
    p.add_argument("--streams", nargs="+", choices=["eager", "best"], default=["eager", "best"],
                   help="which engine stream runs: eager options, the best exact combination, or both")
    p.add_argument("--no-startup", dest="startup", action="store_false", help="skip the cold/warm start-up probe")
    p.add_argument("--out", default="runs/bench")
    return p


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--startup-probe":
        sys.exit(probe_main(sys.argv[2]))
    from engine.bench.table import format_table

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ns = parser().parse_args(sys.argv[1:])
    if ns.exact_rows is None:
        del ns.exact_rows
    os.makedirs(ns.out, exist_ok=True)
    print(format_table(run(ns)), flush=True)
