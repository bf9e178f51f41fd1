"""The whole pipeline on tiny models: the demo's comparison + report, a crash-and-rerun, and `ray job submit`."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from engine.config import load_config
from engine.demo import DEMO_CONFIG
from engine.demo import run as run_demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reduced(tmp_path, name: str) -> list[str]:
    """The demo config shrunk to seconds per stage (same code paths)."""
    return [
        f"run.output={tmp_path}", f"run.name={name}", f"model.cache_dir={tmp_path / 'cache'}",
        "dataset.subset.shots=3", "finetune.steps=4", "finetune.checkpoint_every=2", "finetune.log_every=2",
        "synthesis.multiplier=0.4", "synthesis.num_inference_steps=4", "synthesis.rows_per_file=4",
        "synthesis.batch_size=4", "classify.epochs=2", "classify.eval_every=1",
    ]


def test_demo_comparison_writes_a_complete_report(ray_session, tmp_path):
    config = load_config(DEMO_CONFIG, reduced(tmp_path, "demo") + ["demo.methods=[real-only, diff-mix]", "demo.seeds=[0, 1]"])
    summary = run_demo(config)
    report = summary["report"]
    text = open(report).read()
    figures = re.findall(r"src='([^']+)'", text)
    assert set(figures) == {"grid.png", "results.png", "clip_hist.png"}
    for name in figures:
        path = os.path.join(os.path.dirname(report), name)
        assert os.path.getsize(path) > 1000 and open(path, "rb").read(4) == b"\x89PNG"
    assert set(summary["results"]) == {"real-only", "diff-mix"}
    assert all(len(r["top1"]) == 2 for r in summary["results"].values())  # one classifier per seed
    assert "direction of effect" in text and "synthesize (diff-mix)" in text and "finetune" in text


def _pipeline_cmd(tmp_path, name):
    return [sys.executable, "jobs/pipeline.py", "--config", DEMO_CONFIG, *reduced(tmp_path, name),
            "synthesis.batch_size=2", "synthesis.rows_per_file=2"]


def test_pipeline_rerun_after_crash_during_synthesis_keeps_the_finetune(ray_session, tmp_path):
    """Kill the driver once synthesis has committed a file; the rerun finishes and reuses the adapter."""
    run_dir = tmp_path / "crash"
    log_path = tmp_path / "first.log"
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(_pipeline_cmd(tmp_path, "crash"), cwd=REPO, stdout=log_fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + 600
        while True:
            parts = list((run_dir / "synthetic").glob("*/part-*.parquet")) if (run_dir / "synthetic").exists() else []
            if parts:
                break
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, "synthesis never committed a file"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    adapter_json = run_dir / "adapter" / "adapter.json"
    assert adapter_json.exists()
    mtime = adapter_json.stat().st_mtime_ns
    assert not (run_dir / "pipeline.json").exists()

    out = subprocess.run(_pipeline_cmd(tmp_path, "crash"), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "pipeline.json").read_text())
    assert summary["finetune"]["reused"] is True and adapter_json.stat().st_mtime_ns == mtime
    assert summary["synthesize"]["resumed_rows"] > 0  # rows committed before the crash were kept
    assert summary["synthesize"]["rows"] == summary["synthesize"]["planned"]
    assert "top1" in summary["classify"]["metrics"]


@pytest.mark.usefixtures("ray_session")
def test_stage_jobs_then_the_pipeline_job_via_ray_job_submit(ray_cluster, tmp_path):
    """finetune and synthesize as separate submitted jobs, each finding the last one's output, then the
    pipeline job, which reuses both and trains the classifier (jobs/*.py are the same `job_main` wrapper,
    so one pipeline job covers classify's; one full pipeline over jobs is enough for the suite's time)."""
    from test_job_submit import submit_and_wait

    args = ["--config", "examples/demo.yaml", *reduced(tmp_path, "stages")]
    run_dir = tmp_path / "stages"
    for stage in ("finetune", "synthesize"):
        status, logs = submit_and_wait(ray_cluster, ["python", f"jobs/{stage}.py", *args])
        assert status == "SUCCEEDED", f"{stage}: {logs[-3000:]}"
    adapter_json = run_dir / "adapter" / "adapter.json"
    assert adapter_json.exists()
    mtime = adapter_json.stat().st_mtime_ns
    manifests = list((run_dir / "synthetic").glob("*/manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["counts"]["rows"] > 0

    status, logs = submit_and_wait(ray_cluster, ["python", "jobs/pipeline.py", *args])
    assert status == "SUCCEEDED", logs[-3000:]
    assert "pipeline done" in logs
    summary = json.loads((run_dir / "pipeline.json").read_text())
    assert summary["finetune"]["reused"] is True and adapter_json.stat().st_mtime_ns == mtime
    assert summary["synthesize"]["output"] == str(manifests[0].parent)
    assert summary["synthesize"]["resumed_rows"] == summary["synthesize"]["planned"]  # nothing generated again
    metrics = list((run_dir / "classify").glob("*/metrics.json"))
    assert len(metrics) == 1 and "top1" in json.loads(metrics[0].read_text())["metrics"]
