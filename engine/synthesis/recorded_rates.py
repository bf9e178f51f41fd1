"""Synthesis throughput recorded by the GPU benchmark (`python -m engine.bench synthesis --gpu`), with the card
and date, so `diffmix plan` prices a job from a measurement rather than a guess (README, "Performance").

Each entry is the engine stream (`diffmix synthesize` end to end), steady rate after the first commit, on an
SD-1.5-shaped model (random weights) at fp16. A plan whose images need a different amount of work (other
strengths, T, resolution) uses the rate scaled by work per image (engine.synthesis.cost.scaled_rate).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecordedRate:
    images_per_gpu_hour: float
    card: str
    date: str
    batch_size: int
    resolution: int
    num_inference_steps: int
    strengths: tuple[float, ...]
    guidance_scale: float
    sampler: str
    source: str


_COMMON = dict(card="NVIDIA H200", date="2026-11-26", resolution=512, num_inference_steps=25,
               strengths=(0.5, 0.7, 0.9), guidance_scale=7.5, sampler="dpmsolver++",
               source="README 'Performance / Synthesis': engine stream, steady (torch 2.11, diffusers 0.42.1, Ray 2.60)")

RECORDED_RATES: tuple[RecordedRate, ...] = (
    RecordedRate(32_000, batch_size=16, **_COMMON),  # type: ignore[arg-type]
    RecordedRate(34_700, batch_size=32, **_COMMON),  # type: ignore[arg-type]
)


def closest_rate(batch_size: int, resolution: int) -> tuple[RecordedRate, str | None]:
    """The recorded rate for this batch size and resolution, else the nearest one and a note saying so."""
    exact = [r for r in RECORDED_RATES if r.batch_size == batch_size and r.resolution == resolution]
    if exact:
        return exact[0], None
    best = min(RECORDED_RATES, key=lambda r: (abs(r.resolution - resolution), abs(r.batch_size - batch_size)))
    return best, (f"no rate recorded for batch {batch_size} at {resolution} px: using batch {best.batch_size} at "
                  f"{best.resolution} px, scaled by work per image (measure yours, then pass --rate)")
