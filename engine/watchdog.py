"""Say so when a stage stops moving, and end it when it waits for resources it cannot get.

A background thread in the driver polls the cluster's pending resource requests (what `ray status` lists
as pending demands) and the stage's own heartbeat (`beat()`, e.g. one per committed shard file). It logs one
warning per stall naming what waits and for what, so a job that cannot progress is never silent.

It also bounds the wait (`cluster.max_resource_wait_s`): when one of the stage's own requests has waited
that long while the stage made no progress, the stage fails with a ResourceError naming the operator and
the resource. On a cluster that cannot grow (no autoscaler, no `cluster.wait_for_nodes`), a request that
no live node can ever hold (the only node with a slot was lost) fails after `cluster.infeasible_grace_s`.
The stage's blocking part runs under `watch` / `call`, which raise that error as soon as it is decided.
"""
from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

Shape = frozenset  # a resource request, e.g. frozenset({("CPU", 0.5)})
MIN_IDLE_WARN_S = 30.0  # never warn about a pause shorter than this, however regular the heartbeat
# A request unseen for this long stops counting as waiting: Ray Train retries a worker group that cannot start
# with a new placement group (the same shape), and a poll between the two must not restart the clock.
FORGET_AFTER_S = 15.0
STOP_WAIT_S = 30.0  # how long a stage that gives up waits for its stopped stream to wind down


def shape(resources: dict[str, float]) -> Shape:
    """A request's resources without zero entries and Ray's implicit ones (memory, node:... labels)."""
    return frozenset((k, float(v)) for k, v in resources.items()
                     if v and not k.startswith("node:") and k not in ("memory", "object_store_memory"))


def describe(s: Shape) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(s)) + "}"


def pending_demands() -> dict[Shape, int]:
    """Resource requests waiting for a place in the cluster (tasks, actors, placement-group bundles)."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    out: dict[Shape, int] = {}
    demands = status.resource_demands
    for demand in list(demands.ray_task_actor_demand) + list(demands.placement_group_demand):
        for request in demand.bundles_by_count:
            key = shape(request.bundle)
            if key:
                out[key] = out.get(key, 0) + int(request.count)
    return out


def node_resources() -> list[dict[str, float]]:
    """Total resources of each live node."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def fits_a_node(s: Shape, nodes: list[dict[str, float]]) -> bool:
    """Whether some node's total resources can hold the request `s` (once what holds them is done)."""
    return any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in s) for node in nodes)


def fixed_cluster(cluster: Any) -> bool:
    """No autoscaler, and no one said nodes are coming (`cluster.wait_for_nodes`): what no node has now, no
    node will have."""
    from engine.ray_local import autoscaler_limit

    return not cluster.wait_for_nodes and autoscaler_limit() is None


