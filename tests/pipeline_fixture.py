"""A temporary git + DVC copy of this repository's pipeline over a small raw-data fixture.

Used by the tests that drive real `dvc` commands (end to end, remotes, run-cache).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
# What a stage may import or read from the repository (beyond the data it is given).
PIPELINE_PATHS = ("stages", "metrics", "dvc.yaml", "params.yaml")

TRAIN_CSV = (
    '"3","Wall St. Bears Claw Back","Reuters - Short-sellers, Wall Street\'s dwindling\\band of '
    'ultra-cynics, are seeing green again."\n'
    '"3","Wall St. Bears Claw Back","Reuters - Short-sellers, Wall Street\'s dwindling\\band of '
    'ultra-cynics, are seeing green again."\n'
    '"4","New chip unveiled","Intel #36;2 billion plan &lt;b&gt;for&lt;/b&gt; faster chips."\n'
    '"9","Bad label","This row has a label out of range."\n'
    '"2","Team wins cup","The home side won the final at http://sports.example.com today."\n'
)
TEST_CSV = (
    '"1","Talks resume","Negotiators met on Monday in Geneva to resume talks."\n'
    '"2","Cup final tonight","Fans gather for the final match of the season."\n'
)
GIT_ENV = {
    "GIT_AUTHOR_NAME": "newsclf tests",
    "GIT_AUTHOR_EMAIL": "tests@newsclf.invalid",
    "GIT_COMMITTER_NAME": "newsclf tests",
    "GIT_COMMITTER_EMAIL": "tests@newsclf.invalid",
}


def tool_env() -> dict[str, str]:
    """This interpreter's bin folder first on PATH, so `python` in dvc.yaml is the test's Python."""
    return dict(
        os.environ, **GIT_ENV, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        env=tool_env(),
        capture_output=True,
        text=True,
        check=False,
    )


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, env=tool_env(), capture_output=True, text=True, check=True
    ).stdout


def make_project(root: Path) -> Path:
    """Copy the pipeline into `root`, write the raw fixture, point `ingest.sources` at it, git+dvc init."""
    root.mkdir(parents=True)
    for name in PIPELINE_PATHS:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, root / name)
    raw = root / "data" / "raw" / "fixture"
    raw.mkdir(parents=True)
    (raw / "train.csv").write_text(TRAIN_CSV)
    (raw / "test.csv").write_text(TEST_CSV)
    pl.DataFrame({"text": ["Stocks rise on earnings news today"], "label": [2]}).write_parquet(
        raw / "extra.parquet"
    )
    set_params(
        root,
        {
            "ingest.sources": [
                {"path": "data/raw/fixture/train.csv", "split": "train"},
                {"path": "data/raw/fixture/extra.parquet", "split": "train"},
                {"path": "data/raw/fixture/test.csv", "split": "test"},
            ],
            "tokenize.n_process": 1,
        },
    )
    git(root, "init", "-q")
    assert dvc(root, "init", "-q").returncode == 0
    return root


def set_params(root: Path, values: dict[str, object]) -> None:
    """Set dotted keys in `root/params.yaml`."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in values.items():
        *parents, key = dotted.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def file_hashes(root: Path, *folders: str) -> dict[str, str]:
    """md5 of every file under `folders` of `root`, by path relative to `root`."""
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for folder in folders
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    }
