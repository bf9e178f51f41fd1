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
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from functools import partial
from typing import Any, Callable, TypeVar

from engine.cli import setup_logging, stage_needs
from engine.config import ExperimentConfig, load_config
from engine.data import ImageDataset, load_dataset, scenes
from engine.data.shards import SyntheticSet
from engine.pipeline import run_stage, start_ray_for, with_overrides
from engine.report import ReportInputs, ResultRow, StageTiming, group_names, write_report
from engine.storage import Storage, join
from engine.translation_measures import Judges, measure_set

log = logging.getLogger(__name__)
T = TypeVar("T")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "examples", "demo.yaml")
# Table 4's comparison: Diff-Mix against real data only and against intra-class translation (Diff-Aug)
COMPARED = "diff-mix"
BASELINES = ("real-only", "diff-aug")


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


def classify_runs(config: ExperimentConfig, methods: list[str], sets: dict[str, dict[str, Any]],
                  dataset: ImageDataset, pools: dict[str, list[int]]) -> tuple[list[ResultRow], list[dict[str, Any]]]:
    """One classifier per method and seed, `demo.concurrent_runs` at a time; top-1 overall and per pooled
    test group (`pools`: group_sets)."""
    p = {method: 0.0 if method == "real-only" else config.classify.p for method in methods}
    runs: list[tuple[str, ExperimentConfig]] = []
    for method in methods:
        for seed in config.demo.seeds:
            fields: dict[str, Any] = {"p": p[method], "seed": seed}
            if method != "real-only":
                fields["synthetic"] = sets[method]["output"]
            runs.append((method, with_overrides(config, classify=fields)))
    summaries = run_at_most([partial(run_stage, "classify", cfg) for _, cfg in runs], config.demo.concurrent_runs)
    sizes = Counter(int(g) for g in dataset.index("test").column("group").to_pylist() if g is not None)
    rows = []
    for method in methods:
        metrics = [s["metrics"] for (m, _), s in zip(runs, summaries) if m == method]
        rows.append(ResultRow(method, "-" if method == "real-only" else method, p[method],
                              None if method == "real-only" else config.classify.gamma,
                              [float(m["top1"]) for m in metrics],
                              groups={name: [pooled_accuracy(m, ids, sizes) for m in metrics]
                                      for name, ids in pools.items()}))
    return rows, summaries


def translation_measures(config: ExperimentConfig, storage: Storage, sets: dict[str, dict[str, Any]]
                         ) -> dict[str, list[dict[str, Any]]]:
    """Per set and strength, what its translations kept of the reference and what they drew (scene miniature
    only: the measures need background families), judged against the full real train split."""
    if not is_scenes(config):
        return {}
    full = load_dataset(config, storage, apply_subset=False)
    judges = Judges.fit(full.rows("train"))
    out = {}
    for method, summary in sets.items():
        rows = SyntheticSet.open(summary["output"], storage).read(filtered=False, with_images=True)
        out[method] = [m.as_dict() for m in measure_set(rows, full.rows("train"), judges, seed=config.run.seed)]
    return out


def verdict(rows: list[ResultRow], group: str | None = None) -> str:
    """diff-mix against each baseline, on the test `group` (e.g. "counterfactual") or overall: better or not,
    and whether the gap is larger than the seed-to-seed spread."""
    by = {r.method: r for r in rows}
    present = [b for b in BASELINES if b in by]
    if COMPARED not in by or not present:
        return "Too few methods ran to compare diff-mix with real-only or diff-aug."
    def value(r: ResultRow) -> tuple[float, float]:
        return (r.group_mean(group), r.group_std(group)) if group else (r.mean, r.std)
    where = f"on the {group} test group" if group else "overall"
    mix_mean, mix_std = value(by[COMPARED])
    steps, wins, clear = [], True, True
    for base in present:
        mean, std = value(by[base])
        gap = mix_mean - mean
        beyond_noise = abs(gap) > max(mix_std, std)
        wins &= gap > 0
        clear &= beyond_noise
        steps.append(f"{COMPARED} {mix_mean:.3f} ± {mix_std:.3f} vs {base} {mean:.3f} ± {std:.3f}: "
                     f"{'better' if gap > 0 else 'not better'} by {gap:+.3f}"
                     f"{'' if beyond_noise else ' (within the seed-to-seed spread)'}")
    if len(by[COMPARED].top1) < 2:
        reading = "one classifier seed has no spread to judge a gap against."
    elif wins and clear:
        reading = "the miniature reproduces it."
    elif wins:
        reading = "the miniature shows the same direction, but not every gap is larger than the seed-to-seed spread."
    else:
        reading = "the miniature does NOT reproduce it."
    return (f"The paper finds diff-mix ahead of {' and '.join(present)} {where} (Table 4); {reading} "
            + "; ".join(steps) + f" (top-1, mean ± std over {len(by[COMPARED].top1)} classifier seeds).")


