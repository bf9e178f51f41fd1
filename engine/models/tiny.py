"""Tiny, randomly initialised Stable Diffusion and CLIP folders, built offline and deterministically.

They have the real architectures (and file layouts) at toy sizes, so every code path that loads SD-1.5
or CLIP ViT-B/32 with stock `from_pretrained` runs on a laptop or CI box with no model hub.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable

from engine.models.cache import build_once
from engine.models.errors import ModelError
from engine.models.tokenizer import save_clip_tokenizer, vocabulary_words

log = logging.getLogger(__name__)

# Bump whenever a change here changes the bytes written: it is part of the cache folder name.
TINY_BUILDER_VERSION = "tiny-v1"
MARKER = "diffmix_tiny.json"

# OpenAI CLIP's image normalisation.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def builder_hash(extra_words: Iterable[str] = ()) -> str:
    """Short hash of the builder version (and extra words, if any): changes invalidate caches."""
    extra = list(extra_words)
    key = TINY_BUILDER_VERSION if not extra else f"{TINY_BUILDER_VERSION}|{'|'.join(vocabulary_words(extra))}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def _component_seed(seed: int, component: str) -> int:
    """Independent seed per component, so e.g. a bigger vocab does not change the UNet's weights."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{component}".encode()).digest()[:8], "little") % (2**63)


def _seeded(seed: int, component: str, make: Any) -> Any:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_component_seed(seed, component))
        return make()


def _marker(kind: str, seed: int, size: int, extra_words: Iterable[str]) -> dict[str, Any]:
    return {"builder": TINY_BUILDER_VERSION, "kind": kind, "seed": int(seed), "size": int(size),
            "words": vocabulary_words(extra_words)}


def _check_existing(folder: str, marker: dict[str, Any]) -> None:
    path = os.path.join(folder, MARKER)
    try:
        with open(path, encoding="utf-8") as fh:
            found = json.load(fh)
    except FileNotFoundError:
        raise ModelError(f"{folder} exists but is not a tiny model folder (no {MARKER})") from None
    if found != marker:
        raise ModelError(f"{folder} holds a different tiny model ({found}), wanted {marker}")


def _write_marker(folder: str, marker: dict[str, Any]) -> None:
    with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as fh:
        json.dump(marker, fh, indent=1, sort_keys=True)


@dataclass(frozen=True)
class SDArch:
    """Sizes of a small SD: the defaults are the tiny test model; the pretrained demo model is bigger.

    The VAE downsamples by 2 per block after the first (SD-1.5 has four blocks: 8x).
    """

    vae_blocks: tuple[int, ...] = (32, 64)
    vae_norm_groups: int = 32
    unet_blocks: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 2

    @property
    def latent_downsample(self) -> int:
        return 2 ** (len(self.vae_blocks) - 1)


TINY_ARCH = SDArch()


def _text_config(vocab_size: int, tokenizer: Any) -> dict[str, Any]:
    """CLIP text tower settings; eos/bos/pad ids must be the tokenizer's (CLIP pools at eos)."""
    return dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _make_sd(folder: str, seed: int, resolution: int, extra_words: Iterable[str],
             arch: SDArch = TINY_ARCH) -> None:
    import torch
    from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    os.makedirs(folder, exist_ok=True)
    tokenizer = save_clip_tokenizer(os.path.join(folder, "tokenizer"), extra_words)
    latent_size = resolution // arch.latent_downsample
    n_up = len(arch.unet_blocks)
    unet = _seeded(seed, "unet", lambda: UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=arch.layers_per_block,
        block_out_channels=tuple(arch.unet_blocks),
        down_block_types=("CrossAttnDownBlock2D",) * (n_up - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_up - 1), cross_attention_dim=32,
        attention_head_dim=arch.attention_head_dim, norm_num_groups=32,
    ))
    n_vae = len(arch.vae_blocks)
    vae = _seeded(seed, "vae", lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(arch.vae_blocks),
        down_block_types=("DownEncoderBlock2D",) * n_vae, up_block_types=("UpDecoderBlock2D",) * n_vae,
        layers_per_block=1, norm_num_groups=arch.vae_norm_groups, sample_size=resolution,
    ))
    text_encoder = _seeded(seed, "text_encoder", lambda: CLIPTextModel(
        CLIPTextConfig(**_text_config(len(tokenizer), tokenizer))))
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon", steps_offset=1,
    )
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with torch.no_grad():
        pipe.save_pretrained(folder, safe_serialization=True)


def build_untrained_sd(folder: str, arch: SDArch, seed: int, resolution: int, words: Iterable[str]) -> None:
    """A randomly initialised SD folder of the given sizes (the starting point of `diffmix pretrain`)."""
    if resolution % (8 * arch.latent_downsample):
        raise ModelError(f"resolution {resolution} must be a multiple of {8 * arch.latent_downsample} for a "
                         f"VAE with {len(arch.vae_blocks)} blocks")
    _make_sd(folder, seed, resolution, words, arch)


def _make_clip(folder: str, seed: int, image_size: int, extra_words: Iterable[str]) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    os.makedirs(folder, exist_ok=True)
    tokenizer = save_clip_tokenizer(folder, extra_words)
    config = CLIPConfig(
        text_config=_text_config(len(tokenizer), tokenizer),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8, projection_dim=32),
        projection_dim=32,
    )
    model = _seeded(seed, "clip", lambda: CLIPModel(config))
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size}, do_normalize=True,
        image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )
    with torch.no_grad():
        model.save_pretrained(folder, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    save_clip_tokenizer(folder, extra_words)  # keep vocab.json/merges.txt next to the processor's files


def _build(kind: str, folder: str, seed: int, size: int, extra_words: Iterable[str]) -> str:
    extra_words = list(extra_words)
    marker = _marker(kind, seed, size, extra_words)
    make = _make_sd if kind == "sd" else _make_clip

    def build(tmp: str) -> None:
        make(tmp, seed, size, extra_words)
        _write_marker(tmp, marker)

    folder = os.path.abspath(os.path.expanduser(folder))
    if not build_once(folder, build):
        _check_existing(folder, marker)
        log.debug("tiny %s model already at %s", kind, folder)
    return folder


def build_tiny_sd(folder: str, seed: int = 0, resolution: int = 32, extra_words: Iterable[str] = ()) -> str:
    """Write a tiny diffusers Stable Diffusion (img2img) folder; returns its absolute path.

    Idempotent: an existing folder built with the same arguments is reused, a different one is an error.
    """
    if resolution < 8 or resolution % 8:
        raise ModelError(f"tiny SD resolution must be a positive multiple of 8, got {resolution}")
    return _build("sd", folder, seed, resolution, extra_words)


def build_tiny_clip(folder: str, seed: int = 0, image_size: int = 32, extra_words: Iterable[str] = ()) -> str:
    """Write a tiny CLIPModel + CLIPProcessor folder (stock `from_pretrained` loads it); returns its path."""
    if image_size < 8 or image_size % 8:
        raise ModelError(f"tiny CLIP image_size must be a positive multiple of 8 (patch 8), got {image_size}")
    return _build("clip", folder, seed, image_size, extra_words)
