"""`make demo`: the whole method on the built-in default, end to end, with a report.

Local Ray, tiny offline models, the built-in digits, output under ./runs/demo/. It fine-tunes once,
makes one synthetic set per strategy the comparison needs, trains one classifier per method and
seed, and writes `runs/demo/report/report.html` (translation grid, results table, throughput,
CLIP histogram). Every stage reuses finished work, so a rerun only redoes what is missing.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from functools import partial
from typing import Any, Callable, TypeVar

from engine.cli import setup_logging, stage_needs
from engine.config import ExperimentConfig, load_config
from engine.data import load_dataset
from engine.data.shards import SyntheticSet
from engine.pipeline import run_stage, start_ray_for, with_overrides
from engine.report import ReportInputs, ResultRow, StageTiming, write_report
from engine.storage import Storage, join

log = logging.getLogger(__name__)
T = TypeVar("T")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "examples", "demo.yaml")
# the paper's direction of effect in few-shot settings (Diff-Mix, Table 2)
EXPECTED_ORDER = ("diff-mix", "diff-aug", "real-only")


def start_local_ray(config: ExperimentConfig) -> None:
    """A local Ray sized for every stage the demo runs and for `demo.concurrent_runs` classifiers at once, at
    least 4 logical CPUs on a laptop (more than the cores let fractional tasks pack)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    classifiers = stage_needs("classify", config).times(config.demo.concurrent_runs, "demo.concurrent_runs")
    if start_ray_for(config, ["finetune", "synthesize", "classify"], "the demo", size_for=[classifiers], min_cpus=4,
                     object_store_memory=512 * 1024 * 1024, include_dashboard=False, configure_logging=False):
        ray.data.DataContext.get_current().enable_progress_bars = False


def synthetic_sets(config: ExperimentConfig, methods: list[str], adapter: str | None) -> dict[str, dict[str, Any]]:
    """One synthetic set per synthesis strategy the methods need (real-only needs none)."""
    out = {}
    for method in methods:
        if method == "real-only":
            continue
        fields: dict[str, Any] = {"strategy": method}
        if method.startswith("diff-"):
            fields["adapter"] = adapter
        out[method] = run_stage("synthesize", with_overrides(config, synthesis=fields))
    return out


def run_at_most(calls: list[Callable[[], T]], at_once: int) -> list[T]:
    """Every call, at most `at_once` at a time (threads: each call is a Ray job step that mostly waits on its
    actors), results in call order. After a failure (or Ctrl-C) no further call starts, the running ones end,
    and the first failure in call order is raised."""
    with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="demo-run") as pool:
        futures = [pool.submit(call) for call in calls]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and not f.cancelled() and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()  # type: ignore[misc]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return [f.result() for f in futures]


def classify_runs(config: ExperimentConfig, methods: list[str], sets: dict[str, dict[str, Any]]
                  ) -> tuple[list[ResultRow], list[dict[str, Any]]]:
    """One classifier per method and seed, `demo.concurrent_runs` at a time."""
    p = {method: 0.0 if method == "real-only" else config.classify.p for method in methods}
    runs: list[tuple[str, ExperimentConfig]] = []
    for method in methods:
        for seed in config.demo.seeds:
            fields: dict[str, Any] = {"p": p[method], "seed": seed}
            if method != "real-only":
                fields["synthetic"] = sets[method]["output"]
            runs.append((method, with_overrides(config, classify=fields)))
    summaries = run_at_most([partial(run_stage, "classify", cfg) for _, cfg in runs], config.demo.concurrent_runs)
    rows = []
    for method in methods:
        top1 = [float(s["metrics"]["top1"]) for (m, _), s in zip(runs, summaries) if m == method]
        rows.append(ResultRow(method, "-" if method == "real-only" else method, p[method],
                              None if method == "real-only" else config.classify.gamma, top1))
    return rows, summaries


def verdict(rows: list[ResultRow]) -> str:
    """Each step of the paper's order, measured: holds or not, and whether the gap beats the seed spread."""
    by = {r.method: r for r in rows}
    present = [m for m in EXPECTED_ORDER if m in by]
    if len(present) < 2:
        return "Too few methods ran to compare against the paper's direction of effect."
    steps, holds, clear = [], True, True
    for a, b in zip(present, present[1:]):
        gap = by[a].mean - by[b].mean
        beyond_noise = abs(gap) > max(by[a].std, by[b].std)
        holds &= gap >= 0
        clear &= beyond_noise
        steps.append(f"{a} {by[a].mean:.3f} ± {by[a].std:.3f} vs {b} {by[b].mean:.3f} ± {by[b].std:.3f}: "
                     f"{'holds' if gap >= 0 else 'reversed'} by {abs(gap):.3f}"
                     f"{'' if beyond_noise else ' (within the seed-to-seed spread)'}")
    if holds and clear:
        reading = "the miniature reproduces it."
    elif holds:
        reading = "the miniature shows the same order, but not every gap is larger than the seed-to-seed spread."
    else:
        reading = "the miniature does NOT reproduce it."
    return (f"The paper's few-shot direction of effect is {' >= '.join(present)}; {reading} "
            + "; ".join(steps) + f" (top-1, mean ± std over {len(by[present[0]].top1)} classifier seeds).")


