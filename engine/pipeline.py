"""Orchestration across stages: the only module that calls one stage on behalf of another.

Stages never import each other (DESIGN.md); what spans them lives here and goes through each
stage's public `run(config)` as registered in `engine.cli.STAGES`.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from engine.cli import STAGES, resolve_stage, stage_needs
from engine.config import ExperimentConfig, validate
from engine.ray_local import Needs, ensure_ray
from engine.storage import Storage, join, redact
from engine.synthesis.dryrun import log_estimate

log = logging.getLogger(__name__)

def ensure_synthetic(config: ExperimentConfig) -> str:
    """The synthetic set for this config, made or reused: the synthesis stage is exactly-once and
    resumable (DESIGN.md), so a finished plan is reused by its plan hash and costs no generation."""
    if "synthesize" not in STAGES:
        raise RuntimeError("the synthesis stage is not registered in engine.cli.STAGES ('synthesize')")
    summary = resolve_stage("synthesize")(config)
    output = summary.get("output") if isinstance(summary, dict) else None
    if not isinstance(output, str):
        raise RuntimeError("the synthesis stage's summary names no 'output' folder")
    log.info("synthetic set for strengths %s: %s (%s rows written now)", config.synthesis.strengths, redact(output),
             summary.get("written"))
    return output


def start_ray_for(config: ExperimentConfig, stages: list[str], what: str, size_for: list[Any] | None = None,
                  min_cpus: float = 0.0, **init_kwargs: Any) -> bool:
    """Join the cluster, or start one local instance that holds the largest of `stages` (they run one after
    another inside it; a local instance cannot grow, so sizing it for the first stage alone would leave a
    later one waiting forever). Fails now when the cluster can never hold one of them."""
    needs = Needs.largest(*(stage_needs(s, config) for s in stages), what=what)
    size = Needs.largest(needs, *(size_for or []), Needs(min_cpus), what=what)
    return ensure_ray(needs, size_for=size, config=config, **init_kwargs)


def sweep(config: ExperimentConfig) -> dict[str, Any]:
    """`diffmix sweep`: the classifier grid on Ray Tune, synthesizing missing strength sets first."""
    from engine.classify.tune import run_sweep, sweep_needs

    # a strength set, or the default set when no classify.synthetic is given, may have to be made first
    makes_sets = bool(config.sweep.strengths) or (any(p > 0 for p in config.sweep.p) and not config.classify.synthetic)
    stages = ["sweep"] + (["synthesize"] if makes_sets else [])
    start_ray_for(config, stages, "sweep", size_for=[sweep_needs(config, config.sweep.max_concurrent_trials)])
    return run_sweep(config, ensure_synthetic=ensure_synthetic)


def run_stage(name: str, config: ExperimentConfig) -> dict[str, Any]:
    """One stage's `run(config)`, with its wall time added to the summary as `stage_elapsed_s`."""
    t0 = time.perf_counter()
    summary = dict(resolve_stage(name)(config))
    summary["stage_elapsed_s"] = round(time.perf_counter() - t0, 3)
    return summary


def with_overrides(config: ExperimentConfig, **sections: dict[str, Any]) -> ExperimentConfig:
    """A validated copy of `config` with some section fields replaced (e.g. synthesis={"adapter": uri})."""
    data = config.model_dump(mode="json")
    for section, fields in sections.items():
        data[section].update(fields)
    return validate(data)


def run(config: ExperimentConfig) -> dict[str, Any]:
    """`diffmix pipeline`: finetune -> synthesize (+filter) -> classify for one config.

    Each stage reuses what a finished run of the same config left (the fine-tune artifact by its run
    key, synthetic rows by plan hash and index), so rerunning after a crash continues where it stopped.
    """
    storage = Storage.from_config(config)
    summary: dict[str, Any] = {"run": redact(config.run.uri), "config_hash": config.hash()}
    diff = config.synthesis.strategy.startswith("diff-")
    start_ray_for(config, (["finetune"] if diff else []) + ["synthesize", "classify"], "pipeline")
    # what `diffmix plan` prints (rows, UNet evaluations, GPU-hours, cost, bytes); after Ray is up, so the
    # dataset count it needs reads and checks images in Ray tasks, not in the driver
    log_estimate(config)
    if diff:
        summary["finetune"] = run_stage("finetune", config)
        if config.synthesis.adapter is None:
            config = with_overrides(config, synthesis={"adapter": summary["finetune"]["artifact"]})
    summary["synthesize"] = run_stage("synthesize", config)
    output = summary["synthesize"]["output"]
    summary["classify"] = run_stage("classify", with_overrides(config, classify={"synthetic": output}))
    path = join(config.run.uri, "pipeline.json")
    storage.write_text(path, json.dumps(summary, indent=2, default=str))
    log.info("pipeline done: adapter %s, synthetic set %s, classifier metrics %s; summary %s",
             summary.get("finetune", {}).get("artifact", "-"), redact(output),
             summary["classify"].get("metrics_uri", summary["classify"].get("output", "-")), redact(path))
    return summary
