"""CMO and DRW (the paper's long-tail baselines, Tables 2-3): the minority sampler draws each class about
equally often, the epoch windows are the CMO code's, the class-balanced weights are Cao et al.'s, the
weighted loss is torch's weighted cross-entropy on hard labels, and a `cmo+drw` run uses both."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.classify.augment import cutmix
from engine.classify.rebalance import (
    cmo_active,
    drw_active,
    drw_weights,
    minority_plan,
    minority_weights,
    weighted_soft_cross_entropy,
)
from engine.classify.train import fit, prepare_inputs
from engine.config import load_config
from engine.data import load_dataset


def test_minority_sampler_draws_classes_evenly_and_is_seeded():
    counts = np.array([90, 9, 1])
    labels = np.repeat(np.arange(3), counts)
    weights = minority_weights(labels, counts, power=1.0)
    assert weights.sum() == pytest.approx(1.0)
    assert [weights[labels == k].sum() for k in range(3)] == pytest.approx([1 / 3] * 3)  # 1/n_k per row
    draws = np.concatenate([labels[minority_plan(labels, counts, 1.0, seed=0, epoch=e).order] for e in range(1, 61)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    assert freq == pytest.approx([1 / 3] * 3, abs=0.03)                  # 6000 draws: sd ~0.006
    uniform = labels[minority_plan(labels, counts, 0.0, seed=0, epoch=1).order]  # power 0: instance-balanced
    assert np.bincount(uniform, minlength=3)[0] > 70
    a, b = minority_plan(labels, counts, 1.0, 7, 3), minority_plan(labels, counts, 1.0, 7, 3)
    assert np.array_equal(a.order, b.order) and (a.source == -1).all()
    assert not np.array_equal(a.order, minority_plan(labels, counts, 1.0, 7, 4).order)


def test_epoch_windows_follow_the_cmo_code():
    # CMO: `start_data_aug (3) < epoch < epochs - end_data_aug (3)` on epochs from 0; ours count from 1
    active = [e for e in range(1, 201) if cmo_active(e, 200, 3, 3)]
    assert active[0] == 5 and active[-1] == 197 and len(active) == 193
    # DRW: `idx = epoch // 160` on epochs from 0: the last 40 of 200
    weighted = [e for e in range(1, 201) if drw_active(e, 200, 0.8)]
    assert weighted[0] == 161 and len(weighted) == 40
    assert not any(drw_active(e, 200, None) for e in range(1, 201))


def test_class_balanced_weights():
    counts = np.array([500, 50, 5, 1])
    beta = 0.9999
    w = drw_weights(counts, beta)
    raw = np.array([(1 - beta) / (1 - beta ** n) for n in counts])
    assert w == pytest.approx(raw / raw.sum() * 4)
    assert w.sum() == pytest.approx(4) and (np.diff(w) > 0).all()        # rarer classes weigh more
    assert drw_weights(counts, 0.0) == pytest.approx(np.ones(4))         # beta 0: no re-weighting


def test_weighted_loss_is_torch_weighted_cross_entropy_on_hard_labels():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(16, 5, generator=g), torch.randint(0, 5, (16,), generator=g)
    w = torch.tensor([0.2, 0.5, 1.0, 1.5, 1.8])
    ours = weighted_soft_cross_entropy(logits, F.one_hot(labels, 5).float(), w, 0.0)
    assert float(ours) == pytest.approx(float(F.cross_entropy(logits, labels, weight=w)), rel=1e-6)
    # equal weights: the plain soft-target cross-entropy (with smoothing)
    from engine.classify.labels import soft_cross_entropy

    soft = torch.softmax(torch.randn(16, 5, generator=g), dim=-1)
    assert float(weighted_soft_cross_entropy(logits, soft, torch.ones(5), 0.1)) == pytest.approx(
        float(soft_cross_entropy(logits, soft, 0.1)), rel=1e-6)


def test_cutmix_from_a_second_batch_pastes_its_box_and_mixes_by_area():
    x, x2 = torch.zeros(4, 3, 16, 16), torch.ones(4, 3, 16, 16)
    y, y2 = F.one_hot(torch.zeros(4, dtype=torch.long), 3).float(), F.one_hot(torch.full((4,), 2), 3).float()
    out, target = cutmix(x, y, 1.0, np.random.default_rng(3), source=(x2, y2))
    pasted = out[:, 0].mean(dim=(1, 2))                                   # the fraction of pixels from x2
    assert torch.allclose(target[:, 2], pasted) and torch.allclose(target[:, 0], 1 - pasted)
    assert 0 < float(pasted[0]) < 1 and torch.allclose(target.sum(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match="does not match"):
        cutmix(x, y, 1.0, np.random.default_rng(3), source=(x2[:2], y2[:2]))


def test_cmo_drw_preset_run(ray_session, tmp_path):
    """The `cmo+drw` preset on a long-tail miniature: CMO pastes in its window, DRW weighs the last epochs, and
    the run reports accuracy per many/medium/few-shot bucket."""
    config = load_config(None, [
        f"run.output={tmp_path}", "preset=cmo+drw", "classify.backbone=small_cnn", "classify.resolution=32",
        "classify.batch_size=32", "classify.cpus_per_worker=0.5", "classify.epochs=3", "classify.eval_every=3",
        "classify.cmo_start_after=0", "classify.cmo_end_before=1", "classify.drw_from=0.5",
        "classify.rows_per_task=256", "dataset.subset.kind=long_tail", "dataset.subset.imbalance_factor=10",
        "classify.many_shot_threshold=60", "classify.few_shot_threshold=20"])
    assert config.classify.cmo_prob == 0.5 and config.classify.p == 0 and config.preset == "cmo+drw"
    inputs = prepare_inputs(config, load_dataset(config))
    assert sorted(set(inputs.train_labels)) == list(range(10)) and len(inputs.train_labels) == inputs.num_train
    summary = fit(config, inputs, output=str(tmp_path / "cmo"))
    history = {m["epoch"]: m for m in summary["history"]}
    assert history[1]["cmo_batches"] == 0 and history[3]["cmo_batches"] == 0    # outside 0 < e < 3 - 1
    assert history[2]["cmo_batches"] > 0                                       # p 0.5 over 2 batches, seeded
    assert [history[e]["drw"] for e in (1, 2, 3)] == [False, True, True]
    assert summary["metrics"]["top1"] > 0.1
    assert {"acc_many", "acc_medium", "acc_few"} <= set(summary["metrics"])  # the long-tail buckets, from the run
