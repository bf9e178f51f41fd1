"""The shipped scene scorer (`model.clip: builtin-scenes-clip`): the demo's CLIP filter separates legible digits
from bare backgrounds and failed drawings, through the engine's own scoring path; it is rebuilt deterministically."""
import hashlib

import numpy as np

from engine.config import load_config
from engine.data import load_dataset
from engine.data import scenes
from engine.data.builtin import digit_scans
from engine.models.base import ModelRef
from engine.storage import Storage
from engine.synthesis.score import load_scorer


def test_scores_digits_high_and_backgrounds_and_faded_digits_low():
    score = load_scorer(ModelRef("builtin-scenes-clip", "/nonexistent-cache", kind="clip"), Storage(), "digit")
    ds = load_dataset(load_config(None, ["dataset.builtin=scenes"]), apply_subset=False)
    test = ds.test.take(list(range(0, ds.test.num_rows, 36)))  # ~100 test scenes, every family
    from engine.translation_measures import pixels

    digits = np.stack([(pixels(b) * 255).astype(np.uint8) for b in test.column("image").to_pylist()])
    rng = np.random.default_rng(123)
    bare = np.stack([(scenes.background(f % 10, 32, rng) * 255).astype(np.uint8) for f in range(100)])
    scans, _ = digit_scans()
    faded = np.stack([np.asarray(scenes.compose(scans[i] * 0.15, scenes.layout(i % 10, 32, rng), 32, rng))
                      for i in range(100)])
    s_digits, s_bare, s_faded = (score(x, 50) for x in (digits, bare, faded))
    assert np.median(s_digits) > 0.9 and np.median(s_bare) < 0.1 and np.median(s_faded) < 0.5
    # the filter's use: the lowest-scored 10% of a mix of all three hold no legible digit
    all_scores = np.concatenate([s_digits, s_bare, s_faded])
    is_digit = np.r_[np.ones(len(s_digits)), np.zeros(len(s_bare) + len(s_faded))]
    lowest = np.argsort(all_scores)[: len(all_scores) // 10]
    assert is_digit[lowest].mean() <= 0.05


def test_training_is_deterministic(tmp_path):
    from engine.models.scene_clip import train

    digests = []
    for name in ("a", "b"):
        info = train(str(tmp_path / name), seed=0, steps=3, batch_size=8)
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
        assert info["steps"] == 3 and 0 <= info["held_out"]["digit_vs_none_accuracy"] <= 1
    assert digests[0] == digests[1]
