"""ingest: each format, each row fault, each structural fault; rows in = kept + rejected."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from stages.common import StageError, parse_labels
from stages.ingest import IngestParams, Source, ingest, ingest_source, parse_sources
from tests.pipeline_fixture import AG_NEWS_LABELS

GOOD_CSV = (
    b'"3","Wall St. Bears Claw Back","Reuters - Short-sellers are seeing green again."\n'
    b'"1","Talks in Iraq","Negotiators met in Baghdad on Monday\\and agreed."\n'
)

# Ingest params that let any share of rows be rejected (the loss rule has tests of its own).
ANY_LOSS = IngestParams(sources=(), max_rejected_share=1.0, fold_label_case=False)


def ingest_one(
    source: Source, label_names: tuple[str, ...] = AG_NEWS_LABELS
) -> tuple[pl.DataFrame, pl.DataFrame]:
    done = ingest_source(source, label_names)
    return done.kept, done.rejected


def ingest_with_form(
    source: Source, label_names: tuple[str, ...]
) -> tuple[pl.DataFrame, pl.DataFrame, str]:
    done = ingest_source(source, label_names)
    return done.kept, done.rejected, done.form


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_original_csv_maps_labels_1_4_to_0_3_and_joins_title_and_description(
    tmp_path: Path,
) -> None:
    kept, rejected = ingest_one(Source(write(tmp_path / "a.csv", GOOD_CSV), "train"))
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
    kept, rejected = ingest_one(Source(path, "train"))
    assert kept["label"].to_list() == [0, 3]
    assert kept["id"].to_list() == ["hf.parquet:1", "hf.parquet:2"]
    assert rejected.height == 0


def test_hf_jsonl(tmp_path: Path) -> None:
    lines = [
        json.dumps({"text": "A headline here", "label": 1}),
        json.dumps({"text": "B", "label": 2}),
    ]
    kept, rejected = ingest_one(
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
        (b'"2.5","Title","Body text"', "label not an integer: '2.5'"),
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
    kept, rejected = ingest_one(Source(write(tmp_path / "f.csv", GOOD_CSV + line + b"\n"), "train"))
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
    kept, rejected = ingest_one(Source(path, "train"))
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
    kept, rejected = ingest_one(Source(write(tmp_path / "j.jsonl", data), "train"))
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
        ingest_one(Source(path, "train"))


def test_parquet_with_wrong_columns_names_them(tmp_path: Path) -> None:
    path = tmp_path / "cols.parquet"
    pl.DataFrame({"sentence": ["x"], "label": [0]}).write_parquet(path)
    with pytest.raises(StageError, match=r"cols\.parquet: wrong columns: missing \['text'\]"):
        ingest_one(Source(path, "train"))


def test_sources_param_is_validated() -> None:
    with pytest.raises(StageError, match="split 'dev' is not one of"):
        parse_sources([{"path": "data/raw/a.csv", "split": "dev"}])
    with pytest.raises(StageError, match=r"sources\[1\]\.path 'data/raw/x/a\.csv': listed twice"):
        parse_sources(
            [
                {"path": "data/raw/x/a.csv", "split": "train"},
                {"path": "data/raw/x/a.csv", "split": "test"},
            ]
        )
    with pytest.raises(StageError, match=r"expected \{path, split\[, text, label\]\}"):
        parse_sources([{"file": "a.csv"}])
    with pytest.raises(StageError, match=r"sources\[0\]: a \.csv source names both"):
        parse_sources([{"path": "data/raw/a.csv", "split": "train", "text": "body"}])
    with pytest.raises(StageError, match=r"sources\[0\]\.text: a column name or a list"):
        parse_sources([{"path": "data/raw/a.jsonl", "split": "train", "text": [], "label": "y"}])
    with pytest.raises(StageError, match=r"sources\[0\]\.path: a file path, got None"):
        parse_sources([{"path": None, "split": "train"}])


@pytest.mark.parametrize(
    "path", ["data/elsewhere/train.csv", "/tmp/train.csv", "data/raw/../train.csv", "train.csv"]
)
def test_a_source_outside_the_declared_raw_folder_is_refused(path: str) -> None:
    """dvc.yaml declares data/raw/ as ingest's dependency: DVC would not see a file elsewhere
    change, and would skip ingest with the old rows."""
    with pytest.raises(StageError) as refused:
        parse_sources([{"path": path, "split": "train"}])
    assert str(refused.value).startswith(
        f"params.yaml ingest.sources[0].path {path!r}: outside data/raw/"
    )


def test_sources_sharing_a_file_name_are_told_apart_by_their_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for folder, line in (("a", GOOD_CSV), ("b", b'"2","Cup final","Fans gather for the final."\n')):
        (tmp_path / "data" / "raw" / folder).mkdir(parents=True)
        write(tmp_path / "data" / "raw" / folder / "train.csv", line)
    sources = parse_sources(
        [
            {"path": "data/raw/a/train.csv", "split": "train"},
            {"path": "data/raw/b/train.csv", "split": "train"},
            {"path": "data/raw/ag/test.csv", "split": "test"},
        ]
    )
    assert [s.name for s in sources] == ["a/train.csv", "b/train.csv", "test.csv"]
    kept = pl.concat([ingest_one(source)[0] for source in sources[:2]])
    assert kept["id"].is_unique().all()
    assert kept.filter(pl.col("source") == "b/train.csv")["id"].to_list() == ["b/train.csv:1"]


def test_a_header_csv_with_a_column_name_twice_is_refused_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path / "dup.csv", b"text,text,label\nfirst half,second half,World\n")
    with pytest.raises(StageError) as refused:
        ingest_one(Source(path, "train", ("text",), "label"))
    assert (
        "dup.csv: header row (line 1): duplicate column name(s): 'text' in columns [1, 2]"
        in str(refused.value)
    )


@pytest.mark.parametrize("kind", ["csv", "header-csv", "jsonl"])
def test_cr_only_line_endings_are_read_as_lines(tmp_path: Path, kind: str) -> None:
    """Classic Mac OS line ends (a bare CR): each CR ends a line, and line numbers count them."""
    if kind == "csv":
        data, source = GOOD_CSV.replace(b"\n", b"\r"), lambda p: Source(p, "train")
    elif kind == "header-csv":
        data = b"label,text\rWorld,Leaders meet for talks\rSports,The home side won\r"
        source = lambda p: Source(p, "train", ("text",), "label")  # noqa: E731
    else:
        data = b'{"text": "Leaders meet", "label": 0}\r{"text": "The home side won", "label": 1}'
        source = lambda p: Source(p, "train")  # noqa: E731
    path = write(tmp_path / f"mac.{'jsonl' if kind == 'jsonl' else 'csv'}", data)
    kept, rejected = ingest_one(source(path))
    assert rejected.height == 0 and kept.height == data.count(b"\r") + (
        not data.endswith(b"\r")
    ) - (kind == "header-csv")
    assert not any("\r" in text for text in kept["text"])


def test_a_jsonl_object_with_a_field_twice_is_a_row_fault(tmp_path: Path) -> None:
    data = b'{"text": "Leaders meet", "label": 0}\n{"text": "a", "text": "b", "label": 1}\n'
    kept, rejected = ingest_one(Source(write(tmp_path / "twice.jsonl", data), "train"))
    assert kept["text"].to_list() == ["Leaders meet"]
    assert rejected["reason"].to_list() == [
        "field(s) ['text'] given twice in one object (which value is meant?)"
    ]


def test_rows_in_equals_kept_plus_rejected_per_source(tmp_path: Path) -> None:
    every_class = b'"2","Cup final","Fans gather."\n"4","New chip","Faster chips."\n'
    csv_path = write(tmp_path / "c.csv", GOOD_CSV + every_class + b'"9","bad","label"\n')
    pq_path = tmp_path / "p.parquet"
    pl.DataFrame({"text": ["ok text", ""], "label": [1, 2]}).write_parquet(pq_path)
    result = ingest([Source(csv_path, "train"), Source(pq_path, "test")], AG_NEWS_LABELS, ANY_LOSS)
    kept, rejected, report = result.kept, result.rejected, result.report
    assert report["rows_in"] == 7 == kept.height + rejected.height
    for src in report["sources"]:
        assert src["rows_in"] == src["kept"] + src["rejected"]
    assert report["sources"][0]["rejected_by_reason"] == {"label out of range: 9 (expected 1-4)": 1}
    assert kept["id"].is_unique().all()


# ---- your own corpus: columns and labels from params --------------------------------------------

TICKETS = ("billing", "outage", "account")


def test_header_csv_with_class_names_and_two_text_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # sources are listed relative to the repository root
    (tmp_path / "data" / "raw").mkdir(parents=True)
    path = write(
        Path("data/raw/t.csv"),
        b"queue,subject,body,extra\n"
        b"billing,Invoice twice,I was charged twice,x\n"
        b'outage,"Site down, again",Nothing loads,y\n'
        b"refunds,Money back,Please refund,z\n"
        b"account, Reset , ,w\n",
    )
    source = parse_sources(
        [{"path": str(path), "split": "train", "text": ["subject", "body"], "label": "queue"}]
    )[0]
    kept, rejected, form = ingest_with_form(source, TICKETS)
    assert form == "names"
    assert kept["label"].to_list() == [0, 1, 2]
    assert kept["text"].to_list() == [
        "Invoice twice I was charged twice",
        "Site down, again Nothing loads",
        " Reset   ",
    ]
    # Row numbers count the header: the id points at the line a spreadsheet shows.
    assert kept["id"].to_list() == ["t.csv:2", "t.csv:3", "t.csv:5"]
    assert rejected.select("row", "reason").rows() == [
        (4, "label not in labels: 'refunds' (expected one of ['billing', 'outage', 'account'])")
    ]


def test_jsonl_with_integer_ids_and_named_fields(tmp_path: Path) -> None:
    lines = [
        {"title": "Invoice", "message": "charged twice", "y": 0},
        {"title": "Down", "message": None, "y": 1},
        {"title": "Reset", "message": "password", "y": 3},
        {"title": 5, "message": "not a string", "y": 2},
    ]
    path = write(tmp_path / "t.jsonl", "\n".join(json.dumps(x) for x in lines).encode())
    source = Source(path, "test", ("title", "message"), "y")
    kept, rejected, form = ingest_with_form(source, TICKETS)
    assert form == "ids"
    assert kept.select("label", "text").rows() == [(0, "Invoice charged twice"), (1, "Down")]
    assert dict(rejected.select("row", "reason").rows()) == {
        3: "label out of range: 3 (expected 0-2)",
        4: "text field(s) ['title', 'message'] not all strings",
    }


def test_parquet_with_class_names(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pl.DataFrame(
        {"body": ["a b", "c d", "e f"], "queue": ["outage", "billing", None]}
    ).write_parquet(path)
    kept, rejected, form = ingest_with_form(Source(path, "train", ("body",), "queue"), TICKETS)
    assert form == "names"
    assert kept["label"].to_list() == [1, 0]
    assert rejected["reason"].to_list() == ["label missing"]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("h.csv", b"queue,subject\nbilling,x\n", "h.csv: wrong columns: missing ['body']"),
        ("h.jsonl", b'{"queue": "billing", "subject": "x"}\n', "h.jsonl: wrong columns: no line"),
    ],
)
def test_missing_named_column_fails_naming_file_and_column(
    tmp_path: Path, name: str, data: bytes, message: str
) -> None:
    source = Source(write(tmp_path / name, data), "train", ("subject", "body"), "queue")
    with pytest.raises(StageError, match=re.escape(message)):
        ingest_source(source, TICKETS)


def test_nul_byte_in_one_row_quarantines_that_row_only(tmp_path: Path) -> None:
    # A stray control byte is a row fault: the other rows of the file are kept.
    data = GOOD_CSV + b'"2","Cup\x00 final","Fans gather."\n' + GOOD_CSV
    kept, rejected = ingest_one(Source(write(tmp_path / "nul.csv", data), "train"))
    assert kept.height == 4
    assert rejected.select("row", "reason").rows() == [(3, "control characters in text")]


@pytest.mark.parametrize(
    "data",
    [
        b"\x1f\x8b\x08\x00" + GOOD_CSV,  # gzip magic
        b"PK\x03\x04" + GOOD_CSV,  # a ZIP archive
        b"PAR1" + bytes(range(256)) * 4,  # a Parquet file named .csv
        bytes(range(32)) * 100,  # mostly control bytes
    ],
)
def test_really_binary_file_fails_as_a_whole(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(StageError, match=r"bin\.csv: not a CSV text file \(binary content"):
        ingest_one(Source(write(tmp_path / "bin.csv", data), "train"))


def test_a_class_without_train_rows_fails_with_the_counts(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", GOOD_CSV)  # World and Business only
    problems = ingest([Source(path, "train")], AG_NEWS_LABELS, ANY_LOSS).problems
    assert "['Sports', 'Sci/Tech'] of `labels` have no train row" in problems[-1]
    assert "{'World': 1, 'Sports': 0, 'Business': 1, 'Sci/Tech': 0}" in problems[-1]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (["only"], "1 class(es); a classifier needs at least two"),
        (["a", "b", "a"], "class name(s) listed twice: ['a']"),
        (["a", " "], "an empty class name"),
        ("a,b", "expected a list of class names"),
    ],
)
def test_bad_labels_param(raw, message: str) -> None:
    with pytest.raises(StageError, match=re.escape(message)):
        parse_labels(raw)


def test_empty_text_after_joining_the_columns_is_a_row_fault(tmp_path: Path) -> None:
    path = write(tmp_path / "e.csv", b"queue,subject,body\nbilling,Invoice,twice\noutage, ,\n")
    kept, rejected, _ = ingest_with_form(
        Source(path, "train", ("subject", "body"), "queue"), TICKETS
    )
    assert kept["id"].to_list() == ["e.csv:2"]
    assert rejected.select("row", "reason").rows() == [(3, "empty text")]
