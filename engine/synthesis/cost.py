"""What a synthesis plan costs, before any GPU works: rows, UNet evaluations, FLOPs, GPU-hours, money, bytes.

Pure functions over plain numbers (no Ray, no torch, no I/O); `engine.synthesis.dryrun` gathers the inputs.
The step rule is the paper's and diffusers': img2img at strength s runs int(T * s) denoising steps (capped at
T), *-gen rows run T; PNDM (SD-1.5's own scheduler, `sampler: pndm` / `model`) runs one step more (its PLMS
warm-up repeats a timestep: T + 1 timesteps for T). Classifier-free guidance (guidance_scale > 1, as in
diffusers) runs the UNet on a conditional and an unconditional copy of each sample: two evaluations per step.
Each image also takes one VAE decode, one VAE encode of its reference (img2img only) and the text encoder on
its prompt (and on the empty prompt with guidance).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

from engine.synthesis.model_flops import ComponentFlops

TERA = 1e12
EXTRA_STEPS = {"pndm": 1}  # samplers that evaluate the UNet more than once per nominal step


def denoise_steps(num_inference_steps: int, strength: float, gen: bool, sampler: str = "dpmsolver++") -> int:
    """UNet steps for one image: int(T * s) (diffusers' img2img), T for text-to-image, +1 for PNDM."""
    steps = num_inference_steps if gen else min(int(num_inference_steps * strength), num_inference_steps)
    return steps + EXTRA_STEPS.get(sampler, 0)


def guidance_copies(guidance_scale: float) -> int:
    """UNet samples per image per step: 2 with classifier-free guidance (diffusers: guidance_scale > 1)."""
    return 2 if guidance_scale > 1 else 1


@dataclass(frozen=True)
class StrengthLine:
    strength: float
    rows: int
    steps: int
    evaluations: int        # UNet sample-evaluations for all rows of this strength
    unet_tflop: float


@dataclass(frozen=True)
class WorkEstimate:
    lines: tuple[StrengthLine, ...]
    vae_encode_tflop: float
    vae_decode_tflop: float
    text_encode_tflop: float

    @property
    def rows(self) -> int:
        return sum(line.rows for line in self.lines)

    @property
    def evaluations(self) -> int:
        return sum(line.evaluations for line in self.lines)

    @property
    def unet_tflop(self) -> float:
        return sum(line.unet_tflop for line in self.lines)

    @property
    def total_tflop(self) -> float:
        return self.unet_tflop + self.vae_encode_tflop + self.vae_decode_tflop + self.text_encode_tflop

    @property
    def tflop_per_image(self) -> float:
        return self.total_tflop / self.rows if self.rows else 0.0


def work(rows_per_strength: Mapping[float, int], num_inference_steps: int, guidance_scale: float, gen: bool,
         sampler: str, flops: ComponentFlops) -> WorkEstimate:
    """UNet evaluations and TFLOP per strength, and the VAE / text-encoder TFLOP of all rows."""
    copies = guidance_copies(guidance_scale)
    lines = []
    for s, n in sorted(rows_per_strength.items()):
        steps = denoise_steps(num_inference_steps, s, gen, sampler)
        evaluations = n * steps * copies
        lines.append(StrengthLine(float(s), int(n), steps, evaluations, evaluations * flops.unet / TERA))
    rows = sum(rows_per_strength.values())
    return WorkEstimate(tuple(lines), 0.0 if gen else rows * flops.vae_encode / TERA,
                        rows * flops.vae_decode / TERA, rows * copies * flops.text_encode / TERA)


def scaled_rate(recorded_rate: float, recorded_tflop_per_image: float, tflop_per_image: float) -> float:
    """A recorded images/GPU-hour for images of another size of work: the GPU's FLOP rate held fixed."""
    if tflop_per_image <= 0:
        raise ValueError("an image of this plan needs no work")
    return recorded_rate * recorded_tflop_per_image / tflop_per_image


def gpus_for_deadline(gpu_hours: float, deadline_h: float) -> int:
    """GPUs that finish `gpu_hours` of work within `deadline_h` hours of wall time (at least 1)."""
    if not deadline_h > 0:
        raise ValueError(f"deadline must be > 0 hours, got {deadline_h}")
    return max(1, math.ceil(gpu_hours / deadline_h - 1e-9))


def stored_bytes(rows: int, resolution: int, png_bytes_per_pixel: float, row_overhead: int = 512) -> int:
    """Bytes the shards take: a PNG per row at `png_bytes_per_pixel`, plus the row's metadata and Parquet framing."""
    return int(rows * (resolution * resolution * png_bytes_per_pixel + row_overhead))


@dataclass(frozen=True)
class NodeCost:
    node_type: str            # cluster.yaml's name for the group
    instance: str
    gpus_per_node: int
    gpu: str | None
    usd_per_hour: float | None
    nodes_for_deadline: int | None
    max_workers: int | None
    node_hours: float
    usd: float | None


def node_costs(gpu_hours: float, gpus_needed: int | None, nodes: Sequence[Mapping[str, Any]],
               prices: Mapping[str, Mapping[str, Any]]) -> list[NodeCost]:
    """Per GPU node type: node-hours to do `gpu_hours` on it (all its GPUs busy) and their price."""
    out = []
    for node in nodes:
        price = prices.get(node["instance"])
        gpus = int(price["gpus"]) if price is not None else int(node.get("gpus") or 0)
        if gpus < 1:
            continue
        hours = gpu_hours / gpus
        usd = None if price is None else hours * float(price["usd_per_hour"])
        out.append(NodeCost(node["name"], node["instance"], gpus, None if price is None else price.get("gpu"),
                            None if price is None else float(price["usd_per_hour"]),
                            None if gpus_needed is None else math.ceil(gpus_needed / gpus),
                            node.get("max_workers"), hours, usd))
    return out


@dataclass
class PlanEstimate:
    """Everything `diffmix plan` prints; `to_dict` is the JSON form."""

    strategy: str
    num_train: int
    multiplier: float
    resolution: int
    batch_size: int
    num_inference_steps: int
    guidance_scale: float
    sampler: str
    work: WorkEstimate
    flops: ComponentFlops
    rate: float
    rate_source: str
    gpu_hours: float
    bytes_written: int
    deadline_h: float | None = None
    gpus_for_deadline: int | None = None
    nodes: list[NodeCost] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["work"].update(rows=self.work.rows, evaluations=self.work.evaluations, unet_tflop=self.work.unet_tflop,
                            total_tflop=self.work.total_tflop, tflop_per_image=self.work.tflop_per_image)
        return data


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.2f}"


