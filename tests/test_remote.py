"""Remotes: `dvc push`/`dvc pull` against a real S3 API server on 127.0.0.1.

The server is moto's (from PyPI), started by the test in a thread of this process; DVC reaches it
through dvc-s3 like any S3 endpoint. Credentials go to `.dvc/config.local` only, never into git.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pipeline_fixture import commit_all, dvc, file_hashes, git, make_project, set_params

pytestmark = pytest.mark.e2e

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

BUCKET = "newsclf-test"
CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "not-a-real-secret"}
STAGE_OUTPUTS = ("data/interim", "reports")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_endpoint() -> Iterator[tuple[str, object]]:
    """A fresh S3 server on 127.0.0.1 with one bucket; yields (endpoint URL, server)."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=CREDENTIALS["access_key_id"],
        aws_secret_access_key=CREDENTIALS["secret_access_key"],
    ).create_bucket(Bucket=BUCKET)
    try:
        yield url, server
    finally:
        server.stop()


def add_s3_remote(root: Path, endpoint: str) -> None:
    """The S3 remote as a user sets it: address in .dvc/config, credentials in config.local."""
    for args in (
        ("remote", "add", "-d", "-f", "s3", f"s3://{BUCKET}/cache"),
        ("remote", "modify", "s3", "endpointurl", endpoint),
        *(("remote", "modify", "--local", "s3", k, v) for k, v in CREDENTIALS.items()),
    ):
        result = dvc(root, *args)
        assert result.returncode == 0, result.stderr


def clone(src: Path, dest: Path, endpoint: str) -> Path:
    git(src.parent, "clone", "-q", str(src), str(dest))
    add_s3_remote(dest, endpoint)  # credentials are local: each clone sets its own
    return dest


def test_push_and_pull_through_s3(tmp_path: Path, s3_endpoint) -> None:
    endpoint, server = s3_endpoint
    project = make_project(tmp_path / "repo")
    add_s3_remote(project, endpoint)
    assert CREDENTIALS["secret_access_key"] not in (project / ".dvc" / "config").read_text()
    assert CREDENTIALS["secret_access_key"] in (project / ".dvc" / "config.local").read_text()

    assert dvc(project, "repro", "tokenize").returncode == 0
    commit_all(project, "pipeline run")
    assert ".dvc/config.local" not in git(project, "ls-files")
    pushed = dvc(project, "push")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    expected = file_hashes(project, *STAGE_OUTPUTS)

    # dvc pull into a fresh clone restores every output, byte for byte.
    fresh = clone(project, tmp_path / "fresh", endpoint)
    pulled = dvc(fresh, "pull", "--with-deps", "tokenize")  # the stages this test ran
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert file_hashes(fresh, *STAGE_OUTPUTS) == expected

    # With the server gone, push and pull fail with a clear error and leave the workspace alone.
    server.stop()
    set_params(project, {"clean.min_chars": 25})
    assert dvc(project, "repro", "tokenize").returncode == 0
    before = file_hashes(project, *STAGE_OUTPUTS, ".dvc/cache"), (project / "dvc.lock").read_text()
    failed_push = dvc(project, "push", "--with-deps", "tokenize")
    assert failed_push.returncode != 0
    assert "ERROR" in failed_push.stderr
    assert (
        file_hashes(project, *STAGE_OUTPUTS, ".dvc/cache"),
        (project / "dvc.lock").read_text(),
    ) == before

    offline = clone(project, tmp_path / "offline", endpoint)
    failed_pull = dvc(offline, "pull", "--with-deps", "tokenize")
    assert failed_pull.returncode != 0
    assert "ERROR" in failed_pull.stderr
    assert not list((offline / "data" / "interim").glob("*.parquet"))  # nothing half-pulled
    shutil.rmtree(offline)
