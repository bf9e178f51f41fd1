"""Shard files open as image datasets in the tools users have: Hugging Face `datasets` sees an Image and
ClassLabels (the set folder's dataset card), while pyarrow, pandas and the engine's own reader see the same
columns as before; each opens a set by its folder (the set's own files are hidden)."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from engine.data.shards import CARD, LEGACY_MANIFEST, MANIFEST, SHARD_SCHEMA, SyntheticSet, complete_sets, dataset_card
from engine.storage import Storage
from engine.synthesis.sink import write_window
from engine.synthesis.windows import pixels_to_column
from engine.testing.synthetic import write_synthetic_set

NAMES = ["cardinal", "jay", "wren"]


def scored_window(start: int, rows: int, size: int = 8) -> pa.Table:
    """What the sink receives from the stream: raw pixels plus the contract's other columns."""
    rng = np.random.default_rng(start)
    gen = [i % 2 == 0 for i in range(rows)]
    return pa.table({
        "index": pa.array(range(start, start + rows), pa.int64()),
        "pixels": pixels_to_column(rng.integers(0, 256, (rows, size, size, 3), dtype=np.uint8)),
        "strategy": ["diff-gen" if g else "diff-mix" for g in gen],
        "ref_id": [None if g else f"r{i}" for i, g in enumerate(gen)],
        "ref_label": pa.array([None if g else 1 for g in gen], pa.int64()),
        "target_label": pa.array([i % 3 for i in range(rows)], pa.int64()),
        "strength": [1.0 if g else 0.7 for g in gen],
        "seed": pa.array(range(rows), pa.int64()),
        "prompt": [f"photo of a {NAMES[i % 3]}" for i in range(rows)],
        "clip_score": rng.random(rows),
    })


def test_a_set_folder_loads_as_a_hugging_face_image_dataset(tmp_path):
    import datasets

    out = tmp_path / "set"
    write_window(Storage(), str(out), 0, 6, scored_window(0, 6), 8, NAMES)
    (out / CARD).write_text(dataset_card(NAMES, "a test set"))                # what synthesis writes
    (out / MANIFEST).write_text("{}")                                         # not a data file
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == 6
    assert ds.features["target_label"].names == NAMES and ds.features["ref_label"].names == NAMES
    row = ds[1]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (8, 8)
    assert ds.features["target_label"].int2str(row["target_label"]) == "jay" and ds[0]["ref_label"] is None
    # the files alone (`load_dataset("parquet", ...)`) carry the class names too; the image stays bytes
    files = [str(p) for p in sorted(out.glob("part-*.parquet"))]
    raw = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf2"))
    assert raw.features["target_label"].names == NAMES
    assert isinstance(raw.cast_column("image", datasets.Image())[0]["image"], Image.Image)
    # pyarrow and pandas read the contract's columns and types, unchanged
    table = pq.read_table(files[0])
    assert table.schema.equals(SHARD_SCHEMA) and table.column("image")[0].as_py()[:4] == b"\x89PNG"
    frame = table.to_pandas()
    assert list(frame.columns) == SHARD_SCHEMA.names and frame["target_label"].tolist() == [0, 1, 2, 0, 1, 2]


def test_files_carry_the_class_names_and_the_engine_reads_them_as_before(tmp_path):
    import datasets

    uri = str(tmp_path / "syn")
    imgs = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(3)]
    blobs = []
    for im in imgs:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    write_synthetic_set(uri, Storage(), NAMES, blobs, [0, 1, 2], num_rows=10, rows_per_file=5)
    ds = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (tmp_path / "syn").glob("*.parquet")),
                               split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 10 and ds.features["target_label"].names == NAMES
    assert SyntheticSet.open(uri).read(filtered=False).num_rows == 10


def folder_readers(folder: str, cache: str) -> dict:
    """The set opened by its folder path as users open Parquet folders: rows each reader sees."""
    import datasets
    import pandas as pd

    return {
        "pyarrow": pq.read_table(folder).num_rows,
        "pandas": len(pd.read_parquet(folder)),
        "datasets": len(datasets.load_dataset(folder, split="train", cache_dir=f"{cache}/a")),
        "datasets parquet": len(datasets.load_dataset("parquet", data_dir=folder, split="train",
                                                      cache_dir=f"{cache}/b")),
    }


def test_a_set_opens_by_its_folder_in_pyarrow_pandas_and_datasets(tmp_path):
    """README-less and manifest-hidden: no reader trips over the set's own files ("Could not read schema from
    .../README.md"), and Hugging Face still gets the Image and ClassLabel features from `.huggingface.yaml`."""
    import datasets

    uri = str(tmp_path / "syn")
    write_synthetic_set(uri, Storage(), NAMES, [encode(i) for i in range(3)], [0, 1, 2], num_rows=12, rows_per_file=5)
    assert folder_readers(uri, str(tmp_path / "hf")) == {"pyarrow": 12, "pandas": 12, "datasets": 12,
                                                        "datasets parquet": 12}
    ds = datasets.load_dataset(uri, split="train", cache_dir=str(tmp_path / "hf" / "a"))
    assert isinstance(ds.features["image"], datasets.Image) and ds.features["target_label"].names == NAMES
    assert pq.read_table(uri).schema.remove_metadata().equals(SHARD_SCHEMA)
    assert sorted(p.name for p in (tmp_path / "syn").iterdir() if not p.name.startswith("part-")) == sorted(
        [MANIFEST, CARD])


def test_sets_written_before_the_hidden_names_still_read(tmp_path):
    """A set folder of the earlier layout (manifest.json and a README.md card beside the shards) is found and read
    by the engine as before."""
    uri = str(tmp_path / "sets" / "old")
    write_synthetic_set(uri, Storage(), NAMES, [encode(i) for i in range(3)], [0, 1, 2], num_rows=10, rows_per_file=5)
    old = tmp_path / "sets" / "old"
    (old / MANIFEST).rename(old / LEGACY_MANIFEST)
    (old / CARD).unlink()
    (old / "README.md").write_text("---\n" + json.dumps({"configs": []}) + "\n---\n")
    assert complete_sets(str(tmp_path / "sets"), Storage()) == [uri]
    assert SyntheticSet.open(uri).read(filtered=False).num_rows == 10


def encode(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_class_names_reach_datasets_exactly_through_the_card(tmp_path):
    """Class names are YAML data in `.huggingface.yaml`: names YAML would read as something else (a mapping, a
    comment, a boolean, null, a number) or that hold quotes and slashes come back as the same strings."""
    import datasets

    names = ["a: b", "- dash", "#hash", "yes", "null", "123", "it's \"quoted\"", "T-shirt/top", "ünï cödé"]
    uri = str(tmp_path / "syn")
    write_synthetic_set(uri, Storage(), names, [encode(i) for i in range(3)], [0, 1, 2], num_rows=9, rows_per_file=9)
    ds = datasets.load_dataset(uri, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.features["target_label"].names == names and ds.features["ref_label"].names == names
