"""Tiny offline models: stock diffusers/transformers loaders accept them, and builds are deterministic."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.models import ModelError, build_tiny_clip, build_tiny_sd, make_clip_tokenizer, save_clip_tokenizer
from engine.models.cache import build_once
from engine.models.tokenizer import BOS, EOS, PROMPT_WORDS, vocabulary_words

CLASSES = ["Black-footed Albatross", "Crème brûlée", "laysan albatross"]


@pytest.fixture(scope="module")
def sd_folder(tiny_cache: Path) -> str:
    return build_tiny_sd(str(tiny_cache / "tiny-sd-fixture"), seed=0, extra_words=CLASSES + ["bird"])


@pytest.fixture(scope="module")
def clip_folder(tiny_cache: Path) -> str:
    return build_tiny_clip(str(tiny_cache / "tiny-clip-fixture"), seed=0, extra_words=["bird"])


# --- tokenizer -----------------------------------------------------------------------------------

def test_listed_words_are_single_tokens_and_unknown_words_still_encode():
    tok = make_clip_tokenizer(CLASSES)
    for word in ["photo", "of", "a", "with", "without", "on", "it", "albatross", "footed", "brûlée"]:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    ids = tok("a photo of a zebra")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "photo</w>", "of</w>"]
    pieces = tok.convert_ids_to_tokens(ids[5:-1])  # an unknown word: char (or known-prefix) pieces
    assert len(pieces) > 1 and "".join(pieces) == "zebra</w>" and tok.unk_token_id not in ids[1:-1]
    assert tok.model_max_length == 77
    assert tok("a photo", padding="max_length", max_length=77)["input_ids"][-1] == tok.pad_token_id


def test_vocab_is_clip_format_and_order_independent(tmp_path: Path):
    save_clip_tokenizer(str(tmp_path / "a"), ["zebra", "yak"])
    save_clip_tokenizer(str(tmp_path / "b"), ["yak", "zebra", "yak"])
    for name in ["vocab.json", "merges.txt", "tokenizer.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "a" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1
    assert len(vocab) == 512 + len(merges) - 1 + 2  # each merge adds exactly one new token here
    assert "zebra</w>" in vocab and "yak</w>" in vocab
    assert vocabulary_words(["Yak"])[: len(PROMPT_WORDS)] == list(PROMPT_WORDS)


def test_saved_tokenizer_reloads_identically(tmp_path: Path):
    from transformers import CLIPTokenizer

    tok = save_clip_tokenizer(str(tmp_path), CLASSES)
    loaded = CLIPTokenizer.from_pretrained(str(tmp_path))
    text = "a photo of a black footed albatross, 42 zebras!"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert len(loaded) == len(tok)


def test_placeholder_tokens_can_be_added(sd_folder: str):
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(os.path.join(sd_folder, "tokenizer"))
    enc = CLIPTextModel.from_pretrained(os.path.join(sd_folder, "text_encoder"))
    before = len(tok)
    assert tok.add_tokens(["<cls-0>", "<cls-1>"]) == 2
    enc.resize_token_embeddings(len(tok))
    ids = tok("photo of a <cls-1> bird", add_special_tokens=False)["input_ids"]
    assert len(ids) == 5 and ids[3] == before + 1
    assert enc.get_input_embeddings().weight.shape[0] == before + 2
    with torch.no_grad():
        out = enc(torch.tensor([tok("photo of a <cls-0> bird")["input_ids"]]))
    assert out.pooler_output.shape == (1, 32)


# --- Stable Diffusion ----------------------------------------------------------------------------

def test_tiny_sd_runs_img2img_and_txt2img_with_stock_pipelines(sd_folder: str):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = pipe("photo of a bird", image=image, strength=0.5, num_inference_steps=4, guidance_scale=7.5,
               generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (32, 32)

    txt = StableDiffusionPipeline.from_pretrained(sd_folder)
    txt.set_progress_bar_config(disable=True)
    out = txt("photo of a bird", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (32, 32)


def test_tiny_sd_accepts_textual_inversion_and_lora_targets(sd_folder: str, tmp_path: Path):
    from diffusers import StableDiffusionImg2ImgPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd_folder)
    save_file({"<cls-0>": torch.randn(32)}, str(tmp_path / "learned_embeds.safetensors"))
    pipe.load_textual_inversion(str(tmp_path / "learned_embeds.safetensors"), token="<cls-0>")
    assert len(pipe.tokenizer("<cls-0>", add_special_tokens=False)["input_ids"]) == 1
    names = {n.rsplit(".", 1)[-1] for n, _ in pipe.unet.named_modules()}
    assert {"to_q", "to_k", "to_v"} <= names


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path):
    a = build_tiny_sd(str(tmp_path / "a"), seed=3)
    b = build_tiny_sd(str(tmp_path / "b"), seed=3)
    c = build_tiny_sd(str(tmp_path / "c"), seed=4)
    weights = "unet/diffusion_pytorch_model.safetensors"
    bytes_a = Path(a, weights).read_bytes()
    assert bytes_a == Path(b, weights).read_bytes()
    assert bytes_a != Path(c, weights).read_bytes()
    encoder = "text_encoder/model.safetensors"
    assert Path(a, encoder).read_bytes() == Path(b, encoder).read_bytes()
    # the global RNG is untouched by a build
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_clip(str(tmp_path / "clip"), seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_rebuild_same_args_is_noop_and_other_args_fail(tmp_path: Path):
    folder = build_tiny_clip(str(tmp_path / "clip"), seed=0)
    stamp = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    assert build_tiny_clip(folder, seed=0) == folder
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == stamp
    with pytest.raises(ModelError, match="different tiny model"):
        build_tiny_clip(folder, seed=1)
    with pytest.raises(ModelError, match="multiple of 8"):
        build_tiny_sd(str(tmp_path / "odd"), resolution=30)


# --- CLIP ----------------------------------------------------------------------------------------

def test_tiny_clip_loads_with_stock_classes_and_scores(clip_folder: str):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_folder).eval()
    processor = CLIPProcessor.from_pretrained(clip_folder)
    assert model.config.text_config.eos_token_id == processor.tokenizer.eos_token_id
    inputs = processor(text=["a photo with a bird on it", "a photo without a bird on it"],
                       images=Image.new("RGB", (48, 40), (200, 30, 30)), return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


# --- atomic builds -------------------------------------------------------------------------------

def test_concurrent_builders_build_once(tmp_path: Path):
    calls: list[int] = []

    def slow_build(tmp: str) -> None:
        calls.append(1)
        os.makedirs(tmp)
        time.sleep(0.3)
        Path(tmp, "done").write_text("ok")

    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(build_once(str(tmp_path / "m"), slow_build)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(results) == [False, False, True]
    assert sorted(os.listdir(tmp_path)) == [".m.lock", "m"]


def test_crashed_build_leaves_no_folder_and_is_cleaned(tmp_path: Path):
    def crash(tmp: str) -> None:
        os.makedirs(tmp)
        Path(tmp, "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_once(str(tmp_path / "m"), crash)
    assert not (tmp_path / "m").exists()
    (tmp_path / ".tmp-m-deadbeef").mkdir()  # what a SIGKILLed builder leaves behind
    assert build_once(str(tmp_path / "m"), lambda tmp: os.makedirs(tmp))
    assert sorted(os.listdir(tmp_path)) == [".m.lock", "m"]
