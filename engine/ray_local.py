"""How every stage gets its Ray: join the cluster a job runs on, or start one local instance.

One place decides the local instance's settings (logical CPUs, Ray Train's poll), so `diffmix <stage>`
on a laptop, the pipeline and the demo start Ray the same way, and `ray job submit` always joins.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

log = logging.getLogger(__name__)

# Ray Train's controller polls each worker every 2 s by default and every report() waits for the poll,
# which dominates small local runs (epochs of a second); a local cluster started here polls faster.
LOCAL_TRAIN_POLL_S = "0.1"


def joins_cluster() -> bool:
    """True when this process is (or will be) on an existing cluster rather than a local one of its own."""
    import ray

    return ray.is_initialized() or bool(os.environ.get("RAY_ADDRESS"))


def local_train_env() -> None:
    """Set before a local Ray starts (its processes inherit the environment); a user's value wins."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", LOCAL_TRAIN_POLL_S)


def ensure_ray(min_cpus: float = 0.0, **init_kwargs: Any) -> bool:
    """Join the running or addressed cluster (RAY_ADDRESS, `ray job submit`), else start a local one with
    at least `min_cpus` logical CPUs (more than the cores let fractional tasks of overlapping stages
    pack). `init_kwargs` go to the local `ray.init` only. Returns True when it started a local instance."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return False
    local_train_env()
    cpus = max(os.cpu_count() or 1, math.ceil(min_cpus))
    log.info("starting a local Ray instance (%d logical CPUs; GPUs as Ray detects them)", cpus)
    ray.init(num_cpus=cpus, **init_kwargs)
    return True
