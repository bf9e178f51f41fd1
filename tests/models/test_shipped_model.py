"""The demo's base model: shipped in the package, loaded by stock diffusers, and it draws the prompted digit."""
from __future__ import annotations

import pytest

from engine.config import load_config
from engine.data import load_dataset
from engine.models import ModelError, resolve_model
from engine.models import base as model_base
from engine.models.quality import check_generation


def test_builtin_digits_draws_the_prompted_class(tmp_path):
    """A fast version of `diffmix pretrain`'s check: 3 samples per class, 10 DPM-Solver steps, fixed seed."""
    folder = resolve_model("builtin-digits", str(tmp_path))
    assert folder == model_base.SHIPPED_MODELS["builtin-digits"][0]
    ds = load_dataset(load_config(None, ["dataset.source=builtin", "dataset.image_size=32"]))
    check = check_generation(folder, ds.train, ds.class_names, ds.metaclass, per_class=3, steps=10, guidance=3.0,
                             seed=0, resolution=32, device="cpu")
    assert check.samples == 30 and check.chance == pytest.approx(0.1)
    assert check.accuracy >= 0.5, f"real-data classifier agreed on {check.accuracy:.0%} (per class {check.per_class})"


def test_missing_shipped_model_names_the_recipe(tmp_path, monkeypatch):
    monkeypatch.setitem(model_base.SHIPPED_MODELS, "builtin-digits", (str(tmp_path / "gone"), "diffmix pretrain --x"))
    with pytest.raises(ModelError, match="diffmix pretrain --x"):
        resolve_model("builtin-digits", str(tmp_path))
