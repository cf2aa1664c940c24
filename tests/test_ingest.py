"""ingest: each format, each row fault, each structural fault; rows in = kept + rejected."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from stages.common import StageError
from stages.ingest import Source, ingest, ingest_source, parse_sources

GOOD_CSV = (
    b'"3","Wall St. Bears Claw Back","Reuters - Short-sellers are seeing green again."\n'
    b'"1","Talks in Iraq","Negotiators met in Baghdad on Monday\\and agreed."\n'
)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_original_csv_maps_labels_1_4_to_0_3_and_joins_title_and_description(
    tmp_path: Path,
) -> None:
    kept, rejected = ingest_source(Source(write(tmp_path / "a.csv", GOOD_CSV), "train"))
    assert rejected.height == 0
    assert kept["label"].to_list() == [2, 0]
    assert kept["id"].to_list() == ["a.csv:1", "a.csv:2"]
    assert (
        kept["text"][0]
        == "Wall St. Bears Claw Back Reuters - Short-sellers are seeing green again."
    )
    assert kept.columns == ["id", "split", "label", "text", "source", "row"]
    assert kept["split"].unique().to_list() == ["train"]


def test_hf_parquet_keeps_labels_0_3(tmp_path: Path) -> None:
    path = tmp_path / "hf.parquet"
    pl.DataFrame({"text": ["Title one body", "Title two body"], "label": [0, 3]}).write_parquet(
        path
    )
    kept, rejected = ingest_source(Source(path, "train"))
    assert kept["label"].to_list() == [0, 3]
    assert kept["id"].to_list() == ["hf.parquet:1", "hf.parquet:2"]
    assert rejected.height == 0


def test_hf_jsonl(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "A headline here", "label": 1}),
        json.dumps({"text": "B", "label": 2}),
    ]
    kept, rejected = ingest_source(
        Source(write(tmp_path / "x.jsonl", "\n".join(lines).encode() + b"\n"), "test")
    )
    assert kept["label"].to_list() == [1, 2]
    assert kept["split"].to_list() == ["test", "test"]
    assert rejected.height == 0


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'"7","Title","Body text"', "label out of range: 7 (expected 1-4)"),
        (b'"0","Title","Body text"', "label out of range: 0 (expected 1-4)"),
        (b'"x","Title","Body text"', "label not an integer: 'x'"),
        (b'"2.0","Title","Body text"', "label not an integer: '2.0'"),
        (b'"2"," ","  "', "empty text"),
        (b'"2","Title only"', "wrong field count: expected 3 (class, title, description), found 2"),
        (
            b'"2","Title","Body","extra"',
            "wrong field count: expected 3 (class, title, description), found 4",
        ),
        (b'"2","Caf\xe9 title","Body"', "undecodable bytes (not UTF-8)"),
        (b'"2","Bell\x07 title","Body"', "control characters in text"),
    ],
)
def test_csv_row_faults_are_quarantined_with_reason(
    tmp_path: Path, line: bytes, reason: str
) -> None:
    kept, rejected = ingest_source(
        Source(write(tmp_path / "f.csv", GOOD_CSV + line + b"\n"), "train")
    )
    assert kept.height == 2
    assert rejected.rows(named=True) == [
        {"source": "f.csv", "split": "train", "row": 3, "reason": reason, "raw": rejected["raw"][0]}
    ]
    assert rejected["raw"][0].startswith("[")  # the fields as read, for a person to inspect


@pytest.mark.parametrize(
    ("label", "text", "reason"),
    [
        (4, "fine text", "label out of range: 4 (expected 0-3)"),
        (None, "fine text", "label missing"),
        (1, "", "empty text"),
        (1, None, "empty text"),
        (1, "tab\tok but bell\x07 not", "control characters in text"),
    ],
)
def test_parquet_row_faults(
    tmp_path: Path, label: int | None, text: str | None, reason: str
) -> None:
    path = tmp_path / "p.parquet"
    pl.DataFrame(
        {"text": ["good row", text], "label": [0, label]},
        schema={"text": pl.String, "label": pl.Int64},
    ).write_parquet(path)
    kept, rejected = ingest_source(Source(path, "train"))
    assert kept.height == 1
    assert rejected["reason"].to_list() == [reason]
    assert rejected["row"].to_list() == [2]


def test_jsonl_row_faults(tmp_path: Path) -> None:
    data = b"\n".join(
        [
            json.dumps({"text": "good", "label": 0}).encode(),
            b"{not json",
            b"[1, 2]",
            json.dumps({"text": "no label"}).encode(),
            b'{"text": "caf\xe9", "label": 1}',
        ]
    )
    kept, rejected = ingest_source(Source(write(tmp_path / "j.jsonl", data), "train"))
    assert kept.height == 1
    reasons = dict(zip(rejected["row"].to_list(), rejected["reason"].to_list(), strict=True))
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3] == "not a JSON object"
    assert reasons[4] == "missing field(s): ['label']"
    assert reasons[5] == "undecodable bytes (not UTF-8)"


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("missing.csv", None, "missing.csv: file not found"),
        ("data.txt", b"hello", "data.txt: unsupported format '.txt'"),
        ("two.csv", b'"1","only two"\n"2","fields"\n', "two.csv: wrong columns"),
        ("empty.csv", b"", "empty.csv: empty file"),
        ("bin.csv", b"\x00\x01\x02PK", "bin.csv: not a CSV text file"),
        ("bad.parquet", b"this is not parquet", "bad.parquet: not a readable Parquet file"),
    ],
)
def test_structural_faults_fail_naming_the_file(
    tmp_path: Path, name: str, data: bytes | None, message: str
) -> None:
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(StageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ingest_source(Source(path, "train"))


def test_parquet_with_wrong_columns_names_them(tmp_path: Path) -> None:
    path = tmp_path / "cols.parquet"
    pl.DataFrame({"sentence": ["x"], "label": [0]}).write_parquet(path)
    with pytest.raises(StageError, match=r"cols\.parquet: wrong columns: missing \['text'\]"):
        ingest_source(Source(path, "train"))


def test_sources_param_is_validated() -> None:
    with pytest.raises(StageError, match="split 'dev' is not one of"):
        parse_sources([{"path": "a.csv", "split": "dev"}])
    with pytest.raises(StageError, match="listed twice"):
        parse_sources([{"path": "x/a.csv", "split": "train"}, {"path": "y/a.csv", "split": "test"}])
    with pytest.raises(StageError, match="expected {path, split}"):
        parse_sources([{"file": "a.csv"}])


def test_rows_in_equals_kept_plus_rejected_per_source(tmp_path: Path) -> None:
    csv_path = write(tmp_path / "c.csv", GOOD_CSV + b'"9","bad","label"\n')
    pq_path = tmp_path / "p.parquet"
    pl.DataFrame({"text": ["ok text", ""], "label": [1, 2]}).write_parquet(pq_path)
    kept, rejected, report = ingest([Source(csv_path, "train"), Source(pq_path, "test")])
    assert report["rows_in"] == 5 == kept.height + rejected.height
    for src in report["sources"]:
        assert src["rows_in"] == src["kept"] + src["rejected"]
    assert report["sources"][0]["rejected_by_reason"] == {"label out of range: 9 (expected 1-4)": 1}
    assert kept["id"].is_unique().all()
