"""FLOPs of one forward pass of each SD component, from the model folder's shapes (its JSON configs).

The SD-1.5 figures at 512 px are the known ones DESIGN.md uses (UNet 803 GFLOP per sample-evaluation with a
77-token context, VAE encode 1.1 and decode 2.5 TFLOP): they are what `torch.utils.flop_counter.FlopCounterMode`
counts for the SD-1.5 configs (runwayml/stable-diffusion-v1-5's unet/vae/text_encoder config.json) built on
the meta device, and a test checks that they still agree. Any other shape (another resolution, a tiny or
custom model) is counted the same way: the component is built from its config on the meta device (no weights,
no memory) and run once under the counter (multiply-adds count 2, as the counter does). Counting needs torch,
diffusers and transformers, imported only then; SD-1.5 at 512 px needs none of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SD15_IDS = ("runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "benjamin-paine/stable-diffusion-v1-5", "CompVis/stable-diffusion-v1-4")

# The fields of runwayml/stable-diffusion-v1-5's component configs that decide the compute.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "cross_attention_dim": 768,
    "attention_head_dim": 8, "norm_num_groups": 32,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 512,
}
SD15_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
}
SD15_RESOLUTION = 512
SD15_PROMPT_TOKENS = 77
# FlopCounterMode on the configs above (torch 2.x, diffusers 0.42): 803.27 GFLOP, 1.1167 / 2.5145 TFLOP, 13.30 GFLOP
SD15_FLOPS = {"unet": 803.27e9, "vae_encode": 1.1167e12, "vae_decode": 2.5145e12, "text_encode": 13.30e9}


@dataclass(frozen=True)
class ModelShapes:
    """The component configs of an SD folder (diffusers layout) and where they came from."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    prompt_tokens: int
    source: str

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell: 2 ** (number of VAE down blocks - 1)."""
        return 2 ** (len(self.vae.get("block_out_channels", [0, 0, 0, 0])) - 1)

    def is_sd15(self) -> bool:
        return (all(self.unet.get(k) == v for k, v in SD15_UNET.items() if k != "sample_size")
                and all(self.vae.get(k) == v for k, v in SD15_VAE.items() if k != "sample_size")
                and all(self.text_encoder.get(k) == v for k, v in SD15_TEXT.items() if k != "hidden_act")
                and self.prompt_tokens == SD15_PROMPT_TOKENS)


SD15_SHAPES = ModelShapes(SD15_UNET, SD15_VAE, SD15_TEXT, SD15_PROMPT_TOKENS, "SD-1.5 (known shapes)")


@dataclass(frozen=True)
class ComponentFlops:
    """FLOPs of one sample through each component at one resolution."""

    unet: float
    vae_encode: float
    vae_decode: float
    text_encode: float
    how: str


def component_flops(shapes: ModelShapes, resolution: int) -> ComponentFlops:
    """Known figures for SD-1.5 at 512 px, else counted from the shapes (see the module docstring)."""
    if shapes.is_sd15() and resolution == SD15_RESOLUTION:
        return ComponentFlops(**SD15_FLOPS, how="SD-1.5 at 512 px: known per-pass figures (DESIGN.md; "
                              "torch FlopCounterMode on the SD-1.5 configs)")
    return count_flops(shapes, resolution)


def count_flops(shapes: ModelShapes, resolution: int) -> ComponentFlops:
    """Count each component's forward FLOPs with torch's FlopCounterMode on meta-device modules."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    def counted(fn: Any) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    side = resolution // shapes.vae_factor
    with torch.device("meta"), torch.no_grad():
        unet = UNet2DConditionModel.from_config(shapes.unet)
        vae = AutoencoderKL.from_config(shapes.vae)
        text_cfg = {k: v for k, v in shapes.text_encoder.items() if not k.startswith("_")}
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
        latent_ch = int(shapes.unet.get("in_channels", 4))
        context = torch.empty(1, shapes.prompt_tokens, int(shapes.unet["cross_attention_dim"]))
        flops = ComponentFlops(
            unet=counted(lambda: unet(torch.empty(1, latent_ch, side, side), torch.tensor([500]),
                                      encoder_hidden_states=context)),
            vae_encode=counted(lambda: vae.encode(torch.empty(1, int(shapes.vae.get("in_channels", 3)),
                                                              resolution, resolution))),
            vae_decode=counted(lambda: vae.decode(torch.empty(1, int(shapes.vae.get("latent_channels", 4)),
                                                              side, side))),
            text_encode=counted(lambda: text(torch.zeros(1, shapes.prompt_tokens, dtype=torch.long))),
            how=f"counted from {shapes.source} at {resolution} px (torch FlopCounterMode, meta device)",
        )
    return flops
