"""A folder from elsewhere downloads only inside its destination: an object key with `..` segments (S3 stores
them as they are; fsspec's in-memory filesystem too, SeaweedFS refuses them) fails the whole download, naming the
key, before any file is written."""
import uuid

import fsspec
import pytest

from engine.storage import Storage, StorageError


def test_a_key_climbing_out_of_the_folder_is_refused_before_any_download(tmp_path):
    fs = fsspec.filesystem("memory")
    root = f"/models-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(f"{root}/unet/config.json", b"{}")
    fs.pipe_file(f"{root}/../../escaped.txt", b"payload")
    dest = tmp_path / "cache" / "model"
    with pytest.raises(StorageError, match=r"memory://.*/\.\./\.\./escaped\.txt: its key would download outside"):
        Storage().download_dir(f"memory://{root}", str(dest))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []      # nothing written, inside or out
    fs.rm(f"{root}/../../escaped.txt")
    Storage().download_dir(f"memory://{root}", str(dest))              # the same folder without it downloads
    assert (dest / "unet" / "config.json").read_bytes() == b"{}"


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_a_folder_name_with_glob_characters_is_globbed_as_written(tmp_path, where, request):
    """`exp[1]` is a folder name, not a character class: a classifier or synthetic-set folder so named is found."""
    if where == "local":
        storage, root = Storage(), str(tmp_path / "exp[1]*")
    else:
        s3_server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        storage, root = Storage(s3_server["storage_options"]), f"{bucket}/exp[1]*"
    for name in ("train/checkpoint_000/state.pt", "train/checkpoint_001/state.pt", "train/other.txt"):
        storage.write_bytes(f"{root}/{name}", b"x")
    assert storage.glob(f"{root}/train", "checkpoint_*/state.pt") == [
        f"{root}/train/checkpoint_000/state.pt", f"{root}/train/checkpoint_001/state.pt"]
