"""Personalizer without Ray: what each strategy trains, what stays bit-identical, checkpoint round trip."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.data.builtin import CLASS_NAMES, METACLASS
from engine.models import resolve_model
from engine.models.personalize import PersonalizeSpec, Personalizer

CLASSES = tuple(CLASS_NAMES[:4])


@pytest.fixture(scope="module")
def base(tiny_cache: Path) -> str:
    return resolve_model("tiny", str(tiny_cache), kind="sd", resolution=32, extra_words=[*CLASS_NAMES, METACLASS])


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8), torch.tensor([0, 1, 2, 3])


def _train(base: str, strategy: str, steps: int = 3) -> Personalizer:
    p = Personalizer(PersonalizeSpec(base, strategy, CLASSES, METACLASS, lora_rank=4, learning_rate=1e-2), "cpu")
    for s in range(steps):
        p.step(*_batch(s), p.generator(s))
    return p


def _base_unet_state(p: Personalizer) -> dict[str, torch.Tensor]:
    """UNet weights without LoRA layers, under their plain names (peft wraps targets as `.base_layer`)."""
    return {k.replace(".base_layer", ""): v for k, v in p.unet.state_dict().items() if "lora_" not in k}


@pytest.fixture(scope="module")
def fresh(base: str) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": UNet2DConditionModel.from_pretrained(base, subfolder="unet").state_dict(),
            "embeddings": CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
            .get_input_embeddings().weight.detach().clone()}


@pytest.mark.parametrize("strategy", ["ti", "db", "ti+db"])
def test_what_each_strategy_trains(base: str, fresh: dict, strategy: str):
    p = _train(base, strategy)
    vocab = fresh["embeddings"].shape[0]
    matrix = p.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(matrix[:vocab], fresh["embeddings"])  # non-placeholder rows are bit-identical
    unet = _base_unet_state(p)
    assert unet.keys() == fresh["unet"].keys()
    assert all(torch.equal(unet[k], fresh["unet"][k]) for k in unet)  # the base UNet never changes
    lora = [v for k, v in p.unet.state_dict().items() if "lora_B" in k]
    if "db" in strategy:
        assert lora and all(v.dtype == torch.float32 for v in lora) and any(v.abs().max() > 0 for v in lora)
    else:
        assert not lora
    if "ti" in strategy:
        assert matrix.shape[0] == vocab + len(CLASSES) and len(p.tokens) == len(CLASSES)
        init = matrix[vocab]  # the matrix keeps the metaclass init; the hook serves the trained rows
        assert all(not torch.equal(p.placeholders.weight[i], init) for i in range(len(CLASSES)))
        assert p.prompts[2] == "photo of a <two-2> digit"
    else:
        assert matrix.shape[0] == vocab and p.placeholders is None and p.prompts[2] == "photo of a two digit"


def test_train_state_round_trip_continues_identically(base: str):
    a = _train(base, "ti+db", steps=2)
    b = Personalizer(PersonalizeSpec(base, "ti+db", CLASSES, METACLASS, lora_rank=4, learning_rate=1e-2), "cpu")
    b.load_train_state(a.train_state())
    loss_a = a.step(*_batch(9), a.generator(9))
    loss_b = b.step(*_batch(9), b.generator(9))
    assert loss_a == loss_b
    assert torch.equal(a.placeholders.weight, b.placeholders.weight)


def test_spec_errors(base: str):
    from engine.models.adapters import AdapterError

    with pytest.raises(AdapterError, match="unknown fine-tuning strategy"):
        Personalizer(PersonalizeSpec(base, "full", CLASSES, METACLASS), "cpu")
    with pytest.raises(ValueError, match="mixed_precision"):
        Personalizer(PersonalizeSpec(base, "ti", CLASSES, METACLASS, mixed_precision="fp8"), "cpu")
