"""The console command and the thin job scripts run the same functions, as real subprocesses."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=300, **kw)


def test_check_job_prints_summary(tmp_path):
    out = run([sys.executable, "jobs/check.py", "--config", "examples/demo.yaml",
               f"run.output={tmp_path}", f"model.cache_dir={tmp_path / 'cache'}"])
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["classes"] == 10 and summary["train_images"] == 50
    assert os.path.isdir(summary["base_model"]) and os.path.isdir(summary["clip_model"])


def test_console_command_bad_config_names_key(tmp_path):
    diffmix = os.path.join(os.path.dirname(sys.executable), "diffmix")
    out = run([diffmix, "check", "dataset.subset.kind=few_sht"])
    assert out.returncode == 2
    assert "dataset.subset.kind" in out.stderr and "few_shot" in out.stderr


def test_unknown_stage_is_rejected():
    out = run([sys.executable, "-m", "engine.cli", "nosuchstage"])
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_presets_are_listed_and_a_bad_name_is_one_line():
    out = run([sys.executable, "-m", "engine.cli", "presets"])
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout[out.stdout.index("{"):])
    assert listed["real-guidance"]["values"]["synthesis.strengths"] == [0.1] and "Table 1" in listed["cutmix"]["source"]
    bad = run([sys.executable, "-m", "engine.cli", "check", "preset=realguidance"])
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "unknown preset 'realguidance'" in bad.stderr


def test_expected_errors_are_one_line_and_an_exit_code(tmp_path):
    """A corrupt image, an unreachable S3 endpoint, a diff-mix run without an adapter: `diffmix <stage>:
    <message>` as the last line of stderr, no traceback, the documented code; --debug shows the traceback."""
    (tmp_path / "birds" / "jay").mkdir(parents=True)
    (tmp_path / "birds" / "jay" / "broken.png").write_bytes(b"not a png")
    corrupt = ["dataset.source=imagefolder", f"dataset.uri={tmp_path / 'birds'}", "dataset.metaclass=bird"]
    unreachable = [f"run.output=s3://bucket/runs", "storage.retries=0", "storage.max_stall_s=20",
                   "storage.storage_options={client_kwargs: {endpoint_url: 'http://127.0.0.1:9'}}"]
    cases = [("check", corrupt, 3, "image folder"), ("check", unreachable, 4, "s3://bucket/runs"),
             ("synthesize", [f"run.output={tmp_path / 'runs'}", "synthesis.strategy=diff-mix"], 7, "adapter")]
    for stage, args, code, named in cases:
        out = run([sys.executable, "-m", "engine.cli", stage, *args])
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode == code and last.startswith(f"diffmix {stage}: ") and named in last, out.stderr
        assert "Traceback" not in out.stderr, out.stderr
    debug = run([sys.executable, "-m", "engine.cli", "check", "--debug", *corrupt])
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "DatasetError" in debug.stderr


def test_a_bucket_without_credentials_is_the_storage_line_and_exit_code_4():
    """`diffmix plan` on the example whose dataset is on a placeholder bucket, with no credentials anywhere:
    botocore's NoCredentialsError (raised before any request is sent) is the one storage line, not a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/nonexistent",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    out = subprocess.run([sys.executable, "-m", "engine.cli", "plan", "--config", "examples/cub.yaml"], cwd=REPO,
                         capture_output=True, text=True, env=env, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 4 and "Traceback" not in out.stderr, out.stderr
    assert lines[-1].startswith("diffmix plan: storage: ") and "s3://YOUR-BUCKET/datasets/cub" in lines[-1]
    assert "no usable S3 credentials (NoCredentialsError" in lines[-1] and "AWS_ACCESS_KEY_ID" in lines[-1]
