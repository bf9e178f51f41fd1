"""Stable Diffusion set up for one fine-tuning strategy: frozen base, trainable tokens and/or LoRA, one step.

No Ray here: the Ray Train loop (engine.finetune) and the plain single-process benchmark loop drive the
same `Personalizer`, so they train the same model the same way.

Placeholder tokens are trained without touching the embedding matrix: a forward hook on the text
encoder's input embedding swaps in rows of a small fp32 parameter wherever a placeholder id occurs. All
other rows stay bit-identical by construction and the optimizer holds state for n_classes rows only.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.adapters import (LORA_FILE, LORA_TARGETS, add_placeholder_tokens, check_strategy, class_prompts,
                                    lora_config_dict, placeholder_tokens, save_embeddings, save_lora,
                                    trains_embeddings, trains_lora)
from engine.models.base import _diffusers_dtype_kwarg, loading

log = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


@dataclass(frozen=True)
class PersonalizeSpec:
    """Everything that decides what is trained and how (plain values: it crosses into Ray workers)."""

    base_folder: str
    strategy: str
    class_names: tuple[str, ...]
    metaclass: str
    lora_rank: int = 10
    learning_rate: float = 5e-5
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "fp16"


class PlaceholderEmbeddings(nn.Module):
    """Trainable rows for the placeholder ids, spliced into the embedding output by a forward hook."""

    def __init__(self, ids: Sequence[int], init: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(init.detach().float().clone())
        lookup = torch.full((vocab_size,), -1, dtype=torch.long)
        lookup[torch.as_tensor(list(ids), dtype=torch.long)] = torch.arange(len(ids))
        self.register_buffer("lookup", lookup, persistent=False)

    def splice(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        slot = self.lookup[input_ids]
        rows = self.weight[slot.clamp(min=0)].to(embeds.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), rows, embeds)

    def attach(self, embedding: nn.Embedding) -> Any:
        return embedding.register_forward_hook(lambda _m, args, out: self.splice(args[0], out))


class Denoiser(nn.Module):
    """The part with trainable weights (what DDP wraps): prompt ids -> text states -> UNet noise prediction."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, placeholders: PlaceholderEmbeddings | None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.placeholders = placeholders

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        states = self.text_encoder(input_ids)[0]
        return self.unet(noisy, timesteps, states).sample


