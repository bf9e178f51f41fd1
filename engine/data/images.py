"""Image bytes <-> pixels, in one place, so every stage decodes and validates the same way."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError


# The most pixels an image may declare: PIL's default decompression-bomb limit (~9,460 x 9,460; 256 MiB as RGB).
# A few hundred bytes of PNG can declare 50,000 x 50,000 pixels (7.5 GB decoded): checked against the header,
# before any pixel is decoded, and always (whatever PIL.Image.MAX_IMAGE_PIXELS is set to in the process).
MAX_PIXELS = 89_478_485


class BadImageError(ValueError):
    """An image that cannot be decoded; the message names where it came from."""


def check_size(size: tuple[int, int], source: str) -> None:
    """Refuse an image whose header declares more than MAX_PIXELS (a decompression bomb) before decoding it."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise BadImageError(f"cannot decode image {source}: too many pixels (it declares {width} x {height}, more "
                            f"than {MAX_PIXELS:,}: a decompression bomb?)")


def decode(data: bytes, source: str = "<bytes>") -> Image.Image:
    """Decode to RGB, fully (a truncated file fails here, not later inside a worker); an image declaring more
    than MAX_PIXELS is refused from its header."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            check_size(img.size, source)
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise BadImageError(f"cannot decode image {source}: not an image file PIL knows") from None
    except Image.DecompressionBombError as exc:  # PIL's own check in open() (over twice its limit)
        raise BadImageError(f"cannot decode image {source}: too many pixels ({exc})") from None
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
