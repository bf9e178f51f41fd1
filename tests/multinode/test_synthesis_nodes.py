"""Synthesis on a real multi-node Ray cluster on this machine, end to end against the SeaweedFS S3 store.

The session head (tests/conftest.py) gets worker nodes for one test (tests/multinode/conftest.py), each a
separate `ray start` with a `gpu_slot` resource; Translators ask for one slot (synthesis.actor_resources), so
they run only on worker nodes, on CPU with the tiny offline models (32 px, T = 4, digits at 2 shots:
40 plan rows in 10 files). Which node ran each Translator call is read from Ray's own task records
(ray.util.state), not from anything the engine reports. Node loss is a SIGKILL of the node's process group.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from engine.config import ExperimentConfig, load_config
from engine.storage import Storage
from engine.synthesis import run
from engine.synthesis.sink import committed_files, read_shard
from engine.synthesis.translate import SynthesisError
from engine.testing.background import Background, wait_for_files, wait_until
from engine.testing.cluster import GPU_SLOT, WorkerNode
from engine.testing.s3server import S3_ACCESS_KEY, S3_SECRET_KEY

TOTAL, FILES = 40, 10
TRANSLATOR = "Translator"  # Ray Data names the pool's actor and its tasks after the class


def config(tiny_cache: Path, output: str, endpoint: str, *extra: str) -> ExperimentConfig:
    return load_config(None, [
        f"run.output={output}", f"model.cache_dir={tiny_cache}", "model.resolution=32",
        "dataset.subset.kind=few_shot", "dataset.subset.shots=2",
        "synthesis.strategy=real-mix", "synthesis.multiplier=2", "synthesis.num_inference_steps=4",
        "synthesis.resolution=32", "synthesis.num_gpus_per_actor=0", "synthesis.rows_per_file=4",
        "synthesis.batch_size=4", "synthesis.strength_run=4", "synthesis.clip_batch_size=4",
        "synthesis.cpus_per_actor=0.5", "synthesis.cpus_per_task=0.25", "synthesis.cpu_threads=1",
        "synthesis.log_every_s=2", "metrics.enabled=false",
        f"storage.storage_options={{key: {S3_ACCESS_KEY}, secret: {S3_SECRET_KEY}, "
        f"client_kwargs: {{endpoint_url: '{endpoint}'}}}}", *extra,
    ])


def on_slots(*extra: str) -> tuple[str, ...]:
    return (f"synthesis.actor_resources={{{GPU_SLOT}: 1}}", *extra)


def read_rows(storage: Storage, uri: str) -> pa.Table:
    return pa.concat_tables([read_shard(storage, f) for f in committed_files(storage, uri)]).sort_by("index")


def translator_calls(node_ids: set[str]) -> dict[str, int]:
    """Finished Translator calls per node, for the given nodes (Ray's task records, from the GCS)."""
    from ray.util.state import list_tasks

    counts = {}
    for node_id in node_ids:
        tasks = list_tasks(filters=[("node_id", "=", node_id), ("state", "=", "FINISHED")], detail=True,
                           limit=10_000, raise_on_missing_output=False)
        counts[node_id] = sum(1 for t in tasks if TRANSLATOR in (t.name or ""))
    return counts


def translator_nodes() -> set[str]:
    """Nodes that host a live Translator actor now."""
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1_000,
                                           raise_on_missing_output=False)
            if TRANSLATOR in (a.repr_name or a.class_name or "")}


def ids(*nodes: WorkerNode) -> set[str]:
    return {n.node_id for n in nodes}


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tiny_cache, s3_server):
    """The reference rows: one uninterrupted run of the same plan on the session head alone."""
    bucket = s3_server["server"].make_bucket("multinode-reference")
    cfg = config(tiny_cache, f"{bucket}/runs", s3_server["endpoint_url"])
    summary = run(cfg)
    return summary, read_rows(Storage.from_config(cfg), summary["output"])


@pytest.mark.s3
def test_translators_spread_over_both_worker_nodes(uninterrupted, worker_nodes, tiny_cache, s3_server, s3_bucket):
    """Two one-slot nodes, two Translators: each node hosts one and translates windows; rows match the
    single-node run byte for byte."""
    reference, rows = uninterrupted
    a, b = worker_nodes.add(slots=1), worker_nodes.add(slots=1)
    cfg = config(tiny_cache, f"{s3_bucket}/runs", s3_server["endpoint_url"],
                 *on_slots("synthesis.min_actors=2", "synthesis.max_actors=2"))
    summary = run(cfg)
    assert summary["plan_hash"] == reference["plan_hash"] and summary["written"] == TOTAL
    calls = translator_calls(ids(a, b))
    assert all(c > 0 for c in calls.values()) and sum(calls.values()) >= FILES, calls
    assert read_rows(Storage.from_config(cfg), summary["output"]).equals(rows)


@pytest.mark.s3
def test_killing_a_worker_node_mid_stream_loses_no_row(uninterrupted, worker_nodes, tiny_cache, s3_server,
                                                      s3_bucket):
    """Two one-slot nodes, one Translator on each. Once a shard has committed, one node is SIGKILLed with
    everything on it (actor, object store, queued windows) and a replacement node joins, as an autoscaling
    group replaces a reclaimed spot node; the lost actor is restarted there, and every planned row is committed
    exactly once with the bytes of an uninterrupted run."""
    reference, rows = uninterrupted
    a, b = worker_nodes.add(slots=1), worker_nodes.add(slots=1)
    out = f"{s3_bucket}/set"
    cfg = config(tiny_cache, f"{s3_bucket}/runs", s3_server["endpoint_url"], f"synthesis.output={out}",
                 *on_slots("synthesis.min_actors=2", "synthesis.max_actors=2"))
    storage = Storage.from_config(cfg)
    job = Background(lambda: run(cfg))
    wait_for_files(storage, out, lambda f: "/part-" in f, 1, job, timeout=300)
    committed_at_kill = len(committed_files(storage, out))
    worker_nodes.kill(b)
    replacement = worker_nodes.add(slots=1)
    summary = job.join(timeout=300)
    assert committed_at_kill < FILES, "the stream ended before the node was killed"
    assert summary["plan_hash"] == reference["plan_hash"] and summary["rows"] == TOTAL
    assert summary["files"] == FILES
    final = read_rows(storage, out)
    assert final.column("index").to_pylist() == list(range(TOTAL))  # none missing, none twice
    assert final.equals(rows)
    calls = translator_calls(ids(a, replacement))
    assert calls[a.node_id] > 0, calls
    worker_nodes.wait_dead(b)


@pytest.mark.s3
def test_a_slot_no_node_has_fails_fast_naming_the_key(ray_session, tiny_cache, s3_server, s3_bucket):
    """On the head alone (no gpu_slot anywhere) the Translators could never be placed: the job fails before
    streaming instead of hanging, and says which key and how to fix it."""
    cfg = config(tiny_cache, f"{s3_bucket}/runs", s3_server["endpoint_url"],
                 *on_slots("synthesis.min_actors=2", "synthesis.max_actors=2"))
    with pytest.raises(SynthesisError) as err:
        run(cfg)
    message = str(err.value)
    assert "synthesis.actor_resources" in message and "{'gpu_slot': 2.0}" in message and "\n" not in message
    storage, runs = Storage.from_config(cfg), f"{s3_bucket}/runs"
    assert not [f for f in (storage.walk_files(runs) if storage.exists(runs) else []) if "/part-" in f]
