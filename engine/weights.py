"""Loading `.pt` / `.pth` files without running what is in them.

A torch checkpoint is a pickle, and a pickle can call any function while it loads (an object's
`__reduce__`): a classifier folder or a weights file from someone else could run code in every process
that opens it. Every torch file the engine reads goes through `load_weights`, which allows tensors and
plain containers only (`weights_only=True`) and turns a refusal into the caller's one-line error naming
the file. The engine's own checkpoints hold nothing else (state dicts, numbers, strings, lists, dicts).
"""
from __future__ import annotations

import io
import pickle
from typing import IO, Any

from engine.storage import redact

_MARK = "WeightsUnpickler error:"


def refusal_reason(exc: BaseException) -> str:
    """What torch's weights-only refusal (a paragraph of advice) says was refused, in one sentence: the global
    it would have called (`GLOBAL io.open`), or the opcode it does not know (not a torch file)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if _MARK in line:
            reason = line.split(_MARK, 1)[1].strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return reason.split(". ")[0].rstrip(".")
        if "GLOBAL" in line:
            return line.rstrip(".")
    return "not a pickle torch reads"


def load_weights(source: str | bytes | IO[bytes], name: str, error: type[Exception],
                 map_location: Any = "cpu") -> Any:
    """`torch.load(source, weights_only=True)`; a file that holds other objects, or that is not a torch file,
    raises `error` with one line naming `name` (a path or URI) instead of loading."""
    import torch

    data = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(data, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # the weights-only unpickler refused an object, or not a pickle at all
        raise error(f"{redact(name)}: refused: not a weights-only torch file (only tensors and plain values load; "
                    f"a full pickle could run code): {refusal_reason(exc)}") from None
    except (RuntimeError, EOFError) as exc:  # torch's zip reader on a truncated or foreign file; an empty file
        first = str(exc).splitlines()[0].split(". ")[0] if str(exc) else "empty file"
        raise error(f"{redact(name)}: not a readable torch checkpoint ({first[:200]})") from None