def base_model_note(config: ExperimentConfig) -> str | None:
    """What the base model is, and how well it draws the classes, when it records that (pretrain.json)."""
    from engine.models.base import SHIPPED_MODELS
    from engine.pretrain import read_info

    spec = config.model.base
    info = read_info(SHIPPED_MODELS[spec][0] if spec in SHIPPED_MODELS else spec, Storage.from_config(config))
    if info is None:
        return None
    check = info.get("check") or {}
    drawn = (f"; a classifier trained on real images only labels {100 * check['accuracy']:.0f}% of its "
             f"{check['samples']} plain-prompt samples as the prompted class (chance {100 * check['chance']:.0f}%)"
             if check else "")
    return (f"Base model {spec}: a small Stable Diffusion pre-trained from scratch by `diffmix pretrain` on the "
            f"{info['train_rows']} train images of {info['dataset']} ({info['pretrain']['steps']} denoiser steps)"
            f"{drawn}. The classifiers below see only the few-shot subset; the test split is never used for "
            f"pre-training.")


def timings(finetune: dict[str, Any] | None, sets: dict[str, dict[str, Any]], runs: list[dict[str, Any]],
            classify_s: float, at_once: int) -> list[StageTiming]:
    """Each stage's throughput; the classifiers' over the wall time of all of them (they overlap)."""
    out = []
    if finetune and not finetune.get("reused"):
        out.append(StageTiming("finetune", int(finetune["steps"]), "steps", float(finetune["stage_elapsed_s"])))
    for method, s in sets.items():
        if s.get("written"):
            out.append(StageTiming(f"synthesize ({method})", int(s["written"]), "images", float(s["stage_elapsed_s"])))
    trained = [r for r in runs if not r.get("reused")]  # a reused classifier took no training time
    samples = sum(int(r["metrics"].get("train_rows", 0)) * int(r["metrics"].get("epoch", 0)) for r in trained)
    if samples and classify_s:
        out.append(StageTiming(f"classify ({len(trained)} runs, {min(at_once, len(trained))} at a time)", samples,
                               "samples", classify_s))
    return out


def run(config: ExperimentConfig) -> dict[str, Any]:
    start_local_ray(config)
    storage = Storage.from_config(config)
    methods = list(config.demo.methods)
    dataset = load_dataset(config, storage)
    finetune = None
    if any(m.startswith("diff-") for m in methods):
        finetune = run_stage("finetune", config)
    sets = synthetic_sets(config, methods, finetune["artifact"] if finetune else None)
    started = time.perf_counter()
    rows, runs = classify_runs(config, methods, sets)
    classify_s = time.perf_counter() - started
    grid_method = next((m for m in ("diff-mix", "real-mix") if m in sets), None)
    score_method = grid_method or next(iter(sets), None)
    inputs = ReportInputs(
        title=f"Diff-Mix demo: {dataset.name}, {len(dataset.class_names)} classes",
        class_names=dataset.class_names,
        real_images=dict(zip(dataset.train.column("id").to_pylist(), dataset.train.column("image").to_pylist())),
        grid_set=SyntheticSet.open(sets[grid_method]["output"], storage) if grid_method else None,
        score_set=SyntheticSet.open(sets[score_method]["output"], storage) if score_method else None,
        results=rows, verdict=verdict(rows),
        timings=timings(finetune, sets, runs, classify_s, config.demo.concurrent_runs),
        set_metrics={m: s["set_metrics"] for m, s in sets.items() if s.get("set_metrics")},
        notes=[n for n in (base_model_note(config),
                           f"config hash {config.hash()}; seeds {config.demo.seeds}; p = {config.classify.p}, "
                           f"gamma = {config.classify.gamma}; strengths {config.synthesis.strengths}; "
                           f"fine-tuning {config.finetune.strategy}, {config.finetune.steps} steps") if n],
    )
    page = write_report(inputs, join(config.run.uri, "report"), storage)
    return {"report": page, "results": {r.method: {"mean": r.mean, "std": r.std, "top1": r.top1} for r in rows},
            "set_metrics": {m: s.get("set_metrics") for m, s in sets.items()}}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = load_config(DEMO_CONFIG, list(argv if argv is not None else sys.argv[1:]))
    summary = run(config)
    print(f"demo report: {os.path.abspath(summary['report'])}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
