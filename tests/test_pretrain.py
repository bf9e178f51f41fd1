"""`diffmix pretrain` on a reduced config: two Ray Train phases of the fine-tune loop, a stock-loadable
SD folder with its record, reuse by key, and bad input refused before any Ray work."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.config import ExperimentConfig, load_config
from engine.pretrain import PRETRAIN_JSON, PretrainError, run, run_key


def _config(tmp: Path, *overrides: str) -> ExperimentConfig:
    return load_config(os.path.join(os.path.dirname(__file__), "..", "examples", "pretrain_digits.yaml"), [
        f"run.output={tmp}", "run.name=pt", f"model.cache_dir={tmp / 'cache'}", f"pretrain.output={tmp / 'model'}",
        "pretrain.unet_blocks=[32, 64]", "pretrain.layers_per_block=1", "pretrain.vae_steps=4", "pretrain.steps=4",
        "pretrain.batch_size=32", "pretrain.checkpoint_every=2", "pretrain.log_every=2", "pretrain.cpus_per_worker=1",
        "pretrain.eval_per_class=1", "pretrain.eval_steps=2", *overrides])


def test_pretrain_writes_a_stock_sd_folder_and_reuses_it(ray_session, tmp_path):
    from diffusers import StableDiffusionPipeline

    config = _config(tmp_path)
    summary = run(config)
    assert summary["reused"] is False
    folder = tmp_path / "model"
    info = json.loads((folder / PRETRAIN_JSON).read_text())
    assert info["key"] == summary["key"] and info["train_rows"] > 1000        # the full train split, not a subset
    assert [h[0] for h in info["loss_history"]] == [2, 4]                     # the denoiser phase's windows
    assert info["check"]["samples"] == 10 and 0 <= info["check"]["accuracy"] <= 1
    assert (tmp_path / "pt" / "pretrain" / summary["key"] / "vae" / "model_index.json").is_file()  # phase 1 kept
    with safe_open(str(folder / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as fh:
        assert fh.get_tensor(next(iter(fh.keys()))).dtype == torch.float16     # save_dtype: fp16
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215 and vae_config["scaling_factor"] > 0  # from the latents' std

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                   dtype=torch.float32)
    image = pipe("photo of a three digit", height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)

    again = run(config)
    assert again["reused"] is True and again["key"] == summary["key"]
    # another config has another key (so its own work folder), and a model folder pre-trained with another
    # config is replaced; here the finished VAE phase and the denoiser's final checkpoint are kept and reused
    fingerprint = info["dataset_fingerprint"]
    assert run_key(_config(tmp_path, "pretrain.steps=2"), fingerprint) != run_key(config, fingerprint) == info["key"]
    (folder / PRETRAIN_JSON).write_text(json.dumps({**info, "key": "another-config"}))
    vae_index = tmp_path / "pt" / "pretrain" / summary["key"] / "vae" / "model_index.json"
    vae_written = vae_index.stat().st_mtime_ns
    replaced = run(config)
    assert replaced["reused"] is False and replaced["key"] == summary["key"]
    assert json.loads((folder / PRETRAIN_JSON).read_text())["key"] == summary["key"]
    assert vae_index.stat().st_mtime_ns == vae_written                          # phase 1 not trained again
    assert json.loads((folder / PRETRAIN_JSON).read_text())["loss_history"] == info["loss_history"]


@pytest.mark.parametrize("override, words", [
    ("pretrain.resolution=36", "multiple of"),
    ("pretrain.batch_size=4096", "fewer than"),
    ("pretrain.unet_blocks=[48, 64]", "multiples of 32"),
])
def test_bad_pretrain_config_fails_before_ray(tmp_path, override, words):
    import ray

    was_running = ray.is_initialized()
    with pytest.raises(PretrainError, match=words):
        run(_config(tmp_path, override))
    assert ray.is_initialized() == was_running
    assert not (tmp_path / "pt" / "pretrain").exists()
