"""Dataset loaders on real files (local and S3), subsets, fingerprints and every bad-input case."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.config import load_config
from engine.data import DatasetError, load_dataset
from engine.data.splits import long_tail_counts
from engine.storage import Storage


def png(color: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (color, 255 - color, 7)).save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root, classes=("cardinal", "jay", "wren"), per_class=5):
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            (root / cls / f"{i}.png").write_bytes(png(ci * 40 + i))
    (root / "README.txt").write_text("not an image")
    return root


def cfg(*overrides):
    return load_config(None, list(overrides))


# --- image folder ----------------------------------------------------------------------------
def test_imagefolder_loads_and_splits(tmp_path):
    root = make_folder(tmp_path / "birds")
    ds = load_dataset(cfg("dataset.source=imagefolder", f"dataset.uri={root}", "dataset.metaclass=bird"))
    assert ds.class_names == ["cardinal", "jay", "wren"] and ds.metaclass == "bird"
    assert ds.train.num_rows + ds.test.num_rows == 15
    assert list(ds.class_counts("test")) == [1, 1, 1]
    assert set(ds.train.column("id").to_pylist()).isdisjoint(ds.test.column("id").to_pylist())


def test_imagefolder_with_train_test_dirs(tmp_path):
    make_folder(tmp_path / "d" / "train")
    make_folder(tmp_path / "d" / "test", per_class=2)
    ds = load_dataset(cfg("dataset.source=imagefolder", f"dataset.uri={tmp_path / 'd'}", "dataset.metaclass=bird"))
    assert ds.train.num_rows == 15 and ds.test.num_rows == 6


def test_imagefolder_on_s3(tmp_path, s3_server, s3_bucket):
    root = make_folder(tmp_path / "birds")
    storage = Storage(s3_server["storage_options"])
    storage.upload_dir(str(root), s3_bucket + "/birds")
    local = load_dataset(cfg("dataset.source=imagefolder", f"dataset.uri={root}", "dataset.metaclass=bird"))
    remote = load_dataset(cfg("dataset.source=imagefolder", f"dataset.uri={s3_bucket}/birds", "dataset.metaclass=bird"),
                          storage)
    assert remote.fingerprint() == local.fingerprint()


def test_imagefolder_ignores_hidden_folders_and_non_images(tmp_path, caplog):
    """What Jupyter, macOS zips and editors leave behind is not a class or an image (as in HF imagefolder)."""
    root = make_folder(tmp_path / "birds")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "x-checkpoint.png").write_bytes(png(1))
    (root / "__MACOSX" / "jay").mkdir(parents=True)
    (root / "__MACOSX" / "jay" / "._0.png").write_bytes(b"resource fork")
    (root / "jay" / ".DS_Store").write_bytes(b"\0\0")
    (root / "jay" / "notes.txt").write_text("seen at the feeder")
    (root / "wren" / ".hidden").mkdir()
    (root / "wren" / ".hidden" / "9.png").write_bytes(b"not read")
    with caplog.at_level("INFO", logger="engine.data.loaders"):
        ds = load_dataset(cfg("dataset.source=imagefolder", f"dataset.uri={root}", "dataset.metaclass=bird"))
    assert ds.class_names == ["cardinal", "jay", "wren"] and ds.train.num_rows + ds.test.num_rows == 15
    assert "ignored 1 file(s) without an image extension" in caplog.text


def test_imagefolder_bad_inputs(tmp_path):
    base = ("dataset.source=imagefolder", "dataset.metaclass=bird")
    with pytest.raises(DatasetError, match="dataset root not found: .*nowhere"):
        load_dataset(cfg(*base, f"dataset.uri={tmp_path / 'nowhere'}"))

    root = make_folder(tmp_path / "a")
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match="class 'empty' has no images"):
        load_dataset(cfg(*base, f"dataset.uri={root}"))

    root = make_folder(tmp_path / "b")
    (root / "jay" / "broken.png").write_bytes(png(3)[:40])  # truncated file
    with pytest.raises(DatasetError, match=r"jay/broken\.png"):
        load_dataset(cfg(*base, f"dataset.uri={root}"))
    ds = load_dataset(cfg(*base, f"dataset.uri={root}", "dataset.skip_bad_images=true"))
    assert ds.skipped == 1 and ds.train.num_rows + ds.test.num_rows == 15

    root = make_folder(tmp_path / "many")                  # every bad file in one error, not one per run
    for i in range(7):
        (root / "wren" / f"bad{i}.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"7 bad image\(s\): .*wren/bad0\.png: not an image.*wren/bad4\.png: not an image file PIL knows; and 2 more"):
        load_dataset(cfg(*base, f"dataset.uri={root}"))
    assert load_dataset(cfg(*base, f"dataset.uri={root}", "dataset.skip_bad_images=true")).skipped == 7

    root = make_folder(tmp_path / "c")
    with pytest.raises(DatasetError, match="folder 'wren' is not in the class list"):
        load_dataset(cfg(*base, f"dataset.uri={root}", "dataset.class_names=[cardinal, jay]"))

    with pytest.raises(DatasetError, match="dataset.metaclass is required"):
        load_dataset(cfg("dataset.source=imagefolder", f"dataset.uri={root}"))


# --- Parquet (Hugging Face image-dataset layout) ---------------------------------------------
def hf_parquet(path, labels, names, images=None, with_meta=True):
    images = images or [png(10 * i) for i in range(len(labels))]
    table = pa.table({
        "image": pa.array([{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(images)],
                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "label": pa.array(labels, type=pa.int64()),
    })
    if with_meta:
        meta = {"info": {"features": {"image": {"_type": "Image"},
                                      "label": {"_type": "ClassLabel", "names": names}}}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_parquet_hf_layout(tmp_path):
    names = ["a320", "b737"]
    hf_parquet(tmp_path / "air" / "data" / "train-00000-of-00001.parquet", [0, 1, 0, 1, 0, 1], names)
    hf_parquet(tmp_path / "air" / "data" / "test-00000-of-00001.parquet", [0, 1], names)
    ds = load_dataset(cfg("dataset.source=parquet", f"dataset.uri={tmp_path / 'air'}", "dataset.metaclass=aircraft"))
    assert ds.class_names == names and ds.train.num_rows == 6 and ds.test.num_rows == 2


def test_parquet_on_s3_and_split_when_no_test(tmp_path, s3_server, s3_bucket):
    hf_parquet(tmp_path / "p" / "train.parquet", [0, 1] * 5, ["x", "y"])
    storage = Storage(s3_server["storage_options"])
    storage.upload_dir(str(tmp_path / "p"), s3_bucket + "/p")
    ds = load_dataset(cfg("dataset.source=parquet", f"dataset.uri={s3_bucket}/p", "dataset.metaclass=thing"), storage)
    assert ds.train.num_rows == 8 and ds.test.num_rows == 2


def test_parquet_bad_inputs(tmp_path):
    base = ("dataset.source=parquet", "dataset.metaclass=thing")
    hf_parquet(tmp_path / "lab" / "train.parquet", [0, 1, 2], ["x", "y"])
    with pytest.raises(DatasetError, match=r"label 2 outside the class list"):
        load_dataset(cfg(*base, f"dataset.uri={tmp_path / 'lab'}"))

    hf_parquet(tmp_path / "nometa" / "train.parquet", [0, 1], ["x", "y"], with_meta=False)
    with pytest.raises(DatasetError, match="declares no class names"):
        load_dataset(cfg(*base, f"dataset.uri={tmp_path / 'nometa'}"))

    hf_parquet(tmp_path / "corrupt" / "train.parquet", [0, 1, 0, 1], ["x", "y"],
               images=[png(1), b"garbage", png(2), png(3)])
    with pytest.raises(DatasetError, match=r"train\.parquet row 1 \(img1\.png\)"):
        load_dataset(cfg(*base, f"dataset.uri={tmp_path / 'corrupt'}"))
    ds = load_dataset(cfg(*base, f"dataset.uri={tmp_path / 'corrupt'}", "dataset.skip_bad_images=true"))
    assert ds.skipped == 1

    (tmp_path / "notpq").mkdir()
    (tmp_path / "notpq" / "train.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="cannot read Parquet file"):
        load_dataset(cfg(*base, f"dataset.uri={tmp_path / 'notpq'}"))


# --- built-in, subsets, fingerprint ---------------------------------------------------------
def test_builtin_dataset_is_real_and_stable():
    ds = load_dataset(cfg())
    assert ds.num_classes >= 10 and ds.metaclass == "digit"
    assert ds.train.num_rows + ds.test.num_rows == 1797
    img = Image.open(io.BytesIO(ds.train.column("image")[0].as_py()))
    assert img.size == (32, 32) and np.asarray(img).std() > 10  # a real scan, not a blank
    assert load_dataset(cfg()).fingerprint() == ds.fingerprint()
    assert load_dataset(cfg("dataset.test_fraction=0.3")).fingerprint() != ds.fingerprint()


def test_few_shot_counts_and_seed():
    ds = load_dataset(cfg("dataset.subset.kind=few_shot", "dataset.subset.shots=5"))
    assert list(ds.class_counts()) == [5] * 10
    same = load_dataset(cfg("dataset.subset.kind=few_shot", "dataset.subset.shots=5"))
    other = load_dataset(cfg("dataset.subset.kind=few_shot", "dataset.subset.shots=5", "run.seed=1"))
    assert same.fingerprint() == ds.fingerprint() != other.fingerprint()
    with pytest.raises(DatasetError, match="fewer than shots=500"):
        load_dataset(cfg("dataset.subset.kind=few_shot", "dataset.subset.shots=500"))


@pytest.mark.parametrize("imbalance", [100, 50, 10])
def test_long_tail_counts_follow_formula(imbalance):
    full = load_dataset(cfg())
    ds = load_dataset(cfg("dataset.subset.kind=long_tail", f"dataset.subset.imbalance_factor={imbalance}"))
    counts = full.class_counts()
    n_mean, n = counts.mean(), len(counts)
    ranked = np.argsort(-counts, kind="stable")
    got = ds.class_counts()
    for rank, c in enumerate(ranked):
        expected = min(max(int(n_mean * (1 / imbalance) ** (rank / (n - 1))), 1), counts[c])
        assert got[c] == expected
    assert got[ranked[0]] / got[ranked[-1]] >= imbalance * 0.7  # head / tail ratio is about IF


def test_long_tail_formula_on_synthetic_counts():
    keep = long_tail_counts(np.array([30, 30, 30, 30, 30]), 10)
    assert list(keep) == [30, 16, 9, 5, 3]


def test_ray_dataset_view(ray_session):
    ds = load_dataset(cfg("dataset.subset.kind=few_shot", "dataset.subset.shots=2"))
    rds = ds.to_ray("train")
    assert rds.count() == 20
    assert set(rds.schema().names) == {"id", "image", "label", "group"}
