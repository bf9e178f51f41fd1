"""Say so when a stage stops moving: work queued that Ray cannot place, or nothing committed for too long.

A background thread in the driver polls the cluster's pending resource requests (what `ray status` lists
as pending demands) and the stage's own heartbeat (`beat()`, e.g. one per committed shard file). It never
stops the stage (an autoscaler may be on its way, a store may come back; storage calls have their own
bounds, engine.storage): it logs one warning per stall naming what waits and for what, so a job that
cannot progress is never silent.
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

Shape = frozenset  # a resource request, e.g. frozenset({("CPU", 0.5)})
MIN_IDLE_WARN_S = 30.0  # never warn about a pause shorter than this, however regular the heartbeat


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


def free_resources() -> str:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    return ", ".join(f"{k} {free.get(k, 0.0):g} of {total.get(k, 0.0):g} free" for k in ("CPU", "GPU"))


class Watchdog:
    """Warn (once per stall) about requests pending longer than `warn_after_s`, and about a heartbeat that
    stopped: no `beat()` for `warn_after_s` before the first one, or for `factor` x the usual interval
    (at least MIN_IDLE_WARN_S) after it. `labels` name the stage's operators by their request shape."""

    def __init__(self, stage: str, warn_after_s: float, factor: float = 5.0,
                 labels: dict[Shape, str] | None = None, idle: Callable[[float], str] | None = None,
                 poll_s: float = 2.0, demands: Callable[[], dict[Shape, int]] = pending_demands) -> None:
        self.stage, self.warn_after_s, self.factor = stage, warn_after_s, factor
        self.labels, self.idle, self.poll_s, self.demands = labels or {}, idle, poll_s, demands
        self.last_beat = time.monotonic()
        self.beats = 0
        self.intervals: list[float] = []
        self.pending_since: dict[Shape, float] = {}
        self.warned: set[Any] = set()
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
        return out

    # --- thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()

    def __enter__(self) -> "Watchdog":
        self._thread = threading.Thread(target=self._run, name=f"watchdog-{self.stage}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s + 5)


def _free() -> str:
    try:
        return free_resources()
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
