"""The per-epoch replacement plan and the Ray Data epoch stream it drives (local disk and S3 shards).

Synthetic sets are written straight through the shard contract (engine.testing.synthetic): copies of
real digit images with other labels, so these tests do not depend on the synthesis stage.
"""
import os

import numpy as np
import pytest

from dataclasses import replace

from engine.classify.mixing import (
    NO_SYNTHETIC,
    StreamSettings,
    SyntheticSelection,
    epoch_batches,
    epoch_dataset,
    epoch_plan,
    eval_dataset,
    open_selection,
    worker_share,
)
from engine.config import load_config
from engine.data.epochs import InlineEpoch, put_blocks
from engine.data import load_dataset, make_table
from engine.data.shards import ShardError, SyntheticSet, parse_part_name
from engine.storage import Storage
from engine.testing.s3server import S3_ACCESS_KEY, S3_SECRET_KEY
from engine.testing.synthetic import write_synthetic_set

SETTINGS = StreamSettings(num_classes=10, resolution=32, scale_min=0.6, hflip=False, gamma=0.5, rows_per_task=32)


@pytest.fixture(scope="module")
def digits():
    """The built-in digits, 10 per class in train (100 rows): enough rows, little decoding."""
    return load_dataset(load_config(None, ["dataset.subset.kind=few_shot", "dataset.subset.shots=10"]))


def write_set(uri, digits, storage=None, **kw):
    train = digits.train
    kw.setdefault("num_rows", 300)
    return write_synthetic_set(uri, storage or Storage(), digits.class_names, train.column("image").to_pylist(),
                               train.column("label").to_pylist(), rows_per_file=25, **kw)


def test_plan_fraction_matches_p_and_keeps_epoch_length():
    n, k, p, epochs = 1437, 500, 0.3, 300
    counts = []
    for epoch in range(1, epochs + 1):
        plan = epoch_plan(n, k, p, seed=7, epoch=epoch)
        assert len(plan.order) == n and sorted(plan.order.tolist()) == list(range(n))
        assert plan.source.max() < k
        counts.append(plan.num_synthetic)
    counts = np.asarray(counts)
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < 5 * sigma)                   # every epoch within 5 sigma
    assert abs(counts.mean() - n * p) < 5 * sigma / np.sqrt(epochs)     # and on average
    assert len(set(counts.tolist())) > 10                                # fresh draws every epoch
    again = epoch_plan(n, k, p, seed=7, epoch=3)
    assert np.array_equal(again.source, epoch_plan(n, k, p, seed=7, epoch=3).source)
    draws = np.concatenate([epoch_plan(n, k, p, 7, e).source for e in range(1, 50)])
    used = np.bincount(draws[draws >= 0], minlength=k)                   # uniform over the synthetic rows
    assert used.min() > 0 and used.max() < 3 * used.mean()
    assert epoch_plan(n, k, 0.0, 7, 1).num_synthetic == 0
    assert epoch_plan(n, k, 1.0, 7, 1).num_synthetic == n


def test_worker_shares_are_equal_and_cover_the_epoch():
    plan = epoch_plan(101, 40, 0.3, seed=0, epoch=1)
    shares = [worker_share(plan, 40, rank, 2) for rank in range(2)]
    assert [len(s) for s in shares] == [51, 51]                          # equal steps keep DDP in lockstep
    covered = np.concatenate([s.slots for s in shares])
    assert set(covered.tolist()) == set(range(101))
    one = worker_share(plan, 40, 0, 1)
    assert one.real_counts.sum() + one.synthetic_counts.sum() == 101
    assert one.synthetic_counts.sum() == plan.num_synthetic


def run_epoch(digits, selection, p, epoch=1, storage=None, batch_size=16, settings=SETTINGS):
    blocks = put_blocks(digits.train, 32)
    plan = epoch_plan(digits.train.num_rows, len(selection), p, seed=0, epoch=epoch)
    share = worker_share(plan, len(selection), 0, 1)
    ds = epoch_dataset(blocks, selection, share, storage or Storage(), settings, np.random.default_rng(epoch))
    batches = list(epoch_batches(share, ds, batch_size))
    return plan, share, batches


