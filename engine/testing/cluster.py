"""Worker nodes joined to a running Ray head on this machine: a real multi-node cluster for tests.

Each worker node is its own `ray start --address=<head> --block` process in its own session (process
group), temp dir and ports, so it is a separate raylet with its own object store, resources and
workers, as a cloud node would be. It carries a custom resource standing for a GPU slot, so actors that
ask for it (synthesis.actor_resources) are placed only on worker nodes. `kill()` SIGKILLs the node's
whole process group (raylet, agents, workers) with no goodbye to the head, as a reclaimed spot instance
disappears; the head learns of it from its health checks.

Why `ray start` and not `ray.cluster_utils.Cluster`: the test session already runs one head with
`ray start --head` (tests/conftest.py), and `Cluster` can only add workers to a head it started itself
in-process; its nodes are also children of the test process, while a spot reclaim is best mimicked by
killing a separate process group. Several nodes share 127.0.0.1: each gets its own node-manager,
object-manager and dashboard-agent ports (the agent's default 52365 is the head's).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

from engine.ports import free_port

log = logging.getLogger(__name__)

GPU_SLOT = "gpu_slot"


class ClusterError(RuntimeError):
    """A worker node that did not join or leave the cluster in time; the message carries its log's tail."""


class NodeBootFailed(ClusterError):
    """The node's `ray start` exited before the node joined."""


@dataclass
class WorkerNode:
    """One running worker node: its Ray node id, resources and the handles to stop or kill it."""

    node_id: str
    resources: dict[str, float]
    node_manager_port: int
    proc: subprocess.Popen
    temp_dir: str
    log_path: Path
    log_fh: IO[bytes]
    killed: bool = field(default=False)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as exc:
            return f"(no log: {exc})"


def _nodes() -> list[dict[str, Any]]:
    import ray

    return ray.nodes()


def node_entry(node_id: str) -> dict[str, Any] | None:
    return next((n for n in _nodes() if n["NodeID"] == node_id), None)


