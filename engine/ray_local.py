"""How every stage gets its Ray: join the cluster a job runs on, or start one local instance sized for the job.

One place decides the local instance's settings (logical CPUs, Ray Train's poll), so `diffmix <stage>`
on a laptop, the pipeline and the demo start Ray the same way, and `ray job submit` always joins.

A stage says what it must hold at once (`Needs`) before it streams. A cluster that cannot grow to that
(a local instance, or `ray start` nodes without an autoscaler) is an error naming the config keys to
change, raised before any work: Ray would otherwise queue the requests forever. Whatever starts a local
instance for several stages (pipeline, sweep, demo) sizes it for the largest of them.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from engine.ports import free_port

log = logging.getLogger(__name__)

# Ray Train's controller polls each worker every 2 s by default and every report() waits for the poll,
# which dominates small local runs (epochs of a second); a local cluster started here polls faster.
LOCAL_TRAIN_POLL_S = "0.1"


class ResourceError(RuntimeError):
    """A stage cannot fit in the cluster it runs on; the message names the config keys that size it."""


@dataclass(frozen=True)
class Needs:
    """The least a stage holds at once (CPUs, GPUs), what it is, and the config keys that set it."""

    cpu: float
    gpu: float = 0.0
    what: str = "the job"
    keys: str = ""
    custom: dict[str, float] = field(default_factory=dict)  # custom Ray resources (e.g. a node type's slot)

    def __str__(self) -> str:
        return " + ".join([f"{self.cpu:g} CPU"] + ([f"{self.gpu:g} GPU"] if self.gpu else [])
                          + [f"{v:g} {k}" for k, v in sorted(self.custom.items())])

    def resources(self) -> dict[str, float]:
        return {"CPU": self.cpu, "GPU": self.gpu, **self.custom}

    def times(self, n: int, key: str) -> "Needs":
        """`n` of this running at once (`key` is the setting that says how many)."""
        return Needs(n * self.cpu, n * self.gpu, self.what, f"{key} x ({self.keys})" if self.keys else key,
                     {k: n * v for k, v in self.custom.items()})

    @staticmethod
    def largest(*needs: "Needs", what: str = "the job") -> "Needs":
        """Stages that run one after another: the instance must hold the largest of each resource."""
        cpu = max(needs, key=lambda n: n.cpu)
        gpu = max(needs, key=lambda n: n.gpu)
        keys = cpu.keys if cpu is gpu else f"{cpu.keys}; {gpu.keys}"
        custom: dict[str, float] = {}
        for n in needs:
            for k, v in n.custom.items():
                custom[k] = max(custom.get(k, 0.0), v)
        return Needs(cpu.cpu, gpu.gpu, what, keys, custom)


def local_cpus() -> int:
    """CPUs this process may run on (its affinity: a container's or `taskset`'s limit), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def running_cluster() -> str | None:
    """The cluster a bare `ray.init()` joins: RAY_ADDRESS, else the last `ray start` on this machine (the
    address Ray keeps in its temp folder's ray_current_cluster); None when it would start its own."""
    from ray._private.services import get_ray_address_from_environment

    return get_ray_address_from_environment(None, None)


def joins_cluster() -> bool:
    """True when this process is (or will be) on an existing cluster rather than a local one of its own."""
    import ray

    return ray.is_initialized() or running_cluster() is not None


def local_train_env() -> None:
    """Set before a local Ray starts (its processes inherit the environment); a user's value wins. Besides the
    poll: no preemption watcher, an actor process per Train run that polls for draining nodes (spot reclaims
    announced by a cloud autoscaler); a local instance has no node to drain, and on a laptop each such
    process costs seconds of CPU."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", LOCAL_TRAIN_POLL_S)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


@contextmanager
def own_address(init_kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`ray.init` kwargs for a local instance whose processes know its address (`RAY_ADDRESS`, in the job's
    runtime_env): the GCS port is chosen here (Ray reads RAY_GCS_SERVER_PORT when it starts a head).

    Why: Ray code in workers that finds its cluster by address lookup (the state API; e.g. Ray Train's
    PlacementGroupCleaner, which frees the worker group of a Train run whose controller was killed, as Tune
    kills an ASHA-stopped trial) fails with "Found multiple active Ray instances" when another Ray runs on the
    machine, and the freed CPUs never come back."""
    import ray
    from ray._private.ray_constants import GCS_PORT_ENVIRONMENT_VARIABLE as GCS_PORT_ENV

    port = free_port()
    address = f"{init_kwargs.get('_node_ip_address') or ray.util.get_node_ip_address()}:{port}"
    runtime_env = dict(init_kwargs.get("runtime_env") or {})
    runtime_env["env_vars"] = {"RAY_ADDRESS": address, **(runtime_env.get("env_vars") or {})}
    kwargs = {**init_kwargs, "runtime_env": runtime_env}
    previous = os.environ.get(GCS_PORT_ENV)
    os.environ[GCS_PORT_ENV] = str(port)
    try:
        yield kwargs
    finally:
        if previous is None:
            os.environ.pop(GCS_PORT_ENV, None)
        else:
            os.environ[GCS_PORT_ENV] = previous


