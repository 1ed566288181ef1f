"""Object-store failures a user can fix, as one line: access denied, a missing bucket or object, an endpoint that
cannot be reached, no credentials. Never prints a credential.

s3fs and botocore raise ``PermissionError``, ``FileNotFoundError`` or botocore exceptions that name neither the
object nor the fix (and :mod:`~chexseg_dist.core.fsio` adds the path it was given as ``filename`` where it can). The
CLI turns them into ``chexseg CMD: error: ...`` with exit status 2, naming the URI (or, when the library that failed
did not say which, the command's object-store arguments) and the environment variables that fix it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

_CREDENTIALS = "AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the node's instance role"
_ENDPOINT = "AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for an S3-compatible server; unset it for AWS itself"
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def describe(exc: BaseException, uris: Sequence[str] = ()) -> str | None:
    """One line for an object-store failure (naming the URI and the fix), or None if ``exc`` is not one.

    Args:
        exc: the exception that escaped a command (its ``__cause__`` / ``__context__`` chain is searched too).
        uris: the command's object-store arguments, named when the exception does not say which object failed.
    """
    for e in _chain(exc):
        line = _describe_one(e, uris)
        if line is not None:
            return scrub(line)
    return None


def scrub(text: str) -> str:
    """``text`` with the values of secret AWS variables replaced by ``***``."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen and len(seen) < 8:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _where(exc: BaseException, uris: Sequence[str]) -> str:
    name = getattr(exc, "filename", None)
    if isinstance(name, str) and name:
        return name if "://" in name else f"s3://{name}"
    remote = [u for u in uris if "://" in u and not u.startswith("file://")]
    if len(remote) == 1:
        return remote[0]
    return "one of " + ", ".join(remote) if remote else "object storage"


def _describe_one(exc: BaseException, uris: Sequence[str]) -> str | None:
    kind = type(exc).__name__
    module = type(exc).__module__ or ""
    if module.startswith(("botocore", "aiobotocore")):
        if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ProxyConnectionError"):
            url = re.search(r'"(https?://[^"]+)"', str(exc))
            endpoint = re.sub(r"^(https?://[^/]+).*", r"\1", url.group(1)) if url else "the endpoint"
            return (
                f"cannot reach the object store at {endpoint} (for {_where(exc, uris)}): check {_ENDPOINT}, and "
                "that the server is up"
            )
        if kind in ("NoCredentialsError", "PartialCredentialsError"):
            return f"no object-store credentials found for {_where(exc, uris)}: set {_CREDENTIALS}"
        if kind == "ProfileNotFound":
            return f"{exc}: AWS_PROFILE names a profile that is not in the shared credentials or config file"
        return None
    if isinstance(exc, PermissionError) and _remote_involved(exc, uris):
        return (
            f"access denied to {_where(exc, uris)} ({_short(exc)}): the credentials in use may not read or "
            f"write it; check {_CREDENTIALS}, and the bucket's policy"
        )
    if isinstance(exc, FileNotFoundError) and _remote_involved(exc, uris):
        if "bucket does not exist" in _text(exc).lower():
            return f"the bucket of {_where(exc, uris)} does not exist: create it, or correct the URI"
        return f"{_where(exc, uris)}: no such object: correct the URI, or create it first"
    return None


def _text(exc: BaseException) -> str:
    """The message, also for an ``OSError`` given a ``filename`` after the fact (its ``str`` then shows only that)."""
    if isinstance(exc, OSError) and exc.strerror is None and exc.args:
        return " ".join(str(a) for a in exc.args)
    return str(exc)


def _short(exc: BaseException) -> str:
    lines = _text(exc).strip().splitlines()  # a Ray task error carries a traceback: its last line is the error
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _remote_involved(exc: OSError, uris: Sequence[str]) -> bool:
    name = getattr(exc, "filename", None)
    if isinstance(name, str) and name:
        return "://" in name and not name.startswith("file://")
    return any("://" in u and not u.startswith("file://") for u in uris)
