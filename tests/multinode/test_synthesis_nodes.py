"""Synthesis on a real multi-node Ray cluster on this machine, end to end against the SeaweedFS S3 store.

The session head (tests/conftest.py) gets worker nodes for one test (tests/multinode/conftest.py), each a
separate `ray start` with a `gpu_slot` resource; Translators ask for one slot (synthesis.actor_resources), so
they run only on worker nodes, on CPU with the tiny offline models (32 px, T = 4, digits at 2 shots:
40 plan rows in 10 files). Which node ran each Translator call is read from Ray's own task records
(ray.util.state), not from anything the engine reports. Node loss is a SIGKILL of the node's process group.
"""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pytest

from engine.config import ExperimentConfig, load_config
from engine.storage import Storage, StorageError
from engine.synthesis import run
from engine.synthesis.sink import committed_files, read_shard
from engine.synthesis.translate import SynthesisError
from engine.testing.background import Background, wait_until
from engine.testing.cluster import GPU_SLOT, WorkerNode
from engine.testing.s3server import S3_ACCESS_KEY, S3_SECRET_KEY

TOTAL, FILES = 40, 10
TRANSLATOR = "Translator"  # Ray Data names the pool's actor and its tasks after the class
WINDOW_CALL = f"MapBatches({TRANSLATOR})).submit"  # one per window translated (not __init__ or get_location)
FLUSH_S = 1.5  # > Ray's task-event report interval (1 s): the records of live processes are current after it


def config(tiny_cache: Path, output: str, endpoint: str, *extra: str) -> ExperimentConfig:
    return load_config(None, overrides(tiny_cache, output, endpoint, *extra))


def overrides(tiny_cache: Path, output: str, endpoint: str, *extra: str) -> list[str]:
    """The plan of these tests (tiny models, 32 px, T = 4, 2 shots: 40 rows in 10 files) on the test store."""
    return [
        f"run.output={output}", f"model.cache_dir={tiny_cache}", "model.resolution=32",
        "dataset.subset.kind=few_shot", "dataset.subset.shots=2",
        "synthesis.strategy=real-mix", "synthesis.multiplier=2", "synthesis.num_inference_steps=4",
        "synthesis.resolution=32", "synthesis.num_gpus_per_actor=0", "synthesis.rows_per_file=4",
        "synthesis.batch_size=4", "synthesis.strength_run=4", "synthesis.clip_batch_size=4",
        "synthesis.cpus_per_actor=0.5", "synthesis.cpus_per_task=0.25", "synthesis.cpu_threads=1",
        "synthesis.log_every_s=2", "metrics.enabled=false",
        f"storage.storage_options={{key: {S3_ACCESS_KEY}, secret: {S3_SECRET_KEY}, "
        f"client_kwargs: {{endpoint_url: '{endpoint}'}}}}", *extra,
    ]


def on_slots(*extra: str) -> tuple[str, ...]:
    return (f"synthesis.actor_resources={{{GPU_SLOT}: 1}}", *extra)


def read_rows(storage: Storage, uri: str) -> pa.Table:
    return pa.concat_tables([read_shard(storage, f) for f in committed_files(storage, uri)]).sort_by("index")


def translator_calls(node_ids: set[str], state: str = "FINISHED") -> dict[str, int]:
    """Translator window calls (attempts) per node in `state`, for the given nodes (Ray's task records, from
    the GCS)."""
    from ray.util.state import list_tasks

    counts = {}
    for node_id in node_ids:
        tasks = list_tasks(filters=[("node_id", "=", node_id), ("state", "=", state)], detail=True,
                           limit=10_000, raise_on_missing_output=False)
        counts[node_id] = sum(1 for t in tasks if (t.name or "").endswith(WINDOW_CALL))
    return counts


def head_calls() -> dict[str, int]:
    """Translator window calls on the head (the driver's node) by state, finished or not."""
    import ray

    head = ray.get_runtime_context().get_node_id()
    return {state: translator_calls({head}, state)[head] for state in ("FINISHED", "FAILED", "RUNNING")}


def windows_running() -> set[str]:
    """Nodes translating a window now."""
    from ray.util.state import list_tasks

    return {t.node_id for t in list_tasks(filters=[("state", "=", "RUNNING")], detail=True, limit=1_000,
                                          raise_on_missing_output=False)
            if (t.name or "").endswith(WINDOW_CALL) and t.node_id}


def windows_in_flight(node_id: str) -> int:
    """Window attempts sent to the node's Translator that Ray has not seen end (running or queued on it)."""
    from ray.util.state import list_tasks

    return sum(1 for t in list_tasks(filters=[("node_id", "=", node_id)], detail=True, limit=10_000,
                                     raise_on_missing_output=False)
               if (t.name or "").endswith(WINDOW_CALL) and t.state not in ("FINISHED", "FAILED"))


