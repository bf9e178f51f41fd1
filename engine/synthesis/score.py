"""CLIP scoring (DESIGN.md step 4): P("a photo with a <metaclass> on it") against its negation.

`ClipScorer` is a Ray Data actor that loads CLIP once (CUDA fp16 / CPU fp32) and adds `clip_score`
to each window, in sub-batches of `clip_batch_size` taken along the window (deterministic).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from engine.storage import Storage
from engine.synthesis.translate import ModelRef
from engine.synthesis.windows import column_to_pixels, map_windows

log = logging.getLogger(__name__)


def clip_texts(metaclass: str) -> list[str]:
    return [f"a photo with a {metaclass} on it", f"a photo without a {metaclass} on it"]


class ClipScore:
    """CLIP model + processor with the two metaclass prompts tokenized once."""

    def __init__(self, model: Any, processor: Any, metaclass: str) -> None:
        import torch

        self.model, self.processor = model, processor
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        text = processor.tokenizer(clip_texts(metaclass), padding=True, return_tensors="pt")
        with torch.inference_mode():
            self.text = {k: v.to(self.device) for k, v in text.items()}

    def __call__(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        """Softmax probability of the positive prompt, per image (n,) float64."""
        import torch

        scores = np.empty(len(images), dtype=np.float64)
        for lo in range(0, len(images), batch_size):
            chunk = list(images[lo: lo + batch_size])
            pixels = self.processor.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                out = self.model(pixel_values=pixels.to(self.device, self.dtype), **self.text)
                probs = out.logits_per_image.float().softmax(dim=-1)[:, 0]
            scores[lo: lo + len(chunk)] = probs.cpu().numpy()
        return scores


def load_scorer(model: ModelRef, storage: Storage, metaclass: str, cpu_threads: int | None = None) -> ClipScore:
    import torch

    from engine.models import load_clip, pick_device_dtype

    dev, dtype = pick_device_dtype()
    if dev.type == "cpu" and cpu_threads:
        torch.set_num_threads(cpu_threads)
    clip, processor = load_clip(model.resolve(storage), device=dev, dtype=dtype)
    return ClipScore(clip, processor, metaclass)


class ClipScorer:
    """Ray Data actor: a window with `pixels` in, the same window with `clip_score` out."""

    def __init__(self, model: ModelRef, storage: Storage, metaclass: str, resolution: int, batch_size: int,
                 cpu_threads: int | None = None) -> None:
        self.score = load_scorer(model, storage, metaclass, cpu_threads)
        self.resolution = resolution
        self.batch_size = batch_size

    def score_window(self, start: int, end: int, rows: pa.Table) -> pa.Table:
        images = column_to_pixels(rows.column("pixels"), self.resolution)
        return rows.append_column("clip_score", pa.array(self.score(images, self.batch_size), type=pa.float64()))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return map_windows(batch, self.score_window)
