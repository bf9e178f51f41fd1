"""Decompression bombs: a PNG of a few hundred bytes whose header declares 50,000 x 50,000 pixels (7.5 GB as
RGB) is a bad image wherever the engine decodes user images: the loaders' checks (Ray tasks for image folders,
the driver for Parquet), the classifier's decode tasks and the one decoder every stage shares."""
import io
import json
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.classify.augment import eval_images
from engine.config import load_config
from engine.data import BadImageError, DatasetError, decode, load_dataset
from engine.data.images import MAX_PIXELS


def png_declaring(width: int, height: int) -> bytes:
    """A real PNG: 1-bit greyscale header of `width` x `height`, four zero scanlines of data (the rest missing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + (width + 7) // 8) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def png(color: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (color, 255 - color, 7)).save(buf, format="PNG")
    return buf.getvalue()


BOMB = png_declaring(50_000, 50_000)


def test_the_bomb_is_a_small_real_png_declaring_huge_dimensions(monkeypatch):
    """A real PNG (PIL without its limit opens it at 50,000 x 50,000), which stock PIL refuses with an error that
    is not an OSError (no bad-image path caught it)."""
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(BOMB))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with Image.open(io.BytesIO(BOMB)) as img:
        assert img.format == "PNG" and img.size == (50_000, 50_000)
    assert len(BOMB) < 20_000
    # the stock open refuses only beyond twice its limit: here it would have opened
    assert 2 * MAX_PIXELS > 10_000 * 10_000 > MAX_PIXELS


@pytest.mark.parametrize("side", [50_000, 10_000])
def test_decode_refuses_from_the_header(side, monkeypatch):
    """Beyond twice PIL's limit (its DecompressionBombError) and between once and twice (where PIL only warns and
    would decode 10,000 x 10,000): a BadImageError naming the source and the size, before any pixel; also in a
    process that switched PIL's own limit off."""
    with pytest.raises(BadImageError, match=r"cannot decode image jay/bomb\.png: too many pixels"):
        decode(png_declaring(side, side), "jay/bomb.png")
    assert decode(png(3)).size == (16, 16)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(BadImageError, match=f"declares {side} x {side}"):
        decode(png_declaring(side, side), "jay/bomb.png")


def test_classifier_decode_tasks_name_the_bomb():
    """What classify's decode tasks and the evaluator run on each batch (engine.classify.augment)."""
    with pytest.raises(BadImageError, match="row-7"):
        eval_images([png(1), png_declaring(50_000, 50_000)], 16, 0.875, sources=["row-6", "row-7"])


def test_image_folder_bomb_is_listed_or_skipped(ray_session, tmp_path):
    """Checked by Ray tasks (the session's cluster): one DatasetError naming the file, or skipped and counted."""
    root = tmp_path / "birds"
    for ci, cls in enumerate(("cardinal", "jay", "wren")):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            (root / cls / f"{i}.png").write_bytes(png(ci * 40 + i))
    (root / "jay" / "bomb.png").write_bytes(BOMB)
    base = ["dataset.source=imagefolder", f"dataset.uri={root}", "dataset.metaclass=bird"]
    with pytest.raises(DatasetError, match=r"1 bad image\(s\): .*jay/bomb\.png: too many pixels"):
        load_dataset(load_config(None, base))
    ds = load_dataset(load_config(None, [*base, "dataset.skip_bad_images=true"]))
    assert ds.skipped == 1 and ds.train_rows.num_rows + ds.test_rows.num_rows == 12


def test_parquet_bomb_is_listed_or_skipped(tmp_path):
    images = [png(1), BOMB, png(2), png(3)]
    table = pa.table({"image": [{"bytes": b, "path": f"img{i}.png"} for i, b in enumerate(images)],
                      "label": [0, 1, 0, 1]})
    meta = {"info": {"features": {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": ["x", "y"]}}}}
    (tmp_path / "p").mkdir()
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps(meta).encode()}),
                   tmp_path / "p" / "train.parquet")
    base = ["dataset.source=parquet", f"dataset.uri={tmp_path / 'p'}", "dataset.metaclass=thing"]
    with pytest.raises(DatasetError, match=r"train\.parquet row 1 \(img1\.png\): too many pixels"):
        load_dataset(load_config(None, base))
    assert load_dataset(load_config(None, [*base, "dataset.skip_bad_images=true"])).skipped == 1