def to_unit_range(pixels: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 NCHW pixels -> [-1, 1], the range SD's VAE works in."""
    return pixels.to(device, non_blocking=True).to(dtype) / 127.5 - 1.0


def denoising_loss(vae: nn.Module, scheduler: Any, model: nn.Module, pixels: torch.Tensor, input_ids: torch.Tensor,
                   generator: torch.Generator, weight_dtype: torch.dtype) -> torch.Tensor:
    """SD's training objective: encode, noise at a random timestep, predict the noise (or v) from the prompt ids.

    Shared by fine-tuning (frozen base, adapters trained) and pre-training (whole UNet and text encoder).
    """
    device = input_ids.device
    x = to_unit_range(pixels, device, weight_dtype)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.sample(generator=generator) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator, device=device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps) if scheduler.config.prediction_type == "v_prediction" \
        else noise
    autocast = device.type == "cuda" and weight_dtype != torch.float32
    with torch.autocast(device.type, dtype=weight_dtype, enabled=autocast):
        pred = model(noisy, timesteps, input_ids)
    return F.mse_loss(pred.float(), target.float())


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   params: list[nn.Parameter], max_grad_norm: float) -> float:
    """Backward (scaled when fp16), clip, step; returns the loss. The caller zeroed the grads before the forward."""
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def weight_dtype_for(device: torch.device, mixed_precision: str) -> torch.dtype:
    """Frozen weights in fp16/bf16 on CUDA; fp32 on CPU (half precision there is slow or unsupported)."""
    if mixed_precision not in _DTYPES:
        raise ValueError(f"unknown mixed_precision {mixed_precision!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[mixed_precision] if device.type == "cuda" else torch.float32


class Personalizer:
    """Base SD components plus the strategy's trainable parameters, an optimizer, and a training step."""

    def __init__(self, spec: PersonalizeSpec, device: torch.device | str = "cpu") -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        check_strategy(spec.strategy)
        self.spec = spec
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype_for(self.device, spec.mixed_precision)
        path, dtype = spec.base_folder, {_diffusers_dtype_kwarg(): self.weight_dtype}
        # frozen weights load straight into the low-precision dtype; trainable ones are made fp32 below
        with loading(path):
            self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
            self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=self.weight_dtype)
            self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **dtype)
            self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **dtype)
            self.scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False)

        self.tokens: list[str] = []
        self.placeholders: PlaceholderEmbeddings | None = None
        if trains_embeddings(spec.strategy):
            self.tokens = placeholder_tokens(spec.class_names)
            ids = add_placeholder_tokens(self.tokenizer, self.text_encoder, self.tokens, spec.metaclass)
            weight = self.text_encoder.get_input_embeddings().weight
            self.placeholders = PlaceholderEmbeddings(ids, weight[ids], weight.shape[0])
            self.placeholders.attach(self.text_encoder.get_input_embeddings())
        if trains_lora(spec.strategy):
            from peft import LoraConfig

            self.unet.add_adapter(LoraConfig(**lora_config_dict(spec.lora_rank)))
        self.prompts = class_prompts(spec.strategy, spec.class_names, spec.metaclass)
        self.input_ids = self.tokenizer(self.prompts, padding="max_length", truncation=True,
                                        max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids

        for module in (self.vae, self.unet, self.text_encoder):
            module.to(self.device)
        for p in self.lora_parameters():
            p.data = p.data.float()
        if self.placeholders is not None:
            self.placeholders.to(self.device)
        self.input_ids = self.input_ids.to(self.device)
        self.denoiser = Denoiser(self.unet, self.text_encoder, self.placeholders)
        self.model: nn.Module = self.denoiser
        self.optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=spec.learning_rate,
                                           weight_decay=spec.weight_decay)
        use_scaler = self.device.type == "cuda" and self.weight_dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    # --- parameters --------------------------------------------------------------------------
    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.unet.named_parameters() if "lora_" in n]

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = self.lora_parameters()
        if self.placeholders is not None:
            params.append(self.placeholders.weight)
        for p in params:
            p.requires_grad_(True)
        return params

    def wrap(self, wrap_fn: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the module the step calls (e.g. by its DDP wrapper); parameters stay shared."""
        self.model = wrap_fn(self.denoiser)

    # --- training ----------------------------------------------------------------------------
    def loss(self, pixels: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise-prediction MSE on a batch of uint8 NCHW images; noise and timesteps come from `generator`."""
        labels = labels.to(self.device, non_blocking=True).long()
        return denoising_loss(self.vae, self.scheduler, self.model, pixels, self.input_ids[labels], generator,
                              self.weight_dtype)

    def step(self, pixels: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> float:
        """One optimizer step; returns the batch loss."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(pixels, labels, generator)
        return optimizer_step(loss, self.optimizer, self.scaler, self.trainable_parameters(), self.spec.max_grad_norm)

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    # --- state -------------------------------------------------------------------------------
    def lora_state(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(self.unet).items()}

    def train_state(self) -> dict[str, Any]:
        """What a checkpoint needs to continue exactly: trainable weights, optimizer and scaler state."""
        return copy.deepcopy({  # copies: the live optimizer keeps mutating its tensors in place
            "lora": self.lora_state() if trains_lora(self.spec.strategy) else {},
            "embeds": self.placeholders.weight.detach().cpu() if self.placeholders is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        })

    def load_train_state(self, state: dict[str, Any]) -> None:
        if trains_lora(self.spec.strategy):
            from peft.utils import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.unet, state["lora"])
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise RuntimeError(f"checkpoint LoRA has unexpected keys: {unexpected[:5]}")
            for p in self.lora_parameters():
                p.data = p.data.float()
        if self.placeholders is not None:
            with torch.no_grad():
                self.placeholders.weight.copy_(state["embeds"].to(self.placeholders.weight))
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save_artifact_files(self, folder: str) -> dict[str, Any]:
        """Write the artifact's weight files into a local folder; returns their names for adapter.json."""
        out: dict[str, Any] = {"lora_file": None, "embedding_files": [], "lora_rank": None}
        if trains_lora(self.spec.strategy):
            save_lora(folder, self.lora_state(), self.spec.lora_rank)
            out.update(lora_file=LORA_FILE, lora_rank=self.spec.lora_rank)
        if self.placeholders is not None:
            out["embedding_files"] = save_embeddings(folder, self.tokens, self.placeholders.weight)
        return out


__all__ = ["Denoiser", "LORA_TARGETS", "denoising_loss", "optimizer_step", "to_unit_range", "PersonalizeSpec", "Personalizer", "PlaceholderEmbeddings", "weight_dtype_for"]
