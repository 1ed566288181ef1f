"""Paths and URIs: one way to open local files, s3:// objects and any other fsspec URI.

Object-store credentials and endpoints come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible servers), so the same
command works against AWS, MinIO or a test server and nothing secret is written into configs or stores.
Filesystems are created where they are used (in each task or actor): fsspec's async filesystems are not fork-safe
and must never be pickled into a worker.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import IO, Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from chexseg_dist.errors import InputError, InputNotFoundError

_F = TypeVar("_F", bound=Callable[..., Any])


def _names_its_path(fn: _F) -> _F:
    """Object-store errors (s3fs raises ``PermissionError`` / ``FileNotFoundError`` naming no object) get the URI
    the function was given as their ``filename``, so the CLI can say which object failed."""

    @functools.wraps(fn)
    def wrapper(path: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(path, *args, **kwargs)
        except OSError as exc:
            if is_uri(path) and not getattr(exc, "filename", None):
                exc.filename = path
            raise

    return wrapper  # type: ignore[return-value]


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` URIs other than ``file://``."""
    return "://" in path and not path.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join path components for a local path or a URI."""
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def parent(path: str) -> str:
    """The directory (or prefix) that holds ``path``."""
    if is_uri(path):
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(os.path.abspath(path))


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_uri(path) else os.path.basename(path.rstrip(os.sep))


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``path`` and the path within it."""
    fs, inner = url_to_fs(path)  # s3fs/botocore read the standard AWS environment
    return fs, inner


def open_file(path: str, mode: str = "rb", **kwargs: Any) -> AbstractContextManager[IO[Any]]:
    """Open a local path or URI as a context manager.

    Writing (``"w"``/``"wb"``) publishes the file only when the ``with`` block completes: locally the data go to a
    temporary file beside the target, renamed over it at the end (and removed if the block raises); on object stores
    an upload becomes visible only once complete. A reader, or a command that failed half-way, never leaves a
    half-written output. Parent directories are created when writing locally.
    """
    if "w" in mode:
        return _atomic_remote(path, mode, **kwargs) if is_uri(path) else _atomic_local(_local(path), mode, **kwargs)
    if "a" in mode and not is_uri(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    return _named_call(path, lambda: fsspec.open(path, mode, **kwargs).open())


def _named_call(path: str, fn: Callable[..., Any], *args: Any) -> Any:
    return _names_its_path(lambda _path: fn(*args))(path)


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


@contextlib.contextmanager
def _atomic_remote(path: str, mode: str, **kwargs: Any) -> Iterator[IO[Any]]:
    """Object stores: buffer the data and upload them in one call once the block completes (nothing on failure).

    An fsspec file object would upload what it holds when the block's exception closes it: half a file.
    """
    buffer: io.BytesIO | io.StringIO = io.BytesIO() if "b" in mode else io.StringIO(newline=kwargs.get("newline"))
    yield buffer
    data = buffer.getvalue()
    fs, inner = filesystem(path)
    payload = data if isinstance(data, bytes) else data.encode(kwargs.get("encoding") or "utf-8")
    _named_call(path, fs.pipe_file, inner, payload)


@contextlib.contextmanager
def _atomic_local(path: str, mode: str, **kwargs: Any) -> Iterator[IO[Any]]:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    f = open(tmp, mode, **kwargs)  # noqa: SIM115 - closed below, before the rename
    try:
        yield f
        f.close()
        os.replace(tmp, path)
    finally:
        f.close()
        if os.path.exists(tmp):
            os.remove(tmp)


@_names_its_path
def read_bytes(path: str) -> bytes:
    """All bytes of a local file or object."""
    with open_file(path, "rb") as f:
        return bytes(f.read())


def read_input(path: str, what: str = "input file") -> bytes:
    """All bytes of an input the user named; a missing, unreadable or directory path is a one-line error naming it.

    Raises:
        InputNotFoundError: no such file or object.
        InputError: a directory, or no permission to read it.
    """
    try:
        return read_bytes(path)
    except FileNotFoundError:
        raise InputNotFoundError(f"{what} {path}: no such file or object") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path}: is a directory, not a file") from None
    except PermissionError:
        if is_uri(path):
            raise  # the CLI names the object and the credentials to check (core.storage_errors)
        raise InputError(f"{what} {path}: permission denied") from None


@_names_its_path
def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return bool(fs.exists(inner))