def test_epoch_stream_follows_the_plan(ray_session, tmp_path, digits):
    write_set(str(tmp_path / "syn"), digits, clip_threshold=0.2)
    selection = open_selection(str(tmp_path / "syn"), Storage(), digits.class_names, None, None, True, 0.4)
    assert 0 < len(selection) < 300                                      # the CLIP threshold filtered some
    plan, share, batches = run_epoch(digits, selection, 0.4)
    index = np.concatenate([b["index"].numpy() for b in batches])
    assert len(index) == digits.train.num_rows                           # epoch length = real set
    assert int((index != NO_SYNTHETIC).sum()) == plan.num_synthetic
    assert [(int((b["index"] == -1).sum()), int((b["index"] != -1).sum())) for b in batches] == share.batch_mix(16)
    drawn = index[index != NO_SYNTHETIC]
    expected = np.repeat(selection.index, share.synthetic_counts)
    assert sorted(drawn.tolist()) == sorted(expected.tolist())           # exactly the drawn rows, as often
    b = batches[0]
    assert b["x"].shape[1:] == (32, 32, 3) and b["x"].dtype.is_floating_point is False
    np.testing.assert_allclose(b["y"].sum(dim=1).numpy(), 1.0, atol=1e-6)


def test_stream_targets_are_s_to_the_gamma_from_each_shard_row(ray_session, tmp_path, digits):
    """The method's label, checked where training sees it: every synthetic row in the epoch stream carries
    s**gamma on its target class and 1 - s**gamma on its reference class, read from that row's own shard
    columns, for the configured gamma (a swapped side or a gamma that does not arrive fails here); at
    Table 6's gamma = 0 that is exactly the target's one-hot."""
    from dataclasses import replace

    import pyarrow as pa
    import pyarrow.parquet as pq

    write_set(str(tmp_path / "syn"), digits, strategy="diff-mix")
    shards = pa.concat_tables([pq.read_table(f, columns=["index", "ref_label", "target_label", "strength"])
                               for f in sorted((tmp_path / "syn").glob("part-*.parquet"))])
    row_of = {int(i): k for k, i in enumerate(shards.column("index").to_pylist())}
    selection = open_selection(str(tmp_path / "syn"), Storage(), digits.class_names, None, None, False, 0.5)
    for gamma in (0.0, 1.5):  # Table 6's hard-label row and a gamma above 1 (test_labels: the rest)
        _, _, batches = run_epoch(digits, selection, 0.5, settings=replace(SETTINGS, gamma=gamma))
        checked = 0
        for b in batches:
            for index, y in zip(b["index"].tolist(), b["y"].numpy()):
                if index == NO_SYNTHETIC:
                    continue
                k = row_of[index]
                s = shards.column("strength")[k].as_py()
                target, ref = shards.column("target_label")[k].as_py(), shards.column("ref_label")[k].as_py()
                if target == ref:  # a same-class pair: the whole label on that class
                    assert y[target] == pytest.approx(1.0, abs=1e-6)
                    continue
                assert y[target] == pytest.approx(s ** gamma, abs=1e-6)
                assert y[ref] == pytest.approx(1 - s ** gamma, abs=1e-6)
                if gamma == 0:
                    assert y[target] == 1.0 and y[ref] == 0.0 and s < 1  # exactly hard, at a strength below 1
                checked += 1
        assert checked > 20


