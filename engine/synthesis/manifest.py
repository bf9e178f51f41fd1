"""`.plan.json` (written first: claims an output folder for one plan hash) and `.manifest.json` (written last).

A folder holds one plan: a job whose plan hash differs from the folder's plan stops with an error unless
`synthesis.overwrite: true`, which clears the folder first. The manifest appears only when every planned
row is committed; its presence means the set is complete and readable. Both are hidden files, so Parquet
readers of the folder see only the shards (engine.data.shards); a folder written before keeps them as
`plan.json` / `manifest.json`, which are read, and moved to the hidden names when a job works on the folder.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from importlib import metadata
from typing import Any

from engine.data.shards import CARD, LEGACY_CARD, LEGACY_MANIFEST, MANIFEST, manifest_uri
from engine.storage import Storage, join, redact
from engine.synthesis.sink import committed_files
from engine.synthesis.speed import SpeedOptions, resolve
from engine.synthesis.translate import SynthesisError

log = logging.getLogger(__name__)

PLAN_FILE = ".plan.json"
LEGACY_PLAN_FILE = "plan.json"
LEGACY_FILES = (LEGACY_MANIFEST, LEGACY_PLAN_FILE, LEGACY_CARD)
MANIFEST_VERSION = 1
_PACKAGES = ("diffmix-engine", "torch", "diffusers", "transformers", "ray", "pyarrow", "numpy")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def speed_record(synthesis: Any) -> dict[str, Any]:
    """The Translator speed options as they apply on the actors' device (GPU actors: cuda): each option's
    effective value, CUDA-only ones as 'not applicable on cpu' on a CPU stream."""
    device = "cuda" if synthesis.num_gpus_per_actor > 0 else "cpu"
    return resolve(SpeedOptions.from_config(synthesis.speed), device).record()


def read_json(storage: Storage, uri: str) -> dict[str, Any] | None:
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise SynthesisError(f"{redact(uri)} is not valid JSON: {exc}") from None


def read_plan(storage: Storage, uri: str) -> dict[str, Any] | None:
    """The folder's plan claim (`.plan.json`, else a legacy `plan.json`)."""
    return read_json(storage, join(uri, PLAN_FILE)) or read_json(storage, join(uri, LEGACY_PLAN_FILE))


def read_manifest(storage: Storage, uri: str) -> dict[str, Any] | None:
    """The folder's manifest (`.manifest.json`, else a legacy `manifest.json`); None while incomplete."""
    found = manifest_uri(uri, storage)
    return read_json(storage, found) if found else None


def retire_legacy(storage: Storage, uri: str) -> None:
    """Move a folder written before the hidden names to them: the legacy plan and manifest are copied to their
    hidden names when those are missing, then the legacy files (and the old README.md card) removed, so the
    folder opens as a Parquet dataset."""
    for legacy, name in ((LEGACY_PLAN_FILE, PLAN_FILE), (LEGACY_MANIFEST, MANIFEST)):
        if storage.exists(join(uri, legacy)) and not storage.exists(join(uri, name)):
            storage.write_bytes(join(uri, name), storage.read_bytes(join(uri, legacy)))
    for legacy in LEGACY_FILES:
        storage.remove(join(uri, legacy))


def claim_output(storage: Storage, uri: str, plan_hash: str, plan: dict[str, Any], overwrite: bool) -> bool:
    """Make `uri` this plan's folder; True if it was cleared or new. Writes the plan only when absent."""
    current = read_plan(storage, uri)
    manifest = read_manifest(storage, uri)
    found = (current or {}).get("plan_hash") or (manifest or {}).get("plan_hash")
    parts = committed_files(storage, uri)
    if found == plan_hash:
        if not storage.exists(join(uri, PLAN_FILE)):
            storage.write_text(join(uri, PLAN_FILE), json.dumps(plan, indent=1, sort_keys=True))
        return False
    if found is not None or parts:
        what = f"plan {found}" if found else f"{len(parts)} shard file(s) of an unknown plan"
        if not overwrite:
            raise SynthesisError(
                f"synthesis output {redact(uri)} holds {what}, but this job's plan hash is {plan_hash}: "
                "set synthesis.overwrite: true to replace it, or choose another synthesis.output"
            )
        log.warning("overwrite: clearing %s (%s) for plan %s", redact(uri), what, plan_hash)
        for f in parts:
            storage.remove(f)
        for name in (MANIFEST, CARD, PLAN_FILE, *LEGACY_FILES):
            storage.remove(join(uri, name))
    storage.write_text(join(uri, PLAN_FILE), json.dumps(plan, indent=1, sort_keys=True))
    return True


def write_manifest(storage: Storage, uri: str, manifest: dict[str, Any]) -> None:
    """The manifest, written last (the set is complete); a legacy folder's old files go after it."""
    manifest = {"manifest_version": MANIFEST_VERSION, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **manifest}
    storage.write_text(join(uri, MANIFEST), json.dumps(manifest, indent=1, default=str))
    retire_legacy(storage, uri)
