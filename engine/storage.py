"""Everything addressed by URI through fsspec: a plain path, file://, s3:// or any fsspec scheme.

Writes are whole-file and atomic (temp + rename on local disks, a single PUT on object stores),
so a reader never sees a half-written file and a retried writer rewrites the same name.
Endpoints and credentials come from `storage_options` or the environment and are never logged.
"""
from __future__ import annotations

import asyncio
import copy
import errno
import glob
import io
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import fsspec
from aiohttp import ClientConnectionError, ClientPayloadError
from botocore.exceptions import (BotoCoreError, ClientError, ConfigNotFound, CredentialRetrievalError,
                                 EndpointConnectionError, HTTPClientError, IncompleteReadError, LoginError,
                                 MetadataRetrievalError, NoAuthTokenError, NoCredentialsError,
                                 PartialCredentialsError, ProfileNotFound, ReadTimeoutError, SSOError,
                                 TokenRetrievalError, UnknownCredentialError)
from botocore.exceptions import ConnectionError as BotoConnectionError
from fsspec.asyn import AsyncFileSystem, sync_wrapper
from fsspec.implementations.local import LocalFileSystem
from s3fs import S3FileSystem

from engine.errors import find_cause
from engine.locations import has_scheme

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that mean "could not reach the store", worth a bounded retry. Missing files are not.
# (botocore and aiohttp are s3fs's own dependencies: its requests fail with their errors.)
_TRANSIENT: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, BotoConnectionError,
                                               EndpointConnectionError, ReadTimeoutError, HTTPClientError,
                                               IncompleteReadError, ClientConnectionError, ClientPayloadError)
# botocore errors that say the client has no usable credentials (before any request is sent)
_NO_CREDENTIALS: tuple[type[BaseException], ...] = (
    NoCredentialsError, PartialCredentialsError, CredentialRetrievalError, UnknownCredentialError, ProfileNotFound,
    ConfigNotFound, NoAuthTokenError, TokenRetrievalError, SSOError, LoginError, MetadataRetrievalError)
# S3 answers that mean "these credentials may not do this"
_REFUSED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                            "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
                            "InvalidSecurity", "MissingSecurityHeader"})
CREDENTIALS_HINT = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role) "
                    "on every node, or key/secret in storage.storage_options")
# S3 error codes that ask the client to slow down or try again (besides every 5xx answer).
_RETRY_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestLimitExceeded"})


class StorageError(OSError):
    """Storage could not be used; the message names the URI (never credentials)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _offline_hub(exc: BaseException) -> bool:
    """huggingface_hub's offline refusal (a ConnectionError subclass that no retry can change). Its module is
    only looked at when already imported: an error of it cannot exist otherwise."""
    errors = sys.modules.get("huggingface_hub.errors")
    return errors is not None and isinstance(exc, getattr(errors, "OfflineModeIsEnabled", ()))


def denied(exc: BaseException) -> str | None:
    """Why the store said no to these credentials or this user, in one line: no usable credentials, credentials
    the store rejects, permission denied; None otherwise. Never an engine bug, so also mapped where a library
    call outside `Storage` (Ray Train's or Tune's own storage access) raised it (engine.cli)."""
    from engine.errors import chain

    for err in chain(exc):
        if isinstance(err, _NO_CREDENTIALS):
            return f"no usable S3 credentials ({_first_line(err)}): {CREDENTIALS_HINT}"
    code = _s3_error_code(exc)
    if code in _REFUSED_CODES:
        return f"S3 refused the request ({code}: the credentials may not do this): check them, or {CREDENTIALS_HINT}"
    for err in chain(exc):
        if isinstance(err, PermissionError):
            return f"permission denied ({_first_line(err)})"
    return None


def _http_transport_error(exc: BaseException) -> bool:
    """A connection or timeout error of httpx (huggingface_hub's `hf://` filesystem talks through it, or its
    fork httpx2), which derive from neither OSError nor the builtin ConnectionError; looked up only when
    imported."""
    for name in ("httpx", "httpx2"):
        module = sys.modules.get(name)
        if module is not None and isinstance(exc, getattr(module, "TransportError", ())):
            return True
    return False


def refusal(exc: BaseException) -> str | None:
    """Why the store refused, or cannot be used as configured, in one line; None when `exc` is none of that.

    Refusals are final (no retry): `denied`, a read-only or full disk, a path that is a file where a folder
    must be (or the reverse), an unknown protocol, a bad bucket name, a hub asked while offline. A missing
    file is not one: callers say what was missing (a dataset root, an adapter, a shard)."""
    from engine.errors import chain

    if isinstance(exc, (FileNotFoundError, StorageError)):
        return None
    reason = denied(exc)
    if reason is not None:
        return reason
    for err in chain(exc):
        if _offline_hub(err):
            return f"offline, and the file is not in the local cache ({_first_line(err)})"
        if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            return f"cannot write ({_first_line(err)})"
    code = _s3_error_code(exc)
    if code is not None and not _server_asks_for_retry(exc):
        return f"S3 answered {code} ({_first_line(exc)})"
    if isinstance(exc, (BotoCoreError, ImportError, ValueError, OSError)) and not transient(exc):
        return f"cannot use it ({_first_line(exc)})"
    return None


def refused_error(exc: BaseException, what: str, uri: str) -> "StorageError | None":
    """The one-line StorageError for a refusal (`refusal`) of `what` on `uri`, or None."""
    reason = refusal(exc)
    if reason is None:
        return None
    if reason.startswith("permission denied") and not is_local(uri):  # an object store's 403 without a code
        reason += f": {CREDENTIALS_HINT}"
    return StorageError(f"storage: {what} {redact(uri)}: {reason}")


def redact(uri: str) -> str:
    """Drop any user:password@ part of a URI before it goes into a message."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        host_and_path = rest.split("@", 1)[1]
        return f"{scheme}://***@{host_and_path}"
    return uri


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def is_local(uri: str) -> bool:
    return not has_scheme(uri)


