"""A small CLIP trained on the scene miniature, so the demo's filter and set metrics measure something.

A randomly initialised CLIP scores every image alike: its filter drops a random 10% and its embeddings'
Fréchet distances are noise. This one is a stock `CLIPModel` (small towers) trained offline and
deterministically on the scene miniature's train split (digits on every background family, drawn
independently of the class) and on bare backgrounds of every family:

- the filter's two prompts, "a photo with a digit on it" against "a photo without a digit on it", are
  trained as a two-way choice (digit scenes against bare backgrounds and against scenes whose digit is
  faded or smeared out), so the score is high where a legible digit is drawn;
- each class's prompt, "a photo of a <name> digit", against the other classes' on the digit scenes, so
  the image embedding carries the digit's identity and the set metrics see it.

`python -m engine.models.scene_clip --output engine/models/pretrained/scenes-clip` rebuilds the shipped
folder (a couple of minutes on 2 CPU cores). Loaded with stock `CLIPModel.from_pretrained`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

import numpy as np

from engine.data.builtin import CLASS_NAMES, METACLASS, digit_scans
from engine.data import scenes

log = logging.getLogger(__name__)

SCENE_CLIP_VERSION = "scene-clip-v1"
INFO_FILE = "scene_clip.json"


def filter_prompts(metaclass: str = METACLASS) -> list[str]:
    """The filter's prompts (engine.synthesis.score.clip_texts) for the miniature's metaclass."""
    return [f"a photo with a {metaclass} on it", f"a photo without a {metaclass} on it"]


def class_prompts() -> list[str]:
    return [f"a photo of a {name} {METACLASS}" for name in CLASS_NAMES]


def _train_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits' train split (the demo's test digits are never seen), as scan indices and labels."""
    from engine.config import load_config
    from engine.data import load_dataset
    from engine.data.builtin import digit_index

    train = load_dataset(load_config(None, ["dataset.source=builtin"]), apply_subset=False).train
    return np.asarray([digit_index(i) for i in train.column("id").to_pylist()]), \
        np.asarray(train.column("label").to_pylist())


def _batch(rng: np.random.Generator, train_idx: np.ndarray, scans: np.ndarray, labels: np.ndarray, size: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[size, 32, 32, 3] images in [0, 1], has-digit flags, labels (-1 where no legible digit)."""
    images, has_digit, ys = [], [], []
    for _ in range(size):
        family = int(rng.integers(scenes.FAMILIES))
        pick = int(rng.integers(len(train_idx)))
        i = int(train_idx[pick])
        kind = rng.random()
        where = scenes.layout(family, 32, rng)
        if kind < 0.5:      # a legible digit
            img = np.asarray(scenes.compose(scans[i], where, 32, rng), np.float32) / 255.0
            has_digit.append(1), ys.append(int(labels[pick]))
        elif kind < 0.75:   # a bare background
            img = scenes.background(family, 32, rng)
            has_digit.append(0), ys.append(-1)
        else:               # a failed drawing: the digit faded into the background, or scrambled
            faded = scans[i] * rng.uniform(0.05, 0.35) if rng.random() < 0.5 else \
                rng.permutation(scans[i].ravel()).reshape(8, 8)
            img = np.asarray(scenes.compose(faded, where, 32, rng), np.float32) / 255.0
            has_digit.append(0), ys.append(-1)
        images.append(img)
    return np.stack(images).astype(np.float32), np.asarray(has_digit), np.asarray(ys)


def build_model(folder: str, seed: int) -> Any:
    """The untrained model, with its tokenizer and processor saved in `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from engine.models.tiny import CLIP_MEAN, CLIP_STD, _seeded, _text_config
    from engine.models.tokenizer import save_clip_tokenizer

    os.makedirs(folder, exist_ok=True)
    tokenizer = save_clip_tokenizer(folder, CLASS_NAMES)
    text = _text_config(len(tokenizer), tokenizer)
    text.update(hidden_size=64, intermediate_size=128, projection_dim=64)
    config = CLIPConfig(text_config=text, projection_dim=64,
                        vision_config=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=32, patch_size=4, projection_dim=64))
    processor = CLIPImageProcessor(do_resize=True, size={"shortest_edge": 32}, do_center_crop=True,
                                   crop_size={"height": 32, "width": 32}, do_normalize=True, image_mean=CLIP_MEAN,
                                   image_std=CLIP_STD, do_convert_rgb=True)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    save_clip_tokenizer(folder, CLASS_NAMES)
    return _seeded(seed, "scene-clip", lambda: CLIPModel(config)), tokenizer


def train(folder: str, seed: int = 0, steps: int = 1500, batch_size: int = 64, learning_rate: float = 1e-3
          ) -> dict[str, Any]:
    """Train and save the scorer; returns (and writes to scene_clip.json) its held-out accuracies."""
    import torch

    from engine.models.tiny import CLIP_MEAN, CLIP_STD

    torch.manual_seed(seed)
    model, tokenizer = build_model(folder, seed)
    texts = filter_prompts() + class_prompts()
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    scans, _ = digit_scans()
    train_idx, train_labels = _train_digits()
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, learning_rate, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng([seed, 7])

    def logits(images: np.ndarray) -> "torch.Tensor":
        pixels = (torch.from_numpy(images).permute(0, 3, 1, 2) - mean) / std
        return model(pixel_values=pixels, **tokens).logits_per_image

    model.train()
    for step in range(1, steps + 1):
        images, has_digit, ys = _batch(rng, train_idx, scans, train_labels, batch_size)
        out = logits(images)
        loss = torch.nn.functional.cross_entropy(out[:, :2], torch.from_numpy(1 - has_digit))
        digit = torch.from_numpy(ys >= 0)
        if digit.any():
            loss = loss + torch.nn.functional.cross_entropy(out[digit][:, 2:], torch.from_numpy(ys[digit]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 250 == 0:
            log.info("scene CLIP step %d/%d loss %.4f", step, steps, loss.item())
    model.eval()
    held_out = np.random.default_rng([seed, 8])
    images, has_digit, ys = _batch(held_out, train_idx, scans, train_labels, 1000)
    with torch.inference_mode():
        out = logits(images)
    score = out[:, :2].softmax(-1)[:, 0].numpy()
    digit = ys >= 0
    info = {"version": SCENE_CLIP_VERSION, "seed": seed, "steps": steps, "batch_size": batch_size,
            "learning_rate": learning_rate, "final_loss": float(loss.item()),
            "held_out": {"images": 1000,
                         "digit_vs_none_accuracy": float(np.mean((score > 0.5) == (has_digit == 1))),
                         "class_accuracy": float(np.mean(out[digit][:, 2:].argmax(-1).numpy() == ys[digit]))}}
    model.save_pretrained(folder, safe_serialization=True)
    with open(os.path.join(folder, INFO_FILE), "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=1)
    log.info("scene CLIP written to %s: %s", folder, info["held_out"])
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(2)
    train(args.output, args.seed, args.steps)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["SCENE_CLIP_VERSION", "class_prompts", "filter_prompts", "train"]
