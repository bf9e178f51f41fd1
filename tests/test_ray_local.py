"""How stages get Ray: they join a running cluster, size a local one for the whole job, and refuse at once
to stream into a cluster that can never hold them (its requests would wait forever)."""
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine.config import load_config
from engine.ports import free_port
from engine.ray_local import LOCAL_TRAIN_POLL_S, Needs, ResourceError, check_fits, ensure_ray, joins_cluster, \
    local_train_env
from engine.testing.cluster import wait_for

REPO = Path(__file__).resolve().parents[1]


def test_a_running_cluster_is_joined_not_replaced(ray_session):
    before = ray_session.get_runtime_context().get_node_id()
    assert joins_cluster()
    assert ensure_ray(Needs(1.0)) is False          # no local instance started
    assert ray_session.get_runtime_context().get_node_id() == before


def test_needs_of_stages_run_one_after_another_take_the_largest():
    a = Needs(3.0, 0.0, "synthesis", "synthesis.cpus_per_actor")
    b = Needs(1.5, 1.0, "classify", "classify.num_workers")
    both = Needs.largest(a, b, what="pipeline")
    assert (both.cpu, both.gpu, both.what) == (3.0, 1.0, "pipeline")
    assert "synthesis.cpus_per_actor" in both.keys and "classify.num_workers" in both.keys


def test_a_need_beyond_a_fixed_cluster_fails_fast_naming_the_keys(ray_session, caplog):
    """The session cluster is `ray start --head --num-cpus=4` without an autoscaler: it never grows."""
    with pytest.raises(ResourceError) as err:
        check_fits(Needs(9.0, 0.0, "classify", "classify.num_workers x classify.cpus_per_worker"))
    msg = str(err.value)
    assert "classify needs 9 CPU" in msg and "4 CPU" in msg and "classify.num_workers x classify.cpus_per_worker" in msg
    assert "no autoscaler" in msg and "cluster.wait_for_nodes" in msg
    with pytest.raises(ResourceError, match="GPU"):
        check_fits(Needs(1.0, 2.0, "synthesis", "synthesis.num_gpus_per_actor"))
    caplog.set_level(logging.WARNING, logger="engine.ray_local")
    check_fits(Needs(9.0), wait_for_nodes=True)  # nodes promised by hand: a warning, no error
    assert "waiting for nodes" in caplog.text
    check_fits(Needs(4.0))  # exactly what it has fits


def test_stages_refuse_a_cluster_they_cannot_fit_before_streaming(ray_session, tmp_path, tiny_cache):
    from engine.classify.train import run as classify_run
    from engine.synthesis import run as synthesize

    common = [f"run.output={tmp_path}", f"model.cache_dir={tiny_cache}", "dataset.subset.kind=few_shot",
              "dataset.subset.shots=2", "synthesis.num_gpus_per_actor=0", "synthesis.resolution=32",
              "synthesis.strategy=real-mix", "synthesis.multiplier=1"]
    with pytest.raises(ResourceError, match=r"synthesis needs 13 CPU .*synthesis\.cpus_per_actor"):
        synthesize(load_config(None, common + ["synthesis.cpus_per_actor=6"]))
    assert not list((tmp_path / "run" / "synthetic").rglob("part-*"))  # no shard written
    with pytest.raises(ResourceError, match=r"classify needs 9 CPU .*classify\.num_workers x classify\.cpus_per_worker"):
        classify_run(load_config(None, common + ["classify.num_workers=8", "classify.p=0"]))


