"""`plan.json` (written first: claims an output folder for one plan hash) and `manifest.json` (written last).

A folder holds one plan: a job whose plan hash differs from the folder's `plan.json` stops with an
error unless `synthesis.overwrite: true`, which clears the folder first. `manifest.json` appears only
when every planned row is committed; its presence means the set is complete and readable.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from importlib import metadata
from typing import Any

from engine.data.shards import CARD, MANIFEST
from engine.storage import Storage, join, redact
from engine.synthesis.sink import committed_files
from engine.synthesis.speed import SpeedOptions, resolve
from engine.synthesis.translate import SynthesisError

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
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


def claim_output(storage: Storage, uri: str, plan_hash: str, plan: dict[str, Any], overwrite: bool) -> bool:
    """Make `uri` this plan's folder; True if it was cleared or new. Writes plan.json only when absent."""
    current = read_json(storage, join(uri, PLAN_FILE))
    manifest = read_json(storage, join(uri, MANIFEST))
    found = (current or {}).get("plan_hash") or (manifest or {}).get("plan_hash")
    parts = committed_files(storage, uri)
    if found == plan_hash:
        if current is None:
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
        storage.remove(join(uri, MANIFEST))
        storage.remove(join(uri, CARD))
        storage.remove(join(uri, PLAN_FILE))
    storage.write_text(join(uri, PLAN_FILE), json.dumps(plan, indent=1, sort_keys=True))
    return True


def write_manifest(storage: Storage, uri: str, manifest: dict[str, Any]) -> None:
    manifest = {"manifest_version": MANIFEST_VERSION, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **manifest}
    storage.write_text(join(uri, MANIFEST), json.dumps(manifest, indent=1, default=str))
