"""The adapter artifact: names, prompts, token setup, and stock-diffusers loading of what the engine writes."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.testing.adapter import write_random_adapter
import torch

from engine.data.builtin import CLASS_NAMES, METACLASS
from engine.models import load_img2img_pipeline, resolve_model
from engine.models.adapters import (ADAPTER_JSON, AdapterError, AdapterInfo, add_placeholder_tokens, class_prompts,
                                    embedding_relpath, fingerprint_folder, lora_config_dict, load_adapter,
                                    metaclass_embedding, placeholder_tokens, read_adapter_info, readable_name,
                                    write_adapter_info)

CLASSES = CLASS_NAMES[:3]


@pytest.fixture(scope="module")
def base(tiny_cache: Path) -> str:
    return resolve_model("tiny", str(tiny_cache), kind="sd", resolution=32, extra_words=[*CLASS_NAMES, METACLASS])


def test_tokens_and_prompts():
    tokens = placeholder_tokens(["Black_footed Albatross", "black footed albatross", "Ünïcode!"])
    assert tokens == ["<black_footed_albatross-0>", "<black_footed_albatross-1>", "<n_code-2>"]
    assert len(set(tokens)) == 3 and all(t == t.lower() for t in tokens)
    assert readable_name("001.Black_footed_Albatross") == "Black footed Albatross"
    assert class_prompts("ti+db", ["a", "b"], "bird") == ["photo of a <a-0> bird", "photo of a <b-1> bird"]
    assert class_prompts("ti", ["a"], "bird") == ["photo of a <a-0> bird"]
    assert class_prompts("db", ["Sooty_Albatross"], "bird") == ["photo of a Sooty Albatross bird"]
    with pytest.raises(AdapterError, match="unknown fine-tuning strategy 'lora'"):
        class_prompts("lora", ["a"], "bird")
    with pytest.raises(AdapterError, match="rank"):
        lora_config_dict(0)
    assert lora_config_dict(10)["lora_alpha"] == 10


def test_placeholder_tokens_start_from_the_metaclass(base: str):
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    before = encoder.get_input_embeddings().weight.detach().clone()
    tokens = placeholder_tokens(CLASSES)
    ids = add_placeholder_tokens(tokenizer, encoder, tokens, METACLASS)
    assert ids == list(range(before.shape[0], before.shape[0] + len(tokens)))
    after = encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[: before.shape[0]], before)
    init = metaclass_embedding(tokenizer, encoder, METACLASS)
    assert all(torch.equal(after[i], init) for i in ids)
    assert tokenizer("photo of a <zero-0> digit", add_special_tokens=False)["input_ids"][3] == ids[0]
    with pytest.raises(AdapterError, match="already in the tokenizer"):
        add_placeholder_tokens(tokenizer, encoder, tokens[:1], METACLASS)


def _fake_artifact(base: str, folder: Path, strategy: str = "ti+db") -> AdapterInfo:
    return write_random_adapter(base, str(folder), CLASSES, METACLASS, strategy)


def _sample(pipe, prompt: str, seed: int = 3) -> np.ndarray:
    image = torch.linspace(0, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)
    out = pipe(prompt=prompt, image=image, strength=0.8, num_inference_steps=4, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


def test_engine_loading_matches_stock_diffusers(base: str, tmp_path: Path):
    from diffusers import StableDiffusionImg2ImgPipeline

    info = _fake_artifact(base, tmp_path / "adapter")
    assert (tmp_path / "adapter" / embedding_relpath(0)).is_file()
    stock = StableDiffusionImg2ImgPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    stock_base = _sample(stock, info.prompts[1])
    stock.load_lora_weights(str(tmp_path / "adapter"), weight_name="pytorch_lora_weights.safetensors")
    stock.load_textual_inversion([str(tmp_path / "adapter" / f) for f in info.embedding_files], token=info.tokens)
    expected = _sample(stock, info.prompts[1])

    pipe = load_img2img_pipeline(base, device="cpu")
    loaded = load_adapter(pipe, str(tmp_path / "adapter"))
    assert loaded.prompts == info.prompts and loaded.tokens == info.tokens
    np.testing.assert_array_equal(_sample(pipe, loaded.prompts[1]), expected)
    assert np.abs(expected - stock_base).max() > 1e-3

    fused = load_img2img_pipeline(base, device="cpu")
    load_adapter(fused, str(tmp_path / "adapter"), fuse=True)
    assert not any("lora" in n for n, _ in fused.unet.named_parameters())
    np.testing.assert_allclose(_sample(fused, loaded.prompts[1]), expected, atol=1e-4)


def test_adapter_json_errors_and_base_mismatch(base: str, tmp_path: Path, tiny_cache: Path):
    with pytest.raises(AdapterError, match="missing adapter.json"):
        read_adapter_info(str(tmp_path / "nothing"))
    folder = tmp_path / "adapter"
    info = _fake_artifact(base, folder)
    assert read_adapter_info(str(folder)) == info
    data = json.loads((folder / ADAPTER_JSON).read_text())
    del data["prompts"]
    (folder / ADAPTER_JSON).write_text(json.dumps(data))
    with pytest.raises(AdapterError, match="lacks \\['prompts'\\]"):
        read_adapter_info(str(folder))
    (folder / ADAPTER_JSON).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_adapter_info(str(folder))
    write_adapter_info(str(folder), info)

    other = resolve_model("tiny", str(tiny_cache), kind="sd", tiny_seed=1, resolution=32,
                          extra_words=[*CLASS_NAMES, METACLASS])
    with pytest.raises(AdapterError, match="trained on base model"):
        load_adapter(load_img2img_pipeline(other, device="cpu"), str(folder))


def test_adapter_json_names_only_safetensors_inside_the_artifact(base: str, tmp_path: Path):
    """An artifact from elsewhere: its adapter.json must not make the loaders read files outside the folder,
    or weights that are not safetensors."""
    folder = tmp_path / "adapter"
    _fake_artifact(base, folder)
    good = json.loads((folder / ADAPTER_JSON).read_text())
    hostile = [("lora_file", "../../elsewhere/weights.safetensors"), ("lora_file", "/etc/weights.safetensors"),
               ("lora_file", "pytorch_lora_weights.bin"),                                   # a pickle
               ("embedding_files", "embeddings/../../../x.safetensors"), ("embedding_files", "s3://b/x.safetensors")]
    for field, value in hostile:
        data = dict(good, **{field: value if field == "lora_file" else [value] * len(good["embedding_files"])})
        (folder / ADAPTER_JSON).write_text(json.dumps(data))
        with pytest.raises(AdapterError, match=r"adapter\.json: weight files must be \.safetensors files inside"):
            read_adapter_info(str(folder))
    (folder / ADAPTER_JSON).write_text(json.dumps(good))
    assert read_adapter_info(str(folder)).lora_file == good["lora_file"]   # the engine's own names pass


def test_fingerprint_is_content_not_location(base: str, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    assert fingerprint_folder(str(copy)) == fingerprint_folder(base)
    with open(copy / "scheduler" / "scheduler_config.json", "a") as fh:
        fh.write(" ")
    assert fingerprint_folder(str(copy)) != fingerprint_folder(base)
    assert os.path.isdir(base)
