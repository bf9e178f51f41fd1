"""What a model folder decides by itself, read from its JSON configs (no weights loaded, no torch).

The noise schedule fine-tuning trains on, the latent scale, the prompt length and CLIP's preprocessing
come from the folder, not from the engine: they are right for SD-1.5 and CLIP ViT-B/32 (the paper's) and
must stay whatever the folder says for other models, so they are recorded next to every artifact (the
adapter's adapter.json, the synthetic set's manifest) rather than silently assumed. The sampler is the
one setting the engine pins (engine.models.sampler).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

from engine.storage import Storage, is_local, join

Reader = Callable[[str], "dict[str, Any] | None"]
_SCHEDULE_FIELDS = ("_class_name", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                    "steps_offset", "timestep_spacing")


def folder_reader(folder: str, storage: Storage | None = None) -> Reader:
    """Reads `folder/<rel>` as JSON (None when absent): a local folder, or any URI through `storage`."""
    def read(rel: str) -> dict[str, Any] | None:
        if is_local(folder):
            path = os.path.join(folder.removeprefix("file://"), rel)
            if not os.path.isfile(path):
                return None
            with open(path) as fh:
                return json.load(fh)
        st = storage or Storage()
        uri = join(folder, rel)
        return json.loads(st.read_text(uri)) if st.exists(uri) else None
    return read


def sd_settings(read: Reader) -> dict[str, Any]:
    """Noise schedule (scheduler config), latent scale (VAE) and prompt length (tokenizer) of an SD folder."""
    schedule = read("scheduler/scheduler_config.json") or {}
    return {
        "noise_schedule": {k: schedule.get(k) for k in _SCHEDULE_FIELDS if k in schedule},
        "vae_scaling_factor": (read("vae/config.json") or {}).get("scaling_factor"),
        "prompt_max_length": (read("tokenizer/tokenizer_config.json") or {}).get("model_max_length"),
    }


def clip_settings(read: Reader) -> dict[str, Any]:
    """CLIP's image preprocessing (resize, crop, normalisation), from either processor config layout."""
    config = read("preprocessor_config.json") or (read("processor_config.json") or {}).get("image_processor") or {}
    keys = ("size", "crop_size", "resample", "image_mean", "image_std")
    return {k: config.get(k) for k in keys if k in config}


def model_settings(resolved: str, kind: str, storage: Storage | None = None) -> dict[str, Any] | None:
    """The settings of a resolved model (a folder or URI); None for a hub id, which only a hub can read."""
    if is_local(resolved) and not os.path.isdir(resolved.removeprefix("file://")):
        return None
    read = folder_reader(resolved, storage)
    return sd_settings(read) if kind == "sd" else clip_settings(read)


__all__ = ["clip_settings", "folder_reader", "model_settings", "sd_settings"]
