"""Where a config's paths point: every relative local path is made absolute once, in the process that loads
the config (the driver), so no other process resolves it against its own working directory.

Why: Ray runs work in other working directories: each Tune trial in its own trial folder, Ray Data tasks and
Train workers in their worker's, and a `ray job submit --working-dir .` job in the job's unpacked copy of that
folder on the head. A relative `run.output: runs` resolved there names a different folder in each process.
The config fields that hold a path or URI carry a `Location` marker (engine.config); pydantic applies the rule
below when the config is validated, and workers only ever see absolute paths.

The rule: a URI with a scheme (`s3://`, `gs://`, `hf://` ...) is left as it is; a local path (a plain path or
`file://`) gets `~` expanded and is made absolute against the working directory of the process that loads it.
Model specs (`model.base`, `model.clip`) are paths only when they look like one or name an existing folder;
`tiny`, the shipped `builtin-*` models and hub ids (`org/name`) stand for themselves. A tracking URI is a
path only without a scheme (`databricks` is MLflow's own name).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

# what `ray job submit` puts in its driver's environment (ray._private.runtime_env.constants: its value is its name)
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
SHIPPED_PREFIX = "builtin-"  # models that ship inside the package (engine.models.base.SHIPPED_MODELS)


@dataclass(frozen=True)
class Location:
    """Marks a config field that holds a path or URI (pydantic field metadata).

    `shared`: every node of a cluster reads or writes the same place through it (a local one must be on a
    shared mount there, `storage.shared_local`); false for per-node caches and driver-only files.
    `output`: the stage writes there (a relative one inside a submitted job's working dir is lost with it)."""

    shared: bool = True
    output: bool = False


def has_scheme(uri: str) -> bool:
    """A URI of a remote filesystem (anything with `://` but `file://`)."""
    return "://" in uri and not uri.startswith("file://")


def job_working_dir() -> str | None:
    """The working directory of a `ray job submit --working-dir` job's driver (the job's unpacked copy of the
    folder, under Ray's temp dir on the head), or None outside one."""
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (json.JSONDecodeError, AttributeError):
        return None
    return os.getcwd() if runtime_env.get("working_dir") else None


def absolute_path(uri: str) -> str:
    """A local path (plain or `file://`) as an absolute path, `~` expanded; a remote URI unchanged."""
    if has_scheme(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))


def resolve_local(uri: str | None, output: bool = False) -> str | None:
    """The driver-side rule for one path field; warns when a relative output lands in a job's working-dir copy."""
    if uri is None or has_scheme(uri):
        return uri
    resolved = absolute_path(uri)
    relative = not os.path.isabs(os.path.expanduser(uri.removeprefix("file://")))
    workdir = job_working_dir() if output and relative else None
    if workdir is not None:
        log.warning("%r is relative: in this Ray job it is %s, inside the job's copy of its working dir, which "
                    "Ray may delete once the job ends; give outputs an absolute path or a URI", uri, resolved)
    return resolved


def resolve_output(uri: str | None) -> str | None:
    return resolve_local(uri, output=True)


def resolve_many(uris: list[str] | None) -> list[str] | None:
    return None if uris is None else [u for u in (resolve_local(x) for x in uris) if u is not None]


def looks_like_path(spec: str) -> bool:
    """A model spec that can only be a local path (a hub id is "name" or "org/name")."""
    return (spec.startswith(("/", ".", "~", "file://")) or spec.count(os.sep) >= 2
            or (os.altsep is not None and spec.count(os.altsep) >= 2))


def resolve_model_spec(spec: str) -> str:
    """A model spec that names a local folder becomes its absolute path; names and hub ids stay as they are."""
    stripped = spec.strip()
    if stripped == "tiny" or stripped.startswith(SHIPPED_PREFIX) or has_scheme(stripped):
        return stripped
    if looks_like_path(stripped) or os.path.exists(os.path.expanduser(stripped)):
        return absolute_path(stripped)
    return stripped


def resolve_tracking_uri(uri: str | None) -> str | None:
    """An MLflow tracking URI: a scheme-less one other than MLflow's `databricks` names is a local path."""
    if uri is None or ":" in uri or uri.split("/")[0] in ("databricks", "databricks-uc"):
        return uri
    return resolve_output(uri)


def is_local_location(value: str) -> bool:
    """A resolved location on the process's own disk (an absolute path)."""
    return not has_scheme(value) and os.path.isabs(value)