def _server_asks_for_retry(exc: BaseException) -> bool:
    """An S3 answer that says "try again": a 5xx (InternalError, ServiceUnavailable) or a throttling code."""
    if not isinstance(exc, ClientError):
        return False
    response = exc.response or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return status >= 500 or response.get("Error", {}).get("Code") in _RETRY_CODES


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code (InternalError, SlowDown, ...) in `exc`'s causes, if the store answered one."""
    answer = find_cause(exc, ClientError)
    return None if answer is None else (answer.response or {}).get("Error", {}).get("Code")


def transient(exc: BaseException) -> bool:
    """Could not reach the store (connection, timeout) or the store said "try again" (5xx, SlowDown): worth a
    bounded retry; a missing file or a refused request is not."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if _offline_hub(exc):  # a ConnectionError no retry can change
        return False
    if isinstance(exc, _TRANSIENT) or _server_asks_for_retry(exc) or _http_transport_error(exc):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and transient(cause)


# Per-attempt socket timeouts go into s3fs's botocore config; the engine's own loop does the retrying.
_S3_PROTOCOLS = ("s3", "s3a")


class BoundedS3FileSystem(S3FileSystem):
    """s3fs whose every S3 request has a deadline (`request_timeout`, seconds; None: none).

    Socket timeouts alone do not bound a PUT: against a paused server (SIGSTOP), aiobotocore's PutObject
    waits for ever while GETs time out. The deadline covers every path that reaches S3 through this
    filesystem: the engine's Storage calls, and files that Ray Train writes through pyarrow (checkpoints).
    """

    def __init__(self, *args: Any, request_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.request_timeout = request_timeout

    async def _call_s3(self, method: Any, *akwarglist: Any, **kwargs: Any) -> Any:
        call = super()._call_s3(method, *akwarglist, **kwargs)
        if self.request_timeout is None:
            return await call
        try:
            return await asyncio.wait_for(call, self.request_timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"S3 {method if isinstance(method, str) else 'request'} did not answer within "
                               f"{self.request_timeout:g} s") from None

    call_s3 = sync_wrapper(_call_s3)  # s3fs binds its own _call_s3 here; files (S3File) write through it


def _is_async(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, AsyncFileSystem)


@dataclass
class Storage:
    """A handle on one storage namespace: the fsspec options plus the retry and deadline policy.

    Every call is bounded: each attempt's sockets give up after `connect_timeout_s` / `read_timeout_s`
    without progress, failures (timeouts included) are retried `retries` times with exponential backoff,
    and a call that has not succeeded after `max_stall_s` (all attempts together; on async filesystems
    such as s3fs a hard deadline, even for a request that never returns) fails with a StorageError
    naming the operation and the URI.
    """

    storage_options: dict[str, Any] = field(default_factory=dict)
    retries: int = 3
    retry_wait_s: float = 0.5
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    max_stall_s: float = 300.0

    @classmethod
    def from_config(cls, config: Any) -> "Storage":
        """Build from an ExperimentConfig (or its `storage` section)."""
        section = getattr(config, "storage", config)
        return cls(dict(section.storage_options), section.retries, section.retry_wait_s, section.connect_timeout_s,
                   section.read_timeout_s, section.max_stall_s)

    def options_for(self, uri: str) -> dict[str, Any]:
        """fsspec options for `uri`: the configured ones, plus socket timeouts for S3 unless given there."""
        if is_local(uri):
            return {}
        options = copy.deepcopy(self.storage_options)
        if fsspec.core.split_protocol(uri)[0] in _S3_PROTOCOLS:
            # other processes (Ray workers) write the folders this one lists: never answer from a stale listing
            options.setdefault("use_listings_cache", False)
            botocore = options.setdefault("config_kwargs", {})
            botocore.setdefault("connect_timeout", self.connect_timeout_s)
            botocore.setdefault("read_timeout", self.read_timeout_s)
            botocore.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        return options

    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        options = self.options_for(uri)
        if not is_local(uri) and fsspec.core.split_protocol(uri)[0] in _S3_PROTOCOLS:
            # Storage calls carry their own deadline (fsspec's timeout=, which fires first); the request
            # deadline bounds what reaches S3 without one (pyarrow writes of Ray Train checkpoints)
            fs = BoundedS3FileSystem(request_timeout=2 * self.max_stall_s, **options)
            return fs, fs._strip_protocol(uri)
        fs, path = fsspec.core.url_to_fs(os.path.expanduser(uri) if is_local(uri) else uri, **options)
        return fs, path

    def _call(self, uri: str, what: str, fn: Callable[[fsspec.AbstractFileSystem, str, dict[str, Any]], T],
              deadline_s: float | None = None) -> T:
        """Run `fn(fs, path, kw)` with retries under the call's deadline (`kw` carries the remaining time as
        fsspec's `timeout=` on async filesystems). A refusal (credentials, permission, ...: `refusal`) is a
        StorageError at once; a missing file propagates as FileNotFoundError for the caller to name."""
        budget = self.max_stall_s if deadline_s is None else deadline_s
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                fs, path = self.fs(uri)
                remaining = budget - (time.monotonic() - start)
                kw: dict[str, Any] = {"timeout": max(remaining, 0.01)} if _is_async(fs) else {}
                return fn(fs, path, kw)
            except Exception as exc:  # classified below; a missing file propagates unchanged
                if not transient(exc):
                    refused = refused_error(exc, what, uri)
                    if refused is None:
                        raise
                    raise refused from exc
                elapsed = time.monotonic() - start
                wait = self.retry_wait_s * (2 ** attempt)
                if elapsed + wait >= budget:
                    raise StorageError(
                        f"storage stalled: {what} {redact(uri)} did not complete within {budget:.0f} s "
                        f"({attempt + 1} attempt(s), last {type(exc).__name__}; storage.max_stall_s bounds this)"
                    ) from exc
                if attempt >= self.retries:
                    code = _s3_error_code(exc)
                    state = f"storage answered S3 {code}" if code else "storage unreachable"
                    raise StorageError(
                        f"{state}: {what} {redact(uri)} failed after {attempt + 1} attempts ({type(exc).__name__})"
                    ) from exc
                attempt += 1
                log.warning("%s %s: %s after %.1f s, retry %d/%d in %.1fs", what, redact(uri), type(exc).__name__,
                            elapsed, attempt, self.retries, wait)
                time.sleep(wait)

    # --- reads -------------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        return self._call(uri, "exists", lambda fs, p, kw: fs.exists(p, **kw))

    def isdir(self, uri: str) -> bool:
        return self._call(uri, "isdir", lambda fs, p, kw: fs.isdir(p, **kw))

    def size(self, uri: str) -> int:
        try:
            return int(self._call(uri, "size", lambda fs, p, kw: fs.size(p, **kw)))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {redact(uri)}") from None

    def read_bytes(self, uri: str, start: int | None = None, end: int | None = None) -> bytes:
        """The whole file, or bytes [start, end)."""
        try:
            return self._call(uri, "read", lambda fs, p, kw: fs.cat_file(p, start=start, end=end, **kw))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {redact(uri)}") from None

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def open_input(self, uri: str) -> "RangedFile":
        """A seekable read-only file whose every read is one bounded ranged GET (e.g. a Parquet footer and
        the column chunks it points at, without fetching the rest)."""
        return RangedFile(self, uri, self.size(uri))

    def list(self, uri: str, pattern: str | None = None) -> list[str]:
        """Full URIs of the files directly under `uri` (sorted); `pattern` is a glob on the name."""
        import fnmatch

        def _ls(fs: fsspec.AbstractFileSystem, p: str, kw: dict[str, Any]) -> list[str]:
            if not fs.exists(p, **kw):
                return []
            infos = fs.ls(p, detail=True, **kw)
            return [i["name"] for i in infos if i.get("type") == "file"]

        names = self._call(uri, "list", _ls)
        out = []
        for name in sorted(names):
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith(".tmp-"):
                continue
            if pattern is None or fnmatch.fnmatch(base, pattern):
                out.append(join(uri, base))
        return out

    def list_dirs(self, uri: str) -> list[str]:
        """Names of the folders directly under `uri` (sorted)."""
        infos = self._call(uri, "list", lambda fs, p, kw: fs.ls(p, detail=True, **kw))
        return sorted(i["name"].rstrip("/").rsplit("/", 1)[-1] for i in infos if i.get("type") == "directory")

    def glob(self, root: str, pattern: str) -> list[str]:
        """Full URIs below `root` matching a relative glob such as `*/.manifest.json` (sorted). Only `pattern`
        is a pattern: `root` is escaped, so a folder named `exp[1]` or `a*b` is matched as it is written."""
        def _glob(fs: fsspec.AbstractFileSystem, p: str, kw: dict[str, Any]) -> list[str]:
            return fs.glob(glob.escape(p.rstrip("/")) + "/" + pattern, **kw)

        _, root_path = self.fs(root)
        prefix = root_path.rstrip("/")
        found = self._call(root, "glob", _glob)
        return sorted(join(root, f[len(prefix):].lstrip("/")) for f in found if f.startswith(prefix))

    def walk_files(self, uri: str, sizes: bool = False) -> list[Any]:
        """All file URIs below `uri`, recursively, sorted; with `sizes`, (uri, bytes) pairs."""
        fs, root = self.fs(uri)
        found = self._call(uri, "walk", lambda fs, p, kw: fs.find(p, detail=True, **kw))
        root = root.rstrip("/")
        out = [(join(uri, f[len(root):].lstrip("/")), int(found[f].get("size") or 0))
               for f in sorted(found) if f.startswith(root)]
        return out if sizes else [u for u, _ in out]

    # --- writes ------------------------------------------------------------------------------
    def makedirs(self, uri: str) -> None:
        self._call(uri, "mkdir", lambda fs, p, kw: fs.makedirs(p, exist_ok=True, **kw))

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Atomic whole-file write: readers see the old file, or the whole new one, never a part."""
        def _write(fs: fsspec.AbstractFileSystem, p: str, kw: dict[str, Any]) -> None:
            if isinstance(fs, LocalFileSystem):
                directory = os.path.dirname(p) or "."
                os.makedirs(directory, exist_ok=True)
                tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{os.path.basename(p)}")
                try:
                    with open(tmp, "wb") as fh:
                        fh.write(data)
                        fh.flush()
                        os.fsync(fh.fileno())
                    os.replace(tmp, p)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                # One PUT (or one multipart upload for huge objects): the key appears only when complete.
                fs.pipe_file(p, data, **kw)

        self._call(uri, "write", _write, self.transfer_deadline(len(data)))

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def remove(self, uri: str, recursive: bool = False) -> None:
        def _rm(fs: fsspec.AbstractFileSystem, p: str, kw: dict[str, Any]) -> None:
            if fs.exists(p, **kw):
                fs.rm(p, recursive=recursive, **kw)

        self._call(uri, "remove", _rm)

    def transfer_deadline(self, size: int) -> float:
        """`max_stall_s`, plus time for big transfers at a floor of 1 MiB/s (a slow link is not a stall)."""
        return self.max_stall_s + size / (1 << 20)

    def download_dir(self, uri: str, local_dir: str) -> None:
        """Copy a folder to local disk (e.g. a model from s3:// into the node cache), streaming each file.

        Every key must land inside `local_dir`: S3 keys may hold `..` segments, and a folder from elsewhere
        must not write files anywhere else on the node (checked for all keys before the first download)."""
        os.makedirs(local_dir, exist_ok=True)
        root = os.path.realpath(local_dir)
        files = []
        for file_uri, size in self.walk_files(uri, sizes=True):
            dest = os.path.realpath(os.path.join(root, file_uri[len(uri.rstrip("/")) + 1:]))
            if not dest.startswith(root + os.sep):
                raise StorageError(f"{redact(file_uri)}: its key would download outside {local_dir} "
                                   f"(a '..' or absolute part below {redact(uri)}); refusing the folder")
            files.append((file_uri, size, dest))
        for file_uri, size, dest in files:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            self._call(file_uri, "download", lambda fs, p, kw: fs.get_file(p, dest, **kw),
                       self.transfer_deadline(size))

    def upload_dir(self, local_dir: str, uri: str) -> None:
        """Copy a local folder to storage, file by file, each write atomic."""
        for dirpath, _, files in os.walk(local_dir):
            for name in sorted(files):
                src = os.path.join(dirpath, name)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                with open(src, "rb") as fh:
                    self.write_bytes(join(uri, rel), fh.read())


class RangedFile(io.RawIOBase):
    """Read-only, seekable view of one stored file; each read is a bounded ranged read through Storage."""

    def __init__(self, storage: Storage, uri: str, size: int) -> None:
        super().__init__()
        self.storage, self.uri, self.length, self.pos = storage, uri, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        end = min(self.pos + len(buffer), self.length)
        if end <= self.pos:
            return 0
        data = self.storage.read_bytes(self.uri, self.pos, end)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)
