"""Soft labels (s**gamma mixes, one-hot for aug/gen rows), smoothing, the soft-target loss, CutMix/Mixup,
and the bad-input checks on p and gamma (config and function level)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.classify.augment import cutmix, mixup
from engine.classify.labels import check_gamma, one_hot, smooth, soft_cross_entropy, synthetic_targets
from engine.classify.mixing import check_p
from engine.config import ConfigError, load_config


def test_paper_check_values():
    for gamma, ref, target in ((0.5, 0.16, 0.84), (0.1, 0.04, 0.96)):
        y = synthetic_targets(["diff-mix"], [2], [5], [0.7], gamma, 10)[0]
        assert round(float(y[2]), 2) == ref and round(float(y[5]), 2) == target
        assert np.count_nonzero(y) == 2
    y = synthetic_targets(["real-mix"], [1], [3], [0.7], 0.5, 4)[0]  # real-mix follows the same rule
    assert round(float(y[1]), 2) == 0.16 and round(float(y[3]), 2) == 0.84


def test_gamma_zero_labels_every_mix_row_wholly_as_its_target():
    """Table 6's gamma = 0 row: s**0 = 1 at every strength, so a mix row's label is exactly its target's
    one-hot (the reference gets exactly 0), as aug/gen rows are; the config takes 0 in every gamma key."""
    strengths = [1e-6, 0.1, 0.5, 0.7, 0.9, 1.0]
    refs, targets = [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 5]
    for strategy in ("diff-mix", "real-mix"):
        y = synthetic_targets([strategy] * 6, refs, targets, strengths, 0.0, 6)
        assert np.array_equal(y, one_hot(targets, 6)), y
    # and it is the limit of small gammas, not a special case: gamma = 1e-9 differs by < 1e-6
    near = synthetic_targets(["diff-mix"] * 6, refs, targets, strengths, 1e-9, 6)
    np.testing.assert_allclose(near, one_hot(targets, 6), atol=1e-6)
    assert not np.array_equal(near[:1], one_hot(targets[:1], 6))  # s = 1e-6: 1e-9 * ln(1e-6) ~ -1.4e-8 off
    config = load_config(None, ["classify.gamma=0", "sweep.gamma=[0, 0.5]", "export.gamma=0"])
    assert (config.classify.gamma, config.sweep.gamma, config.export.gamma) == (0.0, [0.0, 0.5], 0.0)


def test_aug_and_gen_rows_are_one_hot():
    y = synthetic_targets(["diff-aug", "diff-gen", "real-aug", "real-gen"], [4, None, 4, None], [4, 7, 4, 7],
                          [0.5, 1.0, 0.9, 1.0], 0.5, 10)
    assert np.array_equal(y, one_hot([4, 7, 4, 7], 10))


def test_labels_sum_to_one_before_smoothing():
    rng = np.random.default_rng(0)
    n, c = 500, 7
    strategies = rng.choice(["diff-mix", "diff-aug", "diff-gen", "real-mix"], n).tolist()
    refs = [None if s.endswith("gen") else int(r) for s, r in zip(strategies, rng.integers(0, c, n))]
    for gamma in (0.1, 0.5, 1.0, 3.0):
        y = synthetic_targets(strategies, refs, rng.integers(0, c, n), rng.choice([0.5, 0.7, 0.9], n), gamma, c)
        np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-6)
        assert (y >= 0).all()
        smoothed = smooth(y, 0.1)
        np.testing.assert_allclose(smoothed.sum(axis=1), 1.0, atol=1e-6)
        assert smoothed.min() >= 0.1 / c - 1e-7


def test_soft_cross_entropy_matches_torch_for_hard_labels():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 5), torch.randint(0, 5, (16,))
    targets = torch.as_tensor(one_hot(labels.tolist(), 5))
    ours = soft_cross_entropy(logits, targets, 0.1)
    assert torch.allclose(ours, F.cross_entropy(logits, labels, label_smoothing=0.1), atol=1e-6)


def test_cutmix_and_mixup_keep_targets_normalised():
    rng = np.random.default_rng(0)
    x = torch.rand(8, 3, 16, 16)
    y = torch.as_tensor(synthetic_targets(["diff-mix"] * 8, list(range(8)), [1] * 8, [0.7] * 8, 0.5, 10))
    for fn in (cutmix, mixup):
        x2, y2 = fn(x, y, 1.0, rng)
        assert x2.shape == x.shape and torch.allclose(y2.sum(dim=1), torch.ones(8), atol=1e-6)


def test_bad_p_and_gamma():
    for bad in ("classify.p=1.5", "classify.p=-0.1"):
        with pytest.raises(ConfigError, match=r"classify\.p"):
            load_config(None, [bad])
    for bad in ("classify.gamma=-0.1", "classify.gamma=-1", "classify.gamma=nan"):
        with pytest.raises(ConfigError, match=r"classify\.gamma"):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match=r"sweep\.p"):
        load_config(None, ["sweep.p=[0.1, 2]"])
    with pytest.raises(ConfigError, match=r"sweep\.gamma"):
        load_config(None, ["sweep.gamma=[0.5, -0.1]"])
    with pytest.raises(ConfigError, match=r"export\.gamma"):
        load_config(None, ["export.gamma=-0.5"])
    with pytest.raises(ValueError, match="p must be in"):
        check_p(1.01)
    for bad_gamma in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="gamma must be >= 0"):
            check_gamma(bad_gamma)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        synthetic_targets(["diff-mix"], [0], [1], [0.5], -0.5, 2)