def is_scenes(config: ExperimentConfig) -> bool:
    return config.dataset.source == "builtin" and config.dataset.builtin == "scenes"


def group_sets(config: ExperimentConfig, dataset: ImageDataset) -> dict[str, list[int]]:
    """The scene miniature's test groups pooled as Table 4 reads them: aligned (the class's own background)
    and counterfactual (any other); other datasets: none."""
    if not is_scenes(config):
        return {}
    ids = sorted({int(g) for g in dataset.index("test").column("group").to_pylist() if g is not None})
    return {"aligned": [g for g in ids if scenes.is_aligned(g)],
            "counterfactual": [g for g in ids if not scenes.is_aligned(g)]}


def pooled_accuracy(metrics: dict[str, Any], groups: list[int], sizes: dict[int, int]) -> float:
    """Top-1 over the union of `groups`, from each group's accuracy and test size."""
    total = sum(sizes[g] for g in groups)
    return sum(float(metrics[f"acc_group_{g}"]) * sizes[g] for g in groups) / total


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


def scene_note(config: ExperimentConfig, dataset: ImageDataset) -> str | None:
    """How correlated the classifiers' train subset really is (a few-shot draw need not hit the configured share)."""
    if not is_scenes(config):
        return None
    groups = [int(g) for g in dataset.rows("train").column("group").to_pylist()]
    own = sum(scenes.is_aligned(g) for g in groups)
    return (f"Scene miniature: {own} of the {len(groups)} train images the classifiers see sit on their class's own "
            f"background family (dataset.scenes.aligned = {config.dataset.scenes.aligned:g} over the full train "
            f"split); the test split puts every test digit on every family ({dataset.index('test').num_rows} "
            f"images, 1 in {scenes.FAMILIES} aligned).")


def console_table(rows: list[ResultRow]) -> str:
    """The results as the last thing on the screen: top-1 overall and per pooled group, mean ± std."""
    names = group_names(rows)
    lines = [f"{'method':<10} {'top-1':>15}" + "".join(f" {n:>15}" for n in names)]
    for r in rows:
        cells = [f"{r.mean:.3f} ± {r.std:.3f}"] + [f"{r.group_mean(n):.3f} ± {r.group_std(n):.3f}" for n in names]
        lines.append(f"{r.method:<10}" + "".join(f" {c:>15}" for c in cells))
    return "\n".join(lines)


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
    pools = group_sets(config, dataset)
    rows, runs = classify_runs(config, methods, sets, dataset, pools)
    classify_s = time.perf_counter() - started
    grid_method = next((m for m in ("diff-mix", "real-mix") if m in sets), None)
    score_method = grid_method or next(iter(sets), None)
    inputs = ReportInputs(
        title=f"Diff-Mix demo: {dataset.name}, {len(dataset.class_names)} classes",
        class_names=dataset.class_names,
        real_images=dict(zip(dataset.train.column("id").to_pylist(), dataset.train.column("image").to_pylist())),
        grid_set=SyntheticSet.open(sets[grid_method]["output"], storage) if grid_method else None,
        score_set=SyntheticSet.open(sets[score_method]["output"], storage) if score_method else None,
        results=rows, verdict=verdict(rows, "counterfactual" if "counterfactual" in pools else None),
        translation=translation_measures(config, storage, sets), grid_pairs=6 if pools else 4,
        timings=timings(finetune, sets, runs, classify_s, config.demo.concurrent_runs),
        set_metrics={m: s["set_metrics"] for m, s in sets.items() if s.get("set_metrics")},
        notes=[n for n in (base_model_note(config), scene_note(config, dataset),
                           f"config hash {config.hash()}; seeds {config.demo.seeds}; p = {config.classify.p}, "
                           f"gamma = {config.classify.gamma}; strengths {config.synthesis.strengths}; "
                           f"fine-tuning {config.finetune.strategy}, {config.finetune.steps} steps") if n],
    )
    page = write_report(inputs, join(config.run.uri, "report"), storage)
    return {"report": page, "verdict": inputs.verdict, "table": console_table(rows), "translation": inputs.translation,
            "results": {r.method: {"mean": r.mean, "std": r.std, "top1": r.top1, "groups": r.groups} for r in rows},
            "set_metrics": {m: s.get("set_metrics") for m, s in sets.items()}}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = load_config(DEMO_CONFIG, list(argv if argv is not None else sys.argv[1:]))
    summary = run(config)
    print(summary["table"])
    print(summary["verdict"])
    print(f"demo report: {os.path.abspath(summary['report'])}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
