"""`diffmix <stage> --config x.yaml key=value ...`: one console command over every stage's `run(config)`.

Stages are looked up lazily by import path, so `diffmix check` does not import torch-heavy stages.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any, Callable

from engine.config import ConfigError, ExperimentConfig, load_config
from engine.errors import chain

log = logging.getLogger("engine")

# stage name -> "module:function"; each function takes an ExperimentConfig and returns a JSON-able summary
STAGES: dict[str, str] = {
    "check": "engine.check:run",
    "presets": "engine.presets:run",
    "pretrain": "engine.pretrain:run",
    "finetune": "engine.finetune:run",
    "synthesize": "engine.synthesis:run",
    "classify": "engine.classify.train:run",
    "sweep": "engine.pipeline:sweep",
    "evaluate": "engine.classify.evaluate:run",
    "compare-sets": "engine.synthesis.set_metrics:run",
    "export": "engine.export:run",
    "pipeline": "engine.pipeline:run",
    "plan": "engine.synthesis.dryrun:run",
}


# stage name -> "module:function" returning the stage's engine.ray_local.Needs (what it holds at once), so
# whatever runs several stages in one Ray instance can size it for the largest
NEEDS: dict[str, str] = {
    "pretrain": "engine.pretrain:resource_needs",
    "finetune": "engine.finetune:resource_needs",
    "synthesize": "engine.synthesis.stage:resource_needs",
    "classify": "engine.classify.train:resource_needs",
    "sweep": "engine.classify.tune:sweep_needs",
    "evaluate": "engine.classify.evaluate:resource_needs",
    "compare-sets": "engine.synthesis.set_metrics:resource_needs",
    "export": "engine.export:resource_needs",
}


# Expected errors and their exit codes (README, "Errors and exit codes"): `diffmix <stage>: <message>` on
# stderr and the code; anything else is a bug and keeps its traceback. By module and class name, so a
# failing `diffmix check` does not import torch to look up the synthesis stage's error class.
ERROR_CODES: list[tuple[str, str, int]] = [
    ("engine.config", "ConfigError", 2),
    ("engine.data.dataset", "DatasetError", 3),
    ("engine.data.images", "BadImageError", 3),
    ("engine.storage", "StorageError", 4),
    ("engine.models.errors", "ModelError", 5),          # and AdapterError
    ("engine.ray_local", "ResourceError", 6),
    ("engine.synthesis.translate", "SynthesisError", 7),  # and ReferenceImageError
    ("engine.synthesis.plan", "PlanError", 7),
    ("engine.data.shards", "ShardError", 7),
    ("engine.finetune", "FinetuneError", 8),
    ("engine.pretrain", "PretrainError", 8),
    ("engine.classify.evaluate", "EvaluateError", 9),
    ("engine.synthesis.set_metrics", "MetricsError", 9),
    ("engine.tracking", "TrackingError", 9),
]
DEBUG_ENV = "DIFFMIX_DEBUG"


def expected_error(exc: BaseException) -> tuple[BaseException, int] | None:
    """The first engine error in `exc`'s chain (through Ray's wrappers, which are skipped: their text is a
    whole traceback) and its exit code; None for anything unexpected."""
    kinds = [(getattr(sys.modules[m], c), code) for m, c, code in ERROR_CODES
             if m in sys.modules and hasattr(sys.modules[m], c)]
    ray_errors = sys.modules["ray.exceptions"].RayError if "ray.exceptions" in sys.modules else ()
    for err in chain(exc):
        if not isinstance(err, ray_errors):
            for kind, code in kinds:
                if isinstance(err, kind):
                    return err, code
    return storage_denied(exc)


def storage_denied(exc: BaseException) -> tuple[BaseException, int] | None:
    """Credentials or permissions refused by a library call outside the engine's Storage (Ray Train's or Tune's
    own use of the run folder): the storage error's line and code, not a bug's traceback."""
    from engine.storage import StorageError, denied

    reason = denied(exc)
    return None if reason is None else (StorageError(f"storage: {reason}"), 4)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "botocore", "s3fs", "aiobotocore", "fsspec", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def resolve_stage(name: str) -> Callable[[ExperimentConfig], Any]:
    module_name, func = STAGES[name].split(":")
    return getattr(importlib.import_module(module_name), func)


def stage_needs(name: str, config: ExperimentConfig) -> Any:
    """The named stage's resource needs for `config` (an engine.ray_local.Needs)."""
    module_name, func = NEEDS[name].split(":")
    return getattr(importlib.import_module(module_name), func)(config)


def build_parser(stages: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffmix", description="Diff-Mix data engine on Ray")
    parser.add_argument("stage", choices=stages or sorted(STAGES), help="what to run")
    parser.add_argument("--config", "-c", default=None, help="experiment YAML (defaults when omitted)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--debug", action="store_true",
                        help=f"tracebacks for expected errors too (or set {DEBUG_ENV}=1)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    plan = parser.add_argument_group("plan (dry run) only")
    plan.add_argument("--rate", default=None, help="images per GPU-hour to plan with (default: the recorded benchmark)")
    plan.add_argument("--deadline", default=None, help="hours the synthesis must finish in: prints the GPUs needed")
    plan.add_argument("--train-images", default=None, help="|train| to plan with instead of counting the dataset")
    plan.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return parser


# `diffmix plan` flag -> (config key, parser, what a valid value is)
PLAN_FLAGS: dict[str, tuple[str, Callable[[str], float], str]] = {
    "rate": ("cost.rate", float, "a positive number of images per GPU-hour"),
    "deadline": ("cost.deadline_h", float, "a positive number of hours"),
    "train_images": ("cost.train_images", int, "a positive whole number of images"),
}


def plan_overrides(args: argparse.Namespace) -> list[str]:
    """The plan flags as config overrides; a bad or misplaced value is a ConfigError naming the flag."""
    out = []
    for name, (key, parse, what) in PLAN_FLAGS.items():
        raw = getattr(args, name)
        if raw is None:
            continue
        flag = "--" + name.replace("_", "-")
        if args.stage != "plan":
            raise ConfigError(f"{flag} is an option of `diffmix plan` only")
        try:
            value = parse(raw)
        except ValueError:
            value = None
        if value is None or not value > 0 or value == float("inf"):
            raise ConfigError(f"{flag} must be {what}, got {raw!r}")
        out.append(f"{key}={value}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    setup_logging(args.log_level)
    try:
        config = load_config(args.config, args.overrides + plan_overrides(args))
    except ConfigError as exc:
        print(f"diffmix {args.stage}: {exc}", file=sys.stderr)
        return 2
    try:
        summary = resolve_stage(args.stage)(config)
    except Exception as exc:  # expected errors become one line and an exit code; the rest is re-raised
        found = None if args.debug or os.environ.get(DEBUG_ENV) else expected_error(exc)
        if found is None:
            raise
        err, code = found
        print(f"diffmix {args.stage}: {err}", file=sys.stderr)
        return code
    if args.stage == "plan" and not args.json:
        print("\n".join(summary["lines"]))
    elif summary is not None:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def job_main(stage: str) -> None:
    """Entry for `jobs/<stage>.py`: the same as `diffmix <stage> ...`."""
    sys.exit(main([stage, *sys.argv[1:]]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
