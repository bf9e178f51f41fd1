"""The report writes an HTML page whose figures exist, are non-empty PNGs, and are all referenced."""
import json
import re

import numpy as np
import pyarrow as pa

from engine.config import load_config
from engine.data import load_dataset
from engine.data.shards import SHARD_SCHEMA, SyntheticSet, encode_table, part_name
from engine.report import ReportInputs, ResultRow, StageTiming, write_report
from engine.storage import Storage, join


def make_set(uri: str, storage: Storage, ds) -> SyntheticSet:
    """A synthetic set written through the shard contract (real digits stand in for outputs)."""
    train = ds.train
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        ref = int(rng.integers(train.num_rows))
        rows.append({
            "index": i, "image": train.column("image")[int(rng.integers(train.num_rows))].as_py(),
            "strategy": "diff-mix", "ref_id": train.column("id")[ref].as_py(),
            "ref_label": int(train.column("label")[ref].as_py()), "target_label": i % 3,
            "strength": [0.5, 0.7, 0.9][(i // 2) % 3], "seed": i, "prompt": "photo of a x digit",
            "clip_score": float(rng.random()),
        })
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)
    storage.write_bytes(join(uri, part_name(0, 30)), encode_table(table))
    scores = table.column("clip_score").to_numpy()
    manifest = {"class_names": ds.class_names, "num_train": ds.train.num_rows, "filter_quantile": 0.1,
                "clip_threshold": float(np.quantile(scores, 0.1)), "files": [{"name": part_name(0, 30), "rows": 30}]}
    storage.write_text(join(uri, "manifest.json"), json.dumps(manifest))
    return SyntheticSet.open(uri, storage)


def test_report_files_exist_and_are_referenced(tmp_path):
    storage = Storage()
    ds = load_dataset(load_config(None, ["dataset.subset.kind=few_shot", "dataset.subset.shots=10"]))
    sset = make_set(str(tmp_path / "syn"), storage, ds)
    inputs = ReportInputs(
        title="demo", class_names=ds.class_names,
        real_images=dict(zip(ds.train.column("id").to_pylist(), ds.train.column("image").to_pylist())),
        grid_set=sset, score_set=sset,
        results=[ResultRow("real only", "-", 0.0, None, [0.5, 0.52], groups={"counterfactual": [0.4, 0.44]}),
                 ResultRow("diff-mix", "diff-mix", 0.1, 0.5, [0.6], groups={"counterfactual": [0.55]})],
        translation={"diff-mix": [{"strength": 0.5, "images": 10, "background_distance": 0.0412,
                                   "background_kept": 0.9, "background_of_target": 0.05, "target_recognised": 0.3, "reference_recognised": 0.6}]},
        timings=[StageTiming("synthesis", 30, "images", 3.0)], verdict="reads as expected",
        set_metrics={"diff-mix": {"images": {"synthetic": 27, "real": 100}, "clip_frechet": 0.01234,
                                  "diversity": 0.311, "real_diversity": 0.402}},
    )
    page = write_report(inputs, str(tmp_path / "report"), storage)
    text = open(page).read()
    figures = re.findall(r"src='([^']+)'", text)
    assert set(figures) == {"grid.png", "results.png", "clip_hist.png", "filtered.png"}
    for name in figures:
        data = (tmp_path / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert "0.510 ± 0.014" in text and "10.00 images/s" in text and "reads as expected" in text
    assert "CLIP Fréchet distance" in text and "<td>0.01234</td>" in text and "0.311 (0.402)" in text
    assert "counterfactual (mean ± std)" in text and "0.420 ± 0.028" in text  # the per-group column
    assert "<td>0.041</td><td>90%</td><td>5%</td><td>30%</td><td>60%</td>" in text     # the translation measures


def test_accuracy_axis_fits_the_data_so_differences_show():
    from engine.report import accuracy_axis

    rows = [ResultRow("real-only", "-", 0.0, None, [0.855, 0.875, 0.883]),
            ResultRow("diff-mix", "diff-mix", 0.3, 0.5, [0.864, 0.872, 0.880])]
    lo, hi = accuracy_axis(rows)
    assert 0.8 < lo < 0.855 and 0.89 < hi < 0.95                         # not 0..1
    assert all(lo <= v <= hi for r in rows for v in (*r.top1, r.mean - r.std, r.mean + r.std))
    assert accuracy_axis([ResultRow("x", "-", 0.0, None, [0.5])]) == (0.49, 0.51)  # one value: a small margin