def test_small_epochs_decoded_in_the_worker_hold_the_same_rows(ray_session, tmp_path, digits):
    """Below classify.inline_rows the epoch skips Ray Data; the rows, targets and batch mix are the same."""
    write_set(str(tmp_path / "syn"), digits)
    selection = open_selection(str(tmp_path / "syn"), Storage(), digits.class_names, None, None, True, 0.4)
    runs = {}
    for inline_rows in (0, digits.train.num_rows):
        settings = replace(SETTINGS, inline_rows=inline_rows)
        blocks = put_blocks(digits.train, 32)
        plan = epoch_plan(digits.train.num_rows, len(selection), 0.4, seed=0, epoch=3)
        share = worker_share(plan, len(selection), 0, 1)
        ds = epoch_dataset(blocks, selection, share, Storage(), settings, np.random.default_rng(3))
        assert isinstance(ds, InlineEpoch) == bool(inline_rows)
        batches = list(epoch_batches(share, ds, 16, seed=5))
        assert [(int((b["index"] == -1).sum()), int((b["index"] != -1).sum())) for b in batches] == share.batch_mix(16)
        rows = sorted((int(i), tuple(np.round(y, 5)), x.tobytes())
                      for b in batches for i, y, x in zip(b["index"].numpy(), b["y"].numpy(), b["x"].numpy()))
        runs[inline_rows] = rows
    assert runs[0] == runs[digits.train.num_rows]   # same rows, targets and augmented pixels
    labels = {}
    for inline_rows in (0, 40):
        ds = eval_dataset(put_blocks(digits.test.slice(0, 40), 16), 0, 1, [], 32, 0.875, inline_rows=inline_rows)
        assert isinstance(ds, InlineEpoch) == bool(inline_rows)
        labels[inline_rows] = sorted(int(v) for b in ds.iter_torch_batches(batch_size=8) for v in b["label"])
    assert labels[0] == labels[40] == sorted(digits.test.slice(0, 40).column("label").to_pylist())


def test_augmentations_follow_the_epoch_seed(ray_session, tmp_path, digits):
    """Crops and flips come from the epoch's generator (per-task seeds): the same seed gives the same batches,
    in the same order, through the Ray Data stream, in whatever order its tasks finish (so two trainings of
    one config see the same data; the epoch's dataset keeps input order itself, in this test process as in a
    Train worker); another seed gives other crops."""
    write_set(str(tmp_path / "syn"), digits)
    selection = open_selection(str(tmp_path / "syn"), Storage(), digits.class_names, None, None, True, 0.4)
    blocks = put_blocks(digits.train, 32)
    share = worker_share(epoch_plan(digits.train.num_rows, len(selection), 0.4, seed=0, epoch=1), len(selection), 0, 1)
    settings = replace(SETTINGS, hflip=True)

    def batches(seed: int) -> list[list[tuple[int, bytes, bytes]]]:
        ds = epoch_dataset(blocks, selection, share, Storage(), settings, np.random.default_rng(seed))
        assert not isinstance(ds, InlineEpoch)                            # several Ray Data tasks (32 rows each)
        return [[(int(i), x.tobytes(), y.tobytes()) for i, x, y in zip(b["index"].numpy(), b["x"].numpy(),
                                                                        b["y"].numpy())]
                for b in epoch_batches(share, ds, 16, seed=5)]

    first = batches(7)
    assert batches(7) == first                                        # batch for batch, row for row
    other = batches(8)
    assert sorted(r[0] for b in other for r in b) == sorted(r[0] for b in first for r in b)  # the same rows ...
    assert sorted(r[:2] for b in other for r in b) != sorted(r[:2] for b in first for r in b)  # ... cropped otherwise


def test_p_zero_reads_no_shard(ray_session, tmp_path, digits):
    uri = str(tmp_path / "syn")
    write_set(uri, digits)
    selection = open_selection(uri, Storage(), digits.class_names, None, None, True, 0.0)
    for f in SyntheticSet.open(uri).files():
        os.remove(f)                                                     # any shard read would now fail
    _, _, batches = run_epoch(digits, selection, 0.0)
    index = np.concatenate([b["index"].numpy() for b in batches])
    assert len(index) == digits.train.num_rows and (index == NO_SYNTHETIC).all()


