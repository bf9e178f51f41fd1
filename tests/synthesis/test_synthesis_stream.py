"""The whole stage on the session's Ray cluster: sink on disk and S3, determinism, resume after a killed
driver, an actor dying mid-run, idempotent re-runs, plan-hash conflicts, the filter and bad inputs.

Every run uses the tiny offline models at 32 px, T = 4, and the built-in digits at 2 shots per class
(20 train images, multiplier 2: 40 rows in 10 files of 4), real-mix (no adapter needed).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine.config import ExperimentConfig, load_config
from engine.data import ImageDataset, encode_png, load_dataset
from engine.data.builtin import CLASS_NAMES, METACLASS
from engine.data.shards import CARD, MANIFEST, SyntheticSet, parse_part_name
from engine.storage import Storage, StorageError, join
from engine.testing.background import Background, wait_for_files
from engine.testing.s3server import stalling_store_overrides
from engine.synthesis import run
from engine.synthesis.manifest import PLAN_FILE, read_json
from engine.synthesis.references import ReferenceImageError
from engine.synthesis.stage import prepare
from engine.synthesis.sink import committed_files, read_shard
from engine.synthesis.translate import SynthesisError

REPO = Path(__file__).resolve().parents[2]
S3_ACCESS_KEY = "diffmix-test-access"      # the values tests/conftest.py gives the SeaweedFS server
S3_SECRET_KEY = "diffmix-test-secret-key"
TOTAL, FILES = 40, 10


def overrides(tiny_cache: Path, output: str, *extra: str) -> list[str]:
    return [
        f"run.output={output}", f"model.cache_dir={tiny_cache}", "model.resolution=32",
        "dataset.subset.kind=few_shot", "dataset.subset.shots=2",
        "synthesis.strategy=real-mix", "synthesis.multiplier=2", "synthesis.num_inference_steps=4",
        "synthesis.resolution=32", "synthesis.num_gpus_per_actor=0", "synthesis.rows_per_file=4",
        "synthesis.batch_size=4", "synthesis.strength_run=4", "synthesis.clip_batch_size=4",
        "synthesis.log_every_s=2", "metrics.enabled=false", *extra,  # measured in test_set_metrics_*
    ]


def config(tiny_cache: Path, output: str, *extra: str) -> ExperimentConfig:
    return load_config(None, overrides(tiny_cache, output, *extra))


def read_rows(storage: Storage, uri: str) -> pa.Table:
    """Every committed row (with image bytes), sorted by plan index."""
    tables = [read_shard(storage, f) for f in committed_files(storage, uri)]
    table = pa.concat_tables(tables)
    return table.sort_by("index")


def output_of(summary: dict) -> str:
    return summary["output"]


@pytest.fixture(scope="module")
def baseline(ray_session, tiny_cache, tmp_path_factory):
    """One uninterrupted run on local disk; other tests compare against its rows."""
    out = tmp_path_factory.mktemp("baseline")
    cfg = config(tiny_cache, str(out))
    summary = run(cfg)
    return cfg, summary, read_rows(Storage(), output_of(summary))


def test_set_metrics_are_added_to_a_complete_sets_manifest_once(baseline, tiny_cache):
    """A complete set synthesized without metrics: a rerun with `metrics.enabled` measures it (nothing is
    regenerated), the manifest and summary carry the figures, and the next rerun measures nothing."""
    cfg, summary, _ = baseline
    out = output_of(summary)
    before = read_json(Storage(), join(out, MANIFEST))
    measured = run(config(tiny_cache, str(cfg.run.output), "metrics.enabled=true"))
    assert measured["written"] == 0 and measured["output"] == out
    manifest = read_json(Storage(), join(out, MANIFEST))
    figures = manifest["set_metrics"]
    assert figures["clip_frechet"] >= 0 and figures["images"]["synthetic"] == manifest["counts"]["kept"]
    assert figures["images"]["real"] == 20 and set(figures["diversity"]["per_class"]) == set(manifest["class_names"])
    assert measured["set_metrics"]["clip_frechet"] == figures["clip_frechet"]
    unchanged = ("set_metrics", "written_at")
    assert {k: v for k, v in manifest.items() if k not in unchanged} == {
        k: v for k, v in before.items() if k not in unchanged}                # measuring changes nothing else
    again = run(config(tiny_cache, str(cfg.run.output), "metrics.enabled=true"))
    assert read_json(Storage(), join(out, MANIFEST))["written_at"] == manifest["written_at"]
    assert again["set_metrics"] == measured["set_metrics"]


def test_local_sink_files_and_manifest(baseline):
    cfg, summary, rows = baseline
    out = output_of(summary)
    assert summary["written"] == TOTAL and summary["files_written"] == FILES and summary["rows"] == TOTAL
    assert out.endswith("/synthetic/" + summary["plan_hash"])
    names = sorted(os.listdir(out))
    parts = [n for n in names if n.startswith("part-")]
    assert names == sorted(parts + [MANIFEST, PLAN_FILE, CARD]) and len(parts) == FILES
    assert [parse_part_name(p) for p in parts] == [(i, i + 4) for i in range(0, TOTAL, 4)]
    manifest = read_json(Storage(), join(out, MANIFEST))
    assert manifest["plan_hash"] == summary["plan_hash"] and manifest["counts"]["rows"] == TOTAL
    assert manifest["counts"]["files"] == FILES == len(manifest["files"])
    assert sum(f["rows"] for f in manifest["files"]) == TOTAL
    assert {f["name"] for f in manifest["files"]} == set(parts)
    assert all(f["bytes"] == os.path.getsize(os.path.join(out, f["name"])) for f in manifest["files"])
    assert manifest["num_train"] == 20 and manifest["class_names"][0] == "zero"
    assert {"torch", "diffusers", "ray", "python"} <= set(manifest["versions"])
    assert "storage" not in manifest["config"] and manifest["config"]["synthesis"]["strategy"] == "real-mix"
    assert manifest["images_per_s"] > 0 and manifest["elapsed_s"] > 0
    # rows follow the shard contract
    assert rows.column("index").to_pylist() == list(range(TOTAL))
    assert set(rows.column("strength").to_pylist()) == {0.5, 0.7, 0.9}
    assert all(p.startswith("photo of a ") and p.endswith(" digit") for p in rows.column("prompt").to_pylist())
    assert rows.column("image")[0].as_py()[:4] == b"\x89PNG"


def test_rerun_of_a_finished_job_writes_nothing(baseline, tiny_cache):
    cfg, summary, _ = baseline
    out = output_of(summary)
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    again = run(cfg)
    after = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    assert again["written"] == 0 and again["files_written"] == 0 and again["resumed_rows"] == TOTAL
    assert before == after
    import engine.synthesis
    from engine.cli import resolve_stage

    assert resolve_stage("synthesize") is engine.synthesis.run and callable(engine.synthesis.run)


@pytest.mark.s3
def test_same_config_on_s3_gives_identical_rows(baseline, tiny_cache, s3_server, s3_bucket):
    _, summary, rows = baseline
    endpoint = s3_server["endpoint_url"]
    options = f"storage.storage_options={{key: {S3_ACCESS_KEY}, secret: {S3_SECRET_KEY}, client_kwargs: {{endpoint_url: '{endpoint}'}}}}"
    cfg = config(tiny_cache, f"{s3_bucket}/runs", options)
    s3 = run(cfg)
    assert s3["plan_hash"] == summary["plan_hash"] and s3["output"].startswith("s3://")
    storage = Storage.from_config(cfg)
    remote = read_rows(storage, s3["output"])
    assert remote.equals(rows)  # identical rows, scores and image bytes
    manifest = SyntheticSet.open(s3["output"], storage).manifest
    listed = sorted(f.rsplit("/", 1)[-1] for f in committed_files(storage, s3["output"]))
    assert listed == sorted(f["name"] for f in manifest["files"]) and len(listed) == FILES
    assert manifest["counts"]["rows"] == TOTAL and "key" not in str(manifest["config"])


def _stalling_job(tiny_cache, s3_server, out: str) -> tuple[Storage, Background]:
    """A synthesis job writing to `out` on the test store, started once its first shard has committed."""
    cfg = config(tiny_cache, out.rsplit("/", 1)[0] + "/runs", f"synthesis.output={out}",
                 *stalling_store_overrides(s3_server["endpoint_url"], max_stall_s=5))
    storage = Storage.from_config(cfg)
    job = Background(lambda: run(cfg))
    wait_for_files(storage, out, lambda f: "/part-" in f, 1, job)
    return storage, job


@pytest.mark.s3
def test_sink_rides_out_a_short_stall_of_the_store(baseline, tiny_cache, s3_server, s3_bucket):
    """SeaweedFS paused (SIGSTOP) for 2 s after the first shard commits: writes wait, then go through."""
    _, _, rows = baseline
    storage, job = _stalling_job(tiny_cache, s3_server, f"{s3_bucket}/short")
    with s3_server["server"].stalled():
        time.sleep(2.0)
    summary = job.join(timeout=300)
    assert summary["rows"] == TOTAL
    assert read_rows(storage, f"{s3_bucket}/short").equals(rows)


@pytest.mark.s3
def test_sink_fails_within_its_bound_on_a_long_stall_and_a_rerun_finishes(baseline, tiny_cache, s3_server,
                                                                         s3_bucket, new_driver_job):
    """Paused for longer than storage.max_stall_s (5 s): the job fails with the URI named within the bound
    (it used to hang for ever), leaves only whole files, and a rerun after the store is back completes
    the set with the rows of an uninterrupted run.

    The rerun is a new driver job, as a user's next `diffmix synthesize` is: Ray Data shuts a failed
    stream's actor pools down by dropping its references (no kill), so in the same job the failed run's
    Translator and ClipScorer (2 CPU) can outlive it while the exception is held, and the rerun's pool
    waited for CPUs past the test's timeout (stop 21's CI, and once here)."""
    _, _, rows = baseline
    out = f"{s3_bucket}/long"
    storage, job = _stalling_job(tiny_cache, s3_server, out)
    with s3_server["server"].stalled():
        paused_at = time.monotonic()
        with pytest.raises(StorageError) as err:
            job.join(timeout=120)
        took = job.finished_at - paused_at
    message = str(err.value)
    assert "storage stalled" in message and out in message and "within 5 s" in message, message
    assert took < 5 + 20, f"failed {took:.1f} s after the store stalled"
    assert "\n" not in message and S3_SECRET_KEY not in message
    for f in committed_files(storage, out):  # whatever is there is a whole shard
        assert read_shard(storage, f).num_rows == 4
    assert not storage.exists(join(out, MANIFEST))
    del err, job
    new_driver_job()
    # the rerun must succeed: a bound a loaded box always meets (storage bounds are not in the plan hash)
    again = run(config(tiny_cache, f"{s3_bucket}/runs", f"synthesis.output={out}",
                       *stalling_store_overrides(s3_server["endpoint_url"], max_stall_s=60)))
    assert again["rows"] == TOTAL and again["resumed_rows"] >= 4
    assert read_rows(storage, out).equals(rows)


def test_other_seed_differs_and_plan_conflicts_need_overwrite(baseline, tiny_cache, tmp_path):
    cfg, summary, rows = baseline
    folder = tmp_path / "set"
    shutil.copytree(output_of(summary), folder)
    other = config(tiny_cache, str(tmp_path), f"synthesis.output={folder}", "synthesis.seed=1")
    with pytest.raises(SynthesisError, match="overwrite"):
        run(other)
    assert len(committed_files(Storage(), str(folder))) == FILES  # nothing touched
    replaced = run(other.model_copy(update={"synthesis": other.synthesis.model_copy(update={"overwrite": True})}))
    assert replaced["plan_hash"] != summary["plan_hash"] and replaced["written"] == TOTAL
    new_rows = read_rows(Storage(), str(folder))
    assert new_rows.num_rows == TOTAL
    assert new_rows.column("seed").to_pylist() != rows.column("seed").to_pylist()
    assert new_rows.column("image").to_pylist() != rows.column("image").to_pylist()
    assert read_json(Storage(), str(folder / PLAN_FILE))["plan_hash"] == replaced["plan_hash"]


def test_resume_after_the_driver_is_killed(baseline, tiny_cache, tmp_path, ray_session):
    _, summary, rows = baseline
    out = tmp_path / "resume"
    args = [sys.executable, "jobs/synthesize.py", *overrides(tiny_cache, str(out))]
    log_path = tmp_path / "driver.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    assert env.get("RAY_ADDRESS")  # the driver joins the session's cluster
    folder = out / "run" / "synthetic" / summary["plan_hash"]
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(args, cwd=REPO, stdout=log_fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            deadline = time.time() + 240
            while not (folder.is_dir() and any(p.name.startswith("part-") for p in folder.iterdir())):
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.05)
        finally:
            proc.kill()
            proc.wait()
    partial = len(committed_files(Storage(), str(folder)))
    assert 0 < partial < FILES, f"driver killed after {partial} files"
    assert not (folder / MANIFEST).exists()
    resumed = run(config(tiny_cache, str(out)))
    assert resumed["resumed_rows"] >= 4 * partial and resumed["written"] == TOTAL - resumed["resumed_rows"]
    final = read_rows(Storage(), str(folder))
    assert final.column("index").to_pylist() == list(range(TOTAL))  # no duplicate, none missing
    assert final.equals(rows)


def test_a_resume_writing_two_files_reports_no_rate(baseline, tiny_cache, tmp_path):
    """Two files are too short a window for a rate: the summary says so instead of printing a wild number."""
    _, summary, rows = baseline
    folder = tmp_path / "set"
    shutil.copytree(output_of(summary), folder)
    for name in ("part-00000008-00000012.parquet", "part-00000020-00000024.parquet", MANIFEST):
        (folder / name).unlink()
    resumed = run(config(tiny_cache, str(tmp_path), f"synthesis.output={folder}"))
    assert resumed["written"] == 8 and resumed["files_written"] == 2
    assert resumed["images_per_s"] is None and resumed["steady_images_per_s"] is None
    assert "window of 2 unit(s) < 3" in resumed["rate_note"]
    assert read_rows(Storage(), str(folder)).equals(rows)


def test_the_set_folder_opens_in_pyarrow_pandas_ray_data_and_datasets(baseline, ray_session, tmp_path):
    """A synthesized set by its folder path, as users open Parquet folders: every reader sees the rows and
    the contract's columns, none trips over the set's own (hidden) files."""
    import datasets
    import pandas as pd
    import pyarrow.parquet as pq

    _, summary, rows = baseline
    folder = output_of(summary)
    table = pq.read_table(folder)
    assert table.num_rows == TOTAL and sorted(table.column("index").to_pylist()) == list(range(TOTAL))
    assert sorted(pd.read_parquet(folder)["index"]) == list(range(TOTAL))
    assert ray_session.data.read_parquet(folder).count() == TOTAL
    ds = datasets.load_dataset(folder, split="train", cache_dir=str(tmp_path / "a"))
    assert len(ds) == TOTAL and isinstance(ds.features["image"], datasets.Image)
    assert ds.features["target_label"].names == CLASS_NAMES
    assert len(datasets.load_dataset("parquet", data_dir=folder, split="train", cache_dir=str(tmp_path / "b"))) == TOTAL


def legacy_copy(folder: str, dest: Path) -> Path:
    """`folder` as the engine laid sets out before the hidden names: manifest.json, plan.json, a README.md card."""
    shutil.copytree(folder, dest)
    (dest / MANIFEST).rename(dest / "manifest.json")
    (dest / PLAN_FILE).rename(dest / "plan.json")
    (dest / CARD).unlink()
    (dest / "README.md").write_text("---\nconfigs: []\n---\n\n# Diff-Mix synthetic set\n")
    return dest


def test_a_set_of_the_earlier_layout_reads_and_moves_to_the_hidden_names(baseline, tiny_cache, tmp_path):
    """Read as before; a rerun over it writes no row and leaves the folder in the hidden layout; an interrupted
    one (a shard and the manifest missing) resumes to the same rows, also in the hidden layout."""
    import pandas as pd

    _, summary, rows = baseline
    old = legacy_copy(output_of(summary), tmp_path / "old")
    assert SyntheticSet.open(str(old)).read(filtered=False).num_rows == TOTAL
    again = run(config(tiny_cache, str(tmp_path), f"synthesis.output={old}"))
    assert again["written"] == 0 and again["rows"] == TOTAL
    hidden = sorted(n for n in os.listdir(old) if not n.startswith("part-"))
    assert hidden == sorted([MANIFEST, PLAN_FILE, CARD]) and len(pd.read_parquet(old)) == TOTAL

    partial = legacy_copy(output_of(summary), tmp_path / "partial")
    (partial / "manifest.json").unlink()
    (partial / "part-00000012-00000016.parquet").unlink()
    resumed = run(config(tiny_cache, str(tmp_path), f"synthesis.output={partial}"))
    assert resumed["written"] == 4 and resumed["resumed_rows"] == TOTAL - 4
    assert sorted(n for n in os.listdir(partial) if not n.startswith("part-")) == hidden
    assert read_rows(Storage(), str(partial)).equals(rows)


def test_translator_dying_mid_run_is_replaced_and_rows_are_exact(baseline, tiny_cache, tmp_path):
    _, _, rows = baseline
    result = run(config(tiny_cache, str(tmp_path), "synthesis.fail_actor_after=3"))
    assert result["injected_actor_failures"] == 1
    assert result["written"] == TOTAL and result["files"] == FILES
    final = read_rows(Storage(), result["output"])
    assert final.column("index").to_pylist() == list(range(TOTAL))
    assert final.equals(rows)


def test_filter_threshold_and_reader(baseline):
    _, summary, rows = baseline
    synthetic = SyntheticSet.open(summary["output"])
    threshold = synthetic.threshold
    scores = np.array(rows.column("clip_score").to_pylist())
    assert threshold is not None and summary["clip_threshold"] == threshold
    kept = synthetic.read()
    assert kept.num_rows == TOTAL - 4 == summary["kept"]  # floor(0.1 x 40) dropped
    assert (scores < threshold).sum() == 4 and min(kept.column("clip_score").to_pylist()) >= threshold
    assert synthetic.read(filtered=False).num_rows == TOTAL
    only = synthetic.read(strengths=[0.5], filtered=False)
    assert set(only.column("strength").to_pylist()) == {0.5} and 0 < only.num_rows < TOTAL
    prefix = synthetic.read(multiplier=1, filtered=False)
    assert prefix.column("index").to_pylist() == list(range(20))
    with_images = synthetic.read(strengths=[0.7, 0.9], multiplier=1, with_images=True)
    assert with_images.num_rows > 0 and with_images.column("image")[0].as_py()[:4] == b"\x89PNG"


# --- diff-*: the fine-tuned adapter --------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tiny_cache, tmp_path_factory) -> str:
    """A ti+db artifact for the 10 digit classes with random (valid) weights, written by the engine's writers."""
    from engine.models import resolve_model
    from engine.testing.adapter import write_random_adapter

    base = resolve_model("tiny", str(tiny_cache), kind="sd", resolution=32, extra_words=[*CLASS_NAMES, METACLASS])
    folder = tmp_path_factory.mktemp("adapter")
    write_random_adapter(base, str(folder), CLASS_NAMES, METACLASS)
    return str(folder)


