"""Translator speed options (issue #14) on the tiny offline model, CPU fp32, no Ray: each exact option's images
against eager's on the same plan rows (engine.synthesis.exactness tolerance, CLIP order), a padded last batch
byte for byte, the options kept out of the plan hash and recorded in the manifest as they apply on a CPU."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine.config import load_config
from engine.storage import Storage
from engine.synthesis.exactness import MAX_FRACTION_OFF, MAX_MEAN_ABS_LEVELS, compare
from engine.synthesis.manifest import speed_record
from engine.synthesis.score import load_scorer
from engine.synthesis.speed import NOT_ON_CPU, SpeedOptions, resolve
from engine.synthesis.translate import ModelRef, TranslateParams, Translator, translate_rows

SIZE = 32
WORDS = ("zero", "one", "two", "digit")
STEPS = 3


@pytest.fixture(scope="module")
def sd(tiny_cache: Path) -> ModelRef:
    return ModelRef("tiny", str(tiny_cache), "sd", 0, SIZE, WORDS)


def plan_rows() -> tuple[pa.Table, np.ndarray]:
    """Six rows, two strength runs of three: at batch 2 each run ends in a short batch of one row."""
    refs = np.random.default_rng(0).integers(0, 256, size=(6, SIZE, SIZE, 3), dtype=np.uint8)
    table = pa.table({"strength": [0.6, 0.6, 0.6, 1.0, 1.0, 1.0], "seed": [11, 12, 13, 14, 15, 16],
                      "prompt": ["photo of a two digit", "photo of a one digit", "photo of a zero digit"] * 2})
    return table, refs


def images(sd: ModelRef, options: SpeedOptions, batch: int = 2) -> tuple[np.ndarray, Translator]:
    t = Translator(sd, Storage(), TranslateParams(STEPS, 7.5, SIZE, batch), speed=options)
    table, refs = plan_rows()
    return translate_rows(t.pipes, table, refs, t.params), t


@pytest.fixture(scope="module")
def eager(sd: ModelRef) -> np.ndarray:
    return images(sd, SpeedOptions())[0]


@pytest.fixture(scope="module")
def scorer(tiny_cache: Path):
    return load_scorer(ModelRef("tiny", str(tiny_cache), "clip", 0, SIZE, WORDS), Storage(), "digit")


@pytest.mark.parametrize("options", [SpeedOptions(channels_last=True), SpeedOptions(fuse_qkv=True),
                                     SpeedOptions(channels_last=True, fuse_qkv=True, cudnn_benchmark=True)],
                         ids=["channels_last", "fuse_qkv", "channels_last+fuse_qkv+cudnn"])
def test_exact_options_match_eager_within_the_stated_tolerance(sd, eager, scorer, options):
    out, t = images(sd, options)
    assert t.pipes.speed["channels_last"] is bool(options.channels_last)
    assert t.pipes.speed["fuse_qkv"] is bool(options.fuse_qkv)
    if options.fuse_qkv:
        assert type(t.pipes.img2img.unet.attn_processors[next(iter(t.pipes.img2img.unet.attn_processors))]
                    ).__name__ == "FusedAttnProcessor2_0"
    ex = compare(eager, out, scorer(eager, 8), scorer(out, 8))
    assert ex.mean_abs_levels <= MAX_MEAN_ABS_LEVELS and ex.fraction_off <= MAX_FRACTION_OFF, ex.brief()
    assert ex.clip_order_same and ex.within_tolerance


def test_fused_projections_keep_a_fine_tuned_adapter(sd, eager, scorer, tmp_path):
    """fuse_qkv concatenates the attention projections' *base* weights: the Translator merges the adapter's LoRA
    into them first (load_adapter(fuse=True)); loaded unmerged, the fused projections would drop the fine-tuned
    q/k/v deltas without a word. The adapter's images must differ clearly from the base model's (so this
    comparison can fail) and fused must match unfused within the tolerance."""
    from engine.testing.adapter import write_random_adapter

    folder = str(tmp_path / "adapter")
    write_random_adapter(sd.resolve(), folder, ["zero", "one", "two"], "digit", strategy="db")
    table, refs = plan_rows()

    def with_adapter(options: SpeedOptions) -> np.ndarray:
        t = Translator(sd, Storage(), TranslateParams(STEPS, 7.5, SIZE, 2), adapter_uri=folder, speed=options)
        return translate_rows(t.pipes, table, refs, t.params)

    unfused, fused = with_adapter(SpeedOptions()), with_adapter(SpeedOptions(fuse_qkv=True))
    assert not compare(eager, unfused).within_tolerance  # the adapter changes the images
    ex = compare(unfused, fused, scorer(unfused, 8), scorer(fused, 8))
    assert ex.within_tolerance, ex.brief()


def test_compile_artifacts_are_cached_under_the_model_cache(tiny_cache, monkeypatch):
    """torch.compile itself is not run here: a cold Inductor build of the tiny UNet + VAE takes minutes on
    this 2-core box (its exactness is printed by `python -m engine.bench.synthesis_gpu --device cpu --tiny`).
    What the actor sets before compiling is checked: the cache folder and the on-disk caches."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    from engine.synthesis.speed import inductor_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what torch writes on first use
    assert inductor_cache(str(tiny_cache)) == str(tiny_cache / "inductor") == cache_dir()
    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tiny_cache / "chosen"))  # a user's choice is kept
    assert inductor_cache(str(tiny_cache)) == str(tiny_cache / "chosen")
    eff = resolve(SpeedOptions(compile="reduce-overhead"), "cpu")
    assert eff.compile == "default" and eff.pad_last_batch and eff.compile_vae
    assert any("CUDA graphs" in note for note in eff.notes)
    assert resolve(SpeedOptions(compile="reduce-overhead"), "cuda").compile == "reduce-overhead"