def wait_for(condition: Callable[[], bool], what: str, timeout: float, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise ClusterError(f"{what}: not within {timeout:g} s")
        time.sleep(poll_s)


class WorkerNodes:
    """Adds worker nodes to the head at `address` and always takes them away again (`close()`).

    The caller must be connected to the same cluster (`ray.init(address=...)`): nodes are found and
    awaited through the GCS node table.
    """

    def __init__(self, address: str, join_timeout_s: float = 90.0, leave_timeout_s: float = 60.0,
                 start_attempts: int = 2) -> None:
        self.address = address
        self.join_timeout_s = join_timeout_s
        self.leave_timeout_s = leave_timeout_s
        self.start_attempts = start_attempts
        self.nodes: list[WorkerNode] = []
        self._ray_bin = str(Path(sys.executable).parent / "ray")

    def add(self, slots: float = 1.0, num_cpus: float = 1.0, object_store_mb: int = 80,
            resources: dict[str, float] | None = None) -> WorkerNode:
        """Start one worker node with `slots` GPU slots and wait until the head lists it alive.

        A `ray start` that exits before its node joins is started again (`start_attempts` in all), as an
        autoscaler relaunches a node that failed to boot: Ray gives a raylet 30 s (fixed) to register with the
        GCS, which a 2-core box busy starting actors can exceed."""
        custom = {GPU_SLOT: float(slots), **(resources or {})}
        for attempt in range(1, self.start_attempts + 1):
            node = self._launch(custom, num_cpus, object_store_mb)
            try:
                self._wait_joined(node)
            except NodeBootFailed as exc:
                self.nodes.remove(node)
                self._discard(node)
                if attempt == self.start_attempts:
                    raise ClusterError(str(exc)) from exc
                log.warning("worker node did not boot (attempt %d/%d), starting it again: %s", attempt,
                            self.start_attempts, str(exc).splitlines()[0])
                continue
            log.info("worker node %s joined with %s", node.node_id[:8], custom)
            return node
        raise AssertionError("unreachable")  # the loop returns or raises

    def _launch(self, custom: dict[str, float], num_cpus: float, object_store_mb: int) -> WorkerNode:
        port = free_port()
        temp_dir = tempfile.mkdtemp(prefix="rayw-", dir="/tmp")  # short: raylet socket paths are length-limited
        cmd = [
            self._ray_bin, "start", f"--address={self.address}", "--block", "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus:g}", "--num-gpus=0", f"--resources={json.dumps(custom)}",
            f"--object-store-memory={object_store_mb * 1024 * 1024}",
            f"--node-manager-port={port}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--include-log-monitor=false", "--disable-usage-stats", f"--temp-dir={temp_dir}",
        ]
        log_path = Path(temp_dir) / "node.log"
        log_fh = open(log_path, "wb")
        env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        env.pop("RAY_ADDRESS", None)  # --address says which head; RAY_ADDRESS would be the same, but be explicit
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        node = WorkerNode("", custom, port, proc, temp_dir, log_path, log_fh)
        self.nodes.append(node)
        return node

    def _wait_joined(self, node: WorkerNode) -> None:
        def joined() -> bool:
            if node.proc.poll() is not None:
                raise NodeBootFailed(f"worker node exited with {node.proc.returncode}; log:\n{node.log_tail()}")
            entry = next((n for n in _nodes() if n["Alive"] and n.get("NodeManagerPort") == node.node_manager_port), None)
            if entry is not None:
                node.node_id = entry["NodeID"]
            return entry is not None

        try:
            wait_for(joined, f"worker node on port {node.node_manager_port} joining {self.address}", self.join_timeout_s)
        except NodeBootFailed:
            raise
        except ClusterError as exc:  # joined too slowly: alive but not listed, no retry
            raise ClusterError(f"{exc}; log:\n{node.log_tail()}") from exc

    def _discard(self, node: WorkerNode) -> None:
        """Whatever a node that never joined left: processes of its group, its log handle and files."""
        _signal_group(node.proc, signal.SIGKILL)
        node.log_fh.close()
        shutil.rmtree(node.temp_dir, ignore_errors=True)

    def kill(self, node: WorkerNode, wait_dead: bool = False) -> None:
        """SIGKILL the node's process group (raylet, agents, workers): a spot reclaim, no goodbye to the head."""
        _signal_group(node.proc, signal.SIGKILL)
        node.proc.wait()
        node.killed = True
        log.info("worker node %s killed", node.node_id[:8])
        if wait_dead:
            self.wait_dead(node)

    def freeze(self, node: WorkerNode) -> None:
        """SIGSTOP the node's process group: nothing on it runs or reports until `thaw` (or `kill`), so a test
        can read what the node holds at this instant before deciding to kill it."""
        _signal_group(node.proc, signal.SIGSTOP)

    def thaw(self, node: WorkerNode) -> None:
        _signal_group(node.proc, signal.SIGCONT)

    def wait_dead(self, node: WorkerNode) -> None:
        """Until the head's node table says the node is gone (its health checks noticed)."""
        def gone() -> bool:
            entry = node_entry(node.node_id)
            return entry is None or not entry["Alive"]

        wait_for(gone, f"head noticing worker node {node.node_id[:8]} is gone", self.leave_timeout_s)

    def stop(self, node: WorkerNode) -> None:
        """A graceful stop (SIGINT, what `--block` treats as stop): the node unregisters at once."""
        if node.proc.poll() is None:
            _signal_group(node.proc, signal.SIGCONT)  # a frozen node would not act on SIGINT
            _signal_group(node.proc, signal.SIGINT)
            try:
                node.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _signal_group(node.proc, signal.SIGKILL)
                node.proc.wait()
        _signal_group(node.proc, signal.SIGKILL)  # any worker of the node left behind

    def close(self) -> None:
        """Stop every node this object started, wait until the head lists none of them, remove their files."""
        for node in self.nodes:
            self.stop(node)
        try:
            for node in self.nodes:
                if node.node_id:
                    self.wait_dead(node)
        finally:
            for node in self.nodes:
                node.log_fh.close()
                shutil.rmtree(node.temp_dir, ignore_errors=True)
            self.nodes = []


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def live_raylets(temp_dir: str) -> list[int]:
    """PIDs of raylet processes started under `temp_dir` (a leak check for tests)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"/raylet") and any(temp_dir.encode() in a for a in cmdline):
            pids.append(int(entry.name))
    return pids
