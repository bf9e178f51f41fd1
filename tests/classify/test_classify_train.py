"""The classifier stage end to end on the session's Ray cluster: a short run on the built-in digits (real +
synthetic shards) beats chance and resumes from its checkpoint after a worker fails, and a run on a stalled
store fails within its bound and resumes to an unbroken run's result (seeds flow from the config, so two runs
of one config train the same classifier; that the Ray Data epoch stream yields its batches in the same order
every time is tests/classify/test_mixing.py's)."""
import json
import time

import pytest

from engine.classify.train import finished_run, fit, prepare_inputs, run
from engine.cli import resolve_stage
from engine.config import load_config
from engine.data import load_dataset
from engine.data.shards import ShardError
from engine.storage import Storage, StorageError
from engine.testing.background import Background
from engine.testing.s3server import stalling_store_overrides
from engine.testing.synthetic import write_synthetic_set

FAST = ["classify.backbone=small_cnn", "classify.resolution=32", "classify.batch_size=32",
        "classify.cpus_per_worker=0.5", "classify.crop_scale_min=0.6", "classify.hflip=false",
        "classify.learning_rate=0.05", "classify.warmup_epochs=1", "classify.rows_per_task=256"]


def test_two_workers_beat_chance_and_resume_after_a_worker_failure(ray_session, tmp_path):
    """`diffmix classify` on two DDP workers (gloo on CPU: equal step counts per worker, all-reduced
    evaluation) over real + synthetic shards; rank 0 fails once at epoch 2 and the group resumes from the
    epoch-1 checkpoint. A rerun of the finished config resumes from its last checkpoint and trains nothing.
    (Per-bucket accuracies on a long-tail run: tests/classify/test_rebalance.py's CMO/DRW run.)"""
    base = load_config(None, [f"run.output={tmp_path}"])
    digits = load_dataset(base)
    syn = str(tmp_path / "syn")
    write_synthetic_set(syn, Storage(), digits.class_names, digits.train.column("image").to_pylist(),
                        digits.train.column("label").to_pylist(), num_rows=600, rows_per_file=50,
                        clip_threshold=0.1)
    overrides = [f"run.output={tmp_path}", *FAST, "classify.epochs=3", "classify.eval_every=3", "classify.p=0.3",
                 f"classify.synthetic={syn}", "classify.num_workers=2", "classify.fail_at_epoch=2",
                 "classify.max_failures=1"]
    config = load_config(None, overrides)
    summary = run(config)
    metrics, out = summary["metrics"], tmp_path / "run" / "classify" / summary["output"].rsplit("/", 1)[-1]
    assert (out / ".fail_at_epoch_2").exists()                             # the failure did happen
    assert metrics["resumed_from_epoch"] == 1 and metrics["epoch"] == 3     # and training continued from epoch 1
    assert metrics["train_rows"] == 2 * -(-digits.train.num_rows // 2)
    assert 0.15 * digits.train.num_rows < metrics["synthetic_rows"] < 0.45 * digits.train.num_rows
    assert metrics["top1"] > 0.3, metrics                                # chance is 0.1
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["metrics"]["top1"] == metrics["top1"] and on_disk["synthetic"] == syn
    from engine.tracking import read_scalars                              # the curves, for TensorBoard

    curves = read_scalars(str(out / "tensorboard"))
    assert [step for step, _ in curves["train_loss"]] == [1, 2, 3] and curves["top1"][-1][1] == pytest.approx(
        metrics["top1"])
    assert resolve_stage("classify") is run
    # a rerun of the finished run reuses its summary: no Train worker group, nothing trained or written
    assert summary["reused"] is False
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run(config)
    assert again["reused"] is True and again["metrics"] == metrics and again["output"] == summary["output"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == written
    # nor is it the finished run for other train rows (a dataset that changed under the same config)
    fewer = load_dataset(load_config(None, [*overrides, "dataset.subset.kind=few_shot", "dataset.subset.shots=2"]))
    assert finished_run(config, prepare_inputs(config, digits), Storage()) is not None
    assert finished_run(config, prepare_inputs(config, fewer), Storage()) is None


def test_run_rejects_a_synthetic_set_with_other_classes(ray_session, tmp_path):
    syn = str(tmp_path / "syn")
    write_synthetic_set(syn, Storage(), [f"bird{i}" for i in range(10)], [b"x"], [0], num_rows=4)
    config = load_config(None, [f"run.output={tmp_path}", *FAST, "classify.p=0.2", f"classify.synthetic={syn}",
                                "dataset.subset.kind=few_shot", "dataset.subset.shots=2"])
    with pytest.raises(ShardError, match=r"bird0.*zero|zero.*bird0"):
        run(config)
    missing = load_config(None, [f"run.output={tmp_path / 'empty'}", *FAST, "classify.p=0.2",
                                 "dataset.subset.kind=few_shot", "dataset.subset.shots=2"])
    with pytest.raises(ShardError, match="set classify.synthetic"):
        run(missing)


@pytest.mark.s3
def test_shard_reads_fail_within_bound_on_a_stalled_store_and_a_rerun_matches(ray_session, tmp_path, s3_server,
                                                                               unbroken_classifier):
    """The synthetic set lives on SeaweedFS; it is paused (SIGSTOP) mid-training for longer than the bound.
    The run fails with the shard's URI named within the bound (each epoch reads shards), and a rerun after
    the store is back resumes from its last checkpoint to the same loss and accuracy as an unbroken run
    (the session's `unbroken_classifier`, same settings; storage bounds do not change what is trained)."""
    stall = stalling_store_overrides(s3_server["endpoint_url"], max_stall_s=4)
    common, syn = [*unbroken_classifier["overrides"], "classify.max_failures=0"], unbroken_classifier["synthetic"]
    config, tight = load_config(None, common), load_config(None, [*common, *stall])
    inputs = prepare_inputs(config, load_dataset(config))

    out = tmp_path / "stalled"
    job = Background(lambda: fit(tight, inputs, output=str(out)))
    deadline = time.monotonic() + 300
    while not list((out / "train").glob("checkpoint_*")) and not job.done and time.monotonic() < deadline:
        time.sleep(0.05)
    with s3_server["server"].stalled():
        paused_at = time.monotonic()
        with pytest.raises(StorageError) as err:
            job.join(120)
        took = job.finished_at - paused_at
    assert "storage stalled" in str(err.value) and f"{syn}/part-" in str(err.value), str(err.value)
    assert took < 4 + 30, f"failed {took:.1f} s after the store stalled"
    again = fit(config, inputs, output=str(out))["metrics"]
    assert again["resumed_from_epoch"] >= 1 and again["epoch"] == 30
    unbroken = unbroken_classifier["metrics"]
    assert {k: again[k] for k in ("train_loss", "top1")} == {k: unbroken[k] for k in ("train_loss", "top1")}
