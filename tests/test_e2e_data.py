"""The data stages under a real `dvc repro`, in a temporary copy of the repository on the raw
fixture alone (`tokenized_project`): apart from the tiny pipeline's tests, so that another xdist
worker runs it beside them."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tests.pipeline_fixture import clone, dvc, file_hashes

pytestmark = pytest.mark.e2e


def test_dvc_repro_tokenize_on_fixture(tmp_path: Path, tokenized_project: Path) -> None:
    project = clone(tokenized_project, tmp_path / "repo", with_outputs=True, upto="tokenize")
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
    first = file_hashes(project, "data/interim")
    assert "Stage 'tokenize' didn't change" in dvc(project, "repro", "tokenize").stdout
    assert dvc(project, "repro", "--force", "tokenize").returncode == 0
    assert file_hashes(project, "data/interim") == first
