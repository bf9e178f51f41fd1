"""Orchestration across stages: the only module that calls one stage on behalf of another.

Stages never import each other (DESIGN.md); what spans them lives here and goes through each
stage's public `run(config)` as registered in `engine.cli.STAGES`.
"""
from __future__ import annotations

import logging
import types
from typing import Any

from engine.cli import STAGES, resolve_stage
from engine.config import ExperimentConfig
from engine.storage import redact

log = logging.getLogger(__name__)

def ensure_synthetic(config: ExperimentConfig) -> str:
    """The synthetic set for this config, made or reused: the synthesis stage is exactly-once and
    resumable (DESIGN.md), so a finished plan is reused by its plan hash and costs no generation."""
    if "synthesize" not in STAGES:
        raise RuntimeError("the synthesis stage is not registered in engine.cli.STAGES ('synthesize')")
    stage: Any = resolve_stage("synthesize")
    if isinstance(stage, types.ModuleType):
        # engine/synthesis/__init__.py's run() imports its submodule `run`, which then shadows the
        # package attribute: from the second call on, STAGES' "engine.synthesis:run" names the module.
        stage = stage.run
    summary = stage(config)
    output = summary.get("output") if isinstance(summary, dict) else None
    if not isinstance(output, str):
        raise RuntimeError("the synthesis stage's summary names no 'output' folder")
    log.info("synthetic set for strengths %s: %s (%s rows written now)", config.synthesis.strengths, redact(output),
             summary.get("written"))
    return output


def sweep(config: ExperimentConfig) -> dict[str, Any]:
    """`diffmix sweep`: the classifier grid on Ray Tune, synthesizing missing strength sets first."""
    from engine.classify.tune import run_sweep

    return run_sweep(config, ensure_synthetic=ensure_synthetic)
