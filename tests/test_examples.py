"""Every shipped example config validates against the current schema."""
import glob
import os

import pytest

from engine.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.yaml")))


def test_examples_cover_the_paper_settings():
    names = {os.path.basename(p)[:-5] for p in EXAMPLES}
    for ds in ("cub", "aircraft", "flowers", "cars", "dogs"):
        assert {ds, f"{ds}_vit"} <= names
    assert {"cub_1shot", "cub_5shot", "cub_10shot", "waterbirds", "sweep_cub", "demo"} <= names
    assert {f"{ds}_lt_if{i}" for ds in ("cub", "flowers") for i in (100, 50, 10)} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: os.path.basename(p))
def test_example_validates(path):
    cfg = load_config(path)
    assert cfg.run.name
    if cfg.dataset.source == "builtin":  # demo.yaml, pretrain_digits.yaml: runnable as they are
        assert cfg.model.base in ("builtin-digits", "tiny") or cfg.pretrain.output
    else:
        assert cfg.dataset.uri and "YOUR-BUCKET" in cfg.dataset.uri  # a placeholder to fill in
        assert cfg.classify.backbone in ("resnet50", "vit_b_16")
        assert cfg.classify.resolution == (448 if cfg.classify.backbone == "resnet50" else 384)