def ensure_ray(needs: Needs | float | None = None, wait_for_nodes: bool = False, size_for: Needs | None = None,
               config: Any = None, **init_kwargs: Any) -> bool:
    """Join the running or addressed cluster (RAY_ADDRESS, `ray job submit`, a `ray start` on this machine),
    else start a local one with at least `size_for.cpu` (default `needs.cpu`) logical CPUs (more than the
    cores let fractional tasks of overlapping stages pack); then check that the stage's local paths are
    reachable from every node (`check_shared_paths`, with the stage's `config`: an ExperimentConfig, whose
    `cluster.wait_for_nodes` also counts) and that `needs`, the least the job holds at once, fits
    (`check_fits`). `init_kwargs` go to the local `ray.init` only. Returns True when it started one."""
    import ray

    if config is not None:
        wait_for_nodes = wait_for_nodes or config.cluster.wait_for_nodes
    if isinstance(needs, (int, float)):
        needs = Needs(float(needs))
    size_for = size_for or needs
    started = False
    if not ray.is_initialized():
        address = running_cluster()
        if address is not None:
            log.info("joining the Ray cluster at %s", address)
            ray.init()
        else:
            local_train_env()
            cpus = max(local_cpus(), math.ceil(size_for.cpu if size_for else 0))
            log.info("starting a local Ray instance (%d logical CPUs; GPUs as Ray detects them)", cpus)
            with own_address(init_kwargs) as init_kwargs:
                ray.init(num_cpus=cpus, **init_kwargs)
            started = True
    if config is not None:
        check_shared_paths(config)
    if needs is not None:
        check_fits(needs, wait_for_nodes)
    return started


def join_checked(config: Any) -> None:
    """At a stage's start, before it reads anything: on a cluster it joins (RAY_ADDRESS, `ray job submit`, a
    `ray start` on the machine), join it and check the config's local paths (`check_shared_paths`); without
    one the stage starts a local instance later (one node: nothing to check)."""
    if joins_cluster():
        ensure_ray(config=config)


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's live nodes (`ray.nodes()` entries)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_shared_paths(config: Any) -> None:
    """Fail now when a path every node must reach (run.output, dataset.uri, ...) is on local disk and the
    cluster has more than one node, or an autoscaler that can add some: each node would read and write its
    own disk (a set's shards on one node, its manifest on another). `storage.shared_local` says the local
    paths are one shared mount (NFS) at the same place on every node."""
    from engine.config import shared_local_paths
    from engine.storage import StorageError

    local = [] if config.storage.shared_local else shared_local_paths(config)
    if not local:
        return
    nodes, grows = len(alive_nodes()), autoscaler_limit() is not None
    if nodes <= 1 and not grows:
        return
    where = f"{nodes} nodes" + (" and an autoscaler that can add more" if grows else "")
    named = ", ".join(f"{key} ({path})" for key, path in local)
    raise StorageError(
        f"{named}: a local path, but this Ray cluster has {where}, and each node would read and write its own "
        "disk: use a URI every node reaches (s3://...), or set storage.shared_local=true if it is a shared "
        "mount (NFS) at the same path on every node")


def autoscaler_limit() -> dict[str, float] | None:
    """The most each resource can grow to under the cluster's autoscaler, or None without an autoscaler."""
    try:
        from ray._private.state import state

        limit = state.get_max_resources_from_cluster_config()
    except (AttributeError, ImportError, RuntimeError) as exc:  # a private API: treat as "no autoscaler"
        log.debug("cannot read the autoscaler's limits: %s", exc)
        return None
    return {k: float(v) for k, v in limit.items()} if limit else None


def check_fits(needs: Needs, wait_for_nodes: bool = False) -> None:
    """Fail now when `needs` can never be placed: more than the cluster has and, without an autoscaler
    (or above its limit), more than it can ever have. `wait_for_nodes` (cluster.wait_for_nodes) trusts that
    nodes will be added by hand instead; the stall watchdog then says what waits."""
    import ray

    have = {k: float(v) for k, v in ray.cluster_resources().items()}
    short = {k: v for k, v in needs.resources().items() if v > have.get(k, 0.0) + 1e-9}
    if not short:
        return
    limit = autoscaler_limit()
    if limit is not None:
        short = {k: v for k, v in short.items() if v > max(limit.get(k, 0.0), have.get(k, 0.0)) + 1e-9}
        where = "can grow to at most " + ", ".join(f"{max(limit.get(k, 0.0), have.get(k, 0.0)):g} {k}" for k in short)
    else:
        if wait_for_nodes:
            log.warning("%s needs %s at once; the cluster has %s now: waiting for nodes (cluster.wait_for_nodes)",
                        needs.what, needs, _fmt(have, needs.custom))
            return
        where = f"has {_fmt(have, needs.custom)} and no autoscaler"
    if short:
        raise ResourceError(
            f"{needs.what} needs {needs} at once but this Ray cluster {where}: its requests would wait forever. "
            f"Lower {needs.keys or 'the stage resources'}, or run on a larger cluster"
            + ("" if limit is not None else " (or set cluster.wait_for_nodes=true if you will add nodes)")
        )


def _fmt(resources: dict[str, float], custom: Iterable[str] = ()) -> str:
    return ", ".join(f"{resources.get(k, 0.0):g} {k}" for k in ("CPU", "GPU", *sorted(custom)))
