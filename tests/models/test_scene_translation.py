"""The mechanism Diff-Mix rests on, with the shipped scene model: an inter-class translation at a moderate
strength keeps the reference's background (far more than a drawing from text alone), and at a high strength
draws the target class. Judged by classifiers of real backgrounds and real digits (engine.translation_measures).
A strength applied wrongly (ignored, inverted, always 1) or a prompt that stops steering the digit fails here."""
import numpy as np
import pyarrow as pa
import pytest

from engine.config import load_config
from engine.data import load_dataset
from engine.models.base import ModelRef
from engine.storage import Storage
from engine.synthesis.plan import plain_prompts
from engine.synthesis.translate import TranslateParams, load_pipelines, translate_rows
from engine.translation_measures import Judges, measure, pixels

N = 40


@pytest.fixture(scope="module")
def scene():
    ds = load_dataset(load_config(None, ["dataset.builtin=scenes"]), apply_subset=False)
    return ds, Judges.fit(ds.train)


@pytest.fixture(scope="module")
def translations(scene):
    ds, _ = scene
    rng = np.random.default_rng(0)
    pick = rng.choice(ds.train.num_rows, N, replace=False)
    refs = [pixels(ds.train.column("image")[int(i)].as_py()) for i in pick]
    ref_labels = [int(ds.train.column("label")[int(i)].as_py()) for i in pick]
    families = [int(ds.train.column("group")[int(i)].as_py()) % 10 for i in pick]
    targets = [(y + 1 + int(rng.integers(9))) % 10 for y in ref_labels]  # always another class
    prompts = plain_prompts(ds.class_names, ds.metaclass)
    pipes = load_pipelines(ModelRef("builtin-scenes", "/nonexistent-cache"), Storage(), device="cpu")
    params = TranslateParams(num_inference_steps=25, guidance_scale=7.5, resolution=32, batch_size=N)
    ref_u8 = (np.stack(refs) * 255 + 0.5).astype(np.uint8)
    out = {}
    for s in (0.5, 0.9, 1.0):
        rows = pa.table({"strength": [s] * N, "seed": list(range(N)), "prompt": [prompts[t] for t in targets]})
        images = translate_rows(pipes, rows, None if s == 1.0 else ref_u8, params)
        out[s] = [im.astype(np.float32) / 255 for im in images]
    return refs, ref_labels, targets, families, out


def _measure(scene, translations, s):
    _, judges = scene
    refs, ref_labels, targets, families, out = translations
    (m,) = measure(out[s], refs, ref_labels, targets, families, [s] * N, judges)
    return m


def test_judges_see_the_real_test_split(scene):
    ds, judges = scene
    sample = ds.test.take(list(range(0, ds.test.num_rows, 7)))
    images = [pixels(b) for b in sample.column("image").to_pylist()]
    from engine.models.quality import thumbnails
    from engine.translation_measures import background_features
    from PIL import Image

    fg = judges.foreground.predict(thumbnails([Image.fromarray((i * 255).astype(np.uint8)) for i in images]))
    bg = judges.background.predict(background_features(images))
    assert np.mean(fg == np.asarray(sample.column("label").to_pylist())) > 0.95
    assert np.mean(bg == np.asarray(sample.column("group").to_pylist()) % 10) > 0.95


def test_moderate_strength_keeps_the_reference_background_far_more_than_text_alone(scene, translations):
    mix, gen = _measure(scene, translations, 0.5), _measure(scene, translations, 1.0)
    assert mix.background_kept >= 0.8, mix
    assert gen.background_kept <= 0.4, gen   # a text-only drawing matches a reference's family by chance
    assert mix.background_distance < 0.5 * gen.background_distance, (mix, gen)


def test_high_strength_draws_the_target_class(scene, translations):
    high = _measure(scene, translations, 0.9)
    assert high.target_recognised >= 0.6, high
    assert high.reference_recognised < high.target_recognised, high
    low = _measure(scene, translations, 0.5)
    assert high.target_recognised >= low.target_recognised, (low, high)
    # strength orders what survives: more of the background at 0.5 than at 0.9
    assert low.background_distance <= high.background_distance, (low, high)