def makedirs(path: str) -> None:
    """Create a local directory (object stores have no directories: a no-op there)."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)


@_names_its_path
def write_bytes_atomic(path: str, data: bytes) -> None:
    """Publish ``data`` at ``path`` only when complete (see :func:`open_file`): a reader never sees half a file."""
    with open_file(path, "wb") as f:
        f.write(data)


@_names_its_path
def remove(path: str, recursive: bool = False) -> bool:
    """Delete a file or object (a directory or prefix with ``recursive``); returns False if there was none."""
    fs, inner = filesystem(path)
    try:
        fs.rm(inner, recursive=recursive)
    except FileNotFoundError:
        return False
    return True


@_names_its_path
def isdir(path: str) -> bool:
    """True for an existing local directory or a non-empty object-store prefix."""
    fs, inner = filesystem(path)
    return bool(fs.isdir(inner))


@_names_its_path
def isfile(path: str) -> bool:
    """True for an existing local file or object."""
    fs, inner = filesystem(path)
    return bool(fs.isfile(inner))


def same_location(a: str, b: str) -> bool:
    """Whether two paths or URIs name the same file or object (local paths compared after resolving links)."""
    if is_uri(a) or is_uri(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(_local(a)) == os.path.realpath(_local(b))


def within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (local paths compared after resolving links; URIs by
    prefix)."""
    if is_uri(path) or is_uri(folder):
        a, b = path.rstrip("/"), folder.rstrip("/")
        return a == b or a.startswith(b + "/")
    a, b = os.path.realpath(_local(path)), os.path.realpath(_local(folder))
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


# Conditional writes: what a lock needs from a file system. On S3 they are conditional PUTs (``If-None-Match: *``
# creates only if absent, ``If-Match: <ETag>`` replaces only the version read), which AWS S3 and the moto server
# honour; on local disks a hard link creates atomically. ``tag`` identifies one version of a file.


class ConditionalWritesUnsupported(Exception):
    """The object store rejected a conditional write (callers fall back to a weaker protocol)."""


@_names_its_path
def create_exclusive(path: str, data: bytes) -> str | None:
    """Write ``data`` at ``path`` only if nothing is there, atomically; the new version's tag, or None if it exists.

    Raises:
        ConditionalWritesUnsupported: an object store that does not implement conditional writes.
    """
    if not is_uri(path):
        local = _local(path)
        directory = os.path.dirname(os.path.abspath(local))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(local)}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, local)  # atomic, fails if the target exists: a reader never sees a half-written file
        except FileExistsError:
            return None
        finally:
            os.remove(tmp)
        return _content_tag(data)
    fs, inner = filesystem(path)
    try:
        out = fs.pipe_file(inner, data, mode="create")
    except FileExistsError:
        return None
    except OSError as exc:
        _raise_if_unsupported(exc)
        raise
    return _etag(out)


@_names_its_path
def read_tagged(path: str) -> tuple[bytes, str] | None:
    """The bytes at ``path`` and their version tag, or None if there is no such file or object."""
    if not is_uri(path):
        try:
            with open(_local(path), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _content_tag(data)
    fs, inner = filesystem(path)
    try:
        tag = str(fs.info(inner, refresh=True)["ETag"])  # read first: if the object changes after, the tag is stale
        data = fs.cat_file(inner)
    except FileNotFoundError:
        return None
    return bytes(data), tag


@_names_its_path
def replace_if(path: str, data: bytes, tag: str) -> str | None:
    """Replace the version ``tag`` of ``path`` with ``data``; the new tag, or None if another version is there now.

    Atomic on object stores (``If-Match``). Locally it compares then renames, which two processes on one host
    could interleave; callers that need more check again afterwards.

    Raises:
        ConditionalWritesUnsupported: an object store that does not implement conditional writes.
    """
    if not is_uri(path):
        current = read_tagged(path)
        if current is None or current[1] != tag:
            return None
        write_bytes_atomic(path, data)
        return _content_tag(data)
    fs, inner = filesystem(path)
    try:
        out = fs.pipe_file(inner, data, IfMatch=tag)
    except FileNotFoundError:
        return None
    except OSError as exc:
        _raise_if_unsupported(exc)
        if _precondition_failed(exc):
            return None
        raise
    return _etag(out)


def _content_tag(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _etag(response: Any) -> str:
    return str(response.get("ETag", "")) if isinstance(response, dict) else ""


def _precondition_failed(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "precondition" in text or "pre-condition" in text


def _raise_if_unsupported(exc: BaseException) -> None:
    text = str(exc)
    if "NotImplemented" in text or "not implemented" in text.lower():
        raise ConditionalWritesUnsupported(f"conditional writes are not supported here: {text}") from exc