def free_resources(also: Iterable[str] = ()) -> str:
    """What the cluster has free of each resource (CPU, GPU, and those named in `also`)."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    names = ["CPU", "GPU"] + sorted(k for k in set(also) if k not in ("CPU", "GPU"))
    return ", ".join(f"{k} {free.get(k, 0.0):g} of {total.get(k, 0.0):g} free" for k in names)


class Watchdog:
    """Warn (once per stall) about requests pending longer than `warn_after_s`, and about a heartbeat that
    stopped: no `beat()` for `warn_after_s` before the first one, or for `factor` x the usual interval
    (at least MIN_IDLE_WARN_S) after it. `labels` name the stage's operators by their request shape.

    Give up (`failure`, raised by `watch` / `call`) when one of the labelled requests has waited, with no beat
    since it began, `max_wait_s` (None: never), or `infeasible_grace_s` when no node can hold it (None: the
    cluster may grow). `cluster` (a ClusterConfig) sets both from `cluster.max_resource_wait_s` and, on a
    cluster that cannot grow, `cluster.infeasible_grace_s`; `nodes` gives the live nodes' total resources."""

    def __init__(self, stage: str, warn_after_s: float, factor: float = 5.0,
                 labels: dict[Shape, str] | None = None, idle: Callable[[float], str] | None = None,
                 poll_s: float = 2.0, demands: Callable[[], dict[Shape, int]] = pending_demands,
                 cluster: Any = None, max_wait_s: float | None = None, infeasible_grace_s: float | None = None,
                 nodes: Callable[[], list[dict[str, float]]] = node_resources) -> None:
        self.stage, self.warn_after_s, self.factor = stage, warn_after_s, factor
        self.labels, self.idle, self.poll_s, self.demands = labels or {}, idle, poll_s, demands
        self.cluster, self.nodes = cluster, nodes
        self.max_wait_s, self.infeasible_grace_s = max_wait_s, infeasible_grace_s
        self.last_beat = time.monotonic()
        self.beats = 0
        self.intervals: list[float] = []
        self.pending_since: dict[Shape, float] = {}
        self.waiting: dict[Shape, tuple[float, float]] = {}  # labelled request -> (first seen, last seen)
        self.warned: set[Any] = set()
        self.failure: Exception | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- heartbeat ---------------------------------------------------------------------------
    def beat(self) -> None:
        now = time.monotonic()
        if self.beats:
            self.intervals = (self.intervals + [now - self.last_beat])[-20:]
        self.beats += 1
        self.last_beat = now
        self.warned.discard("idle")

    def idle_limit(self) -> float:
        """How long without a beat is a stall: `warn_after_s` until the usual interval is known."""
        if not self.intervals:
            return self.warn_after_s
        return max(self.factor * statistics.median(self.intervals), MIN_IDLE_WARN_S)

    # --- checks ------------------------------------------------------------------------------
    def label(self, s: Shape) -> str:
        return self.labels.get(s, "Ray requests (this job's or another's)")

    def check(self, now: float | None = None) -> list[str]:
        """The warnings due now (each stall is reported once); also logged."""
        now = time.monotonic() if now is None else now
        out = []
        try:
            pending = self.demands()
        except Exception as exc:  # the cluster's state API is best effort: a failed poll is not a stall
            log.debug("watchdog: cannot read pending demands: %s", exc)
            pending = {}
        self.pending_since = {s: self.pending_since.get(s, now) for s in pending}
        for s, since in self.pending_since.items():
            if now - since >= self.warn_after_s and s not in self.warned:
                self.warned.add(s)
                out.append(f"{self.stage}: {pending[s]} {self.label(s)} waiting {now - since:.0f} s for "
                           f"{describe(s)} each; the cluster has {_free()}. They start when other work frees "
                           "resources or nodes are added")
        self.warned = {w for w in self.warned if w == "idle" or w in self.pending_since}
        idle_s = now - self.last_beat
        if self.idle is not None and idle_s >= self.idle_limit() and "idle" not in self.warned:
            self.warned.add("idle")
            out.append(f"{self.stage}: {self.idle(idle_s)}")
        for line in out:
            log.warning("%s", line)
        if self.failure is None:
            self._give_up_if_starved(pending, now)
        return out

    # --- bounded waits -----------------------------------------------------------------------
    def _give_up_if_starved(self, pending: dict[Shape, int], now: float) -> None:
        """Record the stage's failure when one of its requests has waited past its bound without progress."""
        for s in pending:
            if s in self.labels:
                self.waiting[s] = (self.waiting.get(s, (now, now))[0], now)
        self.waiting = {s: seen for s, seen in self.waiting.items() if now - seen[1] <= FORGET_AFTER_S}
        if not self.waiting or (self.max_wait_s is None and self.infeasible_grace_s is None):
            return
        try:
            nodes = self.nodes() if self.infeasible_grace_s is not None else []
        except Exception as exc:  # the node table is best effort, as the demands are: decide on the next poll
            log.debug("watchdog: cannot read the nodes: %s", exc)
            return
        for s, (first, _) in self.waiting.items():
            waited = now - max(first, self.last_beat)  # no progress since it began waiting
            never = self.infeasible_grace_s is not None and not fits_a_node(s, nodes)
            bound = self.infeasible_grace_s if never else self.max_wait_s
            if bound is not None and waited >= bound:
                self.failure = self._starved(s, waited, never, nodes)
                log.error("%s", self.failure)
                return

    def _starved(self, s: Shape, waited: float, never: bool, nodes: list[dict[str, float]]) -> Exception:
        from engine.ray_local import ResourceError

        what = f"{self.stage}: {self.label(s)} waited {waited:.0f} s for {describe(s)}"
        if never:
            have = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k, _ in s}
            return ResourceError(
                f"{what}, which no node of this cluster can hold (it has no autoscaler; the most any live node has "
                f"is {describe(frozenset(have.items()))}): a node with it was lost or never joined. Add one and "
                "run again (finished work is kept), or set cluster.wait_for_nodes=true to wait for it "
                "(cluster.max_resource_wait_s bounds that wait)")
        return ResourceError(
            f"{what} while the stage made no progress (cluster.max_resource_wait_s = {self.max_wait_s:g}); the "
            f"cluster has {_free([k for k, _ in s])}. Free or add those resources and run again (finished work is "
            "kept), or raise cluster.max_resource_wait_s")

    def watch(self, items: Iterable[T], stop: Callable[[], None] | None = None) -> Iterator[T]:
        """`items`, consumed in a helper thread one at a time (the consumer's pace, as if iterated here) so
        that the stage fails with the watchdog's ResourceError as soon as it gives up, even while the next
        item never comes (a stream whose actor waits for a node); `stop` then ends what produces them (a
        stream's executor and actors). The producer's own errors are raised here as they are."""
        box: queue.Queue = queue.Queue(maxsize=1)
        done = threading.Event()

        def hand_over(entry: tuple[bool, Any]) -> None:
            while not done.is_set():
                try:
                    box.put(entry, timeout=self.poll_s)
                    return
                except queue.Full:
                    continue

        def produce() -> None:
            try:
                for item in items:
                    hand_over((True, item))
                    if done.is_set():
                        break
                else:
                    hand_over((False, None))
            except BaseException as exc:  # handed to the consumer, which raises it
                hand_over((False, exc))
            finally:
                close = getattr(items, "close", None)
                if done.is_set() and close is not None:
                    close()  # here, while Ray is connected, not at interpreter exit

        producer = threading.Thread(target=produce, name=f"watched-{self.stage}", daemon=True)
        producer.start()
        try:
            while True:
                try:
                    more, value = box.get(timeout=self.poll_s)
                except queue.Empty:
                    if self.failure is not None and stop is not None:
                        stop()  # the producer's next item now ends the iteration
                        done.set()
                        producer.join(STOP_WAIT_S)
                    self._raise_failure()
                    continue
                if not more:
                    if value is not None:
                        raise value
                    return
                yield value
        finally:
            done.set()

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` in a helper thread; its result or error, or the watchdog's ResourceError once it gives up."""
        return next(iter(self.watch(_once(fn))))

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    # --- thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()

    def __enter__(self) -> "Watchdog":
        if self.cluster is not None:
            self.max_wait_s = self.cluster.max_resource_wait_s
            self.infeasible_grace_s = self.cluster.infeasible_grace_s if fixed_cluster(self.cluster) else None
        self._thread = threading.Thread(target=self._run, name=f"watchdog-{self.stage}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5)


def _once(fn: Callable[[], T]) -> Iterator[T]:
    yield fn()


def _free(also: Iterable[str] = ()) -> str:
    try:
        return free_resources(also)
    except Exception:  # noqa: BLE001 - only decorates a warning
        return "an unknown amount free"


def labels_for(entries: Iterable[tuple[dict[str, float], str]]) -> dict[Shape, str]:
    """Operator names by request shape; operators with the same shape share one label."""
    out: dict[Shape, str] = {}
    for resources, name in entries:
        s = shape(resources)
        if s:
            out[s] = f"{out[s]} / {name}" if s in out and name not in out[s] else name
    return out
