"""Stage 2-4: plan -> translate -> CLIP score -> shards -> filter threshold (DESIGN.md steps 2-4).

`run(config)` is the stage entry (`diffmix synthesize`, `jobs/synthesize.py`). The package imports
nothing heavy: `plan` is pure numpy/pyarrow, and `translate` / `score` need only torch + diffusers
(no Ray), so a bare GPU box can run the Translator for benchmarks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.config import ExperimentConfig
    from engine.data import ImageDataset


def run(config: "ExperimentConfig", dataset: "ImageDataset | None" = None) -> dict[str, Any]:
    """Synthesize the configured set; see engine.synthesis.stage.run."""
    from engine.synthesis.stage import run as _run

    return _run(config, dataset)


__all__ = ["run"]
