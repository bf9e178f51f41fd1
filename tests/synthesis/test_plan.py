"""The plan is pure and seeded: counts, pairing rules, strength runs, prefixes, hashes; windows and the filter."""
from __future__ import annotations

import numpy as np
import pytest

from engine.config import ConfigError, load_config
from engine.synthesis.filter import clip_threshold, drop_count, kept_mask
from engine.synthesis.plan import (PlanError, PlanSpec, apportion, build_plan, reversed_distribution, row_seeds)
from engine.synthesis.windows import make_windows

C = 6
# An unbalanced train set: class c has 4 + 2c images (4..14), 54 images in all.
LABELS = np.concatenate([np.full(4 + 2 * c, c) for c in range(C)])
IDS = [f"img-{i:03d}" for i in range(len(LABELS))]
PROMPTS = [f"photo of a c{c} thing" for c in range(C)]


def plan(strategy="diff-mix", multiplier=3.0, seed=0, strengths=(0.5, 0.7, 0.9), run=4, **kw):
    spec = PlanSpec(strategy, tuple(strengths), multiplier, seed, run, **kw)
    return spec, build_plan(spec, IDS, LABELS, C, PROMPTS).to_pydict()


def chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("multiplier", [1, 2.5, 3, 0.5])
def test_row_count_is_multiplier_times_train(multiplier):
    _, rows = plan(multiplier=multiplier)
    assert len(rows["index"]) == round(multiplier * len(LABELS))
    assert rows["index"] == list(range(len(rows["index"])))


def test_diff_mix_references_are_uniform_over_the_train_set():
    _, rows = plan("diff-mix", multiplier=3)
    per_image = np.bincount([IDS.index(r) for r in rows["ref_id"]], minlength=len(IDS))
    assert (per_image == 3).all()  # every train image is a reference exactly m times
    per_class = np.bincount(rows["ref_label"], minlength=C)
    expected = np.bincount(LABELS, minlength=C) * 3.0
    assert chi_square(per_class, expected) < 11.07  # chi2(5 dof) at p = 0.05
    targets = np.bincount(rows["target_label"], minlength=C)
    assert chi_square(targets, np.full(C, len(rows["index"]) / C)) < 11.07  # targets uniform over classes
    # references and targets are paired independently: many cross-class pairs
    assert np.mean(np.array(rows["ref_label"]) != np.array(rows["target_label"])) > 0.5
    assert set(rows["prompt"]) == set(PROMPTS)
    assert all(p == PROMPTS[t] for p, t in zip(rows["prompt"], rows["target_label"]))


def test_diff_aug_reference_is_from_the_target_class():
    _, rows = plan("diff-aug", multiplier=2)
    assert rows["ref_label"] == rows["target_label"]
    per_image = np.bincount([IDS.index(r) for r in rows["ref_id"]], minlength=len(IDS))
    assert (per_image == 2).all()


@pytest.mark.parametrize("strategy", ["diff-gen", "real-gen"])
def test_gen_rows_have_no_reference_and_strength_one(strategy):
    _, rows = plan(strategy, multiplier=2)
    assert all(r is None for r in rows["ref_id"]) and all(r is None for r in rows["ref_label"])
    assert all(p is None for p in rows["ref_pos"]) and set(rows["strength"]) == {1.0}
    assert np.array_equal(np.bincount(rows["target_label"], minlength=C), 2 * np.bincount(LABELS, minlength=C))


def test_referable_class_limit_is_respected():
    _, rows = plan("diff-mix", multiplier=4, referable_classes=2)
    pairs: dict[int, set[int]] = {}
    for ref, target in zip(rows["ref_label"], rows["target_label"]):
        pairs.setdefault(target, set()).add(ref)
    assert set(pairs) == set(range(C))
    for target, refs in pairs.items():
        assert len(refs) <= 2 and target not in refs
    assert max(len(r) for r in pairs.values()) == 2


def test_long_tail_targets_favour_tail_classes():
    counts = np.bincount(LABELS, minlength=C)
    for strategy in ("diff-mix", "diff-aug", "real-gen"):
        _, rows = plan(strategy, multiplier=2, long_tail=True)
        targets = np.bincount(rows["target_label"], minlength=C)
        assert np.array_equal(targets, 2 * reversed_distribution(counts).astype(int)), strategy
        assert targets[0] > targets[-1]  # class 0 is the smallest (tail) class
    _, aug = plan("diff-aug", multiplier=2, long_tail=True)
    assert aug["ref_label"] == aug["target_label"]


