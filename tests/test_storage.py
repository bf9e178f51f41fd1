"""Storage on local disk and on a real S3 server (SeaweedFS), through the same fsspec code."""
import os

import pytest

from engine.storage import Storage, StorageError, join, redact


def roundtrip(storage: Storage, root: str) -> None:
    storage.write_bytes(join(root, "a/x.bin"), b"hello")
    storage.write_text(join(root, "a/y.json"), "{}")
    assert storage.read_bytes(join(root, "a/x.bin")) == b"hello"
    assert storage.exists(join(root, "a/x.bin")) and not storage.exists(join(root, "a/nope"))
    assert storage.list(join(root, "a")) == [join(root, "a/x.bin"), join(root, "a/y.json")]
    assert storage.list(join(root, "a"), "*.json") == [join(root, "a/y.json")]
    assert storage.list(join(root, "missing")) == []
    assert storage.walk_files(root) == [join(root, "a/x.bin"), join(root, "a/y.json")]
    storage.write_bytes(join(root, "a/x.bin"), b"replaced")  # overwrite is whole-file
    assert storage.read_bytes(join(root, "a/x.bin")) == b"replaced"
    with pytest.raises(FileNotFoundError, match="nope"):
        storage.read_bytes(join(root, "a/nope"))


def test_local_roundtrip(tmp_path):
    roundtrip(Storage(), str(tmp_path))
    roundtrip(Storage(), "file://" + str(tmp_path / "f"))


def test_s3_roundtrip(s3_server, s3_bucket):
    roundtrip(Storage(s3_server["storage_options"]), s3_bucket + "/run")


