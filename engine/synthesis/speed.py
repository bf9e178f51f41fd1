"""Exact speed options of the Translator (`synthesis.speed`): execution knobs, never in the plan hash.

Each option computes the same math as eager PyTorch (different kernels or layouts, so images may differ in
the last bits: `engine.synthesis.exactness` measures by how much). `resolve` turns the configured values
into what applies on one device: CUDA-only options (cuDNN autotuning, CUDA graphs) are accepted on a CPU
and recorded as not applicable there, never an error. `apply` changes a loaded pipeline in place; the
same record goes to the log and to the set's manifest.

torch.compile keeps its artifacts (Inductor's FX graph cache, AOTAutograd cache, Triton kernels) in
`<model.cache_dir>/inductor` unless TORCHINDUCTOR_CACHE_DIR is set, so a restarted actor on the same
node reuses them and pays a fraction of the first warm-up.
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
CUDA_GRAPH_MODES = ("max-autotune", "reduce-overhead")  # Inductor modes that capture CUDA graphs
NOT_ON_CPU = "not applicable on cpu"
INDUCTOR_DIR = "inductor"


@dataclass(frozen=True)
class SpeedOptions:
    """The configured values (engine.config.SpeedConfig); None means 'the device's default'."""

    compile: str = "off"
    compile_vae: bool = True
    channels_last: bool | None = None
    fuse_qkv: bool | None = None
    cudnn_benchmark: bool = False
    pad_last_batch: bool | None = None

    @classmethod
    def from_config(cls, speed: Any) -> "SpeedOptions":
        return cls(**(speed.model_dump() if hasattr(speed, "model_dump") else dict(speed or {})))


@dataclass(frozen=True)
class Effective:
    """What applies on `device` ("cuda" or "cpu"), plus why anything requested does not."""

    device: str
    compile: str
    compile_vae: bool
    channels_last: bool
    fuse_qkv: bool
    cudnn_benchmark: bool
    pad_last_batch: bool
    notes: tuple[str, ...] = field(default=())

    @property
    def compiled(self) -> bool:
        return self.compile != "off"

    def record(self) -> dict[str, Any]:
        """JSON for the manifest and the log: each option's effective value, or 'not applicable on cpu'."""
        out: dict[str, Any] = asdict(self)
        out["notes"] = list(self.notes)
        if self.device != "cuda":
            out["cudnn_benchmark"] = NOT_ON_CPU
        return out


def resolve(options: SpeedOptions, device: str) -> Effective:
    """The options as they apply on `device`. Defaults (None): channels_last and fused QKV on CUDA only (no
    start-up cost; on a CPU they do not pay), a padded last batch whenever the UNet is compiled."""
    if options.compile not in COMPILE_MODES:
        raise ValueError(f"synthesis.speed.compile {options.compile!r} is not one of {list(COMPILE_MODES)}")
    cuda = device == "cuda"
    notes: list[str] = []
    mode = options.compile
    if not cuda and mode in CUDA_GRAPH_MODES:
        fallback = "default" if mode == "reduce-overhead" else "max-autotune-no-cudagraphs"
        notes.append(f"compile={mode}: CUDA graphs {NOT_ON_CPU}; compiled with mode {fallback}")
        mode = fallback
    if not cuda and options.cudnn_benchmark:
        notes.append(f"cudnn_benchmark: {NOT_ON_CPU}")
    pad = options.pad_last_batch if options.pad_last_batch is not None else mode != "off"
    return Effective(
        device="cuda" if cuda else "cpu", compile=mode, compile_vae=options.compile_vae and mode != "off",
        channels_last=options.channels_last if options.channels_last is not None else cuda,
        fuse_qkv=options.fuse_qkv if options.fuse_qkv is not None else cuda,
        cudnn_benchmark=options.cudnn_benchmark and cuda, pad_last_batch=pad, notes=tuple(notes))


def inductor_cache(cache_dir: str) -> str:
    """Point Inductor's on-disk caches at `<cache_dir>/inductor` (unless the environment already chose a
    folder) and make sure the FX graph and AOTAutograd caches are on. Call before the first compile."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its default into the environment on first use, so that value is not a user's choice
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        folder = chosen
    else:
        folder = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), INDUCTOR_DIR)
    os.makedirs(folder, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return folder


def apply(pipe: Any, eff: Effective, cache_dir: str) -> dict[str, Any]:
    """Apply `eff` to a loaded img2img pipeline in place (its text-to-image view shares the modules).
    Order matters: fuse the projections before changing layouts, and compile last."""
    import torch

    if eff.fuse_qkv:
        pipe.fuse_qkv_projections(unet=True, vae=True)
    if eff.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if eff.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    record = eff.record()
    if eff.compiled:
        record["inductor_cache"] = inductor_cache(cache_dir)
        # graph breaks are allowed: a diffusers change that adds one costs speed (the benchmark shows it), not the job
        pipe.unet.compile(mode=eff.compile, fullgraph=False)
        if eff.compile_vae:
            pipe.vae.encoder.compile(mode=eff.compile, fullgraph=False)
            pipe.vae.decoder.compile(mode=eff.compile, fullgraph=False)
    log.info("translator speed options: %s", record)
    return record