def test_padded_last_batch_leaves_real_rows_unchanged(sd):
    """Padding a short batch with copies of its last row: every call has the full shape, and the real rows
    are byte for byte what they are next to real neighbours in a full batch (per-row generators). Against
    the unpadded short batch they differ only as any two batch sizes do (CPU kernels pick blocking by
    shape: at most 1/255 here), within the exactness tolerance."""
    calls: list[int] = []
    t = Translator(sd, Storage(), TranslateParams(STEPS, 7.5, SIZE, 4), speed=SpeedOptions(pad_last_batch=True))
    assert t.params.pad_last_batch
    t.pipes.img2img.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    table, refs = plan_rows()
    padded = translate_rows(t.pipes, table, refs, t.params)  # runs of 3 rows, each padded to 4
    assert set(calls) == {8}  # 4 rows x (cond + uncond) in every call
    full = pa.table({"strength": [0.6] * 4, "seed": [11, 12, 13, 99],
                     "prompt": table.column("prompt").to_pylist()[:3] + ["photo of a one digit"]})
    neighbours = translate_rows(t.pipes, full, np.concatenate([refs[:3], refs[5:6]]), t.params)
    assert np.array_equal(padded[:3], neighbours[:3])
    unpadded = images(sd, SpeedOptions(pad_last_batch=False), batch=4)[0]
    assert compare(unpadded, padded).within_tolerance


def test_speed_options_stay_out_of_the_plan_hash_and_are_recorded(tiny_cache):
    from engine.synthesis.stage import prepare

    base = ["dataset.subset.kind=few_shot", "dataset.subset.shots=1", "synthesis.strategy=real-mix",
            f"model.cache_dir={tiny_cache}", "model.resolution=32", "synthesis.resolution=32",
            "synthesis.num_gpus_per_actor=0"]
    fast = base + ["synthesis.speed.compile=reduce-overhead", "synthesis.speed.channels_last=true",
                   "synthesis.speed.fuse_qkv=true", "synthesis.speed.cudnn_benchmark=true",
                   "synthesis.speed.pad_last_batch=false"]
    plain, tuned = load_config(None, base), load_config(None, fast)
    assert prepare(plain).plan_hash == prepare(tuned).plan_hash
    record = speed_record(tuned.synthesis)
    assert record["device"] == "cpu" and record["cudnn_benchmark"] == NOT_ON_CPU
    assert record["compile"] == "default" and record["channels_last"] is True and record["pad_last_batch"] is False
    assert speed_record(plain.synthesis)["compile"] == "off"
    gpu = load_config(None, ["synthesis.speed.cudnn_benchmark=true", "synthesis.speed.compile=reduce-overhead"])
    on_gpu = speed_record(gpu.synthesis)  # default num_gpus_per_actor=1: the actors run on CUDA
    assert on_gpu["cudnn_benchmark"] is True and on_gpu["compile"] == "reduce-overhead"
    assert on_gpu["channels_last"] is True and on_gpu["fuse_qkv"] is True and on_gpu["pad_last_batch"] is True


def test_bad_compile_mode_is_named():
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match="synthesis.speed.compile"):
        load_config(None, ["synthesis.speed.compile=fastest"])
    with pytest.raises(ValueError, match="synthesis.speed.compile"):
        resolve(SpeedOptions(compile="fastest"), "cpu")
