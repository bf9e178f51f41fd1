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
