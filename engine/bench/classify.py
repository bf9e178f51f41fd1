"""Classifier input throughput (`make bench`, `python -m engine.bench classify`).

Does synthetic mixing starve the trainer? Training samples/s with p = 0 (real rows only) against
p = 0.3 (30% of every epoch drawn from synthetic shards streamed from a local SeaweedFS S3 server),
same model, batch, epochs and cluster, on this machine; printed as a ratio (target >= 0.9x).
Throughput is the mean over epochs after the first (which carries start-up), averaged over two
runs of each, in A B A B order. `--gpu` adds the
same comparison with resnet50 at 224 px and AMP on CUDA.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

from engine.bench.table import Row

log = logging.getLogger(__name__)

EPOCHS = 4
REPEATS = 2
SMALL_TASK = 256  # 32 px digits decode in microseconds: bigger tasks amortise per-task overhead
MULTIPLIER = 2.0
TARGET = 0.9


def _cases(gpu: bool) -> list[tuple[str, list[str]]]:
    cpu = ("cpu", ["classify.backbone=small_cnn", "classify.resolution=32", "classify.batch_size=64",
                   "classify.use_gpu=false", "classify.cpus_per_worker=0.5", f"classify.rows_per_task={SMALL_TASK}"])
    if not gpu:
        return [cpu]
    return [cpu, ("cuda", ["classify.backbone=resnet50", "classify.resolution=224", "classify.batch_size=64",
                           "classify.use_gpu=true", "classify.amp=true", "classify.cpus_per_worker=1"])]


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        # logical CPUs above the core count let a fractional Train worker and the Data tasks co-schedule
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def run(args: argparse.Namespace) -> list[Row]:
    from engine.classify.train import fit, prepare_inputs
    from engine.config import load_config
    from engine.data import load_dataset
    from engine.storage import Storage
    from engine.testing.s3server import start_s3_server
    from engine.testing.synthetic import write_synthetic_set

    gpu = bool(getattr(args, "gpu", False))
    if gpu:
        import torch

        gpu = torch.cuda.is_available()
    server = start_s3_server()
    rows: list[Row] = []
    try:
        _ensure_ray()
        bucket = server.make_bucket(f"bench-classify-{int(time.time())}")
        options = server.storage_options_with_keys
        storage = Storage(options)
        with tempfile.TemporaryDirectory(prefix="bench-classify-") as out:
            base = load_config(None, [f"run.output={out}"])
            digits = load_dataset(base)
            syn = f"{bucket}/synthetic"
            t0 = time.perf_counter()
            write_synthetic_set(syn, storage, digits.class_names, digits.train.column("image").to_pylist(),
                                digits.train.column("label").to_pylist(),
                                num_rows=int(MULTIPLIER * digits.train.num_rows), rows_per_file=64,
                                clip_threshold=0.1)
            log.info("synthetic set on S3: %.1fs", time.perf_counter() - t0)
            for device, case in _cases(gpu):
                inputs = prepare_inputs(load_config(None, [f"run.output={out}", *case]), digits)
                samples: dict[float, list[float]] = {0.0: [], 0.3: []}
                for rep in range(REPEATS):  # A B A B: load drifting on a shared machine hits both alike
                    for p in (0.0, 0.3):
                        config = load_config(None, [
                            f"run.output={out}", *case, f"classify.epochs={EPOCHS}", f"classify.eval_every={EPOCHS}",
                            f"classify.p={p}", f"classify.synthetic={syn}", "classify.crop_scale_min=0.6",
                            "classify.hflip=false"])
                        config.storage.storage_options = options
                        summary = fit(config, inputs, output=os.path.join(out, f"{device}-p{p}-{rep}"))
                        samples[p].append(float(summary["metrics"]["train_samples_per_s_mean"]))
                        log.info("%s p=%s: %.1f samples/s", device, p, samples[p][-1])
                rates = {p: sum(v) / len(v) for p, v in samples.items()}
                ratio = rates[0.3] / rates[0.0] if rates[0.0] else 0.0
                rows.append(Row("classify", f"train samples/s, p=0 ({case[0].split('=')[1]})", rates[0.0],
                                "samples/s", device=device))
                rows.append(Row("classify", "train samples/s, p=0.3, shards on S3", rates[0.3], "samples/s",
                                baseline="p=0, same run", ratio=ratio, target=f">= {TARGET}x",
                                ok=ratio >= TARGET, device=device))
    finally:
        server.stop()
    return rows