def test_strengths_come_in_runs_and_balanced_groups():
    _, rows = plan(multiplier=3, run=4)
    s = np.array(rows["strength"])
    runs = s[: len(s) // 4 * 4].reshape(-1, 4)
    assert (runs == runs[:, :1]).all()  # each run of 4 rows shares one strength
    groups = runs[: len(runs) // 3 * 3, 0].reshape(-1, 3)
    assert all(sorted(g) == [0.5, 0.7, 0.9] for g in groups)  # each group of 3 runs uses each strength once
    assert len({tuple(g) for g in groups}) > 1  # in a seeded order, not a fixed cycle


def test_any_prefix_is_a_smaller_multiplier():
    _, big = plan(multiplier=3)
    n = len(LABELS)
    for m in (1, 2):
        _, small = plan(multiplier=m)
        assert {k: v[: m * n] for k, v in big.items()} == small
    per_image = np.bincount([IDS.index(r) for r in big["ref_id"][:n]], minlength=n)
    assert (per_image == 1).all()


def test_plan_is_deterministic_and_seeded():
    spec, a = plan(seed=7)
    _, b = plan(seed=7)
    _, c = plan(seed=8)
    assert a == b
    assert a["ref_id"] != c["ref_id"] and a["seed"] != c["seed"]
    assert len(set(a["seed"])) == len(a["seed"])
    assert np.array_equal(row_seeds(7, np.arange(5)), np.array(a["seed"][:5]))
    assert all(0 <= x < 2**63 for x in a["seed"])


def test_plan_hash_covers_what_changes_an_image():
    base = PlanSpec("diff-mix", (0.5, 0.7), 2.0, 0, 8, None, False, {"num_inference_steps": 25, "adapter": "a"})
    variants = [
        PlanSpec("diff-aug", (0.5, 0.7), 2.0, 0, 8, None, False, base.identity),
        PlanSpec("diff-mix", (0.5,), 2.0, 0, 8, None, False, base.identity),
        PlanSpec("diff-mix", (0.5, 0.7), 3.0, 0, 8, None, False, base.identity),
        PlanSpec("diff-mix", (0.5, 0.7), 2.0, 1, 8, None, False, base.identity),
        PlanSpec("diff-mix", (0.5, 0.7), 2.0, 0, 4, None, False, base.identity),
        PlanSpec("diff-mix", (0.5, 0.7), 2.0, 0, 8, 3, False, base.identity),
        PlanSpec("diff-mix", (0.5, 0.7), 2.0, 0, 8, None, True, base.identity),
        PlanSpec("diff-mix", (0.5, 0.7), 2.0, 0, 8, None, False, {"num_inference_steps": 20, "adapter": "a"}),
        PlanSpec("diff-mix", (0.5, 0.7), 2.0, 0, 8, None, False, {"num_inference_steps": 25, "adapter": "b"}),
    ]
    hashes = {v.hash() for v in variants}
    assert base.hash() not in hashes and len(hashes) == len(variants)
    same = PlanSpec("diff-mix", (0.5, 0.7), 2.0, 0, 8, None, False, dict(base.identity))
    assert same.hash() == base.hash()
    # *-gen ignores the strength set: it always runs s = 1
    assert (PlanSpec("real-gen", (0.5,), 1.0, 0).hash() == PlanSpec("real-gen", (0.9, 0.7), 1.0, 0).hash())


def test_skipped_references_are_never_drawn():
    spec = PlanSpec("diff-mix", (0.5,), 2.0, 0, 4)
    usable = np.ones(len(LABELS), dtype=bool)
    usable[[0, 5]] = False
    rows = build_plan(spec, IDS, LABELS, C, PROMPTS, usable).to_pydict()
    assert not {IDS[0], IDS[5]} & set(rows["ref_id"]) and len(rows["index"]) == 2 * len(LABELS)


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="diff-mixx"), "unknown strategy"),
    (dict(strengths=(0.0, 0.5)), "outside"),
    (dict(strengths=(1.2,)), "outside"),
    (dict(multiplier=0.0), "multiplier"),
    (dict(multiplier=-1.0), "multiplier"),
    (dict(multiplier=0.001), "rounds to 0 rows"),
])
def test_bad_plan_inputs_are_rejected(kwargs, match):
    with pytest.raises(PlanError, match=match):
        plan(**kwargs)


@pytest.mark.parametrize("override, key", [
    ("synthesis.strengths=[0, 0.5]", "synthesis.strengths"),
    ("synthesis.strengths=[1.5]", "synthesis.strengths"),
    ("synthesis.multiplier=0", "synthesis.multiplier"),
    ("synthesis.multiplier=-2", "synthesis.multiplier"),
    ("synthesis.strategy=diff-mixup", "synthesis.strategy"),
    ("synthesis.resolution=36", "synthesis.resolution"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_strength_with_zero_steps_is_rejected():
    with pytest.raises(ConfigError, match="int\\(T\\*s\\) = 0"):
        load_config(None, ["synthesis.num_inference_steps=4", "synthesis.strengths=[0.2]"])


def test_apportion_is_exact_and_proportional():
    assert apportion(10, np.array([1.0, 1.0, 1.0])).tolist() == [4, 3, 3]
    counts = apportion(54, np.array([4.0, 14.0]))
    assert counts.sum() == 54 and counts.tolist() == [12, 42]


def test_windows_align_to_files_and_skip_committed_rows():
    assert make_windows(range(10), 4) == [(0, 4), (4, 8), (8, 10)]
    assert make_windows([1, 2, 3, 4, 5, 9, 10, 11, 20], 4) == [(1, 4), (4, 6), (9, 12), (20, 21)]
    assert make_windows([], 4) == []


@pytest.mark.parametrize("n", [10, 37, 100, 101, 9])
def test_filter_drops_exactly_floor_of_q(n):
    scores = np.random.default_rng(n).random(n)
    threshold = clip_threshold(scores, 0.1)
    dropped = int((~kept_mask(scores, threshold)).sum())
    assert dropped == drop_count(n, 0.1) == int(np.floor(0.1 * n))
    if threshold is not None:
        assert scores[scores < threshold].max() < threshold <= scores[scores >= threshold].min()
    assert clip_threshold(scores, 0.0) is None
