"""Hugging Face-style image Parquet files (tests): embedded PNGs, an int `label` column, ClassLabel names."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png(color: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (color % 256, 0, 255 - color % 256)).save(buf, format="PNG")
    return buf.getvalue()


def class_label_parquet(path: Path, names: Sequence[object], per_class: int = 3) -> None:
    """One Parquet file of `per_class` distinct images per class whose ClassLabel metadata carries `names` as
    given (any strings: what a dataset from elsewhere may hold)."""
    labels = [c for c in range(len(names)) for _ in range(per_class)]
    table = pa.table({"image": [{"bytes": png(7 * i), "path": None} for i in range(len(labels))], "label": labels})
    meta = {"info": {"features": {"image": {"_type": "Image"},
                                  "label": {"_type": "ClassLabel", "names": list(names)}}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()}), path)
