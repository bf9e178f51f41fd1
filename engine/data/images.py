"""Image bytes <-> pixels, in one place, so every stage decodes and validates the same way."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImageError(ValueError):
    """An image that cannot be decoded; the message names where it came from."""


def decode(data: bytes, source: str = "<bytes>") -> Image.Image:
    """Decode to RGB, fully (a truncated file fails here, not later inside a worker)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise BadImageError(f"cannot decode image {source}: not an image file PIL knows") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"cannot decode image {source}: {exc}") from None


def encode_png(img: Image.Image | np.ndarray) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def to_array(data: bytes, size: int | None = None, source: str = "<bytes>") -> np.ndarray:
    """Decode and (optionally) resize to size x size; uint8 HWC RGB."""
    img = decode(data, source)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)
