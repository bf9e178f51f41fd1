"""Driver cost of a dataset on S3 (`make bench`, `python -m engine.bench dataset`).

Does the driver grow with the dataset? Image folders of N small PNGs (10 classes) are written to a local
SeaweedFS S3 server; for each N a fresh driver process joins one Ray instance and does what synthesis
does before its stream: load the dataset (listing on the driver, reading and decoding in Ray tasks),
check references and put the reference table in the object store. Measured in that process: peak RSS
(`resource.getrusage`, whole process life) and wall time until the reference table is ready (the first
batch reaching a Translator follows it by the stream's start-up, which does not depend on N). Printed as
ratios against the smallest N in the same run (target: peak RSS within 1.3x). `--dataset-sizes` sets N.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import resource
import subprocess
import sys
import time

from engine.bench.table import Row

log = logging.getLogger(__name__)

DEFAULT_SIZES = (1000, 50000)
CLASSES = 10
UPLOAD_CHUNK = 2000
RSS_TARGET = 1.3


def _png(i: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i % 251, (i // 251) % 251, 7 * (i % 13))).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(endpoint: str, uri: str, n: int) -> None:
    """N PNGs under uri/<class>/<i>.png, uploaded concurrently (s3fs pipe of many keys)."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    root = uri.split("://", 1)[1]
    for start in range(0, n, UPLOAD_CHUNK):
        fs.pipe({f"{root}/c{i % CLASSES}/{i:06d}.png": _png(i) for i in range(start, min(n, start + UPLOAD_CHUNK))})


def measure(address: str, uri: str, endpoint: str) -> dict[str, float]:
    """In a fresh driver process: load, check references, put the reference table; peak RSS and times."""
    import ray

    from engine.config import load_config
    from engine.data import load_dataset
    from engine.storage import Storage
    from engine.synthesis.references import check_references, reference_table

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    joined_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = load_config(None, ["dataset.source=imagefolder", f"dataset.uri={uri}", "dataset.metaclass=thing",
                                f"storage.storage_options={{client_kwargs: {{endpoint_url: '{endpoint}'}}}}"])
    t0 = time.perf_counter()
    ds = load_dataset(config, Storage.from_config(config))
    t_load = time.perf_counter() - t0
    usable, _ = check_references(ds.train_rows, skip=False)
    ref = ray.put(reference_table(ds))
    t_ready = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del ref
    return {"images": ds.train_rows.num_rows + ds.test_rows.num_rows, "usable": int(usable.sum()),
            "load_s": t_load, "ready_s": t_ready, "peak_mb": peak_kb / 1024, "joined_mb": joined_kb / 1024}


def _measure_in_child(address: str, uri: str, endpoint: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "engine.bench.dataset", "--measure", address, uri, endpoint]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sizes_of(args: argparse.Namespace) -> list[int]:
    text = getattr(args, "dataset_sizes", None)
    sizes = [int(s) for s in text.split(",")] if text else list(DEFAULT_SIZES)
    if len(sizes) < 2 or min(sizes) < CLASSES:
        raise ValueError(f"--dataset-sizes needs two or more sizes of at least {CLASSES} images, got {text!r}")
    return sizes


def run(args: argparse.Namespace) -> list[Row]:
    import ray

    from engine.testing.s3server import start_s3_server

    sizes = sizes_of(args)
    server = start_s3_server()  # sets the test credentials in this environment: Ray workers inherit them
    rows: list[Row] = []
    try:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        bucket = server.make_bucket(f"bench-dataset-{int(time.time())}")
        results = {}
        for n in sizes:
            uri = f"{bucket}/n{n}"
            t0 = time.perf_counter()
            write_folder(server.endpoint_url, uri, n)
            log.info("dataset bench: %d images written to S3 in %.1fs", n, time.perf_counter() - t0)
            results[n] = _measure_in_child(address, uri, server.endpoint_url)
            log.info("dataset bench: %d images: %s", n, results[n])
        base_n = sizes[0]
        base = results[base_n]
        for n in sizes:
            r, label = results[n], f"{n} images"
            ratio = r["peak_mb"] / base["peak_mb"]
            rows.append(Row("dataset", f"driver peak RSS, {label}", r["peak_mb"], "MB", f"{base_n} images", ratio,
                            f"<= {RSS_TARGET}x", ratio <= RSS_TARGET if n != base_n else None))
            rows.append(Row("dataset", f"driver RSS growth after joining Ray, {label}", r["peak_mb"] - r["joined_mb"],
                            "MB", f"{base_n} images",
                            (r["peak_mb"] - r["joined_mb"]) / max(base["peak_mb"] - base["joined_mb"], 1e-9)))
            rows.append(Row("dataset", f"driver wall to reference table ready, {label}", r["ready_s"], "s",
                            f"{base_n} images", r["ready_s"] / base["ready_s"]))
            rows.append(Row("dataset", f"images read+decoded per s (Ray tasks), {label}", n / r["load_s"],
                            "images/s", f"{base_n} images", (n / r["load_s"]) / (base_n / base["load_s"])))
    finally:
        ray.shutdown()
        server.stop()
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--measure":
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(measure(*sys.argv[2:5])))
    else:
        sys.exit("usage: python -m engine.bench dataset [--dataset-sizes 1000,50000]")
