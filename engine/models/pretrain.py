"""Training a small Stable Diffusion from scratch, in two phases, with the fine-tune stage's step protocol.

Phase "vae": the autoencoder alone (reconstruction MSE + a small KL), so latents exist to diffuse in.
Phase "denoiser": the whole UNet and text encoder on SD's noise-prediction loss with the VAE frozen,
dropping a share of prompts to the empty prompt so classifier-free guidance works at sampling time.

Both expose what `engine.finetune.train_loop` drives (`step`, `generator`, `wrap`, `train_state`,
`load_train_state`, `save_artifact_files`), so pre-training gets Ray Train's DDP, checkpoints and resume
from the same loop as fine-tuning. No Ray here.
"""
from __future__ import annotations

import copy
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.adapters import class_prompts
from engine.models.base import _diffusers_dtype_kwarg, loading
from engine.models.personalize import (Denoiser, denoising_loss, optimizer_step, to_unit_range,
                                       weight_dtype_for)

PHASES = ("vae", "denoiser")


@dataclass(frozen=True)
class PretrainSpec:
    """What one phase trains and how (plain values: it crosses into Ray workers)."""

    base_folder: str
    phase: str
    class_names: tuple[str, ...]
    metaclass: str
    learning_rate: float = 5e-4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    prompt_dropout: float = 0.1
    kl_weight: float = 1e-6


def _copy_base(base: str, folder: str) -> None:
    """The artifact is the base folder with the trained parts replaced: one complete SD folder."""
    shutil.copytree(base, folder, dirs_exist_ok=True)


class _PhaseTrainer:
    """Optimizer, scaler and the step shared by both phases; subclasses define the model and loss."""

    spec: PretrainSpec
    device: torch.device
    model: nn.Module
    trained: nn.Module

    def _init_optimizer(self) -> None:
        self.trained.train()
        self.trained.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.trained.parameters(), lr=self.spec.learning_rate,
                                           weight_decay=self.spec.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda"
                                           and self.spec.mixed_precision == "fp16")

    def loss(self, pixels: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def step(self, pixels: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(pixels, labels, generator)
        return optimizer_step(loss, self.optimizer, self.scaler, list(self.trained.parameters()),
                              self.spec.max_grad_norm)

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def wrap(self, wrap_fn: Callable[[nn.Module], nn.Module]) -> None:
        self.model = wrap_fn(self.trained)

    def train_state(self) -> dict[str, Any]:
        return copy.deepcopy({"weights": {k: v.detach().cpu() for k, v in self.trained.state_dict().items()},
                              "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()})

    def load_train_state(self, state: dict[str, Any]) -> None:
        self.trained.load_state_dict(state["weights"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class Reconstruction(nn.Module):
    """The VAE's training forward as one module call, so a DDP wrapper sees (and syncs) it."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample(generator=generator)).sample, posterior.kl().mean()


class VaeTrainer(_PhaseTrainer):
    """Phase 1: the autoencoder, trained in fp32 (it is small; its latents must be faithful)."""

    def __init__(self, spec: PretrainSpec, device: torch.device | str = "cpu") -> None:
        from diffusers import AutoencoderKL

        self.spec, self.device = spec, torch.device(device)
        with loading(spec.base_folder):
            self.vae = AutoencoderKL.from_pretrained(spec.base_folder, subfolder="vae",
                                                     **{_diffusers_dtype_kwarg(): torch.float32}).to(self.device)
        self.trained = self.model = Reconstruction(self.vae)
        self._init_optimizer()

    def loss(self, pixels: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = to_unit_range(pixels, self.device, torch.float32)
        recon, kl = self.model(x, generator)
        return F.mse_loss(recon, x) + self.spec.kl_weight * kl

    def save_artifact_files(self, folder: str) -> dict[str, Any]:
        _copy_base(self.spec.base_folder, folder)
        self.vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=True)
        return {"phase": "vae"}


class DenoiserTrainer(_PhaseTrainer):
    """Phase 2: UNet + text encoder (fp32 master weights, autocast on CUDA), frozen VAE."""

    def __init__(self, spec: PretrainSpec, device: torch.device | str = "cpu") -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        if not 0 <= spec.prompt_dropout < 1:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {spec.prompt_dropout}")
        self.spec, self.device = spec, torch.device(device)
        self.weight_dtype = weight_dtype_for(self.device, spec.mixed_precision)
        path, fp32 = spec.base_folder, {_diffusers_dtype_kwarg(): torch.float32}
        with loading(path):
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
            self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae",
                                                     **{_diffusers_dtype_kwarg(): self.weight_dtype})
            self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **fp32)
            self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=torch.float32)
            self.scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        self.vae.requires_grad_(False)
        # "db" prompts are the plain class names: what real-* synthesis and the demo prompt the base with
        prompts = class_prompts("db", spec.class_names, spec.metaclass) + [""]
        ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        self.input_ids, self.empty_ids = ids[:-1].to(self.device), ids[-1].to(self.device)
        for module in (self.vae, self.unet, self.text_encoder):
            module.to(self.device)
        self.trained = self.model = Denoiser(self.unet, self.text_encoder, None)
        self._init_optimizer()

    def loss(self, pixels: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        labels = labels.to(self.device, non_blocking=True).long()
        ids = self.input_ids[labels]
        drop = torch.rand(len(labels), generator=generator, device=self.device) < self.spec.prompt_dropout
        ids = torch.where(drop.unsqueeze(1), self.empty_ids.unsqueeze(0), ids)
        return denoising_loss(self.vae, self.scheduler, self.model, pixels, ids, generator, self.weight_dtype)

    def save_artifact_files(self, folder: str) -> dict[str, Any]:
        _copy_base(self.spec.base_folder, folder)
        self.unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=True)
        self.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
        return {"phase": "denoiser"}


def make_phase_trainer(spec: PretrainSpec, device: torch.device | str = "cpu") -> _PhaseTrainer:
    if spec.phase not in PHASES:
        raise ValueError(f"unknown pretrain phase {spec.phase!r}: expected one of {PHASES}")
    return (VaeTrainer if spec.phase == "vae" else DenoiserTrainer)(spec, device)


__all__ = ["DenoiserTrainer", "PHASES", "PretrainSpec", "Reconstruction", "VaeTrainer", "make_phase_trainer"]
