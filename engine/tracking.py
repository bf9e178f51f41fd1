"""Curves where users look at them: TensorBoard event files in each run folder, and MLflow when configured.

A `Tracker` lives on the process that reports a run's metrics (rank 0 of a Train worker group). TensorBoard
files are written with tensorboardX's synchronous event writer (tensorboardX comes with Ray Tune; its
`SummaryWriter` queues events on a thread, so a flushed file may still lack them) into a local folder and copied whole
to `<run folder>/tensorboard/` after every write, so the run folder may be on object storage and a reader
never sees half a file. A resumed run adds a new event file beside the old ones; TensorBoard merges them by
step. MLflow (optional extra `mlflow`) gets the same scalars and the stage's settings as parameters when
`tracking.mlflow_uri` is set; its absence is an error at start, not after training.
"""
from __future__ import annotations

import glob
import logging
import numbers
import os
import shutil
import struct
import tempfile
import time
from typing import Any

from engine.storage import Storage, join, redact

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


class TrackingError(ValueError):
    """Tracking cannot start (e.g. MLflow asked for but not installed); the message says what to do."""


def check_tracking(tracking: Any) -> None:
    """On the driver, before any work: MLflow asked for must be importable (`tracking`: TrackingConfig)."""
    if tracking.mlflow_uri:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise TrackingError("tracking.mlflow_uri is set but mlflow is not installed: "
                                "pip install 'diffmix-engine[mlflow]' (or mlflow-skinny)") from None


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite-or-not metrics (bools and None left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)}


class Tracker:
    """Scalars of one run, by step, to TensorBoard (unless `tracking.tensorboard: false`) and MLflow."""

    def __init__(self, tracking: Any, run_uri: str, storage: Storage, run_name: str,
                 params: dict[str, Any] | None = None) -> None:
        self.storage, self.run_uri = storage, run_uri
        self.tb = None
        if tracking.tensorboard:
            from tensorboardX.event_file_writer import EventsWriter

            self.local = tempfile.mkdtemp(prefix="diffmix-tb-")
            self.tb = EventsWriter(os.path.join(self.local, "events"))
        self.mlflow = None
        if tracking.mlflow_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking.mlflow_uri)
            mlflow.set_experiment(tracking.mlflow_experiment)
            mlflow.start_run(run_name=run_name)
            if params:
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            self.mlflow = mlflow
            log.info("tracking: MLflow run %s in %s", run_name, redact(tracking.mlflow_uri))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        values = scalars(metrics)
        if self.tb is not None:
            from tensorboardX.proto import event_pb2, summary_pb2

            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v)
                                                 for k, v in values.items()])
            self.tb.write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
            self.tb.flush()
            self._copy_out()
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: v for k, v in values.items() if v == v}, step=step)

    def _copy_out(self) -> None:
        for name in os.listdir(self.local):
            with open(os.path.join(self.local, name), "rb") as fh:
                self.storage.write_bytes(join(self.run_uri, TENSORBOARD_DIR, name), fh.read())

    def close(self) -> None:
        """Copies the last events out and removes the local folder (a long-lived node runs many of these)."""
        if self.tb is not None:
            self.tb.close()
            self._copy_out()
            shutil.rmtree(self.local, ignore_errors=True)
        if self.mlflow is not None:
            self.mlflow.end_run()


def read_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from every event file in a local `folder` (TFRecord framing: length, its CRC,
    the event, its CRC), e.g. to check or plot a run's curves without TensorBoard."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        with open(path, "rb") as fh:
            data = fh.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
