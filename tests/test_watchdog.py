"""A stage that stops moving says so: requests waiting for resources, and a heartbeat that stopped."""
from __future__ import annotations

import logging
import re
import time

from engine.testing.background import Background, wait_until
from engine.watchdog import MIN_IDLE_WARN_S, Watchdog, labels_for, shape


def test_pending_requests_are_named_once_per_stall():
    demands = {shape({"CPU": 1.0}): 2}
    labels = labels_for([({"CPU": 1.0, "GPU": 0.0}, "Translator actors"), ({"CPU": 1.0}, "ClipScorer actors"),
                         ({"CPU": 0.5}, "sink tasks")])
    dog = Watchdog("synthesis", warn_after_s=10, labels=labels, demands=lambda: dict(demands))
    t0 = time.monotonic()
    assert dog.check(t0) == [] and dog.check(t0 + 9) == []
    [line] = dog.check(t0 + 10.5)
    assert "synthesis: 2 Translator actors / ClipScorer actors waiting 10 s for {CPU: 1} each" in line
    assert dog.check(t0 + 20) == []  # reported once
    demands.clear()
    assert dog.check(t0 + 21) == []  # placed
    demands[shape({"CPU": 1.0})] = 1
    dog.check(t0 + 22)
    assert len(dog.check(t0 + 33)) == 1  # a new stall is reported again


def test_a_stopped_heartbeat_is_reported_against_its_usual_interval():
    dog = Watchdog("synthesis", warn_after_s=100, factor=5, idle=lambda s: f"nothing committed for {s:.0f} s",
                   demands=dict)
    assert dog.idle_limit() == 100  # before the usual interval is known
    dog.beat()
    assert dog.idle_limit() == 100  # one beat: still no interval
    dog.beat()
    assert len(dog.intervals) == 1
    dog.intervals = [10.0, 10.0, 12.0]  # commits usually ~10 s apart
    assert dog.idle_limit() == 50.0
    dog.intervals = [0.1, 0.1]
    assert dog.idle_limit() == MIN_IDLE_WARN_S
    dog.intervals = [10.0]
    now = dog.last_beat + 49
    assert dog.check(now) == []
    [line] = dog.check(dog.last_beat + 51)
    assert line == "synthesis: nothing committed for 51 s"
    assert dog.check(dog.last_beat + 80) == []
    dog.beat()
    assert dog.check(dog.last_beat + 51) != []


def test_starved_stream_is_named_in_a_warning_then_finishes(ray_session, tiny_cache, tmp_path, caplog):
    """Another job holds all but half a CPU of the (fixed, 4-CPU) session cluster: the stream fits the
    cluster but cannot start its actors. The watchdog names them and what they wait for; once the CPUs
    come back, the set is finished as usual."""
    from engine.config import load_config
    from engine.synthesis import run

    @ray_session.remote(num_cpus=3.5)
    class Hog:
        def ping(self) -> bool:
            return True

    hog = Hog.remote()
    ray_session.get(hog.ping.remote())
    config = load_config(None, [
        f"run.output={tmp_path}", f"model.cache_dir={tiny_cache}", "model.resolution=32",
        "dataset.subset.kind=few_shot", "dataset.subset.shots=1", "synthesis.strategy=real-mix",
        "synthesis.multiplier=1", "metrics.enabled=false", "synthesis.num_inference_steps=2", "synthesis.resolution=32",
        "synthesis.num_gpus_per_actor=0", "synthesis.rows_per_file=5", "synthesis.batch_size=5",
        "cluster.stall_warn_s=3"])
    caplog.set_level(logging.WARNING, logger="engine.watchdog")
    job = Background(lambda: run(config))
    try:
        wait_until(lambda: "waiting" in caplog.text, job, "a warning about waiting requests", timeout=120)
    finally:
        ray_session.kill(hog)
    result = job.join(300)
    warning = next(r.getMessage() for r in caplog.records if "waiting" in r.getMessage())
    # the half CPU left is free, or held by a 0.5-CPU reference task at the moment of the snapshot
    assert "Translator actors" in warning and "{CPU: 1}" in warning
    assert re.search(r"CPU (0|0\.5) of 4 free", warning), warning
    assert result["written"] == 10 and result["rows"] == 10


