"""Synthetic-set metrics: the streamed Fréchet distance and diversity equal a direct numpy/scipy computation,
identical sets are ~0 apart, and the Ray job measures a set (CLIP, Inception with local weights) as the
feature model does in-process."""
import json
import os

import numpy as np
import pytest
import torch
from scipy import linalg

from engine.cli import resolve_stage
from engine.config import load_config
from engine.data import load_dataset
from engine.data.shards import SyntheticSet
from engine.storage import Storage
from engine.synthesis.set_metrics import (
    MetricsError,
    Moments,
    SetFeatures,
    SetMoments,
    check_weights,
    compare,
    decode_rgb,
    frechet_distance,
    measure_set,
)
from engine.synthesis.translate import ModelRef
from engine.testing.synthetic import write_synthetic_set


def direct_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The FID formula straight from the two feature matrices."""
    mu1, mu2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * np.real(linalg.sqrtm(c1 @ c2))))


def streamed(features: np.ndarray, labels: np.ndarray, num_classes: int, chunk: int = 17) -> Moments:
    m = Moments(features.shape[1], num_classes)
    for lo in range(0, len(features), chunk):
        m.add(features[lo:lo + chunk], labels[lo:lo + chunk])
    return m


def test_streamed_frechet_distance_equals_the_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(200, 6)) @ rng.normal(size=(6, 6))
    la, lb = rng.integers(0, 3, 300), rng.integers(0, 3, 200)
    ma, mb = streamed(a, la, 3), streamed(b, lb, 3)
    assert ma.cov() == pytest.approx(np.cov(a, rowvar=False))
    assert frechet_distance(ma.mean(), ma.cov(), mb.mean(), mb.cov()) == pytest.approx(direct_fd(a, b), rel=1e-9)
    assert frechet_distance(ma.mean(), ma.cov(), ma.mean(), ma.cov()) == pytest.approx(0.0, abs=1e-8)
    # two diagonal Gaussians: |mu1 - mu2|^2 + sum (s1 - s2)^2
    mu, s1, s2 = np.array([1.0, -2.0]), np.array([1.0, 4.0]), np.array([9.0, 1.0])
    assert frechet_distance(mu, np.diag(s1), 0 * mu, np.diag(s2)) == pytest.approx(
        5.0 + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum())


def test_diversity_is_the_mean_pairwise_cosine_distance():
    rng = np.random.default_rng(1)
    x, labels = rng.normal(size=(40, 5)), np.repeat([0, 1, 2], [20, 19, 1])
    got = streamed(x, labels, 4).diversity()
    for c in (0, 1):
        u = x[labels == c] / np.linalg.norm(x[labels == c], axis=1, keepdims=True)
        sims = u @ u.T
        n = len(u)
        assert got[c] == pytest.approx(1 - (sims.sum() - n) / (n * (n - 1)))
    assert np.isnan(got[2]) and np.isnan(got[3])                           # one image / none: no pairs
    same = streamed(np.tile(x[:1], (5, 1)), np.zeros(5, np.int64), 1).diversity()
    assert same[0] == pytest.approx(0.0, abs=1e-12)                        # identical images: no diversity


def test_compare_sets_measures_a_set_as_the_model_does_in_process(ray_session, tiny_cache, tmp_path):
    """`diffmix compare-sets` over one set listed twice: one Ray job measures the set and the real images, the
    second reuses the real sums; both rows agree bit for bit and with the features computed here directly."""
    storage = Storage()
    uri = str(tmp_path / "syn")
    config = load_config(None, [f"run.output={tmp_path}", f"model.cache_dir={tiny_cache}", "model.resolution=32",
                                "metrics.batch_size=16", f"metrics.sets=[{uri}, {uri}]"])
    digits = load_dataset(config)
    images, labels = digits.train.column("image").to_pylist(), digits.train.column("label").to_pylist()
    write_synthetic_set(uri, storage, digits.class_names, images, labels, num_rows=120, rows_per_file=32,
                        clip_threshold=0.25)
    summary = resolve_stage("compare-sets")(config)
    first, second = summary["sets"]
    assert first["clip_frechet"] == second["clip_frechet"] and first["diversity"] == second["diversity"]
    assert os.path.exists(summary["output"]) and json.load(open(summary["output"]))[0]["set"] == uri
    sset = SyntheticSet.open(uri, storage)
    assert sset.manifest["set_metrics"]["clip_frechet"] == first["clip_frechet"]   # written into the manifest

    # the same features computed here, one call each, and the formula applied directly
    clip = ModelRef.from_config(config, "clip", digits.class_names, digits.metaclass)
    model = SetFeatures(clip, storage, None, batch_size=16)
    kept = sset.read(with_images=True)                                     # the rows the CLIP filter keeps
    assert first["images"] == {"synthetic": kept.num_rows, "real": len(images)} and kept.num_rows < 120
    syn = model.clip_features(decode_rgb(kept.column("image").to_pylist()))
    ref = model.clip_features(decode_rgb(images))
    assert first["clip_frechet"] == pytest.approx(direct_fd(syn, ref), rel=1e-4, abs=1e-6)
    assert 0 <= first["diversity"] <= 2 and first["real_diversity"] is not None
    real = streamed(ref, np.asarray(labels), len(digits.class_names))
    assert compare(SetMoments(real), SetMoments(real), digits.class_names)["clip_frechet"] == pytest.approx(0, abs=1e-6)


def test_inception_fid_from_local_weights(ray_session, tiny_cache, tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    weights = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    config = load_config(None, [f"run.output={tmp_path}", f"model.cache_dir={tiny_cache}", "model.resolution=32",
                                f"metrics.inception_weights={weights}"])
    storage = Storage()
    digits = load_dataset(config, apply_subset=True)
    few = digits.train.slice(0, 10)
    uri = str(tmp_path / "syn")
    write_synthetic_set(uri, storage, digits.class_names, few.column("image").to_pylist(),
                        few.column("label").to_pylist(), num_rows=10, rows_per_file=5)
    clip = ModelRef.from_config(config, "clip", digits.class_names, digits.metaclass)
    figures, _ = measure_set(config, SyntheticSet.open(uri, storage), few, clip, storage)
    assert np.isfinite(figures["inception_fid"]) and figures["inception_fid"] >= 0
    assert figures["inception_weights"] == str(weights)
    missing = load_config(None, [f"run.output={tmp_path}", f"metrics.inception_weights={tmp_path / 'nope.pth'}"])
    with pytest.raises(MetricsError, match="metrics.inception_weights: .*nope.pth does not exist"):
        check_weights(missing, storage)