def translator_states() -> set[str]:
    """States of the Translator actors now (PENDING_CREATION: waiting for a node with the resources)."""
    from ray.util.state import list_actors

    return {a.state for a in list_actors(detail=True, limit=1_000, raise_on_missing_output=False)
            if TRANSLATOR in (a.repr_name or a.class_name or "") and a.state != "DEAD"}


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
def test_killing_a_worker_node_mid_stream_loses_no_row(uninterrupted, worker_nodes, tiny_cache, s3_server,
                                                      s3_bucket):
    """Two one-slot nodes, a pool of two Translators asking for a slot (so one on each). While a node is
    holding a window (frozen, then checked: `frozen_holding_a_window`), it is SIGKILLed with everything on it
    (actor, object store, queued windows) and a replacement node joins, as an autoscaling group replaces a
    reclaimed spot node. The lost window fails on the dead node (Ray's task records say so) and is retried on
    a surviving Translator (Ray Data restarts the lost actor where a slot is free); every window is translated
    on the worker nodes (none on the head), and every planned row is committed exactly once with the bytes of
    the uninterrupted single-node run."""
    reference, rows = uninterrupted
    a, b = worker_nodes.add(slots=1), worker_nodes.add(slots=1)
    out = f"{s3_bucket}/set"
    cfg = config(tiny_cache, f"{s3_bucket}/runs", s3_server["endpoint_url"], f"synthesis.output={out}",
                 *on_slots("synthesis.min_actors=2", "synthesis.max_actors=2"))
    storage = Storage.from_config(cfg)
    on_head_before = head_calls()  # the reference run translated there
    job = Background(lambda: run(cfg))
    chosen: list[WorkerNode] = []

    def frozen_holding_a_window() -> bool:
        """A node Ray's records show translating is frozen, and kept frozen only if, once the driver's own
        task records have caught up (they flush every second; the node can finish nothing meanwhile), it
        still holds a window: a running window's record can lag its end by up to that second."""
        running = windows_running()
        for node in (n for n in (a, b) if n.node_id in running):
            worker_nodes.freeze(node)
            time.sleep(FLUSH_S)
            if windows_in_flight(node.node_id):
                chosen.append(node)
                return True
            worker_nodes.thaw(node)
        return False

    wait_until(frozen_holding_a_window, job, "a worker node holding a window", timeout=300, poll_s=0.2)
    victim = chosen[0]
    committed_at_kill = len(committed_files(storage, out)) if storage.exists(out) else 0
    worker_nodes.kill(victim)
    replacement = worker_nodes.add(slots=1)
    summary = job.join(timeout=300)
    assert committed_at_kill < FILES, "the stream ended before the node was killed"
    assert summary["plan_hash"] == reference["plan_hash"] and summary["rows"] == TOTAL
    assert summary["files"] == FILES
    final = read_rows(storage, out)
    assert final.column("index").to_pylist() == list(range(TOTAL))  # none missing, none twice
    assert final.equals(rows)
    survivor = b if victim is a else a
    assert translator_calls({victim.node_id}, state="FAILED")[victim.node_id] > 0  # a window died with the node
    assert sum(translator_calls(ids(survivor, replacement)).values()) > 0
    # every window on the worker nodes: none more on the head (not a count of the workers' FINISHED records: those
    # of windows the victim finished just before it was frozen die with it, unflushed)
    assert head_calls() == on_head_before
    worker_nodes.wait_dead(victim)


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


@pytest.mark.s3
def test_a_node_added_mid_stream_grows_the_pool(uninterrupted, worker_nodes, tiny_cache, s3_server, s3_bucket):
    """One one-slot node and a pool allowed two Translators. Once the stream's pool exists, a second node
    joins (an autoscaler's answer to the demand): the pool grows onto it when its first Translator is busy,
    and the new node's Translator translates windows. (Starting an actor on a fresh node takes ~30-40 s on this
    box, so the node joins early and the plan is long.) Every row is committed once, and the plan prefix
    matches the uninterrupted run byte for byte."""
    reference, rows = uninterrupted
    a = worker_nodes.add(slots=1)
    out = f"{s3_bucket}/set"
    total, files = 15 * TOTAL, 15 * FILES  # multiplier 30: a stream long enough for a node to join and start an actor
    cfg = config(tiny_cache, f"{s3_bucket}/runs", s3_server["endpoint_url"], f"synthesis.output={out}",
                 "synthesis.multiplier=30", *on_slots("synthesis.min_actors=1", "synthesis.max_actors=2"))
    storage = Storage.from_config(cfg)
    job = Background(lambda: run(cfg))
    wait_until(lambda: bool(translator_states()), job, "the stream's Translator pool", timeout=300, poll_s=0.5)
    added = worker_nodes.add(slots=1)
    committed_at_join = len(committed_files(storage, out)) if storage.exists(out) else 0
    summary = job.join(timeout=600)
    assert committed_at_join < files, "the stream ended before the node joined"
    assert summary["rows"] == total
    final = read_rows(storage, out)
    assert final.column("index").to_pylist() == list(range(total))  # none missing, none twice
    assert final.slice(0, TOTAL).equals(rows)  # the multiplier-2 plan is this plan's prefix
    calls = translator_calls(ids(a, added))
    assert calls[added.node_id] > 0 and calls[a.node_id] > 0, calls


