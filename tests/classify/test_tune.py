"""Sweeps on Ray Tune over Train: a gamma x p grid with its baseline, and a grid over strength sets that
runs the real synthesis stage (tiny offline models, real-mix) once per set and reuses it on a rerun."""
import csv
import os

from engine.classify.tune import grid_points, run_sweep, synthetic_sets
from engine.cli import resolve_stage
from engine.config import load_config
from engine.data import load_dataset
from engine.pipeline import ensure_synthetic, sweep
from engine.storage import Storage
from engine.testing.synthetic import write_synthetic_set

FAST = ["classify.backbone=small_cnn", "classify.resolution=32", "classify.batch_size=16",
        "classify.cpus_per_worker=0.5", "classify.crop_scale_min=0.6", "classify.hflip=false",
        "classify.learning_rate=0.05", "classify.epochs=1", "sweep.max_concurrent_trials=2",
        "sweep.trial_cpus=0.5", "classify.data_cpus=0.5", "classify.rows_per_task=128",
        "dataset.subset.kind=few_shot"]


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_gamma_by_p_grid_with_baseline(ray_session, tmp_path):
    base = load_config(None, ["dataset.subset.kind=few_shot", "dataset.subset.shots=5"])
    digits = load_dataset(base)
    syn = str(tmp_path / "syn")
    write_synthetic_set(syn, Storage(), digits.class_names, digits.train.column("image").to_pylist(),
                        digits.train.column("label").to_pylist(), num_rows=100, rows_per_file=20)
    config = load_config(None, [f"run.output={tmp_path}", *FAST, "dataset.subset.shots=5",
                                f"classify.synthetic={syn}", "sweep.gamma=[0.5, 1.0]", "sweep.p=[0.5]"])
    summary = run_sweep(config)
    rows = read_csv(summary["results_csv"])
    assert len(rows) == 3                                                 # 2 x 1 grid + the p = 0 baseline
    assert sorted((r["gamma"], r["p"]) for r in rows if r["trial"] != "baseline") == [
        ("0.5000", "0.5000"), ("1.0000", "0.5000")]
    # each trial's trainer reports the gamma and p it trained with: the grid point reached it
    assert all((r["trained_gamma"], r["trained_p"]) == (r["gamma"], r["p"]) for r in rows if r["trial"] != "baseline")
    baseline = [r for r in rows if r["trial"] == "baseline"]
    assert len(baseline) == 1 and float(baseline[0]["p"]) == 0
    top1 = [float(r["top1"]) for r in rows]
    assert top1 == sorted(top1, reverse=True) and all(r["status"] == "ok" for r in rows)
    markdown = open(summary["results_md"]).read().splitlines()
    assert markdown[0].startswith("| trial | strengths | multiplier | gamma | p | top1") and len(markdown) == 5
    assert resolve_stage("sweep") is sweep


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
