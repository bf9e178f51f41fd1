"""Everything addressed by URI through fsspec: a plain path, file://, s3:// or any fsspec scheme.

Writes are whole-file and atomic (temp + rename on local disks, a single PUT on object stores),
so a reader never sees a half-written file and a retried writer rewrites the same name.
Endpoints and credentials come from `storage_options` or the environment and are never logged.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that mean "could not reach the store", worth a bounded retry. Missing files are not.
_TRANSIENT: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
try:  # botocore is present whenever s3fs is
    from botocore.exceptions import ConnectionError as _BotoConnectionError
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    _TRANSIENT = _TRANSIENT + (_BotoConnectionError, EndpointConnectionError, ReadTimeoutError)
except ImportError:  # pragma: no cover - s3fs is a hard dependency
    pass
try:
    from aiohttp import ClientConnectionError

    _TRANSIENT = _TRANSIENT + (ClientConnectionError,)
except ImportError:  # pragma: no cover
    pass


class StorageError(OSError):
    """Storage could not be used; the message names the URI (never credentials)."""


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
    return "://" not in uri or uri.startswith("file://")


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, _TRANSIENT):
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and _transient(cause)


@dataclass
class Storage:
    """A handle on one storage namespace: the fsspec options plus retry policy."""

    storage_options: dict[str, Any] = field(default_factory=dict)
    retries: int = 3
    retry_wait_s: float = 0.5

    @classmethod
    def from_config(cls, config: Any) -> "Storage":
        """Build from an ExperimentConfig (or its `storage` section)."""
        section = getattr(config, "storage", config)
        return cls(dict(section.storage_options), section.retries, section.retry_wait_s)

    def fs(self, uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
        options = {} if is_local(uri) else self.storage_options
        fs, path = fsspec.core.url_to_fs(os.path.expanduser(uri) if is_local(uri) else uri, **options)
        return fs, path

    def _call(self, uri: str, what: str, fn: Callable[[fsspec.AbstractFileSystem, str], T]) -> T:
        attempt = 0
        while True:
            try:
                fs, path = self.fs(uri)
                return fn(fs, path)
            except Exception as exc:  # classified below; non-transient errors propagate unchanged
                if not _transient(exc):
                    raise
                if attempt >= self.retries:
                    raise StorageError(
                        f"storage unreachable: {what} {redact(uri)} failed after {attempt + 1} attempts "
                        f"({type(exc).__name__})"
                    ) from exc
                attempt += 1
                wait = self.retry_wait_s * (2 ** (attempt - 1))
                log.warning("%s %s: %s, retry %d/%d in %.1fs", what, redact(uri), type(exc).__name__,
                            attempt, self.retries, wait)
                time.sleep(wait)

    # --- reads -------------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        return self._call(uri, "exists", lambda fs, p: fs.exists(p))

    def isdir(self, uri: str) -> bool:
        return self._call(uri, "isdir", lambda fs, p: fs.isdir(p))

    def read_bytes(self, uri: str) -> bytes:
        try:
            return self._call(uri, "read", lambda fs, p: fs.cat_file(p))
        except FileNotFoundError:
            raise FileNotFoundError(f"no such file: {redact(uri)}") from None

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def list(self, uri: str, pattern: str | None = None) -> list[str]:
        """Full URIs of the files directly under `uri` (sorted); `pattern` is a glob on the name."""
        import fnmatch

        def _ls(fs: fsspec.AbstractFileSystem, p: str) -> list[str]:
            if not fs.exists(p):
                return []
            infos = fs.ls(p, detail=True)
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

    def walk_files(self, uri: str) -> list[str]:
        """All file URIs below `uri`, recursively, sorted."""
        fs, root = self.fs(uri)

        def _find(fs: fsspec.AbstractFileSystem, p: str) -> list[str]:
            return sorted(fs.find(p))

        found = self._call(uri, "walk", _find)
        root = root.rstrip("/")
        return [join(uri, f[len(root):].lstrip("/")) for f in found if f.startswith(root)]

    # --- writes ------------------------------------------------------------------------------
    def makedirs(self, uri: str) -> None:
        self._call(uri, "mkdir", lambda fs, p: fs.makedirs(p, exist_ok=True))

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Atomic whole-file write: readers see the old file, or the whole new one, never a part."""
        def _write(fs: fsspec.AbstractFileSystem, p: str) -> None:
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
                fs.pipe_file(p, data)

        self._call(uri, "write", _write)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def remove(self, uri: str, recursive: bool = False) -> None:
        def _rm(fs: fsspec.AbstractFileSystem, p: str) -> None:
            if fs.exists(p):
                fs.rm(p, recursive=recursive)

        self._call(uri, "remove", _rm)

    def download_dir(self, uri: str, local_dir: str) -> None:
        """Copy a folder to local disk (e.g. a model from s3:// into the node cache)."""
        os.makedirs(local_dir, exist_ok=True)
        for file_uri in self.walk_files(uri):
            rel = file_uri[len(uri.rstrip("/")) + 1:]
            dest = os.path.join(local_dir, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as fh:
                fh.write(self.read_bytes(file_uri))

    def upload_dir(self, local_dir: str, uri: str) -> None:
        """Copy a local folder to storage, file by file, each write atomic."""
        for dirpath, _, files in os.walk(local_dir):
            for name in sorted(files):
                src = os.path.join(dirpath, name)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                with open(src, "rb") as fh:
                    self.write_bytes(join(uri, rel), fh.read())
