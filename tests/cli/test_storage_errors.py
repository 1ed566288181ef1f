"""Object-store failures as a user meets them, against real HTTP servers on 127.0.0.1: access denied, a missing
bucket, an endpoint that does not answer. Each is one line naming the URI and the fix, exit status 2, no traceback
and never the secret key. Each command runs in its own process, as a user's would (s3fs caches its clients)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TEST_SECRET, AuthServer
from cxp_helpers import write_split

from chexseg_dist.core import fsio

pytestmark = pytest.mark.s3


def _chexseg(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chexseg_dist.cli", *argv],
        env={**os.environ, "AWS_MAX_ATTEMPTS": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_error(out: subprocess.CompletedProcess[str], command: str, *expected: str) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"chexseg {command}: error: "), out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout
    assert TEST_SECRET not in out.stderr + out.stdout
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def test_access_denied_reading_and_writing_names_the_uri(
    s3_bucket: str, s3_auth_server: AuthServer, tmp_path: Path
) -> None:
    csv_path = write_split(tmp_path / "data", "valid", 4, 2)
    fsio.write_bytes_atomic(f"{s3_bucket}/valid.csv", csv_path.read_bytes())  # readable on the working server
    denied = {"AWS_ENDPOINT_URL": s3_auth_server.endpoint}  # a server that knows no key "testing"
    read = _chexseg(["manifest", "--csv", f"{s3_bucket}/valid.csv", "--out", str(tmp_path / "m.parquet")], **denied)
    _one_line_error(read, "manifest", f"access denied to {s3_bucket}/valid.csv", "AWS_PROFILE")
    assert not (tmp_path / "m.parquet").exists()

    write = _chexseg(["manifest", "--csv", str(csv_path), "--out", f"{s3_bucket}/m.parquet", "--no-check"], **denied)
    _one_line_error(write, "manifest", f"access denied to {s3_bucket}/m.parquet", "AWS_ACCESS_KEY_ID")
    assert not fsio.exists(f"{s3_bucket}/m.parquet")


def test_a_missing_bucket_for_an_output_is_named(s3_server: str, tmp_path: Path) -> None:
    csv_path = write_split(tmp_path / "data", "valid", 4, 2)
    out = _chexseg(["manifest", "--csv", str(csv_path), "--out", "s3://no-such-bucket-4711/m.parquet", "--no-check"])
    _one_line_error(out, "manifest", "the bucket of s3://no-such-bucket-4711/m.parquet does not exist")


def test_an_endpoint_that_does_not_answer_is_named_with_the_variable_to_fix(s3_bucket: str, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = _chexseg(
        ["manifest", "--csv", f"{s3_bucket}/valid.csv", "--out", str(tmp_path / "m.parquet")],
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )
    _one_line_error(out, "manifest", f"cannot reach the object store at http://127.0.0.1:{port}", "AWS_ENDPOINT_URL")