def test_diff_mix_translates_with_the_adapter(baseline, adapter, tiny_cache, tmp_path):
    from engine.models.adapters import read_adapter_info

    _, summary, real_rows = baseline
    info = read_adapter_info(adapter)
    cfg = config(tiny_cache, str(tmp_path), "synthesis.strategy=diff-mix", f"synthesis.adapter={adapter}")
    result = run(cfg)
    assert result["written"] == TOTAL and result["plan_hash"] != summary["plan_hash"]
    rows = read_rows(Storage(), result["output"])
    assert rows.column("strategy").to_pylist() == ["diff-mix"] * TOTAL
    prompts, targets = rows.column("prompt").to_pylist(), rows.column("target_label").to_pylist()
    assert all(p == info.prompts[t] and "<" in p for p, t in zip(prompts, targets))
    # same pairs, strengths and seeds as real-mix (same plan seed): only the model and prompts differ
    assert rows.column("ref_id").equals(real_rows.column("ref_id"))
    assert rows.column("seed").equals(real_rows.column("seed"))
    assert rows.column("image").to_pylist() != real_rows.column("image").to_pylist()
    manifest = SyntheticSet.open(result["output"]).manifest
    assert manifest["plan"]["identity"]["adapter"] is not None


# --- bad inputs: all fail before any Ray work ----------------------------------------------------

