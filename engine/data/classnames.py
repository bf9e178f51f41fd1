"""Class names as users' datasets have them, and as folder names.

A class name comes from the dataset (a folder name, Hugging Face ClassLabel metadata, `dataset.class_names`,
a synthetic set's manifest), so it can be anything: Fashion-MNIST's "T-shirt/top", a name with `..`, a name
of hundreds of characters. Where a name becomes a path (an `imagefolder` export), it goes through
`folder_names`: the same names always get the same folders, one per class, never a path outside the folder
written to. Only names no tool can carry are refused at load (`check_class_names`).
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from typing import Sequence

# Characters that would split a path, are reserved on Windows or object-store consoles, are glob patterns in
# fsspec, or are control characters: each becomes "_" in a folder name
_UNSAFE = re.compile(r'[/\\:*?"<>|\[\]\x00-\x1f\x7f]')
# Longest folder name in UTF-8 bytes: filesystems allow 255, object-store keys 1,024 in all (the rest is the
# export's own path)
MAX_FOLDER_BYTES = 100
_HASH_CHARS = 8


class ClassNameError(ValueError):
    """Class names no tool can carry; the message lists them (raised as the loaders' DatasetError)."""


def unusable(name: object) -> str | None:
    """Why a class name is refused (not a string, empty or blank, a NUL character), or None."""
    if not isinstance(name, str):
        return f"not a string ({type(name).__name__})"
    if not name.strip():
        return "empty"
    if "\x00" in name:
        return "holds a NUL character"
    return None


def check_class_names(names: Sequence[object]) -> None:
    """Refuse names that are empty, not strings, hold a NUL, or repeat, listing every such name."""
    problems = [f"{n!r} ({why})" for n in names if (why := unusable(n)) is not None]
    repeated = sorted(n for n, c in Counter(n for n in names if isinstance(n, str)).items() if c > 1)
    problems += [f"{n!r} (appears more than once)" for n in repeated]
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ClassNameError(f"unusable class names: {shown}")


def _hash(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:_HASH_CHARS]


def _truncate(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, on a character boundary."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def safe_folder(name: str) -> str:
    """`name` as one path segment: unsafe characters and leading dots (hidden folders, `..`) become "_", and a
    name too long for a folder is cut and given its hash. A safe name stays as it is."""
    text = _UNSAFE.sub("_", unicodedata.normalize("NFC", name))
    text = re.sub(r"^\.+", lambda m: "_" * len(m.group()), text)
    if len(text.encode("utf-8")) > MAX_FOLDER_BYTES:
        text = f"{_truncate(text, MAX_FOLDER_BYTES - _HASH_CHARS - 1)}-{_hash(name)}"
    return text or f"class-{_hash(name)}"


def folder_names(names: Sequence[str]) -> list[str]:
    """One folder name per class, in class order: unique also where case is ignored (macOS, Windows), and a
    pure function of the names. Names that would share a folder each get their hash appended."""
    candidates = [safe_folder(n) for n in names]
    clashes = Counter(c.casefold() for c in candidates)
    out = [f"{_truncate(c, MAX_FOLDER_BYTES - _HASH_CHARS - 1)}-{_hash(n)}" if clashes[c.casefold()] > 1 else c
           for n, c in zip(names, candidates)]
    if len({f.casefold() for f in out}) != len(out):  # two names whose hashes agree: refuse rather than merge
        raise ClassNameError(f"class names {list(names)[:10]} do not map to distinct folder names")
    return out
