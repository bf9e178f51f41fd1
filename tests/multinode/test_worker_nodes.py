"""The multi-node fixture itself: a node whose `ray start` dies before joining is started again, once."""
from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from engine.testing.cluster import ClusterError


def _flaky_ray(tmp_path: Path, real_ray: str, failures: int) -> str:
    """A `ray` that exits 1 on its first `failures` calls (as a raylet that missed Ray's 30 s registration
    window makes `ray start` do), then is the real one."""
    script = tmp_path / "ray"
    count = tmp_path / "calls"
    script.write_text(f"""#!/bin/sh
n=$(cat {count} 2>/dev/null || echo 0); echo $((n + 1)) > {count}
if [ "$n" -lt {failures} ]; then echo "The current node timed out during startup." >&2; exit 1; fi
exec {real_ray} "$@"
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_a_node_that_fails_to_boot_is_started_again(worker_nodes, tmp_path, caplog):
    real_ray = worker_nodes._ray_bin
    worker_nodes._ray_bin = _flaky_ray(tmp_path, real_ray, failures=1)
    with caplog.at_level(logging.WARNING, logger="engine.testing.cluster"):
        node = worker_nodes.add(slots=1)
    assert node.node_id and node.proc.poll() is None
    assert (tmp_path / "calls").read_text().strip() == "2"
    assert [r.getMessage() for r in caplog.records if "did not boot (attempt 1/2)" in r.getMessage()]
    assert worker_nodes.nodes == [node]  # the failed boot left nothing to stop


def test_a_node_that_never_boots_is_a_named_error(worker_nodes, tmp_path):
    worker_nodes._ray_bin = _flaky_ray(tmp_path, worker_nodes._ray_bin, failures=2)
    with pytest.raises(ClusterError, match="worker node exited with 1; log:\n.*timed out during startup"):
        worker_nodes.add(slots=1)
    assert worker_nodes.nodes == []
