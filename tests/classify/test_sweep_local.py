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
3. `sweep.seeds`, a classifier-seed axis crossed with the grid: (1) runs with one seed (no extra trial),
   which must reach each trial's classify.seed and give a one-seed summary; the crossing with three seeds
   and the mean / sample std of the summary are checked as the pure functions the sweep uses.
"""
from __future__ import annotations

import csv
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from engine.classify.tune import (grid_points, results_table, seed_summary, summary_table, sweep_needs,
                                  synthetic_sets, trial_config)
from engine.cli import resolve_stage
from engine.config import ConfigError, load_config
from engine.pipeline import ensure_synthetic, sweep

REPO = Path(__file__).resolve().parents[2]
# gamma and p differ from demo.yaml's classify.gamma and classify.p: a grid point that never reached its
# trainer would show the config's values in the trainer's trained_gamma / trained_p. Seed 1 is not the
# classifier's default (run.seed 0), and one seed adds no trial.
GRID = ["sweep.strengths=[[0.5], [0.9]]", "sweep.gamma=[1.0]", "sweep.p=[0.5]", "sweep.include_baseline=true",
        "sweep.asha=true", "sweep.seeds=[1]"]


def _overrides(tiny_cache: Path) -> list[str]:
    """`run.output` is the demo's relative `runs`, as in README's sweep: the sweep runs in the test's folder."""
    return ["run.output=runs", f"model.cache_dir={tiny_cache}", "synthesis.strategy=real-mix",
            "metrics.enabled=false", "synthesis.multiplier=0.5", "synthesis.num_inference_steps=5",
            "classify.epochs=1", "classify.eval_every=1", *GRID]


def _sweep(tmp_path: Path, tiny_cache: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # no cluster to join: a local instance
    args = [sys.executable, "-m", "engine.cli", "sweep", "--config", str(REPO / "examples" / "demo.yaml"),
            *_overrides(tiny_cache)]

    def two_cpus() -> None:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])

    log = tmp_path / "sweep.log"
    with open(log, "wb") as fh:
        proc = subprocess.run(args, cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=600,
                              preexec_fn=two_cpus)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def _shard_times(uri: str) -> dict[str, float]:
    return {f: os.path.getmtime(os.path.join(uri, f)) for f in os.listdir(uri) if f.endswith(".parquet")}