@pytest.mark.s3
def test_a_lost_node_with_the_only_slot_fails_within_its_bound_and_a_rerun_finishes_once(
        uninterrupted, worker_nodes, tiny_cache, s3_server, tmp_path):
    """One node has the only gpu_slot, and the stream's one Translator holds it; the set goes to local disk.
    Without storage.shared_local a local output on this two-node cluster is refused at start, naming the keys.
    With it (one machine's nodes share its disk), `diffmix synthesize` runs as a user runs it, in its own
    process joined to the cluster, and the node is SIGKILLed after a file is committed: on a cluster without an
    autoscaler the restarting Translator can never be placed, and the command fails within
    cluster.infeasible_grace_s (plus Ray's noticing the node is gone) with one line naming the operator and the
    resource, and the resources exit code, instead of waiting for ever. Only whole files are left; once a node
    with a slot is back, the rerun commits every row exactly once, the multiplier-2 prefix byte-identical to the
    uninterrupted run."""
    import subprocess
    import sys

    reference, rows = uninterrupted
    a = worker_nodes.add(slots=1)
    out = str(tmp_path / "set")
    total = 2 * TOTAL  # multiplier 4: 20 windows, so the stream is still running when the node dies
    extra = ("synthesis.multiplier=4", f"synthesis.output={out}", "cluster.infeasible_grace_s=5",
             *on_slots("synthesis.min_actors=1", "synthesis.max_actors=1"))
    with pytest.raises(StorageError) as refused:
        run(config(tiny_cache, str(tmp_path / "runs"), s3_server["endpoint_url"], *extra))
    line = str(refused.value)
    assert "run.output" in line and "synthesis.output" in line and "storage.shared_local" in line, line
    assert "2 nodes" in line and "\n" not in line and not (tmp_path / "set").exists()

    shared = overrides(tiny_cache, str(tmp_path / "runs"), s3_server["endpoint_url"], *extra,
                       "storage.shared_local=true")
    storage = Storage.from_config(load_config(None, shared))
    with open(tmp_path / "synthesize.log", "wb") as log:  # RAY_ADDRESS (the session's cluster) is inherited
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "synthesize", *shared], stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not (storage.exists(out) and committed_files(storage, out)):
                assert proc.poll() is None, (tmp_path / "synthesize.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no file committed within 300 s"
                time.sleep(0.1)
            worker_nodes.kill(a)
            killed_at = time.monotonic()
            code = proc.wait(timeout=120)
            took = time.monotonic() - killed_at
        finally:
            if proc.poll() is None:
                proc.kill()
    text = (tmp_path / "synthesize.log").read_text()
    said = [line for line in text.splitlines() if line.startswith("diffmix synthesize: ")]  # Ray's logs go on
    assert code == 6 and len(said) == 1, text[-3000:]
    assert said[0].startswith("diffmix synthesize: synthesis: Translator actors waited"), said
    assert "{CPU: 0.5, gpu_slot: 1}" in said[0] and "no node of this cluster can hold" in said[0], said
    assert "Traceback" not in text, text[-3000:]  # the stream was stopped before the process exits
    # Ray calls the node dead after ~5 s of failed health checks (tests/conftest.py), then the 5 s grace; and
    # the process exits
    assert took < 60, f"the command ended {took:.0f} s after the node was killed"
    committed = committed_files(storage, out)
    assert 0 < len(committed) < total // 4  # 4 rows a file
    partial = read_rows(storage, out)  # every committed file is whole (readable), no row twice
    assert len(set(partial.column("index").to_pylist())) == partial.num_rows

    worker_nodes.add(slots=1)
    summary = run(load_config(None, shared))
    assert summary["rows"] == total and summary["resumed_rows"] >= partial.num_rows
    final = read_rows(storage, out)
    assert final.column("index").to_pylist() == list(range(total))  # none missing, none twice
    assert final.slice(0, TOTAL).equals(rows)
    assert reference["plan_hash"] != summary["plan_hash"]  # another multiplier, the same plan prefix
