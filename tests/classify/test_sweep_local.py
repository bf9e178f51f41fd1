"""The laptop sweep that used to deadlock, run as a user runs it: `diffmix sweep` in its own process, no
cluster to join, two CPUs, one local Ray sized for its largest stage, while another Ray instance runs on the
machine (the test cluster: the `ray_session` fixture), as a user's other Ray work might.

1. A sweep (ASHA on Ray Tune over Train) whose grid spans two strength sets that have no synthetic set yet
   synthesizes each set once inside the sweep's instance (Translator + ClipScorer actors and their tasks:
   3 CPUs); sized for the trials alone (2), the reference-loading tasks could never run. Its trials (one per
   set, and the p = 0 baseline) then train and evaluate in that instance, each with its own grid point (the
   trainers report what they used), and resolving the sets again, as a rerun does, reuses them. With the
   other instance running, this hung before the local instance's processes knew its address: Ray Train
   could not free the worker groups of the trials Tune stopped (state API: "Found multiple active Ray
   instances"), and the last trial's evaluation waited for their CPUs for ever.
2. A sweep over an existing set: a trial (1 CPU) and its Train worker (0.5) left no CPU for the
   evaluation stream's decode task (1), which waited forever at the first evaluation. The trials of (1)
   have that same shape; the sizing that counts the decode task is checked without a second sweep.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

from engine.classify.tune import grid_points, sweep_needs, synthetic_sets
from engine.cli import resolve_stage
from engine.config import load_config
from engine.pipeline import ensure_synthetic, sweep

REPO = Path(__file__).resolve().parents[2]
# gamma and p differ from classify.gamma and classify.p (0.5 and 0.3 in demo.yaml): a grid point that never
# reached its trainer would show the config's values in the trainer's trained_gamma / trained_p
GRID = ["sweep.strengths=[[0.5], [0.9]]", "sweep.gamma=[1.0]", "sweep.p=[0.5]", "sweep.include_baseline=true",
        "sweep.asha=true"]


def _overrides(tmp_path: Path, tiny_cache: Path) -> list[str]:
    return [f"run.output={tmp_path}", f"model.cache_dir={tiny_cache}", "synthesis.strategy=real-mix",
            "metrics.enabled=false", "synthesis.multiplier=0.5", "synthesis.num_inference_steps=5",
            "classify.epochs=1", "classify.eval_every=1", *GRID]


def _sweep(tmp_path: Path, tiny_cache: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # no cluster to join: a local instance
    args = [sys.executable, "-m", "engine.cli", "sweep", "--config", "examples/demo.yaml",
            *_overrides(tmp_path, tiny_cache)]

    def two_cpus() -> None:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])

    log = tmp_path / "sweep.log"
    with open(log, "wb") as fh:
        proc = subprocess.run(args, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=600,
                              preexec_fn=two_cpus)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def _shard_times(uri: str) -> dict[str, float]:
    return {f: os.path.getmtime(os.path.join(uri, f)) for f in os.listdir(uri) if f.endswith(".parquet")}


def test_laptop_sweep_synthesizes_each_set_once_then_trains_and_evaluates_on_two_cpus(ray_session, tmp_path,
                                                                                   tiny_cache):
    text = _sweep(tmp_path, tiny_cache)
    assert "starting a local Ray instance (3 logical CPUs" in text  # sized for synthesis, not the trials
    assert "synthetic set for strengths [0.5]" in text and "synthetic set for strengths [0.9]" in text
    results = sorted((tmp_path / "demo" / "sweep").glob("*/results.md"))
    assert len(results) == 1
    markdown = results[0].read_text().splitlines()
    assert markdown[0].startswith("| trial | strengths | multiplier | gamma | p | top1") and len(markdown) == 5
    with open(results[0].with_name("results.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), rows  # 2 sets x 1 point + the baseline
    trials = [r for r in rows if r["trial"] != "baseline"]
    assert sorted((r["strengths"], r["gamma"], r["p"]) for r in trials) == [
        ("0.5", "1.0000", "0.5000"), ("0.9", "1.0000", "0.5000")], rows
    # each trial's trainer reports the gamma and p it trained with: the grid point reached it
    assert all((r["trained_gamma"], r["trained_p"]) == (r["gamma"], r["p"]) for r in trials), rows
    assert [float(r["p"]) for r in rows if r["trial"] == "baseline"] == [0.0]
    top1 = [float(r["top1"]) for r in rows]
    assert top1 == sorted(top1, reverse=True)

    # one set per strength set, and resolving them again (a rerun of the sweep) reuses both: no shard rewritten
    made = sorted(str(m.parent) for m in (tmp_path / "demo" / "synthetic").glob("*/manifest.json"))
    assert len(made) == 2
    shards = {uri: _shard_times(uri) for uri in made}
    assert all(shards.values())
    config = load_config(REPO / "examples" / "demo.yaml", _overrides(tmp_path, tiny_cache))
    calls = []

    def counting(cfg):
        calls.append(list(cfg.synthesis.strengths))
        return ensure_synthetic(cfg)

    again = synthetic_sets(config, grid_points(config), counting)
    assert sorted(calls) == [[0.5], [0.9]] and sorted(again.values()) == made
    assert {uri: _shard_times(uri) for uri in made} == shards
    assert resolve_stage("sweep") is sweep


def test_a_sweep_over_an_existing_set_is_sized_for_the_decode_task_too():
    """Trial (1) + Train worker (0.5) + the evaluation's decode task (1): 2.5, so a local instance of 3."""
    config = load_config(REPO / "examples" / "demo.yaml", ["sweep.gamma=[1.0]", "sweep.p=[0.3]"])
    needs = sweep_needs(config, config.sweep.max_concurrent_trials)
    assert needs.cpu == config.sweep.trial_cpus + config.classify.cpus_per_worker + config.classify.data_cpus == 2.5
    assert math.ceil(needs.cpu) == 3
