"""Every shipped example config validates, and every value an example claims as the paper's is the paper's.

The table below is read off the paper (../shared/paper): change an example and this test says which
setting no longer matches which table.
"""
import glob
import os

import pytest

from engine.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(REPO, "examples", "*.yaml")))
DATASETS = ("cub", "aircraft", "flowers", "cars", "dogs")

# Table 7 (fine-tuning and sampling, every dataset) and Sec. 7.1 (the CLIP filter)
TABLE_7 = {"model.base": "runwayml/stable-diffusion-v1-5", "model.clip": "openai/clip-vit-base-patch32",
           "finetune.strategy": "ti+db", "finetune.lora_rank": 10, "finetune.steps": 35000, "finetune.batch_size": 8,
           "finetune.learning_rate": 5e-5, "finetune.resolution": 512, "synthesis.num_inference_steps": 25,
           "synthesis.guidance_scale": 7.5, "synthesis.sampler": "dpmsolver++", "synthesis.resolution": 512,
           "synthesis.filter_quantile": 0.1}
# Sec. 4.2 (conventional): 5x, s in {0.5, 0.7, 0.9}, p = 0.1, gamma = 0.5, label smoothing 0.1
SEC_4_2 = {"synthesis.strategy": "diff-mix", "synthesis.multiplier": 5, "synthesis.strengths": [0.5, 0.7, 0.9],
           "classify.p": 0.1, "classify.gamma": 0.5, "classify.label_smoothing": 0.1}
# Table 9 (CUB; the engine uses it for every dataset, with the official code's per-dataset learning rates)
TABLE_9_RESNET = {"classify.backbone": "resnet50", "classify.resolution": 448, "classify.batch_size": 64,
                  "classify.epochs": 128, "classify.momentum": 0.9, "classify.weight_decay": 5e-5}
TABLE_9_VIT = {"classify.backbone": "vit_b_16", "classify.resolution": 384, "classify.batch_size": 32,
               "classify.epochs": 100, "classify.momentum": 0.9, "classify.weight_decay": 5e-5}
# Sec. 4.1 + 7.4 (few-shot CUB): ResNet-50 @224, batch 256, lr 0.05, 5x, p by shots
FEW_SHOT = {"classify.backbone": "resnet50", "classify.resolution": 224, "classify.batch_size": 256,
            "classify.learning_rate": 0.05, "classify.epochs": 128, "classify.weight_decay": 5e-5,
            "synthesis.multiplier": 5, "classify.gamma": 0.5, "classify.label_smoothing": 0.1}
# Sec. 4.3 + 7.4 (long tail): s = 0.7 and gamma = 0.5 fixed, p = 0.5, targets reversed; buckets per dataset
LONG_TAIL = {"synthesis.strengths": [0.7], "classify.gamma": 0.5, "classify.p": 0.5, "synthesis.long_tail": True}

PAPER: dict[str, dict] = {}
for ds in DATASETS:
    PAPER[ds] = {**TABLE_7, **SEC_4_2, **TABLE_9_RESNET}
    PAPER[f"{ds}_vit"] = {**TABLE_7, **SEC_4_2, **TABLE_9_VIT}
PAPER["cub"]["classify.learning_rate"] = 0.02        # Table 9, ResNet50
PAPER["cub_vit"]["classify.learning_rate"] = 0.001   # Table 9, ViT-B/16
for shots, p in ((1, 0.5), (5, 0.3), (10, 0.2)):      # Sec. 4.1: p = 0.5 / 0.3 / 0.2 for 1 / 5 / 10 shots
    PAPER[f"cub_{shots}shot"] = {**TABLE_7, **FEW_SHOT, "classify.p": p, "dataset.subset.shots": shots}
for ds, many, few in (("cub", 20, 5), ("flowers", 30, 10)):  # Sec. 7.4: many > 20/30, few < 5/10 (CUB-LT/Flower-LT)
    for factor in (100, 50, 10):
        PAPER[f"{ds}_lt_if{factor}"] = {**TABLE_7, **LONG_TAIL, "dataset.subset.imbalance_factor": factor,
                                        "classify.many_shot_threshold": many, "classify.few_shot_threshold": few}
