"""`diffmix evaluate` end to end on a two-dataset miniature of the paper's Waterbirds protocol (Sec. 4.4).

The classifier is trained on the built-in digits. The second dataset is its test split put on two
"backgrounds" (as is, and inverted), each image keeping its digit label, with a group per (small/large
digit, background): the analogue of Waterbirds' (bird type, place) groups on CUB species labels.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.classify.evaluate import EvaluateError, label_lookup, run as evaluate
from engine.classify.train import run as classify
from engine.cli import resolve_stage
from engine.config import load_config
from engine.data import decode, encode_png, load_dataset

FAST = ["classify.backbone=small_cnn", "classify.resolution=16", "classify.batch_size=32", "classify.epochs=3",
        "classify.eval_every=3", "classify.cpus_per_worker=0.5", "classify.crop_scale_min=0.6", "classify.hflip=false",
        "classify.p=0", "classify.rows_per_task=256", "dataset.subset.kind=few_shot", "dataset.subset.shots=20"]
SMALL = ["zero", "one", "two", "three", "four"]


def backgrounds(uri, digits) -> None:
    """The digits test split twice: as is (group 2 x type + 0) and inverted (+ 1); type 0 small, 1 large."""
    images, labels, groups = [], [], []
    for blob, label in zip(digits.test.column("image").to_pylist(), digits.test.column("label").to_pylist()):
        pixels = np.asarray(decode(blob).convert("RGB"))
        kind = 0 if digits.class_names[label] in SMALL else 1
        for background, img in ((0, pixels), (1, 255 - pixels)):
            images.append({"bytes": encode_png(img), "path": None})
            labels.append(label)
            groups.append(2 * kind + background)
    uri.mkdir(parents=True)
    pq.write_table(pa.table({"image": images, "label": labels, "group": groups}), uri / "test-00000.parquet")


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    config = load_config(None, [f"run.output={tmp}", *FAST])
    summary = classify(config)
    return tmp, config, summary


def test_same_dataset_gives_the_classifiers_own_accuracy(trained):
    """Evaluating on the dataset it was evaluated on in training reproduces its top-1 exactly."""
    tmp, config, summary = trained
    again = evaluate(load_config(None, [f"run.output={tmp}", *FAST, "evaluate.dataset.source=builtin"]))
    assert again["images"] == load_dataset(config).test.num_rows
    assert again["metrics"]["top1"] == summary["metrics"]["top1"]
    assert again["classifier"] == summary["output"] and resolve_stage("evaluate") is evaluate

    # the same test images as an image folder, all of it evaluated (split=all: its own train and test parts,
    # read by Ray workers from the files): the same top-1
    digits = load_dataset(config)
    for i, (blob, label) in enumerate(zip(digits.test.column("image").to_pylist(),
                                          digits.test.column("label").to_pylist())):
        folder = tmp / "folder" / digits.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(blob)
    folder = evaluate(load_config(None, [f"run.output={tmp}", *FAST, "evaluate.dataset.source=imagefolder",
                                         f"evaluate.dataset.uri={tmp / 'folder'}", "evaluate.dataset.metaclass=digit",
                                         f"evaluate.dataset.class_names={json.dumps(digits.class_names)}",
                                         "evaluate.split=all"]))
    assert folder["images"] == digits.test.num_rows and folder["metrics"]["top1"] == summary["metrics"]["top1"]


def test_group_accuracy_on_a_second_dataset_with_and_without_a_class_map(trained):
    tmp, config, summary = trained
    digits = load_dataset(config)
    backgrounds(tmp / "bg", digits)
    common = [f"run.output={tmp}", *FAST, "evaluate.dataset.source=parquet", f"evaluate.dataset.uri={tmp / 'bg'}",
              "evaluate.dataset.metaclass=digit", f"evaluate.dataset.class_names={json.dumps(digits.class_names)}"]
    species = evaluate(load_config(None, common))
    m = species["metrics"]
    assert species["images"] == 2 * digits.test.num_rows and species["groups"] == [0, 1, 2, 3]
    assert {f"acc_group_{g}" for g in range(4)} <= set(m) and m["worst_group_acc"] == min(
        m[f"acc_group_{g}"] for g in range(4))
    assert m["acc_group_0"] > 0.3 and m["acc_group_0"] > m["acc_group_1"]  # trained on dark backgrounds only
    stored = json.loads(open(tmp / "run" / "evaluate" / species["output"].rsplit("/", 1)[-1] / "metrics.json").read())
    assert stored["metrics"] == m

    # the coarser protocol: each digit counts as its type (small / large); right digit => right type
    coarse = tmp / "bg-type"
    table = pq.read_table(tmp / "bg" / "test-00000.parquet")
    types = [0 if digits.class_names[label] in SMALL else 1 for label in table.column("label").to_pylist()]
    coarse.mkdir()
    pq.write_table(table.set_column(1, "label", pa.array(types)), coarse / "test-00000.parquet")
    class_map = {name: ("small" if name in SMALL else "large") for name in digits.class_names}
    typed = evaluate(load_config(None, [f"run.output={tmp}", *FAST, "evaluate.dataset.source=parquet",
                                        f"evaluate.dataset.uri={coarse}", "evaluate.dataset.metaclass=digit",
                                        'evaluate.dataset.class_names=["small", "large"]',
                                        f"evaluate.class_map={json.dumps(class_map)}"]))
    assert typed["metrics"]["top1"] >= m["top1"] and typed["class_map"]


def test_bad_classifier_and_class_lists_are_named(trained, tmp_path):
    tmp, config, _ = trained
    with pytest.raises(EvaluateError, match="no finished classifier"):
        evaluate(load_config(None, [f"run.output={tmp}", *FAST, "evaluate.dataset.source=builtin",
                                    f"evaluate.classifier={tmp_path / 'none'}"]))
    with pytest.raises(EvaluateError, match="evaluate.dataset is not set"):
        evaluate(load_config(None, [f"run.output={tmp}", *FAST]))
    with pytest.raises(EvaluateError, match=r"evaluation classes \['heron'\].*evaluate.class_map"):
        label_lookup(["gull", "tern"], ["gull", "heron"], None)
    with pytest.raises(EvaluateError, match="does not have"):
        label_lookup(["gull", "tern"], ["water", "land"], {"gull": "water", "crow": "land"})
    assert label_lookup(["gull", "tern", "crow"], ["water", "land"],
                        {"gull": "water", "tern": "water", "crow": "land"}).tolist() == [0, 0, 1]


# --- checkpoints that would run code ------------------------------------------------------------------
class Payload:
    """Unpickling it calls `open(marker, "w")`: any callable could be there instead (a hostile checkpoint)."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_copy(output: str, dest, marker) -> list:
    """A copy of a classify run folder whose every checkpoint's state.pt carries a Payload beside real weights."""
    import shutil

    import torch

    shutil.copytree(output, dest)
    planted = sorted(dest.glob("train/checkpoint_*/state.pt"))
    for state_file in planted:
        state = torch.load(state_file, weights_only=True)
        state["hook"] = Payload(marker)
        torch.save(state, state_file)
    return planted


