"""`ray job submit` against a real `ray start --head` cluster (the session's head node)."""
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def submit(ray_cluster, entrypoint: list[str]) -> str:
    """Submit with the real CLI (`ray job submit --no-wait`); return the job id."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # The head's dashboard answers "No available agent to submit job, please try again later" while its
    # job agent is (re)registering, which a loaded 2-core machine stretches to tens of seconds: retry that.
    agent_deadline = time.time() + 120
    while True:
        out = subprocess.run(
            [ray_bin, "job", "submit", "--address", ray_cluster["dashboard_url"], "--no-wait",
             "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": env}), "--", *entrypoint],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        if out.returncode == 0 or "No available agent" not in out.stderr or time.time() > agent_deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stderr + out.stdout
    return next(w.strip("'\"") for line in out.stdout.splitlines() for w in line.split()
                if w.strip("'\"").startswith("raysubmit_"))


def wait_for_job(ray_cluster, job_id: str, timeout_s: float = 600, message: list | None = None) -> tuple[str, str]:
    """Until the job is in a terminal state; return (status, logs); `message` gets the job's status message
    (what `ray job status` prints)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_cluster["dashboard_url"])
    deadline = time.time() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            if message is not None:
                message.append(client.get_job_info(job_id).message or "")
            return str(status), client.get_job_logs(job_id)
        assert time.time() < deadline, f"job {job_id} still {status} after {timeout_s}s"
        time.sleep(1)


def submit_and_wait(ray_cluster, entrypoint: list[str], timeout_s: float = 600, message: list | None = None
                    ) -> tuple[str, str]:
    """Submit, then wait for a terminal state; return (status, logs)."""
    return wait_for_job(ray_cluster, submit(ray_cluster, entrypoint), timeout_s, message)


def test_check_job_via_ray_job_submit(ray_cluster, tmp_path):
    """The job's driver runs in its copy of the working dir: the relative config path is found there, and the
    relative output is resolved there too, with a warning that the copy is not a place for outputs."""
    status, logs = submit_and_wait(ray_cluster, [
        "python", "jobs/check.py", "--config", "examples/demo.yaml",
        "run.output=runs-in-the-job", f"model.cache_dir={tmp_path / 'cache'}", "model.clip=tiny",
    ])
    assert status == "SUCCEEDED", logs
    assert '"classes": 10' in logs and "check ok" in logs
    assert os.path.isdir(tmp_path / "cache")  # the tiny CLIP was built where the absolute path says
    assert "'runs-in-the-job' is relative: in this Ray job it is" in logs and "job's copy of its working dir" in logs


def test_failed_job_reports_the_bad_key(ray_cluster, tmp_path):
    status, logs = submit_and_wait(ray_cluster, [
        "python", "jobs/check.py", "--config", "examples/demo.yaml", "synthesis.strengths=[1.5]",
    ])
    assert status == "FAILED"
    assert "synthesis.strengths" in logs and "outside (0, 1]" in logs


def test_failed_job_shows_the_one_line_error(ray_cluster, tmp_path):
    """An expected error (a corrupt image) fails the job with `diffmix <stage>: <message>` and no traceback."""
    (tmp_path / "birds" / "jay").mkdir(parents=True)
    (tmp_path / "birds" / "jay" / "broken.png").write_bytes(b"not a png")
    message: list = []
    status, logs = submit_and_wait(ray_cluster, [
        "python", "jobs/check.py", "dataset.source=imagefolder", f"dataset.uri={tmp_path / 'birds'}",
        "dataset.metaclass=bird"], message=message)
    assert status == "FAILED"
    line = f"diffmix check: image folder {tmp_path / 'birds'}: 1 bad image(s): cannot decode image"
    assert line in logs and "Traceback" not in logs, logs
    assert "exit code 3" in message[0] and line in message[0], message
