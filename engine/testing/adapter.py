"""A fine-tune artifact with random (but valid) weights, written by the engine's own writers.

Lets tests of the adapter contract and of diff-* synthesis run without a fine-tuning run.
"""
from __future__ import annotations

from typing import Sequence

from engine.models.adapters import (AdapterInfo, class_prompts, fingerprint_folder, lora_config_dict,
                                    placeholder_tokens, save_embeddings, save_lora, write_adapter_info)


def write_random_adapter(base: str, folder: str, class_names: Sequence[str], metaclass: str,
                         strategy: str = "ti+db", rank: int = 4, seed: int = 0) -> AdapterInfo:
    """LoRA B matrices and token embeddings drawn from N(0, .); `base` is the tiny SD folder they fit."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet.add_adapter(LoraConfig(**lora_config_dict(rank)))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_lora(folder, get_peft_model_state_dict(unet), rank)
    tokens = placeholder_tokens(class_names)
    files = save_embeddings(folder, tokens, torch.randn(len(tokens), unet.config.cross_attention_dim))
    info = AdapterInfo(strategy=strategy, base_model="tiny", base_model_hash=fingerprint_folder(base),
                       class_names=list(class_names), metaclass=metaclass, tokens=tokens,
                       prompts=class_prompts(strategy, class_names, metaclass), lora_rank=rank,
                       lora_file="pytorch_lora_weights.safetensors", embedding_files=files, steps=1, final_loss=1.0,
                       resolution=32, config_hash="test", dataset_fingerprint="test", uri=folder)
    write_adapter_info(folder, info)
    return info