def test_a_request_no_node_can_hold_fails_after_the_grace_and_others_after_the_bound():
    """The decision alone (demands and nodes given): the stage's own request that no live node can hold fails
    after `infeasible_grace_s`, one that fits a node but stays unplaced after `max_wait_s`, each counted from
    the stage's last progress; other jobs' requests never fail the stage; a request Ray re-makes (Train's next
    placement group) keeps its clock across a short gap."""
    translator = shape({"CPU": 0.5, "gpu_slot": 1.0})
    demands: dict = {translator: 1, shape({"CPU": 7.0}): 1}  # the second one is another job's
    nodes = [{"CPU": 4.0}]  # the only node with a gpu_slot is gone
    slot = {"CPU": 0.5, "gpu_slot": 1.0}
    dog = Watchdog("synthesis", warn_after_s=1000, labels=labels_for([(slot, "Translator actors")]),
                   demands=lambda: dict(demands), max_wait_s=100, infeasible_grace_s=10, nodes=lambda: nodes)
    t0 = dog.last_beat
    dog.check(t0 + 1)
    dog.check(t0 + 9)
    assert dog.failure is None
    dog.last_beat = t0 + 9  # a beat (a committed file) then: progress restarts the clock
    dog.check(t0 + 18)
    assert dog.failure is None
    dog.check(t0 + 19.5)
    message = str(dog.failure)
    assert "synthesis: Translator actors waited 10 s for {CPU: 0.5, gpu_slot: 1}" in message, message
    assert "no node of this cluster can hold" in message and "gpu_slot: 0" in message and "\n" not in message
    # the slot exists (a node has it) but stays taken: the general bound, across a gap shorter than the forget time
    nodes.append({"CPU": 1.0, "gpu_slot": 1.0})
    dog = Watchdog("finetune", warn_after_s=1000, labels=labels_for([(slot, "finetune Train workers")]),
                   demands=lambda: dict(demands), max_wait_s=100, infeasible_grace_s=10, nodes=lambda: nodes)
    t0 = dog.last_beat
    dog.check(t0 + 1)
    dog.check(t0 + 40)
    demands.pop(translator)
    dog.check(t0 + 50)  # the worker group was torn down, and is about to be asked for again
    demands[translator] = 1
    dog.check(t0 + 60)
    assert dog.failure is None
    dog.check(t0 + 101)
    assert "finetune Train workers waited 100 s" in str(dog.failure) and "max_resource_wait_s = 100" in str(dog.failure)
    # only another job's request, or no bound at all: never
    for labels, bound in (({}, 100), (dog.labels, None)):
        other = Watchdog("x", 1000, labels=labels, demands=lambda: dict(demands), max_wait_s=bound, nodes=lambda: [])
        other.check(other.last_beat + 1)
        other.check(other.last_beat + 10_000)
        assert other.failure is None


def test_watch_and_call_raise_the_failure_while_the_stage_blocks():
    """A stream whose next item never comes, and a call that never returns: both end with the watchdog's
    error once it gives up (polled every poll_s); items and errors before that pass through unchanged."""
    import threading

    import pytest

    from engine.ray_local import ResourceError

    release = threading.Event()

    def stream():
        yield 1
        release.wait(30)  # a window bound to an actor that waits for a node
        yield 2

    dog = Watchdog("synthesis", 1000, poll_s=0.05, demands=dict)
    seen = []
    t0 = time.monotonic()
    with pytest.raises(ResourceError, match="gave up"):
        for item in dog.watch(stream()):
            seen.append(item)
            dog.failure = ResourceError("synthesis: gave up")  # what check() records
    assert seen == [1] and time.monotonic() - t0 < 5
    release.set()
    dog = Watchdog("classify", 1000, poll_s=0.05, demands=dict)
    assert dog.call(lambda: 42) == 42
    with pytest.raises(ValueError, match="boom"):
        dog.call(lambda: (_ for _ in ()).throw(ValueError("boom")))
    blocker = threading.Event()
    threading.Timer(0.2, lambda: setattr(dog, "failure", ResourceError("classify: gave up"))).start()
    with pytest.raises(ResourceError, match="classify: gave up"):
        dog.call(lambda: blocker.wait(30))
    blocker.set()
