"""Credentials from a shared credentials file (``AWS_PROFILE``), against a moto server that checks signatures: the
data path (s3fs) and Ray Train's storage path (pyarrow's S3 filesystem) both sign with the profile's key, and a
wrong secret in the profile is denied (so the server really checks)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import pytest
from conftest import AuthServer
from cxp_helpers import write_split

pytestmark = pytest.mark.s3


def _profile_env(tmp_path: Path, server: AuthServer, secret: str) -> dict[str, str]:
    creds = tmp_path / f"credentials-{uuid.uuid4().hex[:6]}"
    creds.write_text(f"[chexseg]\naws_access_key_id = {server.key_id}\naws_secret_access_key = {secret}\n")
    config = tmp_path / "config"
    config.write_text("[profile chexseg]\nregion = us-east-1\n")
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(
        AWS_PROFILE="chexseg",
        AWS_SHARED_CREDENTIALS_FILE=str(creds),
        AWS_CONFIG_FILE=str(config),
        AWS_ENDPOINT_URL=server.endpoint,
        AWS_MAX_ATTEMPTS="1",
    )
    return env


def test_a_profile_in_a_shared_credentials_file_signs_data_and_training_storage(
    s3_auth_server: AuthServer, tmp_path: Path
) -> None:
    bucket = f"profile-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_auth_server.endpoint,
        aws_access_key_id=s3_auth_server.key_id,
        aws_secret_access_key=s3_auth_server.secret,
    )
    s3.create_bucket(Bucket=bucket)
    csv_path = write_split(tmp_path / "data", "valid", 4, 2)
    env = _profile_env(tmp_path, s3_auth_server, s3_auth_server.secret)

    out = subprocess.run(
        [sys.executable, "-m", "chexseg_dist.cli", "manifest", "--csv", str(csv_path), "--no-check", "--out",
         f"s3://{bucket}/m.parquet"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert s3.head_object(Bucket=bucket, Key="m.parquet")["ContentLength"] > 0

    # Ray Train keeps its runs through pyarrow's S3 filesystem, which reads the same chain.
    code = (
        f"import pyarrow.fs as pf; fs, p = pf.FileSystem.from_uri('s3://{bucket}/ray-train/probe.txt'); "
        "s = fs.open_output_stream(p); s.write(b'ok'); s.close()"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert s3.get_object(Bucket=bucket, Key="ray-train/probe.txt")["Body"].read() == b"ok"

    wrong = _profile_env(tmp_path, s3_auth_server, "not-the-secret")
    out = subprocess.run(
        [sys.executable, "-m", "chexseg_dist.cli", "manifest", "--csv", str(csv_path), "--no-check", "--out",
         f"s3://{bucket}/m2.parquet"],
        env=wrong, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2 and f"access denied to s3://{bucket}/m2.parquet" in out.stderr, out.stderr[-3000:]
    assert "not-the-secret" not in out.stderr + out.stdout
