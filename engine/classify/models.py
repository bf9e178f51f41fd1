"""Classifier backbones: torchvision resnet18/50 and vit_b_16, and a small CNN for the demo and tests.

Pretrained weights come only from a configured local path or URI (a torchvision state dict);
nothing is ever downloaded. The classification head is re-initialised for the dataset's classes.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from engine.models.errors import ModelError
from engine.storage import Storage, redact
from engine.weights import load_weights

log = logging.getLogger(__name__)

BACKBONES = ("small_cnn", "resnet18", "resnet50", "vit_b_16")
_HEAD_PREFIX = {"resnet18": "fc.", "resnet50": "fc.", "vit_b_16": "heads.", "small_cnn": "head."}


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head: trains in seconds on CPU at 32 px."""

    def __init__(self, num_classes: int, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(block(3, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _architecture(name: str, num_classes: int, resolution: int) -> nn.Module:
    import torchvision.models as tvm

    if name == "small_cnn":
        return SmallCNN(num_classes)
    if name == "resnet18":
        return tvm.resnet18(weights=None, num_classes=num_classes)
    if name == "resnet50":
        return tvm.resnet50(weights=None, num_classes=num_classes)
    if name == "vit_b_16":
        if resolution % 16:
            raise ValueError(f"vit_b_16 needs a resolution divisible by 16, got {resolution}")
        return tvm.vit_b_16(weights=None, num_classes=num_classes, image_size=resolution)
    raise ValueError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})")


def load_state_dict(uri: str, storage: Storage) -> dict[str, torch.Tensor]:
    """A state dict from a .pth/.pt file (raw, or under a 'model' / 'state_dict' key) at a path or URI."""
    state = load_weights(storage.read_bytes(uri), f"classify.pretrained {uri}", ModelError)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"classify.pretrained {redact(uri)} does not hold a state dict of tensors")
    return state


def _adapt(name: str, model: nn.Module, state: dict[str, torch.Tensor], resolution: int) -> dict[str, torch.Tensor]:
    """Drop the foreign head; resize ViT position embeddings to this resolution."""
    head = _HEAD_PREFIX[name]
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith(head) and (k not in own or own[k].shape != v.shape))}
    pos = "encoder.pos_embedding"
    if name == "vit_b_16" and pos in state and state[pos].shape != own[pos].shape:
        from torchvision.models.vision_transformer import interpolate_embeddings

        state = interpolate_embeddings(resolution, 16, state)
    return state


def build_model(name: str, num_classes: int, resolution: int, pretrained: str | None = None,
                storage: Storage | None = None) -> nn.Module:
    """The backbone with a fresh `num_classes` head; backbone weights from `pretrained` when given."""
    model = _architecture(name, num_classes, resolution)
    if pretrained:
        state = _adapt(name, model, load_state_dict(pretrained, storage or Storage()), resolution)
        missing, unexpected = model.load_state_dict(state, strict=False)
        head = _HEAD_PREFIX[name]
        bad_missing = [k for k in missing if not k.startswith(head)]
        if bad_missing or unexpected:
            raise ModelError(
                f"classify.pretrained weights {redact(pretrained)} do not fit {name}: missing {bad_missing[:5]}, "
                f"unexpected {list(unexpected)[:5]}"
            )
        log.info("%s: loaded pretrained weights from %s (head re-initialised for %d classes)",
                 name, redact(pretrained), num_classes)
    return model