def test_strength_and_multiplier_selection_read_only_selected_rows(ray_session, tmp_path, digits):
    uri = str(tmp_path / "syn")
    manifest = write_set(uri, digits, num_rows=300, strengths=(0.5, 0.7, 0.9))
    sset = SyntheticSet.open(uri)
    selection = SyntheticSelection.from_set(sset, strengths=[0.7], multiplier=1.5, filtered=False)
    meta = sset.read(filtered=False).to_pandas().set_index("index")
    limit = int(1.5 * manifest["num_train"])
    assert len(selection) > 0
    assert (meta.loc[selection.index, "strength"] == 0.7).all() and (selection.index < limit).all()
    assert len(selection) == int(((meta.index < limit) & (meta["strength"] == 0.7)).sum())
    # files past the multiplier prefix are never opened: remove them, then read every selected row
    for f in sset.files():
        start, _ = parse_part_name(f)
        if start >= limit:
            os.remove(f)
    _, share, batches = run_epoch(digits, selection, 1.0)
    index = np.concatenate([b["index"].numpy() for b in batches])
    assert len(index) == digits.train.num_rows and (index != NO_SYNTHETIC).all()
    assert set(index.tolist()) <= set(selection.index.tolist())
    assert set(index.tolist()) == set(selection.index[share.synthetic_counts > 0].tolist())


def test_shards_stream_from_s3(ray_session, s3_server, s3_bucket, digits):
    options = {"key": S3_ACCESS_KEY, "secret": S3_SECRET_KEY, **s3_server["storage_options"]}
    storage = Storage(options)
    uri = f"{s3_bucket}/syn"
    write_set(uri, digits, storage=storage, num_rows=120)
    selection = open_selection(uri, storage, digits.class_names, None, None, True, 0.5)
    plan, _, batches = run_epoch(digits, selection, 0.5, storage=storage)
    index = np.concatenate([b["index"].numpy() for b in batches])
    assert len(index) == digits.train.num_rows and int((index != NO_SYNTHETIC).sum()) == plan.num_synthetic


def test_eval_stream_maps_groups(ray_session, digits):
    test = digits.test.slice(0, 40)
    groups = [None if i % 5 == 0 else (7 if i % 2 else 3) for i in range(test.num_rows)]
    table = make_table(test.column("id").to_pylist(), test.column("image").to_pylist(),
                       test.column("label").to_pylist(), groups)
    ds = eval_dataset(put_blocks(table, 16), rank=0, world=1, group_ids=[3, 7], resolution=32, crop=0.875)
    rows = ds.take_all()
    assert len(rows) == 40
    got = sorted((int(r["label"]), int(r["group_pos"])) for r in rows)
    labels = table.column("label").to_pylist()
    want = sorted((int(lbl), -1 if g is None else [3, 7].index(g)) for lbl, g in zip(labels, groups))
    assert got == want
    half = eval_dataset(put_blocks(table, 16), rank=1, world=2, group_ids=[3, 7], resolution=32, crop=0.875)
    assert half.count() == 20


def test_bad_synthetic_inputs(tmp_path, digits):
    uri = str(tmp_path / "other")
    write_synthetic_set(uri, Storage(), [f"class{i}" for i in range(10)], digits.train.column("image").to_pylist()[:5],
                        [0, 1, 2, 3, 4], num_rows=10)
    with pytest.raises(ShardError) as err:
        open_selection(uri, Storage(), digits.class_names, None, None, True, 0.3)
    assert "class0" in str(err.value) and "zero" in str(err.value)       # the error names both class lists
    uri = str(tmp_path / "all-filtered")
    write_set(uri, digits, num_rows=50, clip_threshold=1.5)              # the filter drops every row
    with pytest.raises(ShardError, match="no rows left after selection"):
        open_selection(uri, Storage(), digits.class_names, None, None, True, 0.3)
    assert len(open_selection(uri, Storage(), digits.class_names, None, None, True, 0.0)) == 0  # p = 0: fine
    assert len(open_selection(uri, Storage(), digits.class_names, None, None, False, 0.3)) == 50
    with pytest.raises(ShardError, match=r"missing \.manifest\.json"):
        open_selection(str(tmp_path / "nowhere"), Storage(), digits.class_names, None, None, True, 0.3)
    with pytest.raises(ValueError, match="p must be in"):
        epoch_plan(10, 5, 1.2, 0, 1)
    with pytest.raises(ShardError, match="selection is empty"):
        epoch_plan(10, 0, 0.2, 0, 1)
