"""The sampler is part of the method: the paper samples with DPM-Solver++ (25 steps), whatever scheduler a model
folder ships (SD-1.5 ships PNDM, and a pipeline loaded from it samples with PNDM unless told otherwise).

The scheduler is rebuilt from the folder's scheduler config (its noise schedule: betas, timesteps, offset)
with the named solver, as the official Diff-Mix code does (`DPMSolverMultistepScheduler.from_config`).
`synthesis.sampler` names it; "model" keeps the folder's own (for experiments, never by accident).
"""
from __future__ import annotations

from typing import Any

# name -> (diffusers scheduler class, the fields that make it that solver); "model": the folder's own
SAMPLERS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "model": (None, {}),
}
PAPER_SAMPLER = "dpmsolver++"  # Diff-Mix, Table 7: "Noise Scheduler: DPMsolver++"


def sampler_identity(name: str) -> dict[str, Any]:
    """What names the sampler in a plan hash and a manifest (with the model fingerprint, which covers the
    folder's scheduler config, this fixes the sampling schedule)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: expected one of {sorted(SAMPLERS)}")
    cls, fields = SAMPLERS[name]
    return {"name": name, "class": cls or "the model folder's own", **fields}


def set_sampler(pipe: Any, name: str) -> Any:
    """Give `pipe` the named sampler, built from its current scheduler's config; returns the scheduler."""
    import diffusers

    sampler_identity(name)
    cls, fields = SAMPLERS[name]
    if cls is not None:
        pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **fields)
    return pipe.scheduler


__all__ = ["PAPER_SAMPLER", "SAMPLERS", "sampler_identity", "set_sampler"]
