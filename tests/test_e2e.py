"""End to end: the real `dvc repro` in a temporary copy of the repository, on a fixture it writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e

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


def dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git + DVC repository holding this repository's pipeline and a small raw-data fixture."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copytree(
        REPO_ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    raw = root / "data" / "raw" / "fixture"
    raw.mkdir(parents=True)
    (raw / "train.csv").write_text(TRAIN_CSV)
    (raw / "test.csv").write_text(TEST_CSV)
    pl.DataFrame({"text": ["Stocks rise on earnings news today"], "label": [2]}).write_parquet(
        raw / "extra.parquet"
    )
    params["ingest"]["sources"] = [
        {"path": "data/raw/fixture/train.csv", "split": "train"},
        {"path": "data/raw/fixture/extra.parquet", "split": "train"},
        {"path": "data/raw/fixture/test.csv", "split": "test"},
    ]
    params["tokenize"]["n_process"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    assert dvc(root, "init", "-q").returncode == 0
    return root


def output_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted((root / "data" / "interim").glob("*.parquet"))
    }


def test_dvc_repro_tokenize_on_fixture(project: Path) -> None:
    result = dvc(project, "repro", "tokenize")
    assert result.returncode == 0, result.stdout + result.stderr

    ingest = json.loads((project / "reports" / "ingest.json").read_text())
    assert ingest["rows_in"] == 8 == ingest["kept"] + ingest["rejected"]
    rejected = pl.read_parquet(project / "data" / "interim" / "rejected.parquet")
    assert rejected.select("source", "row", "reason").rows() == [
        ("train.csv", 4, "label out of range: 9 (expected 1-4)")
    ]

    clean = pl.read_parquet(project / "data" / "interim" / "clean.parquet")
    assert clean.height == 6  # one exact duplicate removed
    texts = clean["text"].to_list()
    assert "New chip unveiled Intel $2 billion plan for faster chips." in texts
    assert "Team wins cup The home side won the final at today." in texts  # URL removed
    assert all("\\" not in t for t in texts)

    tokens = pl.read_parquet(project / "data" / "interim" / "tokens.parquet")
    assert tokens["id"].to_list() == clean["id"].to_list()
    assert (project / "reports" / "plots" / "token_lengths.csv").exists()

    # A second repro changes nothing; a forced one rebuilds byte-identical outputs.
    first = output_hashes(project)
    assert "Stage 'tokenize' didn't change" in dvc(project, "repro", "tokenize").stdout
    assert dvc(project, "repro", "--force", "tokenize").returncode == 0
    assert output_hashes(project) == first
