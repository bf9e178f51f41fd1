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
