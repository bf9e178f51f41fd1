"""resolve_model and the loaders: tiny builds are cached, bad paths fail early, s3:// models are copied once."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from engine.models import ModelError, load_clip, load_img2img_pipeline, pick_device_dtype, resolve_model
from engine.models.base import looks_like_path, remote_cache_name
from engine.storage import Storage


def _mtime(folder: str, rel: str) -> int:
    return os.stat(os.path.join(folder, rel)).st_mtime_ns


def test_tiny_is_built_once_and_cached(tmp_path: Path):
    first = resolve_model("tiny", str(tmp_path), kind="sd", tiny_seed=0, resolution=32)
    assert os.path.basename(first).startswith("tiny-sd-s0-r32-")
    stamp = _mtime(first, "unet/diffusion_pytorch_model.safetensors")
    again = resolve_model("tiny", str(tmp_path), kind="sd", tiny_seed=0, resolution=32)
    assert again == first and _mtime(again, "unet/diffusion_pytorch_model.safetensors") == stamp
    other = resolve_model("tiny", str(tmp_path), kind="sd", tiny_seed=1, resolution=32)
    assert other != first and os.path.basename(other).startswith("tiny-sd-s1-r32-")
    clip = resolve_model("tiny", str(tmp_path), kind="clip", extra_words=["bird"])
    assert os.path.basename(clip).startswith("tiny-clip-s0-r32-") and os.path.isfile(os.path.join(clip, "config.json"))


def test_local_folders_and_path_errors(tmp_path: Path, tiny_cache: Path):
    sd = resolve_model("tiny", str(tiny_cache))
    assert resolve_model(sd, str(tmp_path)) == sd
    assert resolve_model("file://" + sd, str(tmp_path)) == sd
    missing = str(tmp_path / "no" / "such-model")
    with pytest.raises(ModelError, match="base model folder not found: " + missing):
        resolve_model(missing, str(tmp_path))
    with pytest.raises(ModelError, match="not found"):
        resolve_model("./definitely/not/here", str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="model_index.json"):
        resolve_model(str(tmp_path / "empty"), str(tmp_path))
    with pytest.raises(ModelError, match="kind"):
        resolve_model("tiny", str(tmp_path), kind="vae")  # type: ignore[arg-type]


def test_hub_ids_pass_through_and_fail_clearly_offline(tmp_path: Path):
    assert not looks_like_path("runwayml/stable-diffusion-v1-5") and looks_like_path("a/b/c")
    spec = resolve_model("runwayml/stable-diffusion-v1-5", str(tmp_path))
    assert spec == "runwayml/stable-diffusion-v1-5" and os.listdir(tmp_path) == []
    start = time.monotonic()
    with pytest.raises(ModelError, match="runwayml/stable-diffusion-v1-5"):
        load_img2img_pipeline(spec)
    with pytest.raises(ModelError, match="openai/clip-vit-base-patch32"):
        load_clip("openai/clip-vit-base-patch32")
    assert time.monotonic() - start < 30


def test_loaders_check_paths_before_loading(tmp_path: Path):
    with pytest.raises(ModelError, match="base model folder not found: " + str(tmp_path / "gone")):
        load_img2img_pipeline(str(tmp_path / "gone"))
    with pytest.raises(ModelError, match="not found"):
        load_clip(str(tmp_path / "gone"))
    with pytest.raises(ModelError, match="resolve_model"):
        load_clip("s3://bucket/clip")


def test_loaders_pick_cpu_fp32_and_run(tiny_cache: Path):
    assert pick_device_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert pick_device_dtype("cuda:0")[1] == torch.float16
    pipe = load_img2img_pipeline(resolve_model("tiny", str(tiny_cache)), device="cpu")
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    out = pipe("photo of a bird", image=torch.rand(1, 3, 32, 32), strength=0.5, num_inference_steps=4,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 32, 32)
    model, processor = load_clip(resolve_model("tiny", str(tiny_cache), kind="clip"), device="cpu")
    assert not model.training and model.dtype == torch.float32
    inputs = processor(text=["a photo with a bird on it", "a photo without a bird on it"],
                       images=[torch.zeros(3, 32, 32)], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**inputs).logits_per_image.shape == (1, 2)


@pytest.mark.s3
def test_s3_model_is_copied_once_per_node(tmp_path: Path, tiny_cache: Path, s3_server, s3_bucket: str,
                                          monkeypatch: pytest.MonkeyPatch):
    storage = Storage(storage_options=s3_server["storage_options"])
    source = resolve_model("tiny", str(tiny_cache))
    uri = f"{s3_bucket}/models/tiny-sd"
    storage.upload_dir(source, uri)
    cache = tmp_path / "cache"

    local = resolve_model(uri, str(cache), storage=storage)
    assert local == str(cache / remote_cache_name(uri))
    for rel in ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json"]:
        assert Path(local, rel).read_bytes() == Path(source, rel).read_bytes()
    assert [e for e in os.listdir(cache) if e.startswith(".tmp-")] == []
    load_img2img_pipeline(local, device="cpu")

    stamp = _mtime(local, "model_index.json")
    monkeypatch.setattr(Storage, "download_dir", lambda *a, **k: pytest.fail("downloaded twice"))
    assert resolve_model(uri + "/", str(cache), storage=storage) == local
    assert _mtime(local, "model_index.json") == stamp


@pytest.mark.s3
def test_missing_s3_model_fails_and_leaves_nothing(tmp_path: Path, s3_server, s3_bucket: str):
    storage = Storage(storage_options=s3_server["storage_options"])
    with pytest.raises(ModelError, match="empty or missing"):
        resolve_model(f"{s3_bucket}/nothing-here", str(tmp_path), storage=storage)
    assert [e for e in os.listdir(tmp_path) if not e.endswith(".lock")] == []
