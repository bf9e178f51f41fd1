"""Translator, ClipScorer and sink pieces without Ray, on the tiny offline models (CPU, fp32); the sampler pin."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from engine.config import load_config
from engine.data import encode_png
from engine.models import load_img2img_pipeline, resolve_model
from engine.data.shards import SHARD_SCHEMA
from engine.storage import Storage
from engine.synthesis.references import ReferenceImageError, attach_references, check_references
from engine.synthesis.score import ClipScorer
from engine.synthesis.sink import shard_table
from engine.synthesis.stage import prepare
from engine.synthesis.translate import ModelRef, TranslateParams, Translator, sub_batches
from engine.synthesis.windows import column_to_pixels

SIZE = 32
WORDS = ("zero", "one", "two", "digit")


@pytest.fixture(scope="module")
def sd(tiny_cache: Path) -> ModelRef:
    return ModelRef("tiny", str(tiny_cache), "sd", 0, SIZE, WORDS)


def rows(strengths: list[float], seeds: list[int], with_ref: bool = True) -> pa.Table:
    n = len(strengths)
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 256, size=(n, SIZE, SIZE, 3), dtype=np.uint8)
    table = pa.table({
        "index": np.arange(n), "strategy": ["real-mix"] * n, "ref_pos": [0] * n, "ref_id": ["r"] * n,
        "ref_label": [1] * n, "target_label": [2] * n, "strength": strengths, "seed": seeds,
        "prompt": ["photo of a two digit"] * n,
    })
    col = pa.array([r.tobytes() for r in refs], type=pa.binary()) if with_ref else pa.nulls(n, type=pa.binary())
    return table.append_column("ref_pixels", col)


def translator(sd: ModelRef, steps: int = 4, batch: int = 4, guidance: float = 7.5) -> Translator:
    return Translator(sd, Storage(), TranslateParams(steps, guidance, SIZE, batch))


def unet_calls(t: Translator) -> list[int]:
    calls: list[int] = []
    t.pipes.img2img.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


def test_output_size_values_and_determinism(sd):
    t = translator(sd)
    out = t.translate_window(0, 6, rows([0.5, 0.5, 0.9, 0.9, 0.5, 0.9], [1, 2, 3, 4, 5, 6]))
    assert "ref_pixels" not in out.column_names and out.num_rows == 6
    images = column_to_pixels(out.column("pixels"), SIZE)
    assert images.shape == (6, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert images.std() > 1.0  # not a constant image
    again = column_to_pixels(t.translate_window(0, 6, rows([0.5, 0.5, 0.9, 0.9, 0.5, 0.9], [1, 2, 3, 4, 5, 6]))
                             .column("pixels"), SIZE)
    assert np.array_equal(images, again)
    other = column_to_pixels(t.translate_window(0, 6, rows([0.5, 0.5, 0.9, 0.9, 0.5, 0.9], [9, 2, 3, 4, 5, 6]))
                             .column("pixels"), SIZE)
    assert not np.array_equal(images[0], other[0]) and np.array_equal(images[1:], other[1:])


def test_half_strength_of_25_steps_runs_12_unet_steps(sd):
    t = translator(sd, steps=25, batch=8)
    calls = unet_calls(t)
    t.translate_window(0, 2, rows([0.5, 0.5], [1, 2]))
    assert len(calls) == 12 == int(25 * 0.5)
    assert calls == [4] * 12  # one call per step: 2 rows x (cond + uncond) batched together
    calls.clear()
    t.translate_window(0, 3, rows([0.7, 0.9, 0.7], [1, 2, 3]))
    assert len(calls) == int(25 * 0.7) + int(25 * 0.9)  # one pipeline call per strength group


def test_batches_are_grouped_by_strength_and_cut_at_batch_size(sd):
    groups = sub_batches([0.5, 0.9, 0.5, 0.5, 0.9, 0.5], [True] * 6, 2)
    assert [g.tolist() for g in groups] == [[0, 2], [3, 5], [1, 4]]
    t = translator(sd, steps=4, batch=2, guidance=1.0)  # no classifier-free guidance: batch = rows
    calls = unet_calls(t)
    t.translate_window(0, 6, rows([0.5, 0.9, 0.5, 0.5, 0.9, 0.5], [1, 2, 3, 4, 5, 6]))
    assert calls == [2] * 2 + [2] * 2 + [2] * 3  # int(4*.5)=2 steps x 2 calls, then int(4*.9)=3 steps


def test_gen_rows_run_text_to_image_for_all_steps(sd):
    t = translator(sd, steps=5)
    calls = unet_calls(t)
    out = t.translate_window(0, 2, rows([1.0, 1.0], [1, 2], with_ref=False))
    assert len(calls) == 5
    assert column_to_pixels(out.column("pixels"), SIZE).shape == (2, SIZE, SIZE, 3)


def test_clip_scores_are_probabilities_and_sink_table_follows_the_contract(tiny_cache):
    clip = ModelRef("tiny", str(tiny_cache), "clip", 0, SIZE, WORDS)
    scorer = ClipScorer(clip, Storage(), "digit", SIZE, batch_size=3)
    window = rows([0.5] * 5, [1, 2, 3, 4, 5]).drop_columns(["ref_pixels"])
    pixels = np.random.default_rng(1).integers(0, 256, size=(5, SIZE, SIZE, 3), dtype=np.uint8)
    window = window.append_column("pixels", pa.array([p.tobytes() for p in pixels], type=pa.binary()))
    scored = scorer.score_window(0, 5, window)
    scores = np.array(scored.column("clip_score").to_pylist())
    assert scores.shape == (5,) and ((scores > 0) & (scores < 1)).all()
    assert np.allclose(scorer.score(pixels, 5), scores)  # batch size does not change a score
    table = shard_table(scored, SIZE)
    assert table.schema == SHARD_SCHEMA and table.num_rows == 5
    assert table.column("image")[0].as_py()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clip_score_is_the_probability_of_the_with_caption(tiny_cache):
    """Each caption scored on its own by the same CLIP: the engine's score is softmax([with, without])[with],
    so a swapped caption order or a score read from the wrong column fails here."""
    from engine.synthesis.score import clip_texts, load_scorer

    scorer = load_scorer(ModelRef("tiny", str(tiny_cache), "clip", 0, SIZE, WORDS), Storage(), "digit")
    assert clip_texts("digit") == ["a photo with a digit on it", "a photo without a digit on it"]
    pixels = np.random.default_rng(3).integers(0, 256, size=(6, SIZE, SIZE, 3), dtype=np.uint8)
    values = scorer.processor.image_processor(images=list(pixels), return_tensors="pt")["pixel_values"]
    logits = []
    for caption in clip_texts("digit"):
        text = scorer.processor.tokenizer([caption], padding=True, return_tensors="pt")
        with torch.inference_mode():
            logits.append(scorer.model(pixel_values=values, **text).logits_per_image[:, 0].double().numpy())
    with_, without = logits
    assert np.abs(with_ - without).min() > 1e-4  # the captions are told apart
    expected = np.exp(with_) / (np.exp(with_) + np.exp(without))
    np.testing.assert_allclose(scorer(pixels, 4), expected, rtol=1e-4)


def test_engine_translation_equals_stock_diffusers_img2img(sd, tiny_cache):
    """The engine's batched translate (one VAE encode per batch, latents handed to the pipeline) computes
    what stock `StableDiffusionImg2ImgPipeline` computes for the same reference, seed, strength and prompt:
    bit for bit one row per call, and within 1/255 on a few pixels at batch 4 (batched CPU kernels)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from engine.synthesis.translate import tensor_to_uint8

    window = rows([0.7] * 4, [11, 12, 13, 14])
    refs = column_to_pixels(window.column("ref_pixels"), SIZE)
    stock = StableDiffusionImg2ImgPipeline.from_pretrained(sd.resolve(), safety_checker=None, feature_extractor=None,
                                                           requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    expected = np.concatenate([tensor_to_uint8(stock(
        prompt=["photo of a two digit"], image=torch.from_numpy(refs[i:i + 1]).permute(0, 3, 1, 2).float() / 255.0,
        strength=0.7, num_inference_steps=5, guidance_scale=7.5, output_type="pt",
        generator=[torch.Generator("cpu").manual_seed(11 + i)]).images) for i in range(4)])
    one = column_to_pixels(translator(sd, steps=5, batch=1).translate_window(0, 4, window).column("pixels"), SIZE)
    assert np.array_equal(one, expected)
    four = column_to_pixels(translator(sd, steps=5, batch=4).translate_window(0, 4, window).column("pixels"), SIZE)
    off = np.abs(four.astype(int) - expected.astype(int))
    assert off.max() <= 1 and (off > 0).mean() < 0.01


def test_output_follows_the_reference_less_as_strength_grows(tiny_cache):
    """SDEdit: a translation starts from the noised reference, so it depends on it, and moves further from
    it the larger s. Shown with the shipped digits SD (a random tiny model draws noise whatever it gets)
    on real digit references: the mean distance to the reference grows with s, and another reference
    (same seeds and prompt) gives another image."""
    from engine.data import load_dataset, to_array

    digits = load_dataset(load_config(None, ["dataset.subset.kind=few_shot", "dataset.subset.shots=1"]))
    refs = np.stack([to_array(b, SIZE) for b in digits.train.column("image").to_pylist()[:4]])
    t = Translator(ModelRef("builtin-digits", str(tiny_cache), "sd"), Storage(), TranslateParams(10, 3.0, SIZE, 4))

    def translate(strength: float, references: np.ndarray) -> np.ndarray:
        window = rows([strength] * 4, [1, 2, 3, 4])
        window = window.set_column(window.schema.get_field_index("ref_pixels"), "ref_pixels",
                                   pa.array([r.tobytes() for r in references], type=pa.binary()))
        return column_to_pixels(t.translate_window(0, 4, window).column("pixels"), SIZE).astype(float)

    distance = [np.abs(translate(s_, refs) - refs).mean() for s_ in (0.2, 0.5, 0.9)]
    assert distance[0] < distance[1] < distance[2], distance
    # row i keeps its seed and prompt and gets another digit as reference: another image
    assert np.abs(translate(0.5, refs) - translate(0.5, np.roll(refs, 1, axis=0))).mean() > 5.0


def test_bad_reference_images_are_named_or_counted():
    good = encode_png(np.zeros((8, 8, 3), dtype=np.uint8))
    train = pa.table({"id": ["a", "broken-b", "c"], "image": [good, b"not an image", good]})
    with pytest.raises(ReferenceImageError, match="broken-b"):
        check_references(train, skip=False)
    usable, bad = check_references(train, skip=True)
    assert usable.tolist() == [True, False, True] and bad == ["broken-b"]
    window = pa.table({"ref_pos": [1], "ref_id": ["broken-b"]})
    with pytest.raises(ReferenceImageError, match="broken-b"):
        attach_references(window, train, SIZE)
    ok = attach_references(pa.table({"ref_pos": [0, 2], "ref_id": ["a", "c"]}), train, SIZE)
    assert column_to_pixels(ok.column("ref_pixels"), SIZE).shape == (2, SIZE, SIZE, 3)


def test_translator_uses_cpu_fp32_here(sd):
    t = translator(sd)
    assert t.pipes.img2img.device.type == "cpu" and t.pipes.img2img.unet.dtype == torch.float32


# --- the sampler is part of the method -----------------------------------------------------------
@pytest.fixture(scope="module")
def pndm_folder(tiny_cache: Path, tmp_path_factory) -> Path:
    """The tiny SD with its scheduler replaced by PNDM, as runwayml/stable-diffusion-v1-5 ships it."""
    from diffusers import PNDMScheduler

    src = resolve_model("tiny", str(tiny_cache), kind="sd", resolution=SIZE, extra_words=WORDS)
    folder = tmp_path_factory.mktemp("sd") / "sd-pndm"
    shutil.copytree(src, folder)
    shipped = load_img2img_pipeline(str(folder), device="cpu").scheduler
    PNDMScheduler.from_config(shipped.config, skip_prk_steps=True).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_synthesis_samples_with_dpm_solver_pp_whatever_the_folder_ships(pndm_folder, tiny_cache):
    assert type(load_img2img_pipeline(str(pndm_folder), device="cpu").scheduler).__name__ == "PNDMScheduler"
    ref = ModelRef(str(pndm_folder), str(tiny_cache), "sd", 0, SIZE, WORDS)
    paper = Translator(ref, Storage(), TranslateParams(4, 7.5, SIZE, 4))
    scheduler = paper.pipes.img2img.scheduler
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.algorithm_type == "dpmsolver++"
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.steps_offset == 1  # the folder's
    assert paper.pipes.txt2img.scheduler is scheduler  # *-gen rows sample with it too
    kept = Translator(ref, Storage(), TranslateParams(4, 7.5, SIZE, 4, sampler="model"))
    assert type(kept.pipes.img2img.scheduler).__name__ == "PNDMScheduler"
    window = rows([0.9] * 4, [1, 2, 3, 4])
    a = column_to_pixels(paper.translate_window(0, 4, window).column("pixels"), SIZE)
    b = column_to_pixels(kept.translate_window(0, 4, window).column("pixels"), SIZE)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1.0  # the sampler changes the images


def test_plan_hash_and_manifest_name_the_sampler(pndm_folder, tiny_cache, tmp_path):
    common = [f"run.output={tmp_path}", f"model.base={pndm_folder}", f"model.cache_dir={tiny_cache}",
              "dataset.subset.kind=few_shot", "dataset.subset.shots=1", "synthesis.strategy=real-mix",
              "synthesis.multiplier=1", "synthesis.resolution=32"]
    paper = prepare(load_config(None, common))
    kept = prepare(load_config(None, common + ["synthesis.sampler=model"]))
    ddim = prepare(load_config(None, common + ["synthesis.sampler=ddim"]))
    assert len({paper.plan_hash, kept.plan_hash, ddim.plan_hash}) == 3
    recorded = paper.spec.to_dict()["identity"]["sampler"]  # the manifest records spec.to_dict() as "plan"
    assert recorded == {"name": "dpmsolver++", "class": "DPMSolverMultistepScheduler", "algorithm_type": "dpmsolver++"}
    assert kept.spec.to_dict()["identity"]["sampler"]["name"] == "model"
    # what the folder decides by itself is recorded (the manifest's model_settings), not assumed
    base = paper.model_settings["base"]
    assert base["noise_schedule"]["_class_name"] == "PNDMScheduler" and base["noise_schedule"]["steps_offset"] == 1
    assert base["vae_scaling_factor"] > 0 and base["prompt_max_length"] == 77
    assert {"crop_size", "size", "image_mean", "image_std"} <= set(paper.model_settings["clip"])
