"""The two laptop sweeps that used to deadlock, run as a user runs them: `diffmix sweep` in its own process,
no cluster to join, two CPUs. Each starts one local Ray sized for its largest stage.

1. A sweep over a strength set that has no synthetic set yet synthesizes it inside the sweep's instance
   (Translator + ClipScorer actors and their tasks: 3 CPUs); sized for the trials alone (2), the
   reference-loading tasks could never run.
2. A sweep over the existing set: a trial (1 CPU) and its Train worker (0.5) left no CPU for the
   evaluation stream's decode task (1), which waited forever at the first evaluation.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _sweep(tmp_path: Path, tiny_cache: Path, name: str, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # no cluster to join: a local instance
    args = [sys.executable, "-m", "engine.cli", "sweep", "--config", "examples/demo.yaml",
            f"run.output={tmp_path}", f"model.cache_dir={tiny_cache}", "synthesis.strategy=real-mix", "metrics.enabled=false",
            "synthesis.multiplier=0.5", "synthesis.num_inference_steps=5", "classify.epochs=1",
            "classify.eval_every=1", "sweep.include_baseline=false", *extra]

    def two_cpus() -> None:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])

    log = tmp_path / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.run(args, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=600,
                              preexec_fn=two_cpus)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    return text


def test_both_laptop_sweeps_finish_on_two_cpus(tmp_path, tiny_cache):
    first = _sweep(tmp_path, tiny_cache, "strengths", "sweep.gamma=[0.5]", "sweep.p=[0.3]",
                   "sweep.strengths=[[0.5,0.7,0.9],[0.7]]")
    assert "starting a local Ray instance (3 logical CPUs" in first  # sized for synthesis, not the trials
    assert "synthetic set for strengths [0.7]" in first
    # one trial is enough: the old deadlock struck at the first trial's first evaluation
    second = _sweep(tmp_path, tiny_cache, "existing", "sweep.gamma=[1.0]", "sweep.p=[0.3]")
    assert "starting a local Ray instance (3 logical CPUs" in second  # trial + worker + decode task = 2.5
    results = sorted((tmp_path / "demo" / "sweep").glob("*/results.md"))
    assert len(results) == 2
    rows = [line for md in results for line in md.read_text().splitlines()[2:] if line.strip()]
    assert len(rows) == 3 and all("| ok |" in r for r in rows), rows