def format_estimate(est: PlanEstimate) -> list[str]:
    """The estimate as printable lines (the CLI prints them, `diffmix pipeline` logs them)."""
    w = est.work
    out = [f"plan: {est.strategy}, {est.multiplier:g} x {est.num_train:,} train images = {w.rows:,} rows, "
           f"{est.resolution} px, T = {est.num_inference_steps} ({est.sampler}), guidance {est.guidance_scale:g} "
           f"({guidance_copies(est.guidance_scale)} UNet samples per step)",
           f"{'strength':>8} {'rows':>10} {'steps':>6} {'UNet evals':>14} {'UNet TFLOP':>14}"]
    for line in w.lines:
        out.append(f"{line.strength:>8g} {line.rows:>10,} {line.steps:>6} {line.evaluations:>14,} "
                   f"{line.unet_tflop:>14,.0f}")
    out += [f"{'all':>8} {w.rows:>10,} {'':>6} {w.evaluations:>14,} {w.unet_tflop:>14,.0f}",
            f"VAE encode {w.vae_encode_tflop:,.0f} TFLOP, VAE decode {w.vae_decode_tflop:,.0f} TFLOP, "
            f"text encode {w.text_encode_tflop:,.0f} TFLOP; total {w.total_tflop:,.0f} TFLOP "
            f"({w.tflop_per_image:.1f} TFLOP per image)",
            f"per pass: UNet {est.flops.unet / 1e9:,.1f} GFLOP, VAE encode {est.flops.vae_encode / TERA:.2f} / "
            f"decode {est.flops.vae_decode / TERA:.2f} TFLOP, text {est.flops.text_encode / 1e9:.1f} GFLOP "
            f"[{est.flops.how}]",
            f"rate: {est.rate:,.0f} images per GPU-hour [{est.rate_source}]",
            f"GPU-hours: {est.gpu_hours:,.2f}",
            f"bytes written: {est.bytes_written / 1e9:,.2f} GB (PNG shards)"]
    if est.deadline_h is not None:
        out.append(f"deadline {est.deadline_h:g} h: {est.gpus_for_deadline} GPUs (of the rated kind)")
    for n in est.nodes:
        fit = ""
        if n.nodes_for_deadline is not None:
            fit = f", {n.nodes_for_deadline} node(s) for the deadline"
            if n.max_workers is not None and n.nodes_for_deadline > n.max_workers:
                fit += f" (cluster.yaml max_workers {n.max_workers}: raise it)"
        out.append(f"node {n.node_type} ({n.instance}, {n.gpus_per_node} x {n.gpu or 'GPU'}, "
                   f"{_usd(n.usd_per_hour)}/h): {n.node_hours:,.2f} node-hours = {_usd(n.usd)}{fit}")
    out += [f"note: {note}" for note in est.notes]
    return out
