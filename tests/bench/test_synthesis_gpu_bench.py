"""The GPU synthesis benchmark's code path (issue #14) run end to end on the CPU with the tiny model, at its
smallest size, so a GPU session spends its minutes measuring. Nothing is timed here: the rows' presence,
units and exactness verdicts are checked, not their values. torch.compile is left out (a cold Inductor build
takes minutes on this box); the compile rows run the same functions with another SpeedOptions."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.bench import synthesis_gpu
from engine.bench.table import format_table
from engine.synthesis.speed import SpeedOptions


def test_gpu_bench_path_runs_on_cpu_with_the_tiny_model(tmp_path: Path) -> None:
    args = argparse.Namespace(device="cpu", tiny=True, batches=[2], windows=1, naive_rows=1, exact_rows=3,
                              compile_modes=[], stream=True, streams=["best"], stream_rows=40, startup=True,
                              out=str(tmp_path))
    rows = synthesis_gpu.run(args)
    cases = [r.case for r in rows]
    table = format_table(rows)
    assert cases[0].startswith("(a) naive loop") and rows[0].unit == "images/CPU-hour"
    for name in ("eager", "channels_last", "fuse_qkv"):
        assert any(c.startswith(f"(b) translate, batch 2, {name} ") for c in cases), table
    assert not any("cudnn" in c for c in cases)  # CUDA only: not measured on a CPU
    exact = [r for r in rows if r.case.startswith("exactness")]
    assert len(exact) >= 2 and all(r.ok for r in exact), table  # fp32 CPU: within tolerance of eager
    streams = [r for r in rows if r.case.startswith("engine stream") and r.case.endswith("steady")]
    assert streams and all(r.value > 0 for r in streams), table
    startup = [r for r in rows if r.case.startswith("actor start-up")]
    assert len(startup) == 2 and startup[1].baseline == "cold warm-up / warm", table
    assert json.loads(json.dumps([r.as_dict() for r in rows]))


def test_best_options_take_every_exact_winner_and_the_fastest_compile_mode() -> None:
    eager = synthesis_gpu.EAGER
    measured = [synthesis_gpu.Variant("eager", eager, rate=10.0),
                synthesis_gpu.Variant("channels_last", SpeedOptions(channels_last=True, fuse_qkv=False), rate=11.0),
                synthesis_gpu.Variant("fuse_qkv", SpeedOptions(channels_last=False, fuse_qkv=True), rate=9.0),
                synthesis_gpu.Variant("compile=a", SpeedOptions(compile="default", channels_last=False,
                                                                fuse_qkv=False), rate=14.0),
                synthesis_gpu.Variant("compile=b", SpeedOptions(compile="reduce-overhead", channels_last=False,
                                                                fuse_qkv=False), rate=20.0,
                                      exactness={"within_tolerance": False})]
    best = synthesis_gpu.best_options(measured)
    assert best.channels_last and not best.fuse_qkv and best.compile == "default" and best.pad_last_batch
    assert synthesis_gpu.describe(best) == "channels_last+compile=default"
    assert synthesis_gpu.best_options(measured[:1]) == eager
