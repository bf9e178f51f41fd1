"""`diffmix export` round trips: torchvision's ImageFolder opens the exported tree and `labels.jsonl` holds each
image's soft label; WebDataset shards written to S3 read back with the `webdataset` package; counts and labels
match the set's selected rows."""
import io
import json

import numpy as np
import pytest

from engine.cli import resolve_stage
from engine.config import load_config
from engine.data import load_dataset
from engine.data.shards import ShardError, SyntheticSet
from engine.storage import Storage
from engine.testing.synthetic import write_synthetic_set


@pytest.fixture(scope="module")
def digits_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    digits = load_dataset(load_config(None, ["dataset.subset.kind=few_shot", "dataset.subset.shots=3"]))
    uri = str(root / "syn")
    write_synthetic_set(uri, Storage(), digits.class_names, digits.train.column("image").to_pylist(),
                        digits.train.column("label").to_pylist(), num_rows=60, rows_per_file=16, clip_threshold=0.3)
    return root, uri, digits.class_names


def test_image_folder_opens_in_torchvision_with_soft_labels(ray_session, digits_set):
    from torchvision.datasets import ImageFolder

    root, uri, names = digits_set
    out = root / "folder"
    summary = resolve_stage("export")(load_config(None, [
        f"run.output={root}", f"export.synthetic={uri}", f"export.output={out}", "export.gamma=0.5",
        "export.rows_per_task=20"]))
    kept = SyntheticSet.open(uri).read()                                   # the CLIP filter's rows
    assert summary["rows"] == kept.num_rows < 60 and (out / "export.json").exists()
    folder = ImageFolder(str(out))
    assert len(folder) == kept.num_rows
    assert sorted(folder.classes[label] for _, label in folder.samples) == sorted(
        names[t] for t in kept.column("target_label").to_pylist())
    lines = [json.loads(x) for x in (out / "labels.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == sorted(kept.column("index").to_pylist())
    for x in lines:
        assert (out / x["path"]).exists() and x["path"].startswith(x["target"] + "/")
        assert sum(x["soft_label"].values()) == pytest.approx(1.0)
        if x["strategy"] == "diff-mix" and x["reference"] != x["target"]:
            assert x["soft_label"][x["target"]] == pytest.approx(x["strength"] ** 0.5, abs=1e-6)
    assert folder[0][0].size == (32, 32)


def test_webdataset_shards_on_s3_read_back(ray_session, digits_set, s3_server, s3_bucket):
    import webdataset as wds

    root, uri, names = digits_set
    out = f"{s3_bucket}/wds"
    config = load_config(None, [
        f"run.output={root}", f"export.synthetic={uri}", f"export.output={out}", "export.format=webdataset",
        "export.shard_rows=25", "export.filtered=false", "export.strengths=[0.5, 0.7]",
        f"storage.storage_options={json.dumps(s3_server['storage_options'])}"])
    summary = resolve_stage("export")(config)
    storage = Storage.from_config(config)
    chosen = SyntheticSet.open(uri).read(filtered=False, strengths=[0.5, 0.7])
    assert summary["rows"] == chosen.num_rows and summary["files"] == -(-chosen.num_rows // 25)
    local = root / "wds-copy"
    storage.download_dir(out, str(local))
    shards = sorted(str(p) for p in local.glob("shard-*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil"))
    assert len(samples) == chosen.num_rows
    assert sorted(int(s["__key__"]) for s in samples) == sorted(chosen.column("index").to_pylist())
    by_index = dict(zip(chosen.column("index").to_pylist(), chosen.column("target_label").to_pylist()))
    assert all(s["json"]["target"] == names[by_index[int(s["__key__"])]] for s in samples)
    assert {s["json"]["strength"] for s in samples} == {0.5, 0.7} and samples[0]["png"].size == (32, 32)


def test_export_needs_an_output_and_rows(tmp_path, digits_set):
    root, uri, _ = digits_set
    with pytest.raises(ShardError, match="export.output is not set"):
        resolve_stage("export")(load_config(None, [f"export.synthetic={uri}"]))
    with pytest.raises(ShardError, match="no rows left to export"):
        resolve_stage("export")(load_config(None, [f"export.synthetic={uri}", f"export.output={tmp_path}",
                                                   "export.strengths=[0.3]"]))


def test_class_names_that_are_not_folder_names_stay_inside_the_export(ray_session, tmp_path):
    """A Parquet dataset whose ClassLabel names hold "/", "..", case twins and 300 characters: the export's
    folders are safe, one per class (torchvision's ImageFolder finds exactly the dataset's classes), recorded in
    export.json, and no file is written outside the export folder."""
    from torchvision.datasets import ImageFolder

    from engine.testing.parquet import class_label_parquet

    names = ["T-shirt/top", "../../escaped", "plain", "Plain", "T-shirt_top", "y" * 300]
    class_label_parquet(tmp_path / "data" / "train.parquet", names, per_class=4)
    ds = load_dataset(load_config(None, ["dataset.source=parquet", f"dataset.uri={tmp_path / 'data'}",
                                         "dataset.metaclass=garment"]))
    assert ds.class_names == names
    uri = str(tmp_path / "syn")
    write_synthetic_set(uri, Storage(), names, ds.train.column("image").to_pylist(),
                        ds.train.column("label").to_pylist(), num_rows=80, rows_per_file=40)
    out = tmp_path / "exp" / "folder"
    summary = resolve_stage("export")(load_config(None, [
        f"run.output={tmp_path / 'runs'}", f"export.synthetic={uri}", f"export.output={out}", "export.filtered=false"]))
    folders = summary["class_folders"]
    assert list(folders) == names and json.loads((out / "export.json").read_text())["class_folders"] == folders

    written = [p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*") if p.is_file()]
    assert set(written) == {"data", "syn", "exp"} and not (tmp_path / "escaped").exists()
    assert {p.parent for p in out.rglob("*.png")} == {out / f for f in folders.values()}   # one level, one per class

    folder = ImageFolder(str(out))
    assert sorted(folder.classes) == sorted(folders.values()) and len(folder.classes) == len(names)
    targets = SyntheticSet.open(uri).read(filtered=False).column("target_label").to_pylist()
    assert sorted(folder.classes[label] for _, label in folder.samples) == sorted(folders[names[t]] for t in targets)
    for line in (out / "labels.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["path"].split("/")[0] == folders[rec["target"]] and (out / rec["path"]).exists()
