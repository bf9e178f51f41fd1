"""Fine-tune and classify on a real multi-node Ray cluster on this machine: the node that runs the Train
workers is SIGKILLed (a spot reclaim) after a checkpoint has reached the SeaweedFS S3 store, and the run
finishes on the surviving node from that checkpoint, with the result of an uninterrupted run.

Train workers ask for a `gpu_slot` (`<stage>.worker_resources`), so they run only on the worker nodes; the
Train controller stays on the driver's node (the head), as Ray Train places it. Which node ran the workers is
read from Ray's own actor records (ray.util.state), not from anything the engine reports.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.classify.train import fit, prepare_inputs
from engine.config import ExperimentConfig, load_config
from engine.data import load_dataset
from engine.finetune import run as finetune
from engine.storage import Storage
from engine.testing.background import Background, wait_until
from engine.testing.cluster import GPU_SLOT, WorkerNode, WorkerNodes
from engine.testing.s3server import stalling_store_overrides

TRAIN_WORKER = "RayTrainWorker"


def s3(s3_server) -> list[str]:
    """The test store's keys, with bounds a loaded 2-core box meets (nothing here stalls the store)."""
    return stalling_store_overrides(s3_server["endpoint_url"], max_stall_s=60)


def train_worker_nodes(alive: bool = True) -> set[str]:
    """Nodes hosting a (live, or any) Ray Train worker actor."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", TRAIN_WORKER)] + ([("state", "=", "ALIVE")] if alive else [])
    return {a.node_id for a in list_actors(filters=filters, detail=True, limit=1_000, raise_on_missing_output=False)}


def checkpoint_recorded(storage: Storage, root: str) -> bool:
    """Ray Train's own record under `root` names a checkpoint: a restarted worker group resumes from it."""
    if not storage.exists(root):
        return False
    return any(f.endswith("checkpoint_manager_snapshot.json") and "checkpoint_" in storage.read_text(f)
               for f in storage.walk_files(root))


def kill_the_training_node(nodes: WorkerNodes, candidates: list[WorkerNode], job: Background) -> WorkerNode:
    """SIGKILL the worker node running the Train workers (all of them are on one: Train packs its group)."""
    wait_until(lambda: bool(train_worker_nodes() & {n.node_id for n in candidates}), job, "Train workers placed")
    hosting = train_worker_nodes()
    victim = next(n for n in candidates if n.node_id in hosting)
    nodes.kill(victim)
    return victim


def weight_files(storage: Storage, adapter: str) -> dict[str, bytes]:
    return {f[len(adapter) + 1:]: storage.read_bytes(f) for f in storage.walk_files(adapter)
            if f.endswith(".safetensors")}


def finetune_config(output: str, tiny_cache: Path, s3_server, *extra: str) -> ExperimentConfig:
    return load_config(None, [
        f"run.output={output}", f"model.cache_dir={tiny_cache}", "model.resolution=32",
        "dataset.subset.kind=few_shot", "dataset.subset.shots=8", "finetune.strategy=ti",
        "finetune.resolution=32", "finetune.batch_size=8", "finetune.num_workers=2",
        "finetune.cpus_per_worker=0.5", "finetune.learning_rate=1e-2", "finetune.log_every=2",
        "finetune.steps=16", "finetune.checkpoint_every=2", "finetune.max_failures=2", *s3(s3_server), *extra,
    ])


@pytest.mark.s3
def test_finetune_resumes_on_the_surviving_node(worker_nodes, tiny_cache, s3_server, s3_bucket):
    """Two nodes of two slots; the two DDP workers are packed on one, which is killed after a checkpoint:
    the group restarts on the other node from the S3 checkpoint, and the adapter is byte-identical to an
    uninterrupted run's."""
    a, b = worker_nodes.add(slots=2), worker_nodes.add(slots=2)
    reference = finetune(finetune_config(f"{s3_bucket}/reference", tiny_cache, s3_server))
    cfg = finetune_config(f"{s3_bucket}/runs", tiny_cache, s3_server, f"finetune.worker_resources={{{GPU_SLOT}: 1}}")
    storage = Storage.from_config(cfg)
    job = Background(lambda: finetune(cfg))
    wait_until(lambda: checkpoint_recorded(storage, f"{s3_bucket}/runs/run/finetune-ray"), job,
               "a finetune checkpoint recorded by Ray Train")
    victim = kill_the_training_node(worker_nodes, [a, b], job)
    summary = job.join(timeout=300)
    survivor = b if victim is a else a
    assert 2 <= summary["resumed_from_step"] < 16 and summary["steps"] == 16, summary
    assert survivor.node_id in train_worker_nodes(alive=False)
    assert weight_files(storage, summary["artifact"]) == weight_files(storage, reference["artifact"])


@pytest.mark.s3
def test_classify_resumes_on_the_surviving_node(worker_nodes, s3_bucket, unbroken_classifier):
    """One Train worker on one of two one-slot nodes, reading synthetic shards from S3 every epoch; its node
    is killed after a checkpoint: the run resumes on the other node to the loss and accuracy of an
    uninterrupted run (the session's `unbroken_classifier`, same settings)."""
    a, b = worker_nodes.add(slots=1), worker_nodes.add(slots=1)
    cfg = load_config(None, [*unbroken_classifier["overrides"], "classify.max_failures=2",
                             f"classify.worker_resources={{{GPU_SLOT}: 1}}"])
    storage = Storage.from_config(cfg)
    inputs = prepare_inputs(cfg, load_dataset(cfg))
    out = f"{s3_bucket}/killed"
    job = Background(lambda: fit(cfg, inputs, output=out))
    wait_until(lambda: checkpoint_recorded(storage, f"{out}/train"), job, "a classify checkpoint recorded by Ray Train")
    victim = kill_the_training_node(worker_nodes, [a, b], job)
    metrics = job.join(timeout=300)["metrics"]
    survivor = b if victim is a else a
    reference = unbroken_classifier["metrics"]
    assert 1 <= metrics["resumed_from_epoch"] < 30 and metrics["epoch"] == 30, metrics
    assert survivor.node_id in train_worker_nodes(alive=False)
    assert {k: metrics[k] for k in ("train_loss", "top1")} == {k: reference[k] for k in ("train_loss", "top1")}
    written = json.loads(storage.read_text(f"{out}/metrics.json"))
    assert written["metrics"]["top1"] == metrics["top1"]
