"""The whole pipeline on tiny models: the demo's comparison + report (its classifiers two at a time), and the
pipeline job through `ray job submit`, its driver killed mid-synthesis and the job submitted again to finish."""
import json
import os
import re
import signal
import time

import pytest

from engine.config import load_config
from engine.demo import DEMO_CONFIG
from engine.demo import run as run_demo

def reduced(tmp_path, name: str) -> list[str]:
    """The demo config shrunk to seconds per stage (same code paths; one fine-tune worker: DDP is tested in
    tests/test_finetune.py, and each worker process costs ~20 s of imports here)."""
    return [
        f"run.output={tmp_path}", f"run.name={name}", f"model.cache_dir={tmp_path / 'cache'}",
        "dataset.subset.shots=3", "finetune.steps=4", "finetune.checkpoint_every=2", "finetune.log_every=2",
        "finetune.num_workers=1",
        "synthesis.multiplier=0.4", "synthesis.num_inference_steps=4", "synthesis.rows_per_file=4",
        "synthesis.batch_size=4", "classify.epochs=2", "classify.eval_every=1",
    ]


def test_demo_comparison_writes_a_complete_report(ray_session, tmp_path):
    config = load_config(DEMO_CONFIG, reduced(tmp_path, "demo") + ["demo.methods=[real-only, diff-mix]", "demo.seeds=[0]"])
    summary = run_demo(config)
    report = summary["report"]
    text = open(report).read()
    figures = re.findall(r"src='([^']+)'", text)
    assert set(figures) == {"grid.png", "results.png", "clip_hist.png", "filtered.png"}
    for name in figures:
        path = os.path.join(os.path.dirname(report), name)
        assert os.path.getsize(path) > 1000 and open(path, "rb").read(4) == b"\x89PNG"
    assert set(summary["results"]) == {"real-only", "diff-mix"}
    assert all(len(r["top1"]) == 1 for r in summary["results"].values())  # one classifier per seed
    # (two methods' classifiers train at once: demo.concurrent_runs; run_at_most is checked in test_demo.py)
    assert "The paper finds diff-mix ahead of real-only on the counterfactual test group" in text
    assert "synthesize (diff-mix)" in text and "finetune" in text and "What the translations keep" in text
    assert set(summary["results"]["diff-mix"]["groups"]) == {"aligned", "counterfactual"}


@pytest.mark.usefixtures("ray_session")
def test_a_killed_pipeline_job_and_its_rerun_via_ray_job_submit(ray_cluster, tmp_path):
    """The pipeline job fine-tunes, and its driver is SIGKILLed once synthesis has committed a file (a crashed
    job); the same job submitted again finds both: it reuses the adapter, keeps the rows committed before the
    crash, generates the rest and trains the classifier. (jobs/*.py are the same `job_main` wrapper, so the
    pipeline job covers the stages' jobs; one job that crashes and one that finishes are enough for the
    suite's time. Two rows per file and batch: synthesis commits a file long before it would finish.)"""
    from ray.job_submission import JobSubmissionClient
    from test_job_submit import submit, submit_and_wait, wait_for_job

    args = ["--config", "examples/demo.yaml", *reduced(tmp_path, "stages"), "synthesis.batch_size=2",
            "synthesis.rows_per_file=2"]
    run_dir = tmp_path / "stages"
    adapter_json = run_dir / "adapter" / "adapter.json"

    job_id = submit(ray_cluster, ["python", "jobs/pipeline.py", *args])
    client = JobSubmissionClient(ray_cluster["dashboard_url"])
    deadline = time.time() + 600
    while not list(run_dir.glob("synthetic/*/part-*.parquet")):
        info = client.get_job_info(job_id)
        assert not info.status.is_terminal(), f"the pipeline ended before synthesis committed a file: {info.status}"
        assert time.time() < deadline, "synthesis never committed a file"
        time.sleep(0.2)
    driver = client.get_job_info(job_id).driver_info
    assert driver is not None and driver.node_ip_address  # the driver runs on this machine's head node
    os.kill(int(driver.pid), signal.SIGKILL)
    status, _ = wait_for_job(ray_cluster, job_id, timeout_s=120)
    assert status == "FAILED"
    assert adapter_json.exists()  # the fine-tune finished before synthesis started
    mtime = adapter_json.stat().st_mtime_ns

    status, logs = submit_and_wait(ray_cluster, ["python", "jobs/pipeline.py", *args])
    assert status == "SUCCEEDED", logs[-3000:]
    assert "pipeline done" in logs
    summary = json.loads((run_dir / "pipeline.json").read_text())
    assert summary["finetune"]["reused"] is True and adapter_json.stat().st_mtime_ns == mtime
    assert summary["synthesize"]["resumed_rows"] > 0  # rows committed before the crash were kept
    assert summary["synthesize"]["rows"] == summary["synthesize"]["planned"]
    manifests = list((run_dir / "synthetic").glob("*/.manifest.json"))
    assert len(manifests) == 1 and summary["synthesize"]["output"] == str(manifests[0].parent)
    metrics = list((run_dir / "classify").glob("*/metrics.json"))
    assert len(metrics) == 1 and "top1" in json.loads(metrics[0].read_text())["metrics"]
