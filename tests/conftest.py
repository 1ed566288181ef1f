"""Shared fixtures: a real S3-compatible server (moto in server mode) on 127.0.0.1 and a real local Ray cluster.

Nothing here mocks what the project ships against: s3fs/zarr talk HTTP to the moto server, and Ray tests run a
real local cluster (``ray.init(num_cpus=2)``). Ray is started lazily by the tests that need it and shared by
them; it is started after the S3 server so that its workers inherit the S3 endpoint and credentials.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent

# Ray Train's controller polls its workers every 2 s and starts a preemption watcher actor per run; on the tests'
# one-node clusters (and the job subprocesses, which inherit this environment) polling every 0.5 s and no watcher
# take about a fifth off every training test (tests/train/test_loop_cluster.py: 85 s -> 69 s on 2 cores). Nothing
# tested depends on either; a user's runs keep Ray's defaults.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_moto(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("moto_server", path=str(VENV_BIN)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not found: install the dev extra (pip install -e '.[dev]')")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(extra_env or {})},
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return proc, endpoint
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"moto_server did not start on {endpoint}")
            time.sleep(0.1)


#: The test server's secret key: distinctive, so that a test can search outputs for it (a leak would show).
TEST_SECRET = "chexsegTEST-s3cr3t-9f41c27de05b"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start ``moto_server`` on 127.0.0.1 and point the standard AWS environment at it; yields the endpoint."""
    proc, endpoint = _start_moto()
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY=TEST_SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass(frozen=True)
class AuthServer:
    """A moto server that checks signatures, and the one access key it knows (allowed everything)."""

    endpoint: str
    key_id: str
    secret: str


@pytest.fixture(scope="session")
def s3_auth_server(s3_server: str) -> Iterator[AuthServer]:
    """A second moto server that checks credentials as AWS does (``INITIAL_NO_AUTH_ACTION_COUNT``: after the three
    unauthenticated IAM calls that create its one user and key, a request with an unknown key or a wrong signature
    is denied). The environment is left pointing at :func:`s3_server`."""
    import boto3

    proc, endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        iam = boto3.client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="chexseg")
        key = iam.create_access_key(UserName="chexseg")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="chexseg", PolicyName="all", PolicyDocument=json.dumps(policy))
        yield AuthServer(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture()
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the test S3 server; yields ``s3://<bucket>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str) -> Iterator[None]:
    """A real local Ray cluster with 2 CPUs, shared by the tests that ask for it (S3 env already exported)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def student_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The student's miniature world (phantom splits, manifests, a done map store of train), made once per session
    and only read by the tests that share it (outputs go to each test's own tmp_path)."""
    from student_helpers import make_world

    return make_world(tmp_path_factory.mktemp("student_world"))


@pytest.fixture(scope="session")
def cxp_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny CheXpert-format tree with two unreadable train images (cxp_helpers.tiny_cxp), made once per session and
    only read by the tests that share it."""
    from cxp_helpers import tiny_cxp

    return tiny_cxp(tmp_path_factory.mktemp("cxp"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the Ray cluster or the S3 server is marked so, whatever its decorators say: ``make
    test-fast`` (``-m "not cluster and not s3 and not slow"``) never starts either."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "ray_cluster" in fixtures:
            item.add_marker(pytest.mark.cluster)
        if fixtures & {"s3_server", "s3_bucket", "s3_auth_server"}:
            item.add_marker(pytest.mark.s3)
