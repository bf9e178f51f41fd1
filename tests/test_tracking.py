"""Training curves in TensorBoard event files (read back here with the TFRecord framing and tensorboardX's
protobufs) and in MLflow when configured."""
import os

import pytest

from engine.config import TrackingConfig
from engine.storage import Storage
from engine.tracking import Tracker, TrackingError, check_tracking, read_scalars


def test_tensorboard_events_are_copied_whole_into_the_run_folder(tmp_path):
    run = str(tmp_path / "run")
    tracker = Tracker(TrackingConfig(), run, Storage(), "classify-x")
    tracker.log({"train_loss": 0.75, "top1": 0.5, "drw": True, "note": None, "rate": None}, 1)
    assert read_scalars(os.path.join(run, "tensorboard")) == {"train_loss": [(1, 0.75)], "top1": [(1, 0.5)]}
    tracker.log({"train_loss": 0.5}, 2)                                   # visible before close
    tracker.close()
    assert read_scalars(os.path.join(run, "tensorboard"))["train_loss"] == [(1, 0.75), (2, 0.5)]
    assert not os.path.exists(tracker.local)                              # no folder left in the node's /tmp
    off = Tracker(TrackingConfig(tensorboard=False), str(tmp_path / "off"), Storage(), "x")
    off.log({"loss": 1.0}, 1)
    off.close()
    assert not os.path.exists(tmp_path / "off")


def test_mlflow_file_store_gets_the_params_and_curves(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch

    uri = f"file://{tmp_path / 'mlruns'}"
    check_tracking(TrackingConfig(mlflow_uri=uri))
    tracker = Tracker(TrackingConfig(mlflow_uri=uri, mlflow_experiment="cub"), str(tmp_path / "run"), Storage(),
                      "classify-abc", params={"gamma": 0.5, "p": 0.1})
    for epoch, loss in ((1, 0.9), (2, 0.6)):
        tracker.log({"train_loss": loss, "top1": None}, epoch)
    tracker.close()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cub").experiment_id])
    assert run.info.run_name == "classify-abc" and run.data.params == {"gamma": "0.5", "p": "0.1"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss")] == [(1, 0.9), (2, 0.6)]


def test_mlflow_asked_for_but_missing_fails_before_work(monkeypatch):
    """Mocked absence (the test extra installs mlflow): the error says how to install it."""
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow":
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(TrackingError, match=r"mlflow is not installed: pip install 'diffmix-engine\[mlflow\]'"):
        check_tracking(TrackingConfig(mlflow_uri="file:///tmp/mlruns"))
    check_tracking(TrackingConfig())
