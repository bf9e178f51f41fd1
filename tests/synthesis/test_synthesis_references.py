"""References read from storage by the stream's tasks give the same images as references shipped inline.

The built-in digits (2 shots per class) are written as an image folder to the SeaweedFS S3 store; a
real-mix run over that folder (the driver keeps URIs; reference tasks read the images by URI) and a run
over the same images held inline (bytes in the driver's table, the path the built-in data takes) must
have the same plan and byte-identical rows. A counting hook shows the driver read no image.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from engine.config import load_config
from engine.data import ImageDataset, load_dataset
from engine.storage import Storage
from engine.synthesis import run
from engine.synthesis.sink import committed_files, read_shard

S3_ACCESS_KEY = "diffmix-test-access"      # the values tests/conftest.py gives the SeaweedFS server
S3_SECRET_KEY = "diffmix-test-secret-key"


def overrides(tiny_cache: Path, output: str, *extra: str) -> list[str]:
    return [
        f"run.output={output}", f"model.cache_dir={tiny_cache}", "model.resolution=32",
        "synthesis.strategy=real-mix", "synthesis.multiplier=1", "synthesis.num_inference_steps=4",
        "synthesis.resolution=32", "synthesis.num_gpus_per_actor=0", "synthesis.rows_per_file=4",
        "synthesis.batch_size=4", "synthesis.strength_run=4", "synthesis.clip_batch_size=4",
        "metrics.enabled=false", *extra,
    ]


def read_rows(storage: Storage, uri: str) -> pa.Table:
    return pa.concat_tables([read_shard(storage, f) for f in committed_files(storage, uri)]).sort_by("index")


def test_references_read_from_s3_give_the_inline_images(ray_session, tiny_cache, tmp_path, s3_server, s3_bucket,
                                                        driver_reads):
    digits = load_dataset(load_config(None, ["dataset.subset.kind=few_shot", "dataset.subset.shots=2"]))
    options = (f"storage.storage_options={{key: {S3_ACCESS_KEY}, secret: {S3_SECRET_KEY}, "
               f"client_kwargs: {{endpoint_url: '{s3_server['endpoint_url']}'}}}}")
    folder = f"{s3_bucket}/digits"
    on_s3 = load_config(None, overrides(tiny_cache, str(tmp_path / "s3"), options, "dataset.source=imagefolder",
                                        f"dataset.uri={folder}", "dataset.metaclass=digit",
                                        f"dataset.class_names=[{', '.join(digits.class_names)}]"))
    storage = Storage.from_config(on_s3)
    for split in ("train", "test"):  # every train image; one test image per class (the plan reads train only)
        table = digits.split(split)
        written: set[int] = set()
        for row_id, label, data in zip(table.column("id").to_pylist(), table.column("label").to_pylist(),
                                       table.column("image").to_pylist()):
            if split == "train" or label not in written:
                storage.write_bytes(f"{folder}/{split}/{digits.class_names[label]}/{row_id}.png", data)
                written.add(label)

    remote = run(on_s3)
    assert remote["written"] == 20 and not [u for u in driver_reads if u.endswith(".png")]

    ds = load_dataset(on_s3, storage)
    assert ds.on_storage
    inline = ImageDataset(ds.class_names, ds.metaclass, ds.train, ds.test, ds.name)  # bytes in the table
    assert not inline.on_storage and inline.fingerprint() == ds.fingerprint()
    local = run(load_config(None, overrides(tiny_cache, str(tmp_path / "inline"), options)), inline)
    assert local["plan_hash"] == remote["plan_hash"]
    assert read_rows(Storage(), remote["output"]).equals(read_rows(Storage(), local["output"]))