def one_line(capsys, stage: str) -> str:
    """The driver's own stderr (Ray's lines from workers, `(pid=...)`-prefixed, left out): one error line."""
    ours = [x for x in capsys.readouterr().err.strip().splitlines() if x and not x.startswith(("\x1b[", "("))]
    assert ours and "Traceback" not in "\n".join(ours), ours
    return ours[-1] if ours[-1].startswith(f"diffmix {stage}: ") else "\n".join(ours)


def test_a_checkpoint_carrying_a_payload_is_refused_and_never_runs(trained, tmp_path, capsys):
    """A classifier folder from elsewhere is a pickle: evaluate and classify's resume load tensors and plain
    values only; the payload's file is never created, the error is one line naming the file and its code."""
    import torch

    from engine.cli import main

    tmp, config, summary = trained
    marker = tmp_path / "payload-ran"
    control = tmp_path / "control"                      # the payload is real: a full unpickle does run it
    planted = planted_copy(summary["output"], tmp_path / "hostile", marker)
    assert planted
    torch.save({"hook": Payload(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()

    rc = main(["evaluate", f"run.output={tmp}", *FAST, "evaluate.dataset.source=builtin",
               f"evaluate.classifier={tmp_path / 'hostile'}", f"evaluate.output={tmp_path / 'ev'}"])
    line = one_line(capsys, "evaluate")
    assert rc == 9 and str(planted[-1]) in line and "refused" in line and "could run code" in line, line
    assert not marker.exists()

    (tmp_path / "hostile" / "metrics.json").unlink()    # not finished: classify resumes from the checkpoint
    rc = main(["classify", f"run.output={tmp}", *FAST, f"classify.output={tmp_path / 'hostile'}",
               "classify.max_failures=0"])  # one attempt: a refused checkpoint fails every retry the same way
    line = one_line(capsys, "classify")
    assert rc == 5 and "state.pt" in line and "refused" in line and "open" in line, line
    assert not marker.exists()


def test_the_engines_own_checkpoint_still_resumes(trained, tmp_path):
    """weights_only loads what classify saves: a copy of the finished run without its metrics.json resumes
    from its last checkpoint (epoch 3 of 3, all its state: weights, optimizer, scheduler, scaler, metrics) and
    reports its top-1 without training (no epoch written again, no new checkpoint)."""
    import shutil

    tmp, config, summary = trained
    copy = tmp_path / "copy"
    shutil.copytree(summary["output"], copy)
    (copy / "metrics.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (copy / "history").iterdir()}
    checkpoints = sorted(p.name for p in (copy / "train").glob("checkpoint_*"))
    again = classify(load_config(None, [f"run.output={tmp}", *FAST, f"classify.output={copy}"]))
    assert again["metrics"]["epoch"] == 3 and again["metrics"]["top1"] == summary["metrics"]["top1"]
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "history").iterdir()} == before
    assert sorted(p.name for p in (copy / "train").glob("checkpoint_*")) == checkpoints
