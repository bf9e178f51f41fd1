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


# --- refusals: credentials, permissions and the other errors the libraries raise ----------------------------

def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": f"{code} message"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


def _translated(code: str, status: int) -> Exception:
    """What s3fs raises for an S3 answer: its own OSError subclass, with botocore's ClientError as the context."""
    from s3fs.errors import translate_boto_error

    try:
        raise _client_error(code, status)
    except Exception as err:  # noqa: BLE001 - the ClientError built just above
        try:
            raise translate_boto_error(err)
        except OSError as translated:
            return translated


def _hub_http(cls: type, status: int, message: str) -> Exception:
    """A huggingface_hub HTTP error as the hub client raises it: with the (httpx) response it answered."""
    import importlib
    import inspect

    response = inspect.signature(cls.__init__).parameters["response"].annotation  # httpx's, or its fork httpx2's
    httpx = importlib.import_module(response.__module__.split(".")[0])
    return cls(message, response=response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x")))


def _library_errors() -> list[tuple[str, Exception, str]]:
    """(name, the library's real exception, what the one line says) for what fsspec, s3fs, botocore and
    huggingface_hub raise from a storage call."""
    import botocore.exceptions as boto
    import huggingface_hub.errors as hub
    from fsspec.exceptions import FSTimeoutError

    return [
        ("botocore NoCredentialsError", boto.NoCredentialsError(), "no usable S3 credentials"),
        ("botocore PartialCredentialsError", boto.PartialCredentialsError(provider="env", cred_var="AWS_SECRET"),
         "no usable S3 credentials"),
        ("botocore CredentialRetrievalError", boto.CredentialRetrievalError(provider="sso", error_msg="expired"),
         "no usable S3 credentials"),
        ("botocore ProfileNotFound", boto.ProfileNotFound(profile="nope"), "no usable S3 credentials"),
        ("botocore TokenRetrievalError", boto.TokenRetrievalError(provider="sso", error_msg="x"),
         "no usable S3 credentials"),
        ("botocore NoRegionError", boto.NoRegionError(), "cannot use it (NoRegionError"),
        ("botocore ParamValidationError", boto.ParamValidationError(report="Invalid bucket name"),
         "cannot use it (ParamValidationError"),
        ("botocore ClientError AccessDenied", _client_error("AccessDenied", 403),
         "S3 refused the request (AccessDenied"),
        ("botocore ClientError InvalidAccessKeyId", _client_error("InvalidAccessKeyId", 403),
         "S3 refused the request (InvalidAccessKeyId"),
        ("botocore ClientError NoSuchBucket", _client_error("NoSuchBucket", 404), "S3 answered NoSuchBucket"),
        ("botocore EndpointConnectionError", boto.EndpointConnectionError(endpoint_url="http://x"),
         "storage unreachable"),
        ("botocore ReadTimeoutError", boto.ReadTimeoutError(endpoint_url="http://x"), "storage unreachable"),
        ("botocore ResponseStreamingError", boto.ResponseStreamingError(error="reset"), "storage unreachable"),
        ("s3fs AccessDenied", _translated("AccessDenied", 403), "S3 refused the request (AccessDenied"),
        ("s3fs SignatureDoesNotMatch", _translated("SignatureDoesNotMatch", 403),
         "S3 refused the request (SignatureDoesNotMatch"),
        ("s3fs ExpiredToken", _translated("ExpiredToken", 400), "S3 refused the request (ExpiredToken"),
        ("s3fs InvalidBucketName", _translated("InvalidBucketName", 400), "S3 answered InvalidBucketName"),
        ("s3fs InternalError", _translated("InternalError", 500), "storage answered S3 InternalError"),
        ("fsspec FSTimeoutError", FSTimeoutError(), "storage unreachable"),
        ("PermissionError", PermissionError(13, "Permission denied", "/data/x"), "permission denied"),
        ("read-only disk", OSError(30, "Read-only file system"), "cannot write"),
        ("full disk", OSError(28, "No space left on device"), "cannot write"),
        ("IsADirectoryError", IsADirectoryError(21, "Is a directory"), "cannot use it (IsADirectoryError"),
        ("huggingface_hub OfflineModeIsEnabled", hub.OfflineModeIsEnabled("offline"), "offline"),
        ("huggingface_hub GatedRepoError", _hub_http(hub.GatedRepoError, 401, "gated repo"),
         "cannot use it (GatedRepoError"),
        ("huggingface_hub RepositoryNotFoundError", _hub_http(hub.RepositoryNotFoundError, 404, "no repo"),
         "cannot use it (RepositoryNotFoundError"),
        ("huggingface_hub HFValidationError", hub.HFValidationError("bad repo id"), "cannot use it (HFValidationError"),
    ]


def test_every_library_error_of_a_storage_call_is_one_storage_line_with_exit_code_4():
    """Each real exception class raised inside a real Storage call (the one place storage errors are mapped)
    ends as a one-line StorageError naming the operation and URI, which the CLI maps to exit code 4; a missing
    file stays a FileNotFoundError for the caller to name what was missing (a dataset root, an adapter)."""
    from engine.cli import expected_error

    storage = Storage(retries=0, retry_wait_s=0.0)
    for name, exc, says in _library_errors():
        def fail(fs, path, kw, exc=exc):
            raise exc

        with pytest.raises(StorageError) as err:
            storage._call("s3://bucket/runs/x.json", "write", fail)
        line = str(err.value)
        assert says in line and "write s3://bucket/runs/x.json" in line and "\n" not in line, (name, line)
        assert expected_error(err.value)[1] == 4, name
    for missing in (_translated("NoSuchKey", 404), FileNotFoundError(2, "No such file")):
        with pytest.raises(FileNotFoundError) as err:
            storage._call("s3://bucket/x", "read", lambda fs, p, kw, exc=missing: (_ for _ in ()).throw(exc))
        assert not isinstance(err.value, StorageError)


def test_unknown_or_uninstalled_protocols_and_a_file_in_the_way_are_storage_lines(tmp_path):
    storage = Storage()
    for uri, says in (("nosuchproto://b/x", "Protocol not known"), ("gs://bucket/x", "gcsfs")):
        with pytest.raises(StorageError, match=says) as err:
            storage.exists(uri)
        assert uri in str(err.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="FileExistsError") as err:  # os.makedirs meets the file
        storage.write_text(str(tmp_path / "file" / "out.json"), "{}")
    assert str(tmp_path / "file" / "out.json") in str(err.value)


def test_model_library_errors_are_one_model_line_with_exit_code_5():
    """diffusers, transformers and huggingface_hub report a model that does not load as these classes (diffusers'
    and transformers' own are OSError and ValueError with paragraphs of text); inside `loading`, around every
    from_pretrained, each is a one-line ModelError naming the model (exit 5). The real classes are raised
    where from_pretrained would raise them (importing diffusers alone costs ~10 CPU-s)."""
    import huggingface_hub.errors as hub

    from engine.cli import expected_error
    from engine.models.base import loading
    from engine.models.errors import ModelError

    raised = [OSError("We couldn't connect to 'https://huggingface.co'\nto load this file, couldn't find it"),
              ValueError("bad config\nmore"), _hub_http(hub.RepositoryNotFoundError, 404, "404 repo"),
              _hub_http(hub.GatedRepoError, 401, "gated"),
              hub.OfflineModeIsEnabled("offline"), hub.LocalEntryNotFoundError("not cached"),
              hub.HFValidationError("repo id")]
    for exc in raised:
        with pytest.raises(ModelError) as err:
            with loading("org/model"):
                raise exc
        assert "'org/model'" in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert expected_error(err.value)[1] == 5


def test_pil_errors_are_one_bad_image_line_with_exit_code_3():
    """PIL's UnidentifiedImageError, a truncated file (OSError) and a decompression bomb, from real bytes."""
    import io

    from PIL import Image

    from engine.cli import expected_error
    from engine.data.images import BadImageError, decode, encode_png

    png = encode_png(Image.new("RGB", (16, 16), (200, 10, 10)))
    bomb = io.BytesIO()
    Image.new("1", (1, 1)).save(bomb, format="PNG")
    header = bytearray(bomb.getvalue())
    header[16:24] = (50_000).to_bytes(4, "big") * 2  # IHDR width and height: a 50,000 x 50,000 image
    for data in (b"not an image", png[: len(png) // 2], bytes(header)):
        with pytest.raises(BadImageError) as err:
            decode(data, "s3://b/img.png")
        assert "s3://b/img.png" in str(err.value) and "\n" not in str(err.value)
        assert expected_error(err.value)[1] == 3


@pytest.mark.s3
def test_the_store_refusing_anonymous_or_wrong_credentials_is_one_storage_line(s3_server, s3_bucket):
    """Real s3fs calls to SeaweedFS (which enforces its keys): unsigned (anonymous) and with keys it does not
    know; each is refused at once, not retried, in one line naming the URI and the S3 code."""
    endpoint = {"client_kwargs": {"endpoint_url": s3_server["endpoint_url"]}}
    Storage(s3_server["storage_options"]).write_text(s3_bucket + "/x.json", "{}")
    for options, op in (({"anon": True, **endpoint}, lambda s: s.read_text(s3_bucket + "/x.json")),
                        ({"key": "AKIAWRONG", "secret": "wrong-secret", **endpoint},
                         lambda s: s.write_text(s3_bucket + "/y.json", "{}"))):
        with pytest.raises(StorageError) as err:
            op(Storage(options, retries=3, retry_wait_s=5.0))  # a retry would take 5 s
        line = str(err.value)  # a HEAD's 403 has no body, so no S3 code: then it is the permission line
        assert ("S3 refused the request" in line or "permission denied" in line) and "AWS_ACCESS_KEY_ID" in line
        assert s3_bucket in line and "\n" not in line, line
        assert "AKIAWRONG" not in line and "wrong-secret" not in line


def test_a_permission_denied_local_path_is_one_storage_line(tmp_path):
    """A folder the process may not write into: read-only for a user, immutable (chattr +i) for root, whom
    permission bits do not stop."""
    import subprocess

    locked = tmp_path / "locked"
    locked.mkdir()
    root = os.geteuid() == 0
    if root:
        subprocess.run(["chattr", "+i", str(locked)], check=True)
    else:
        locked.chmod(0o500)
    try:
        with pytest.raises(StorageError) as err:
            Storage().write_text(str(locked / "runs" / "metrics.json"), "{}")
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
        else:
            locked.chmod(0o700)
    line = str(err.value)
    assert "permission denied" in line and str(locked / "runs" / "metrics.json") in line and "\n" not in line
