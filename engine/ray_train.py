"""Ray Train plumbing shared by the training stages (fine-tuning, classification).

One place decides where Train keeps checkpoints (a local path, or any fsspec URI through
pyarrow), whether workers get GPUs, and how a `TorchTrainer` is assembled from a stage's
settings, so both stages resume and report the same way.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from engine.errors import find_cause, surfaced
from engine.ray_local import Needs
from engine.storage import Storage, StorageError, is_local, redact, transient
from engine.watchdog import Watchdog, labels_for


def use_gpu(requested: bool | None) -> bool:
    """The config's choice, else GPUs whenever the cluster has one."""
    import ray

    if requested is not None:
        return requested
    return ray.cluster_resources().get("GPU", 0) >= 1


def train_storage(uri: str, storage: Storage) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: a local absolute path, or an fsspec fs via pyarrow."""
    if is_local(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return os.path.abspath(os.path.expanduser(path)), None
    import pyarrow.fs

    fs, path = storage.fs(uri)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def make_trainer(train_loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], *, name: str,
                 uri: str, storage: Storage, num_workers: int, gpu: bool, cpus_per_worker: float,
                 max_failures: int, keep_checkpoints: int, datasets: dict[str, Any] | None = None,
                 callbacks: Sequence[Any] = (), worker_resources: dict[str, float] | None = None) -> Any:
    """A `TorchTrainer` checkpointing under `uri`/`name`, restarting failed worker groups from the last one
    (on any node with the workers' resources: a lost node's workers come back elsewhere)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path, filesystem = train_storage(uri, storage)
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=gpu,
                                               resources_per_worker={"CPU": cpus_per_worker,
                                                                     **(worker_resources or {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=list(callbacks)),
        datasets=datasets,
    )


def train_needs(section: str, num_workers: int, cpus_per_worker: float, use_gpu: bool | None,
                data_cpus: float = 0.0, what: str | None = None,
                worker_resources: dict[str, float] | None = None) -> Needs:
    """What a TorchTrainer holds at once: its workers (a GPU each when `use_gpu` is true, and their
    `worker_resources`) and one decode task."""
    keys = f"{section}.num_workers x {section}.cpus_per_worker" + (f" + {section}.data_cpus" if data_cpus else "")
    if worker_resources:
        keys += f"; {section}.num_workers x {section}.worker_resources"
    return Needs(cpu=num_workers * cpus_per_worker + data_cpus, gpu=float(num_workers) if use_gpu else 0.0,
                 what=what or section, keys=keys,
                 custom={k: num_workers * v for k, v in (worker_resources or {}).items()})


def train_labels(section: str, cpus_per_worker: float, gpu: bool, data_cpus: float | None = None,
                 worker_resources: dict[str, float] | None = None) -> dict:
    """Train workers (each a placement-group bundle of its CPUs, GPU and custom resources) and their decode
    tasks by request shape, for the stall watchdog."""
    entries = [({"CPU": cpus_per_worker, "GPU": 1.0 if gpu else 0.0, **(worker_resources or {})},
                f"{section} Train workers")]
    if data_cpus:
        entries.append(({"CPU": data_cpus}, f"{section} decode tasks ({section}.data_cpus)"))
    return labels_for(entries)


def fit_watched(trainer: Any, what: str, cluster: Any, labels: dict, checkpoints: str) -> Any:
    """`trainer.fit()` with the stall watchdog on (requests waiting for resources are named in a warning, and
    a worker group that cannot be placed within the cluster's bounds fails the stage, engine.watchdog).

    A worker's StorageError becomes the stage's error (its line names the URI and the bound); so does a
    timeout or lost connection in Train's own use of the checkpoint storage `checkpoints` (the controller
    records each checkpoint there; every request is bounded, engine.storage.BoundedS3FileSystem)."""
    with Watchdog(what, cluster.stall_warn_s, cluster.stall_warn_factor, labels, cluster=cluster) as watchdog, \
            surfaced(StorageError):
        try:
            return watchdog.call(trainer.fit)
        except Exception as exc:  # re-raised as it is unless it is a storage failure (below)
            if find_cause(exc, StorageError) is not None:
                raise
            unreachable = find_cause(exc, OSError)
            if unreachable is None or not transient(unreachable):
                raise
            raise StorageError(f"{what}: Ray Train's checkpoint storage under {redact(checkpoints)} did not "
                               f"answer ({type(unreachable).__name__}; storage.max_stall_s bounds each request)") from exc


def report_checkpoint(metrics: dict[str, Any], folder: str, uri: str) -> None:
    """`ray.train.report` with the checkpoint in `folder`: Train uploads it under `uri` here, and an upload
    that fails or stalls (each request bounded, engine.storage) is a StorageError naming where."""
    import ray.train

    try:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
    except OSError as exc:  # pyarrow and fsspec errors (FSTimeoutError, ArrowIOError) are OSErrors
        raise StorageError(f"checkpoint could not be written under {redact(uri)} ({type(exc).__name__}; "
                           "storage.max_stall_s bounds each request)") from exc
