"""Shard files open as image datasets in the tools users have: Hugging Face `datasets` sees an Image and
ClassLabels (the set folder's dataset card), while pyarrow, pandas and the engine's own reader see the same
columns as before."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from engine.data.shards import CARD, SHARD_SCHEMA, SyntheticSet, dataset_card
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
    (out / CARD).write_text(dataset_card(NAMES, "# a test set"))              # what synthesis writes last
    (out / "manifest.json").write_text("{}")                                  # not a data file
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
