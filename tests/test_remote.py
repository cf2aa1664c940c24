"""Remotes: `dvc push`/`dvc pull` against a real S3 API server on 127.0.0.1.

The server is moto's (from PyPI), started by the test in a thread of this process; DVC reaches it
through dvc-s3 like any S3 endpoint. Credentials go to `.dvc/config.local` only, never into git.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pipeline_fixture import (
    clone,
    dvc,
    file_hashes,
    git,
    set_params,
    stages_run,
    tool_env,
)

pytestmark = pytest.mark.e2e  # on the worker that builds the tiny pipeline (tests/conftest.py)

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

BUCKET = "newsclf-test"
CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "not-a-real-secret"}
ALL_OUTPUTS = ("data/interim", "data/processed", "models", "reports")


def s3_client(endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=CREDENTIALS["access_key_id"],
        aws_secret_access_key=CREDENTIALS["secret_access_key"],
    )


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
    s3_client(url).create_bucket(Bucket=BUCKET)
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


def clone_with_s3(src: Path, dest: Path) -> Path:
    """A clone of `src`, whose committed .dvc/config names the S3 remote: credentials are local,
    so each clone writes its own .dvc/config.local (what `dvc remote modify --local` writes)."""
    git(src.parent, "clone", "-q", str(src), str(dest))
    assert 'remote "s3"' in (dest / ".dvc" / "config").read_text()
    lines = "".join(f"    {key} = {value}\n" for key, value in CREDENTIALS.items())
    (dest / ".dvc" / "config.local").write_text(f"['remote \"s3\"']\n{lines}")
    return dest


def test_push_pull_repro_pull_and_the_artifact_through_s3(
    tmp_path: Path, s3_endpoint, tiny_pipeline: Path
) -> None:
    """One push of the tiny pipeline (outputs and run-cache) serves every remote workflow: `dvc
    pull` and `dvc repro --pull` into fresh clones, a partial `repro --pull`, the model as a DVC
    artifact fetched from another directory; then, with the server gone, push and pull fail
    clearly and change nothing."""
    from dvc.api import artifacts_show

    endpoint, server = s3_endpoint
    work = clone(tiny_pipeline, tmp_path / "work", with_outputs=True)
    add_s3_remote(work, endpoint)
    assert CREDENTIALS["secret_access_key"] not in (work / ".dvc" / "config").read_text()
    assert CREDENTIALS["secret_access_key"] in (work / ".dvc" / "config.local").read_text()
    git(work, "add", ".dvc/config")  # the remote's address travels with the repository
    git(work, "commit", "-qm", "S3 remote")
    assert ".dvc/config.local" not in git(work, "ls-files")
    pushed = dvc(work, "push", "--run-cache")
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    listed = s3_client(endpoint).list_objects_v2(Bucket=BUCKET, Prefix="cache/runs/")
    assert listed["KeyCount"] > 0  # the run-cache entries went up beside the outputs
    expected = file_hashes(tiny_pipeline, *ALL_OUTPUTS)

    # dvc pull into a fresh clone restores every output, byte for byte.
    pulled_clone = clone_with_s3(work, tmp_path / "pulled")
    pulled = dvc(pulled_clone, "pull")
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert file_hashes(pulled_clone, *ALL_OUTPUTS) == expected

    # `repro --pull` on a fresh clone of the same commit: every stage's outputs come from the
    # remote, none runs.
    fresh = clone_with_s3(work, tmp_path / "fresh")
    restored = dvc(fresh, "repro", "--pull")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert stages_run(restored.stdout) == set()
    assert file_hashes(fresh, *ALL_OUTPUTS) == expected
    assert dvc(fresh, "status").stdout.strip() == "Data and pipelines are up to date."

    # A param of the last stage on another fresh clone: the unchanged upstream stages neither run
    # nor download anything they do not need; the inputs of the stage that reruns are pulled.
    other = clone_with_s3(work, tmp_path / "other")
    set_params(other, {"report.top_suspects": 5})
    rerun = dvc(other, "repro", "--pull", "--allow-missing")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert stages_run(rerun.stdout) == {"validate_params", "report"}
    assert (other / "data" / "processed" / "train.parquet").exists()
    assert not (other / "data" / "interim" / "tokens.parquet").exists()
    assert not (other / "models" / "adapter").exists()

    # The model as an artifact. Versions and stages are git tags in GTO's format (`gto register`
    # / `gto assign` make them).
    git(work, "tag", "-a", "text-classifier@v1.0.0", "-m", "first model")
    git(work, "tag", "-a", "text-classifier#prod#1", "-m", "v1.0.0 to prod")
    shown = artifacts_show("text-classifier", repo=str(work))
    assert shown == {"rev": git(work, "rev-parse", "HEAD").strip(), "path": "models/onnx"}
    # From another directory, with credentials from the environment (no config.local there).
    env = tool_env() | {
        "AWS_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    model_files = file_hashes(work, "models/onnx")
    for name, how in (("latest", []), ("v1", ["--rev", "v1.0.0"]), ("prod", ["--stage", "prod"])):
        out = elsewhere / name
        got = subprocess.run(
            [sys.executable, "-m", "dvc", "artifacts", "get", str(work), "text-classifier"]
            + [*how, "-o", str(out)],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert got.returncode == 0, got.stdout + got.stderr
        fetched = {f"models/onnx/{k}": v for k, v in file_hashes(out, ".").items()}
        assert fetched == model_files
        assert "model-index" in (out / "README.md").read_text()  # the card travels with it

    # With the server gone, push and pull fail with a clear error and leave the workspace alone.
    server.stop()
    set_params(work, {"clean.min_chars": 25})
    assert dvc(work, "repro", "clean").returncode == 0  # a new clean table to push
    before = file_hashes(work, *ALL_OUTPUTS, ".dvc/cache"), (work / "dvc.lock").read_text()
    # One attempt per request (botocore's default retries a refused connection for ~15 s).
    one_try = {"AWS_MAX_ATTEMPTS": "1"}
    failed_push = dvc(work, "push", "clean", env=one_try)
    assert failed_push.returncode != 0
    assert "ERROR" in failed_push.stderr
    assert (
        file_hashes(work, *ALL_OUTPUTS, ".dvc/cache"),
        (work / "dvc.lock").read_text(),
    ) == before

    offline = clone_with_s3(work, tmp_path / "offline")
    failed_pull = dvc(offline, "pull", "--with-deps", "tokenize", env=one_try)
    assert failed_pull.returncode != 0
    assert "ERROR" in failed_pull.stderr
    assert not list(offline.glob("data/*/*.parquet"))  # nothing half-pulled
    shutil.rmtree(offline)