def test_missing_adapter_fails_before_ray(tiny_cache, tmp_path):
    cfg = config(tiny_cache, str(tmp_path), "synthesis.strategy=diff-mix", f"synthesis.adapter={tmp_path / 'nope'}")
    with pytest.raises(SynthesisError, match=f"no fine-tuned adapter at {tmp_path / 'nope'}.*real-\\*"):
        run(cfg)
    default = config(tiny_cache, str(tmp_path), "synthesis.strategy=diff-aug")
    with pytest.raises(SynthesisError, match=str(tmp_path / "run" / "adapter")):
        run(default)
    assert not (tmp_path / "run" / "synthetic").exists()


def test_bad_reference_image_is_named_or_skipped_and_counted(tiny_cache, tmp_path):
    cfg = config(tiny_cache, str(tmp_path))
    ds = load_dataset(cfg)
    ids = ds.train.column("id").to_pylist()
    images = ds.train.column("image").to_pylist()
    images[3] = b"\x89PNG broken"
    train = pa.table({"id": ids, "image": images, "label": ds.train.column("label"), "group": ds.train.column("group")},
                     schema=ds.train.schema)
    broken = ImageDataset(ds.class_names, ds.metaclass, train, ds.test, ds.name)
    with pytest.raises(ReferenceImageError, match=ids[3]):
        run(cfg, broken)
    skipping = config(tiny_cache, str(tmp_path), "dataset.skip_bad_images=true")
    job = prepare(skipping, broken)
    assert job.skipped == [ids[3]] and ids[3] not in set(job.plan.column("ref_id").to_pylist())
    assert job.plan.num_rows == TOTAL and job.spec.identity["skipped_references"] == [ids[3]]
    assert job.plan_hash != prepare(skipping, ds).plan_hash
    assert not (tmp_path / "run" / "synthetic").exists()


