"""Image folders on S3 are read and checked by Ray tasks: the driver keeps ids, labels, URIs, sizes and
hashes, never image bytes (a counting hook on the driver's Storage reads shows it), and every bad file
is named in one error."""
import hashlib
import io

import pyarrow as pa
import pytest
from PIL import Image

from engine.config import load_config
from engine.data import DatasetError, load_dataset
from engine.data import reads
from engine.storage import Storage


def png(color: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (color, 255 - color, 7)).save(buf, format="PNG")
    return buf.getvalue()


def upload_folder(storage: Storage, root: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        storage.write_bytes(f"{root}/{rel}", data)


def birds(per_class: int = 6) -> dict[str, bytes]:
    return {f"{cls}/{i}.png": png(ci * 40 + i) for ci, cls in enumerate(("cardinal", "jay", "wren"))
            for i in range(per_class)}


def cfg(uri: str, *extra: str):
    return load_config(None, ["dataset.source=imagefolder", f"dataset.uri={uri}", "dataset.metaclass=bird", *extra])


def test_s3_folder_is_read_by_ray_tasks_not_the_driver(ray_session, s3_server, s3_bucket, driver_reads, monkeypatch):
    storage = Storage(s3_server["server"].storage_options_with_keys)  # workers predate the server's keys
    files = birds()
    upload_folder(storage, f"{s3_bucket}/birds", files)
    monkeypatch.setattr(reads, "ROWS_PER_TASK", 9)  # 18 files -> 2 Ray tasks
    ds = load_dataset(cfg(f"{s3_bucket}/birds"), storage)

    assert ds.on_storage and not [u for u in driver_reads if u.endswith(".png")]
    for split in ("train", "test"):
        index = ds.index(split)
        assert not [f.name for f in index.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
        for row in index.to_pylist():   # sizes and content hashes were computed by the workers
            assert row["uri"] == f"{s3_bucket}/birds/{row['id']}"
            assert row["size"] == len(files[row["id"]])
            assert row["sha256"] == hashlib.sha256(files[row["id"]]).hexdigest()
    assert ds.train_rows.num_rows + ds.test_rows.num_rows == 18 and list(ds.class_counts("test")) == [1, 1, 1]

    rows = ds.to_ray("train").take_all()  # pixels for a consumer: read on workers, by URI
    assert len(rows) == ds.train_rows.num_rows and not [u for u in driver_reads if u.endswith(".png")]
    assert all(r["image"] == files[r["id"]] for r in rows)
    assert ds.train.column("image").to_pylist() == [files[i] for i in ds.train.column("id").to_pylist()]


def test_bad_images_on_s3_are_all_named_in_one_error(ray_session, s3_server, s3_bucket, driver_reads):
    storage = Storage(s3_server["server"].storage_options_with_keys)
    files = birds(per_class=3)
    files.update({f"wren/bad{i}.png": b"not a png" for i in range(6)})
    files["jay/broken.png"] = png(3)[:40]  # truncated
    upload_folder(storage, f"{s3_bucket}/birds", files)
    with pytest.raises(DatasetError, match=r"7 bad image\(s\): cannot decode image s3://.*/jay/broken\.png: .*"
                                           r"wren/bad0\.png: not an image file PIL knows; .*wren/bad3\.png.*; and 2 more"):
        load_dataset(cfg(f"{s3_bucket}/birds"), storage)
    ds = load_dataset(cfg(f"{s3_bucket}/birds", "dataset.skip_bad_images=true"), storage)
    assert ds.skipped == 7 and ds.train_rows.num_rows + ds.test_rows.num_rows == 9
    assert not [u for u in driver_reads if u.endswith(".png")]


def test_training_inputs_are_read_by_ray_tasks_not_the_driver(ray_session, tmp_path, driver_reads):
    """classify's blocks and finetune's train table for an image folder are made by Ray tasks reading the
    files (no image crosses this process), and hold what the bytes-in-the-driver path would have put."""
    import ray

    from engine.classify.train import prepare_inputs
    from engine.data.dataset import ImageDataset

    storage, root = Storage(), str(tmp_path / "birds")
    files = birds()
    upload_folder(storage, root, files)
    config = cfg(root, f"run.output={tmp_path}")
    ds = load_dataset(config, storage)
    inputs = prepare_inputs(config, ds, rows_per_block=4)
    train_ref = ds.put("train", ["image", "label"])
    tables = ray.get([b.ref for b in inputs.train_blocks + inputs.test_blocks] + [train_ref])
    assert not [u for u in driver_reads if u.endswith(".png")]

    held = ImageDataset(ds.class_names, ds.metaclass, ds.train, ds.test, "held")   # bytes read here, after
    expected = prepare_inputs(config, held, rows_per_block=4)
    assert [(b.start, b.end) for b in inputs.train_blocks] == [(b.start, b.end) for b in expected.train_blocks]
    want = ray.get([b.ref for b in expected.train_blocks + expected.test_blocks]) + [held.train.select(["image", "label"])]
    assert len(tables) == len(want) and all(a.equals(b) for a, b in zip(tables, want))
    assert inputs.train_labels == expected.train_labels and inputs.num_train == expected.num_train
