"""The built-in scene miniature: deterministic, correlated in train as configured, independent in test, grouped."""
from collections import Counter

import numpy as np
import pytest

from engine.config import ConfigError, load_config
from engine.data import decode, load_dataset
from engine.data import scenes


def _load(*overrides, subset=False):
    config = load_config(None, ["dataset.source=builtin", "dataset.builtin=scenes", *overrides])
    return load_dataset(config, apply_subset=subset)


@pytest.fixture(scope="module")
def default():
    return _load()


def test_same_seed_same_bytes_other_seed_other_backgrounds(default):
    again = _load()
    assert default.fingerprint() == again.fingerprint()
    assert default.train.column("image").to_pylist()[:20] == again.train.column("image").to_pylist()[:20]
    other = _load("dataset.scenes.seed=1")
    assert other.train.column("image").to_pylist()[:20] != default.train.column("image").to_pylist()[:20]
    # the digits' own split: the same scans in train and test as the plain built-in dataset
    digits = load_dataset(load_config(None, ["dataset.source=builtin"]), apply_subset=False)
    assert sorted(i.rsplit("-bg", 1)[0] for i in default.train.column("id").to_pylist()) == \
        sorted(digits.train.column("id").to_pylist())


@pytest.mark.parametrize("aligned", [0.9, 0.5, 0.1])
def test_train_split_holds_the_configured_share_on_each_class_s_own_family(aligned):
    ds = default_ds = _load(f"dataset.scenes.aligned={aligned}")
    labels = np.asarray(ds.train.column("label").to_pylist())
    groups = np.asarray(ds.train.column("group").to_pylist())
    assert np.array_equal(groups // scenes.FAMILIES, labels)
    for c in range(10):
        own = np.mean([scenes.is_aligned(g) for g in groups[labels == c]])
        assert own == pytest.approx(aligned, abs=0.6 / (labels == c).sum() + 1e-9)
        others = Counter((groups[labels == c] % scenes.FAMILIES).tolist())
        del others[scenes.family_of_class(c)]
        if aligned < 1:  # the rest spread over the other nine families
            assert len(others) >= min(9, int((1 - aligned) * (labels == c).sum()) // 3)
    assert default_ds.metaclass == "digit" and default_ds.name == "scenes"


def test_test_split_is_independent_of_the_class_every_digit_on_every_family(default):
    labels = np.asarray(default.test.column("label").to_pylist())
    groups = np.asarray(default.test.column("group").to_pylist())
    families = groups % scenes.FAMILIES
    counts = Counter(zip(labels.tolist(), families.tolist()))
    for c in range(10):
        per_family = [counts[(c, f)] for f in range(scenes.FAMILIES)]
        assert len(set(per_family)) == 1 and per_family[0] > 0  # same digits on each family
    assert np.mean([scenes.is_aligned(g) for g in groups]) == pytest.approx(1 / scenes.FAMILIES)
    assert len(set(groups.tolist())) == 10 * scenes.FAMILIES


def test_digit_and_background_both_legible(default):
    """The digit is near-white on a background that keeps a dark channel: the foreground mask finds it."""
    img = np.asarray(decode(default.train.column("image")[0].as_py()), np.float32) / 255
    assert img.shape == (32, 32, 3)
    mask = scenes.foreground_mask(img)
    assert 0.03 < mask.mean() < 0.5
    assert img[~mask].min(axis=-1).mean() < 0.35 and img[~mask].std() > 0.01


def test_few_shot_subset_and_bad_keys():
    ds = _load("dataset.subset.kind=few_shot", "dataset.subset.shots=5", subset=True)
    assert ds.train.num_rows == 50 and set(ds.train.column("group").to_pylist()) <= set(range(100))
    with pytest.raises(ConfigError, match="dataset.scenes.aligned"):
        load_config(None, ["dataset.builtin=scenes", "dataset.scenes.aligned=1.5"])
    with pytest.raises(ConfigError, match="dataset.builtin"):
        load_config(None, ["dataset.builtin=sceens"])