def test_train_workers_asking_for_a_resource_no_node_has_fail_before_training(ray_session, tmp_path, tiny_cache):
    """`<stage>.worker_resources` (a node type's custom resource) counts in the fit check: on the head alone
    (no `gpu_slot`) classify and finetune fail at once, naming the key, instead of queueing workers forever."""
    from engine.classify.train import run as classify_run
    from engine.finetune import run as finetune

    common = [f"run.output={tmp_path}", f"model.cache_dir={tiny_cache}", "model.resolution=32",
              "dataset.subset.kind=few_shot", "dataset.subset.shots=2", "finetune.resolution=32",
              "finetune.batch_size=4", "finetune.cpus_per_worker=0.5", "classify.cpus_per_worker=0.5"]
    with pytest.raises(ResourceError, match=r"classify needs .*2 gpu_slot.*classify\.num_workers x "
                                            r"classify\.worker_resources"):
        classify_run(load_config(None, common + ["classify.num_workers=2", "classify.p=0",
                                                 "classify.worker_resources={gpu_slot: 1}"]))
    with pytest.raises(ResourceError, match=r"finetune needs .*1 gpu_slot.*finetune\.worker_resources"):
        finetune(load_config(None, common + ["finetune.worker_resources={gpu_slot: 1}"]))
    assert not (tmp_path / "run" / "classify").exists() and not (tmp_path / "run" / "adapter").exists()
    both = Needs.largest(Needs(1.0, custom={"gpu_slot": 2.0}), Needs(2.0, custom={"gpu_slot": 1.0, "x": 1.0}))
    assert both.custom == {"gpu_slot": 2.0, "x": 1.0} and str(both) == "2 CPU + 2 gpu_slot + 1 x"

    # told that nodes are coming (cluster.wait_for_nodes), the stage starts and its worker group waits: for
    # cluster.max_resource_wait_s, then `diffmix classify` (its own process, on the session's cluster) ends with
    # one line naming the Train workers and the resource, and the resources exit code
    waits = [*common, "classify.p=0", "classify.epochs=1", "classify.backbone=small_cnn", "classify.resolution=16",
             "classify.worker_resources={gpu_slot: 1}", "cluster.wait_for_nodes=true", "cluster.max_resource_wait_s=5"]
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "engine.cli", "classify", *waits], capture_output=True, text=True,
                         timeout=300)
    said = [line for line in out.stderr.splitlines() if line.startswith("diffmix classify: ")]
    # lines of Ray's own actors, forwarded with their "(Name pid=...)" prefix, left out: when the driver exits
    # mid-run, Ray Train's PlacementGroupCleaner looks its cluster up without an address and, with several Ray
    # instances on this machine, logs a traceback (on a cluster's node there is one; the job's end frees the group)
    own = [line for line in out.stderr.splitlines() if not re.match(r"(\x1b\[\d+m)?\(\w+ pid=\d+", line)]
    assert out.returncode == 6 and len(said) == 1 and "Traceback" not in "\n".join(own), out.stderr[-3000:]
    assert re.match(r"diffmix classify: classify: classify Train workers waited [5-9] s for \{CPU: 0\.5, "
                    r"gpu_slot: 1\} while the stage made no progress", said[0]), said  # polled every 2 s
    assert "cluster.max_resource_wait_s = 5" in said[0] and "gpu_slot 0 of 0 free" in said[0], said
    assert time.monotonic() - t0 < 120


def test_local_train_poll_keeps_a_users_value(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    local_train_env()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    local_train_env()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == LOCAL_TRAIN_POLL_S
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # a user who wants drains logged keeps it
    local_train_env()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
    monkeypatch.delenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    local_train_env()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"


def test_needs_of_several_at_once_scale_every_resource_and_name_the_key():
    two = Needs(1.5, 1.0, "classify", "classify.num_workers x classify.cpus_per_worker", {"gpu_slot": 1.0}).times(
        2, "demo.concurrent_runs")
    assert (two.cpu, two.gpu, two.custom, two.what) == (3.0, 2.0, {"gpu_slot": 2.0}, "classify")
    assert two.keys == "demo.concurrent_runs x (classify.num_workers x classify.cpus_per_worker)"


# A stage's Ray as a separate `diffmix` process gets it: ensure_ray, then a task that uses Ray's state API
# without an address, as Ray's own code in workers does (Ray Train's PlacementGroupCleaner, which frees the
# worker group of a Train run whose controller was killed, e.g. an ASHA-stopped trial).
PROBE = """
import json, ray
from engine.ray_local import ensure_ray
started = ensure_ray(1.0, include_dashboard=True, configure_logging=False)

@ray.remote(num_cpus=0)
def nodes_seen_by_the_state_api():
    from ray.util.state import list_nodes
    return len(list_nodes())

print(json.dumps({"started": started, "cpus": ray.cluster_resources().get("CPU"),
                  "nodes": ray.get(nodes_seen_by_the_state_api.remote())}))
"""


def _probe(env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_ray_start_on_the_machine_is_joined_and_a_local_instance_knows_its_address(ray_session):
    """With the test cluster running (another Ray instance on this machine, as a user's other work would be):
    1. a `ray start --head` cluster on the machine (in its own temp folder: RAY_TMPDIR, as a user's /tmp/ray)
       is joined by a stage run without RAY_ADDRESS, as a bare `ray.init()` joins it (the engine passed its
       local sizing to `ray.init` and failed with Ray's "When connecting to an existing cluster, num_cpus and
       num_gpus must not be provided");
    2. without one, the stage's own local instance, whose workers' state-API calls reach it although other
       instances run (they failed: "Found multiple active Ray instances"; an ASHA sweep then leaked each
       stopped trial's placement group and hung)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    ray_tmp = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")  # short: Ray's socket paths are length-limited
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={free_port()}",
         "--node-ip-address=127.0.0.1", "--num-cpus=1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={free_port()}", "--disable-usage-stats"],
        env={**env, "RAY_TMPDIR": ray_tmp}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        wait_for(lambda: os.path.exists(os.path.join(ray_tmp, "ray", "ray_current_cluster")),
                 "`ray start --head` writing its address", 120)
        joined = _probe({**env, "RAY_TMPDIR": ray_tmp})
    finally:
        os.killpg(head.pid, signal.SIGINT)  # what --block treats as stop: exactly this cluster
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert joined == {"started": False, "cpus": 1.0, "nodes": 1}
    local = _probe(env)
    assert local["started"] is True and local["nodes"] == 1 and local["cpus"] >= 1