PAPER["waterbirds"] = {**PAPER["cub"], "evaluate.split": "test"}  # Sec. 4.4: the CUB classifier on Waterbirds


def value(config, dotted):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_examples_cover_the_paper_settings():
    names = {os.path.basename(p)[:-5] for p in EXAMPLES}
    assert set(PAPER) <= names
    assert {"sweep_cub", "demo", "pretrain_digits"} <= names


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_values_are_the_papers(name):
    config = load_config(os.path.join(REPO, "examples", f"{name}.yaml"))
    wrong = {key: (value(config, key), want) for key, want in PAPER[name].items() if value(config, key) != want}
    assert not wrong, f"examples/{name}.yaml differs from the paper (have, paper): {wrong}"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: os.path.basename(p))
def test_example_validates(path):
    cfg = load_config(path)
    assert cfg.run.name
    if cfg.dataset.source == "builtin":  # demo.yaml, pretrain_digits.yaml: runnable as they are
        assert cfg.model.base in ("builtin-digits", "tiny") or cfg.pretrain.output
    else:
        assert cfg.dataset.uri and "YOUR-BUCKET" in cfg.dataset.uri  # a placeholder to fill in
        assert cfg.classify.backbone in ("resnet50", "vit_b_16")


# Each baseline of the paper's tables as a preset over examples/cub.yaml (Sec. 4.2, 4.3, 7.4; Table 11)
BASELINES = {
    "real-filtering": {"synthesis.strategy": "real-gen", "synthesis.filter_quantile": 0.1, "classify.filtered": True},
    "real-generation": {"synthesis.strategy": "real-gen", "classify.filtered": False},
    "real-guidance": {"synthesis.strategy": "real-aug", "synthesis.strengths": [0.1], "classify.filtered": False},
    "da-fusion": {"finetune.strategy": "ti", "synthesis.strategy": "diff-aug",
                  "synthesis.strengths": [0.25, 0.5, 0.75, 1.0], "classify.filtered": False},
    "cutmix": {"classify.p": 0.0, "classify.cutmix_prob": 0.1, "classify.cutmix_alpha": 1.0,
               "classify.weight_decay": 1e-5, "classify.mixup_prob": 0.0},
    "mixup": {"classify.p": 0.0, "classify.mixup_prob": 0.3, "classify.mixup_alpha": 1.0,
              "classify.weight_decay": 1e-5, "classify.cutmix_prob": 0.0},
    "diff-mix+cutmix": {"synthesis.strategy": "diff-mix", "classify.p": 0.1, "classify.cutmix_prob": 0.1,
                        "classify.weight_decay": 5e-5},
    "cmo": {"classify.p": 0.0, "classify.cmo_prob": 0.5, "classify.cmo_alpha": 1.0,
            "classify.cmo_weight_power": 1.0, "classify.drw_from": None},
    "cmo+drw": {"classify.p": 0.0, "classify.cmo_prob": 0.5, "classify.drw_from": 0.8, "classify.drw_beta": 0.9999},
}


@pytest.mark.parametrize("preset", sorted(BASELINES))
def test_baseline_presets_reproduce_the_papers_rows(preset):
    example = "cub_lt_if100" if preset.startswith("cmo") else "cub"
    config = load_config(os.path.join(REPO, "examples", f"{example}.yaml"), [f"preset={preset}"])
    wrong = {key: (value(config, key), want) for key, want in BASELINES[preset].items() if value(config, key) != want}
    assert not wrong, f"preset {preset} over examples/{example}.yaml (have, paper): {wrong}"
    assert config.preset == preset and config.classify.backbone == "resnet50"  # the example's own settings stay


def test_every_preset_is_covered_and_listed():
    from engine.presets import PRESETS, run

    assert set(BASELINES) | {"diff-mix", "real-only"} == set(PRESETS)
    listed = run()
    assert all(listed[name]["source"] for name in PRESETS)