def test_laptop_sweep_synthesizes_each_set_once_then_trains_and_evaluates_on_two_cpus(ray_session, tmp_path,
                                                                                   tiny_cache, monkeypatch):
    """With a relative run.output: Tune runs each trial in its own working directory, where a relative path
    would name another folder (the trials failed with "no synthetic set at <trial dir>/runs/..."); the driver
    resolved it once, so every trial trains on the sets under the sweep's own folder."""
    text = _sweep(tmp_path, tiny_cache)
    assert "starting a local Ray instance (3 logical CPUs" in text  # sized for synthesis, not the trials
    assert "synthetic set for strengths [0.5]" in text and "synthetic set for strengths [0.9]" in text
    results = sorted((tmp_path / "runs" / "demo" / "sweep").glob("*/results.md"))
    assert len(results) == 1
    markdown = results[0].read_text().splitlines()
    assert markdown[0].startswith("| trial | strengths | multiplier | gamma | p | seed | top1") and len(markdown) == 5
    with open(results[0].with_name("results.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), rows  # 2 sets x 1 point + the baseline
    trials = [r for r in rows if r["trial"] != "baseline_seed=1"]
    assert sorted((r["strengths"], r["gamma"], r["p"]) for r in trials) == [
        ("0.5", "1.0000", "0.5000"), ("0.9", "1.0000", "0.5000")], rows
    # each trial's trainer reports the gamma and p it trained with: the grid point reached it
    assert all((r["trained_gamma"], r["trained_p"]) == (r["gamma"], r["p"]) for r in trials), rows
    assert [float(r["p"]) for r in rows if r["trial"] == "baseline_seed=1"] == [0.0]
    top1 = [float(r["top1"]) for r in rows]
    assert top1 == sorted(top1, reverse=True)
    # the seed axis reached every trainer (it reports the classifier seed it used), and the summary has one
    # seed per grid point
    assert all((r["seed"], r["trained_seed"]) == ("1", "1") for r in rows), rows
    with open(results[0].with_name("summary.csv")) as fh:
        summary = {s["grid_point"]: s for s in csv.DictReader(fh)}
    assert sorted(summary) == sorted(r["trial"].removesuffix("_seed=1") for r in rows), summary
    for r in rows:
        entry = summary[r["trial"].removesuffix("_seed=1")]
        assert (entry["seeds"], entry["trials"], entry["top1_mean"], entry["top1_std"]) == ("1", "1", r["top1"], "")

    # one set per strength set, and resolving them again (a rerun of the sweep) reuses both: no shard rewritten
    made = sorted(str(m.parent) for m in (tmp_path / "runs" / "demo" / "synthetic").glob("*/.manifest.json"))
    assert len(made) == 2
    shards = {uri: _shard_times(uri) for uri in made}
    assert all(shards.values())
    monkeypatch.chdir(tmp_path)  # where the sweep's relative paths were resolved
    config = load_config(REPO / "examples" / "demo.yaml", _overrides(tiny_cache))
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


def test_seeds_cross_every_grid_point_and_become_each_trials_classify_seed():
    """Three seeds x (2 strength sets x 2 gammas + the baseline): 15 trials, each point once per seed, each
    trial's config carrying its seed as classify.seed and the point's own knobs; without seeds nothing changes."""
    grid = ["sweep.strengths=[[0.5], [0.9]]", "sweep.gamma=[0.0, 1.0]", "sweep.p=[0.5]", "classify.seed=7"]
    config = load_config(REPO / "examples" / "demo.yaml", [*grid, "sweep.seeds=[0, 1, 2]"])
    points = grid_points(config)
    assert len(points) == 15 and len({p["trial"] for p in points}) == 15
    by_point: dict[str, list[int]] = {}
    for point in points:
        by_point.setdefault(point["grid_point"], []).append(point["seed"])
        assert point["trial"] == f"{point['grid_point']}_seed={point['seed']}"
    assert by_point == {k: [0, 1, 2] for k in ["baseline", "s=0.5_g=0_p=0.5", "s=0.5_g=1_p=0.5",
                                                "s=0.9_g=0_p=0.5", "s=0.9_g=1_p=0.5"]}, by_point
    base = config.model_dump(mode="json")
    for point in points:
        trial = trial_config({**point, "synthetic": None}, base)
        assert trial.classify.seed == point["seed"]
        assert (trial.classify.gamma, trial.classify.p, trial.classify.strengths) == (
            point["gamma"], point["p"], point["strengths"])
    plain = grid_points(load_config(REPO / "examples" / "demo.yaml", grid))
    assert [p["trial"] for p in plain] == [p["grid_point"] for p in plain] == sorted(by_point, key=list(by_point).index)
    assert all(p["seed"] is None for p in plain)
    assert trial_config({**plain[1], "synthetic": None}, base).classify.seed == 7  # the config's own seed
    for bad in ("sweep.seeds=[]", "sweep.seeds=[0, 0]", "sweep.seeds=[-1]", "sweep.seeds=[0.5]"):
        with pytest.raises(ConfigError, match=r"sweep\.seeds"):
            load_config(None, [bad])


def _row(trial: str, grid_point: str, seed: int | None, status: str = "ok", **metrics: float) -> dict:
    point = {"trial": trial, "grid_point": grid_point, "seed": seed, "strengths": None, "multiplier": None,
             "gamma": 0.1, "p": 0.0 if grid_point == "baseline" else 0.3}
    return {"point": point, "metrics": metrics, "status": status}


def test_seed_summary_gives_each_points_mean_and_sample_std_over_its_finished_seeds():
    rows = [_row("g=0.1_p=0.3_seed=0", "g=0.1_p=0.3", 0, top1=0.50, acc_group_0=0.2),
            _row("g=0.1_p=0.3_seed=1", "g=0.1_p=0.3", 1, top1=0.60, acc_group_0=0.4),
            _row("g=0.1_p=0.3_seed=2", "g=0.1_p=0.3", 2, top1=0.70, acc_group_0=0.9),
            _row("baseline_seed=0", "baseline", 0, top1=0.40),
            _row("baseline_seed=1", "baseline", 1, status="error: RuntimeError", top1=0.99),  # not counted
            _row("baseline_seed=2", "baseline", 2, top1=float("nan"))]  # no value: not counted
    summary = seed_summary(rows, "top1", "max")
    assert [s["grid_point"] for s in summary] == ["g=0.1_p=0.3", "baseline"]  # by mean top1, best first
    mix, baseline = summary
    assert mix["seeds"] == [0, 1, 2] and mix["trials"] == 3
    assert mix["top1_mean"] == pytest.approx(0.6) and mix["top1_std"] == pytest.approx(0.1)  # n - 1: 0.1
    assert mix["acc_group_0_mean"] == pytest.approx(0.5)
    assert mix["acc_group_0_std"] == pytest.approx(statistics.stdev([0.2, 0.4, 0.9]))
    assert baseline["seeds"] == [0, 2] and baseline["trials"] == 3
    assert baseline["top1_mean"] == pytest.approx(0.4) and baseline["top1_std"] is None  # one value: no spread
    assert baseline["acc_group_0_mean"] is None
    assert [s["grid_point"] for s in seed_summary(rows, "top1", "min")] == ["baseline", "g=0.1_p=0.3"]
    columns, body = summary_table(summary)
    assert columns[:7] == ["grid_point", "strengths", "multiplier", "gamma", "p", "seeds", "trials"]
    cells = dict(zip(columns, body[0]))
    assert (cells["seeds"], cells["top1_mean"], cells["top1_std"]) == ("0+1+2", "0.6000", "0.1000")
    assert dict(zip(columns, body[1]))["top1_std"] == ""
    # the per-trial table names each seed
    header, lines = results_table(rows, "top1")
    assert header[:6] == ["trial", "strengths", "multiplier", "gamma", "p", "seed"]
    assert [line[5] for line in lines] == ["0", "1", "2", "0", "1", "2"]


def test_a_failing_trial_is_one_line_naming_it_and_what_is_missing(ray_session, tmp_path, monkeypatch, caplog):
    """A sweep whose trial fails with an engine error (its synthetic set is not there), on Tune over the test
    cluster: Tune's record of the failed trial is that error's one line (no traceback, its own or the trial's),
    and the sweep fails with the engine's error class (its exit code, 7) in one line naming the trial and the
    set's absolute path, resolved where the config was loaded, not in the trial's working directory."""
    import logging

    from engine.classify.tune import TUNE_CONTROLLER_LOG, run_sweep
    from engine.data.shards import ShardError

    monkeypatch.chdir(tmp_path)
    config = load_config(REPO / "examples" / "demo.yaml", [
        "run.output=runs", "classify.synthetic=missing-set", "sweep.gamma=[1.0]", "sweep.p=[0.5]",
        "sweep.include_baseline=false", "classify.epochs=1", "dataset.builtin=digits", "model.base=tiny"])
    with caplog.at_level(logging.INFO, logger=TUNE_CONTROLLER_LOG), pytest.raises(ShardError) as err:
        run_sweep(config)
    line = str(err.value)
    assert "\n" not in line and line.startswith("sweep: 1 of 1 trial(s) failed"), line
    assert f"g=1_p=0.5: no synthetic set at {tmp_path / 'missing-set'}" in line, line
    failed = [r for r in caplog.records if r.name == TUNE_CONTROLLER_LOG and r.levelno >= logging.ERROR]
    assert len(failed) == 1 and failed[0].exc_info is None, [r.getMessage() for r in failed]
    assert f"_00000: no synthetic set at {tmp_path / 'missing-set'} (missing " in failed[0].getMessage()
    with open(tmp_path / "runs" / "demo" / "sweep" / os.listdir(tmp_path / "runs" / "demo" / "sweep")[0] /
              "results.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["error: ShardError"]