def test_encode_png_roundtrip_of_generated_images(baseline):
    from engine.data import to_array

    _, _, rows = baseline
    img = to_array(rows.column("image")[0].as_py())
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert encode_png(img)[:4] == b"\x89PNG"


def test_remote_models_are_fingerprinted_from_a_listing(tiny_cache, tmp_path):
    from engine.models import resolve_model
    from engine.synthesis.stage import model_identity
    from engine.synthesis.translate import ModelRef

    storage = Storage()
    local = resolve_model("tiny", str(tiny_cache), kind="sd", resolution=32, extra_words=["zero", "digit"])
    storage.upload_dir(local, "memory://models/a")
    storage.upload_dir(local, "memory://models/b")
    ident = [model_identity(ModelRef(f"memory://models/{x}", str(tmp_path / "cache"), "sd"), storage) for x in "ab"]
    assert ident[0]["fingerprint"] == ident[1]["fingerprint"]
    assert not (tmp_path / "cache").exists()  # nothing was downloaded
    storage.write_text("memory://models/b/unet/config.json", '{"changed": true}')
    changed = model_identity(ModelRef("memory://models/b", str(tmp_path / "cache"), "sd"), storage)
    assert changed["fingerprint"] != ident[0]["fingerprint"]
    with pytest.raises(SynthesisError, match="model folder not found: memory://models/none"):
        model_identity(ModelRef("memory://models/none", str(tmp_path / "cache"), "sd"), storage)
