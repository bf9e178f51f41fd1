"""Worker nodes added to the session's Ray head for one test, and always taken away again."""
from __future__ import annotations

import pytest

from engine.testing.cluster import WorkerNodes, live_raylets, wait_for


@pytest.fixture
def worker_nodes(ray_session, ray_cluster):
    """A `WorkerNodes` on the session head; the test adds (and may kill) nodes. Teardown stops the rest, waits
    until the head lists none of them, checks no raylet of theirs is left and the head's resources are as
    before, so the rest of the suite runs on the one-node cluster it expects."""
    before = ray_session.cluster_resources()
    nodes = WorkerNodes(ray_cluster["address"])
    yield nodes
    temp_dirs = [n.temp_dir for n in nodes.nodes]
    nodes.close()
    leaked = [pid for d in temp_dirs for pid in live_raylets(d)]
    assert not leaked, f"raylets of the test's worker nodes still running: {leaked}"
    wait_for(lambda: ray_session.cluster_resources() == before, f"head resources back to {before}", 30)
