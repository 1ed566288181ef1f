"""Paths and URIs: one way to open local files, s3:// objects and any other fsspec URI.

Object-store credentials and endpoints come from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible servers), so the same
command works against AWS, MinIO or a test server and nothing secret is written into configs or stores.
Filesystems are created where they are used (in each task or actor): fsspec's async filesystems are not fork-safe
and must never be pickled into a worker.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs


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


def open_file(path: str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """Open a local path or URI; parent directories are created when writing locally."""
    if ("w" in mode or "a" in mode) and not is_uri(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    return fsspec.open(path, mode, **kwargs).open()  # type: ignore[no-any-return]


def read_bytes(path: str) -> bytes:
    """All bytes of a local file or object."""
    with open_file(path, "rb") as f:
        return bytes(f.read())


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return bool(fs.exists(inner))


def makedirs(path: str) -> None:
    """Create a local directory (object stores have no directories: a no-op there)."""
    if not is_uri(path):
        os.makedirs(path, exist_ok=True)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Publish ``data`` at ``path`` only when complete: temp file + rename locally, a single PUT on object stores.

    A reader (or a resumed job) therefore never sees a half-written file.
    """
    if is_uri(path):
        with open_file(path, "wb") as f:
            f.write(data)
        return
    path = path[len("file://") :] if path.startswith("file://") else path
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
