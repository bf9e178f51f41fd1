"""Base models: resolving specs to folders, tiny offline models, the generated tokenizer, loaders."""
from engine.models.base import (
    load_clip,
    load_img2img_pipeline,
    looks_like_path,
    pick_device_dtype,
    resolve_model,
)
from engine.models.errors import ModelError
from engine.models.tiny import TINY_BUILDER_VERSION, build_tiny_clip, build_tiny_sd
from engine.models.tokenizer import PROMPT_WORDS, make_clip_tokenizer, save_clip_tokenizer

__all__ = [
    "ModelError",
    "PROMPT_WORDS",
    "TINY_BUILDER_VERSION",
    "build_tiny_clip",
    "build_tiny_sd",
    "load_clip",
    "load_img2img_pipeline",
    "looks_like_path",
    "make_clip_tokenizer",
    "pick_device_dtype",
    "resolve_model",
    "save_clip_tokenizer",
]
