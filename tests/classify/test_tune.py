"""A sweep on Ray Tune over Train (ASHA) whose grid spans strength sets: the real synthesis stage (tiny offline
models, real-mix) runs once per set, and a rerun reuses the sets. (The gamma x p grid with its baseline, and
each trial's grid point reaching its trainer, are checked by the laptop sweep, tests/classify/test_sweep_local.py.)"""
import csv
import os

from engine.classify.tune import grid_points, run_sweep, synthetic_sets
from engine.cli import resolve_stage
from engine.config import load_config
from engine.pipeline import ensure_synthetic, sweep

FAST = ["classify.backbone=small_cnn", "classify.resolution=32", "classify.batch_size=16",
        "classify.cpus_per_worker=0.5", "classify.crop_scale_min=0.6", "classify.hflip=false",
        "classify.learning_rate=0.05", "classify.epochs=1", "sweep.max_concurrent_trials=2",
        "sweep.trial_cpus=0.5", "classify.data_cpus=0.5", "classify.rows_per_task=128",
        "dataset.subset.kind=few_shot"]


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_strength_grid_synthesizes_once_per_set_and_reuses(ray_session, tmp_path, tiny_cache):
    """Uses the real synthesis stage through engine.pipeline.ensure_synthetic (wrapped to count calls)."""
    config = load_config(None, [
        f"run.output={tmp_path}", *FAST, "dataset.subset.shots=2", f"model.cache_dir={tiny_cache}",
        "model.resolution=32", "synthesis.strategy=real-mix", "metrics.enabled=false", "synthesis.multiplier=2",
        "synthesis.num_inference_steps=4", "synthesis.resolution=32", "synthesis.num_gpus_per_actor=0",
        "synthesis.rows_per_file=4", "synthesis.batch_size=4", "synthesis.clip_batch_size=4",
        "sweep.strengths=[[0.5], [0.9]]", "sweep.gamma=[0.5]", "sweep.p=[0.5]", "sweep.include_baseline=false",
        "sweep.asha=true"])
    assert [p["strengths"] for p in grid_points(config)] == [[0.5], [0.9]]
    calls = []

    def counting(cfg):
        calls.append(list(cfg.synthesis.strengths))
        return ensure_synthetic(cfg)

    first = run_sweep(config, ensure_synthetic=counting)
    assert sorted(calls) == [[0.5], [0.9]]
    sets = first["synthetic_sets"]
    assert len(set(sets.values())) == 2
    shards = {uri: {f: os.path.getmtime(os.path.join(uri, f)) for f in os.listdir(uri) if f.endswith(".parquet")}
              for uri in sets.values()}
    assert all(shards.values())
    rows = read_csv(first["results_csv"])
    assert sorted(r["strengths"] for r in rows) == ["0.5", "0.9"]

    # a rerun resolves its sets exactly as run_sweep does (synthetic_sets), without training the trials again
    calls.clear()
    again = synthetic_sets(config, grid_points(config), counting)
    assert sorted(calls) == [[0.5], [0.9]] and again == sets
    for uri, files in shards.items():                                    # reused: no shard rewritten
        assert {f: os.path.getmtime(os.path.join(uri, f)) for f in files} == files
    assert resolve_stage("sweep") is sweep
