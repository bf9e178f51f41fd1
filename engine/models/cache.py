"""Build a folder once per node: a temp sibling renamed into place under a file lock.

A crashed build leaves only a `.tmp-*` sibling (cleared by the next builder), never a half folder
under the final name; a second process waiting on the lock finds the finished folder and reuses it.
"""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from typing import Callable

from filelock import FileLock, Timeout

from engine.models.errors import ModelError

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 1800.0


def _temp_prefix(name: str) -> str:
    return f".tmp-{name}-"


def _clear_stale_temps(parent: str, name: str) -> None:
    """Only called under the lock: any temp sibling of `name` is from a crashed builder."""
    prefix = _temp_prefix(name)
    for entry in os.listdir(parent):
        if entry.startswith(prefix):
            log.info("removing stale partial build %s", os.path.join(parent, entry))
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def build_once(folder: str, build: Callable[[str], None], lock_timeout_s: float = LOCK_TIMEOUT_S) -> bool:
    """Make `folder` by calling `build(tmp_folder)` then renaming; True if this call built it.

    An existing `folder` is taken as complete (it only ever appears by rename) and left alone.
    """
    folder = os.path.abspath(os.path.expanduser(folder))
    if os.path.isdir(folder):
        return False
    parent, name = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    lock = FileLock(os.path.join(parent, f".{name}.lock"), timeout=lock_timeout_s)
    try:
        with lock:
            if os.path.isdir(folder):  # another process built it while we waited
                return False
            _clear_stale_temps(parent, name)
            tmp = os.path.join(parent, f"{_temp_prefix(name)}{uuid.uuid4().hex[:12]}")
            try:
                build(tmp)
                os.rename(tmp, folder)
            finally:
                if os.path.exists(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
    except Timeout as exc:
        raise ModelError(f"timed out after {lock_timeout_s:.0f}s waiting for another build of {folder}") from exc
    log.info("built %s", folder)
    return True