def test_local_failed_write_leaves_no_file(tmp_path, monkeypatch):
    storage = Storage()
    target = str(tmp_path / "out.parquet")

    real_fsync = os.fsync

    def die(fd):
        raise OSError("disk died")

    monkeypatch.setattr(os, "fsync", die)
    with pytest.raises(OSError, match="disk died"):
        storage.write_bytes(target, b"x" * 1000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert os.listdir(tmp_path) == []  # neither the target nor a temp file is visible


def test_local_old_content_survives_failed_overwrite(tmp_path, monkeypatch):
    storage = Storage()
    target = str(tmp_path / "m.json")
    storage.write_text(target, "old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
    with pytest.raises(OSError):
        storage.write_text(target, "new")
    assert open(target).read() == "old" and os.listdir(tmp_path) == ["m.json"]


def test_s3_failed_write_leaves_no_object(s3_server, s3_bucket):
    """A PUT whose body cannot be produced never creates the key (single-request upload)."""
    storage = Storage(s3_server["storage_options"])

    class Boom(bytes):
        def __len__(self):
            raise OSError("producer died")

    with pytest.raises(OSError):
        storage.write_bytes(s3_bucket + "/x/part.bin", Boom(b"abc"))
    assert not storage.exists(s3_bucket + "/x/part.bin")
    assert storage.list(s3_bucket + "/x") == []


def test_unreachable_store_is_a_named_bounded_error():
    storage = Storage({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "key": "AKIASECRET",
                       "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
                       "secret": "topsecret"}, retries=1, retry_wait_s=0.01)
    with pytest.raises(StorageError) as err:
        storage.read_bytes("s3://bucket/file.bin")
    msg = str(err.value)
    assert "s3://bucket/file.bin" in msg and "2 attempts" in msg
    assert "topsecret" not in msg and "AKIASECRET" not in msg


def test_redact_hides_userinfo():
    assert redact("s3://user:pw@host/b/k") == "s3://***@host/b/k"
    assert redact("/plain/path") == "/plain/path"


# --- a stalled store (SeaweedFS paused with SIGSTOP: connections open, nothing answers) -----------------

def _stall_storage(s3_server, max_stall_s: float) -> Storage:
    return Storage(s3_server["storage_options"], retries=3, retry_wait_s=0.2, connect_timeout_s=1.0,
                   read_timeout_s=1.0, max_stall_s=max_stall_s)


@pytest.mark.s3
@pytest.mark.parametrize("op", ["write", "read", "exists", "list", "walk", "ranged read"])
def test_every_call_on_a_stalled_store_fails_within_its_bound(s3_server, s3_bucket, op):
    import time

    storage = _stall_storage(s3_server, max_stall_s=3.0)
    storage.write_bytes(s3_bucket + "/d/x.bin", b"0123456789")
    calls = {"write": lambda: storage.write_bytes(s3_bucket + "/d/y.bin", b"y" * 1000),
             "read": lambda: storage.read_bytes(s3_bucket + "/d/x.bin"),
             "exists": lambda: storage.exists(s3_bucket + "/d/y.bin"),
             "list": lambda: storage.list(s3_bucket + "/d"),
             "walk": lambda: storage.walk_files(s3_bucket),
             "ranged read": lambda: storage.read_bytes(s3_bucket + "/d/x.bin", 2, 5)}
    with s3_server["server"].stalled():
        t0 = time.monotonic()
        with pytest.raises(StorageError) as err:
            calls[op]()
        took = time.monotonic() - t0
    assert took < 3.0 + 1.5, f"{op} took {took:.1f} s"
    assert "storage stalled" in str(err.value) and s3_bucket in str(err.value) and "3 s" in str(err.value)
    # the store is back: a write that timed out left the whole object or nothing, never a part
    if op == "write" and storage.exists(s3_bucket + "/d/y.bin"):
        assert storage.read_bytes(s3_bucket + "/d/y.bin") == b"y" * 1000
    assert storage.read_bytes(s3_bucket + "/d/x.bin", 2, 5) == b"234"


@pytest.mark.s3
def test_a_short_stall_is_ridden_out(s3_server, s3_bucket):
    storage = _stall_storage(s3_server, max_stall_s=30.0)
    with s3_server["server"].stalled(seconds=2.5):
        storage.write_bytes(s3_bucket + "/z.bin", b"z" * 100)  # times out, backs off, retries after the resume
    assert storage.read_bytes(s3_bucket + "/z.bin") == b"z" * 100


def test_s3_calls_get_socket_timeouts_unless_configured():
    storage = Storage({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}, connect_timeout_s=2,
                      read_timeout_s=7)
    botocore = storage.options_for("s3://b/k")["config_kwargs"]
    assert botocore["connect_timeout"] == 2 and botocore["read_timeout"] == 7
    assert storage.storage_options == {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}  # not mutated
    mine = Storage({"config_kwargs": {"read_timeout": 99}}, read_timeout_s=7)
    assert mine.options_for("s3://b/k")["config_kwargs"]["read_timeout"] == 99
    assert Storage().options_for("/local/path") == {}


# --- a store that answers "try again" (S3 500 InternalError) ------------------------------------------

@pytest.mark.s3
def test_a_store_answering_internal_error_is_retried_then_named(caplog):
    """A second SeaweedFS with room for two buckets' volumes: a PUT into a third bucket gets the real 500
    InternalError ("please try again"). The engine retries it (as it does a timeout) and, if the store keeps
    answering so, fails with one line naming the write, the URI and the S3 code; when a volume frees up
    between attempts, the retry lands. This is also what CI hit once the suite made more buckets than the
    test server had volumes (engine.testing.s3server.VOLUME_COUNT)."""
    import logging

    import s3fs

    from engine.testing.s3server import start_s3_server

    server = start_s3_server(set_environ=False, volume_count=2)
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options_with_keys)
        storage = Storage(server.storage_options_with_keys, retries=2, retry_wait_s=0.2)
        first, second, third = (server.make_bucket(f"full-{i}") for i in range(3))
        storage.write_bytes(first + "/x.bin", b"1")
        storage.write_bytes(second + "/x.bin", b"2")  # every volume is now some bucket's

        with caplog.at_level(logging.WARNING, logger="engine.storage"):
            with pytest.raises(StorageError) as err:
                storage.write_bytes(third + "/x.bin", b"3")
        assert str(err.value) == f"storage answered S3 InternalError: write {third}/x.bin failed after 3 attempts (OSError)"
        assert sum("retry" in r.getMessage() for r in caplog.records) == 2
        assert not storage.exists(third + "/x.bin")

        class FreeAVolumeOnFirstRetry(logging.Handler):
            """Deletes the first bucket (its volume with it) when the engine logs its first retry: the first
            attempt surely failed, the next may land."""

            def emit(self, record: logging.LogRecord) -> None:
                if "retry 1/" in record.getMessage() and fs.exists(first):
                    fs.rm(first, recursive=True)

        handler = FreeAVolumeOnFirstRetry(logging.WARNING)
        logging.getLogger("engine.storage").addHandler(handler)
        try:
            caplog.clear()
            storage.write_bytes(third + "/x.bin", b"3")
        finally:
            logging.getLogger("engine.storage").removeHandler(handler)
        assert any("retry 1/" in r.getMessage() for r in caplog.records)
        assert storage.read_bytes(third + "/x.bin") == b"3"
    finally:
        server.stop(grace_s=1)
