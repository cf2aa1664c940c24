"""ingest never loses a row: the faults real exports have, each record carrying its own marker.

Every record written here holds a unique marker (`M0007X`); a test checks each marker, not the
stage's own totals: it is in exactly one kept text or one rejected raw (with a reason), and no row
holds two (nothing merged).
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages import paths
from stages.common import StageError
from stages.ingest import (
    CSV_FIELD_LIMIT,
    IngestParams,
    Source,
    SourceRead,
    ingest,
    ingest_source,
    main,
)
from tests.pipeline_fixture import AG_NEWS_LABELS

MARKER = r"M\d{4}X"
TICKETS = ("Billing", "Outage", "Account")


def marker(i: int) -> str:
    return f"M{i:04d}X"


def params(share: float = 1.0, fold: bool = False) -> IngestParams:
    return IngestParams(sources=(), max_rejected_share=share, fold_label_case=fold)


def assert_each_marker_once(n: int, kept: pl.DataFrame, rejected: pl.DataFrame) -> None:
    """Markers 0..n-1: each in exactly one row, kept or rejected with a reason; no row holds two."""
    found = pl.concat(
        [
            kept.select(pl.col("text").str.extract_all(MARKER).alias("m")),
            rejected.select(pl.col("raw").str.extract_all(MARKER).alias("m")),
        ]
    )["m"].to_list()
    assert all(len(ms) <= 1 for ms in found), "a row holds the markers of several records"
    seen = sorted(m for ms in found for m in ms)
    assert seen == [marker(i) for i in range(n)]
    assert rejected["reason"].str.len_chars().min() or rejected.height == 0


def header_csv(rows: list[tuple[str, str]], newline: str = "\n") -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=newline)
    writer.writerow(["label", "text"])
    writer.writerows(rows)
    return buf.getvalue()


def ticket_source(path: Path, split: str = "train") -> Source:
    return Source(path, split, ("text",), "label")


def ticket_rows(n: int) -> list[tuple[str, str]]:
    return [
        (TICKETS[i % 3], f"Ticket {marker(i)} says, plainly, what went wrong") for i in range(n)
    ]


# ---- quotes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("at", [14, 59], ids=["row 15 of 60", "the last row"])
def test_an_unclosed_quote_loses_no_later_row(tmp_path: Path, at: int) -> None:
    lines = header_csv(ticket_rows(60)).splitlines(keepends=True)
    # `Billing,"Ticket M0014X says, plainly, what went wrong`: the quote never closes.
    lines[at + 1] = lines[at + 1].removesuffix('"\n') + "\n"
    path = tmp_path / "t.csv"
    path.write_text("".join(lines))
    done = ingest_source(ticket_source(path), TICKETS)
    assert_each_marker_once(60, done.kept, done.rejected)
    assert done.kept.height == 59
    assert done.rejected["row"].to_list() == [at + 2]
    assert done.rejected["reason"][0].startswith(f"unclosed quote from line {at + 2}: it runs to")
    assert done.read.counted_in == 61  # physical lines, counted from the bytes


def test_a_stray_quote_that_closes_later_does_not_merge_rows(tmp_path: Path) -> None:
    # The quote opened on line 2 "closes" before the `,` on line 4: strict CSV reads lines 2-4 as
    # one well-formed record of 3 fields, but line 3 is a row of its own, so line 2 is the fault.
    data = (
        f'"1","Title {marker(0)}","Body"\n'
        f'3,"Title {marker(1)}\n'
        f"4,Title {marker(2)},Body\n"
        f'2,",Title {marker(3)}\n'
    )
    path = tmp_path / "o.csv"
    path.write_text(data)
    done = ingest_source(Source(path, "train"), AG_NEWS_LABELS)
    assert_each_marker_once(4, done.kept, done.rejected)
    assert done.rejected["row"].to_list() == [2, 4]
    assert done.rejected["reason"][0] == (
        "unclosed quote from line 2: it runs to line 4 and holds the row on line 3"
    )


def test_broken_quoting_on_one_line_is_that_rows_fault(tmp_path: Path) -> None:
    data = f'"1","Title {marker(0)}","Body"\n"2","Ti"tle {marker(1)}","Body"\n"3","T {marker(2)}","B"\n'
    path = tmp_path / "q.csv"
    path.write_text(data)
    done = ingest_source(Source(path, "train"), AG_NEWS_LABELS)
    assert_each_marker_once(3, done.kept, done.rejected)
    assert done.rejected["reason"].to_list() == [
        "broken quoting on line 2 (',' expected after '\"')"
    ]


def test_a_quoted_field_over_several_lines_is_one_row(tmp_path: Path) -> None:
    rows = [("Billing", f"First line {marker(0)}\nsecond line, with a comma"), *ticket_rows(3)[1:]]
    path = tmp_path / "m.csv"
    path.write_text(header_csv(rows))
    done = ingest_source(ticket_source(path), TICKETS)
    assert_each_marker_once(3, done.kept, done.rejected)
    assert done.rejected.height == 0
    assert done.kept["text"][0] == f"First line {marker(0)}\nsecond line, with a comma"
    assert done.kept["row"].to_list() == [2, 3, 4]
    assert (done.read.counted_in, done.read.multiline_records) == (5, 1)


# ---- long fields, blank lines, encodings -------------------------------------------------------------


@pytest.mark.parametrize("layout", ["original", "header"])
def test_a_field_over_pythons_csv_limit_is_a_row_like_any_other(
    tmp_path: Path, layout: str
) -> None:
    long_text = f"{marker(1)} " + "word " * 40_000  # 200,000+ characters, over csv's 131,072
    path = tmp_path / "long.csv"
    if layout == "original":
        path.write_text(
            f'"1","T {marker(0)}","B"\n"3","Long","{long_text}"\n"4","T {marker(2)}","B"\n'
        )
        source = Source(path, "train")
        labels = AG_NEWS_LABELS
    else:
        rows = [("Billing", f"T {marker(0)}"), ("Outage", long_text), ("Account", f"T {marker(2)}")]
        path.write_text(header_csv(rows))
        source, labels = ticket_source(path), TICKETS
    done = ingest_source(source, labels)
    assert_each_marker_once(3, done.kept, done.rejected)
    assert done.kept["text"].str.len_chars().max() > 200_000
    assert CSV_FIELD_LIMIT > 131_072


def test_blank_lines_are_skipped_and_counted_not_rejected(tmp_path: Path) -> None:
    text = header_csv(ticket_rows(3), newline="\r\n")
    lines = text.splitlines(keepends=True)
    path = tmp_path / "b.csv"
    path.write_text("".join(["\r\n", lines[0], lines[1], "\n", "   \n", lines[2], lines[3], "\n"]))
    done = ingest_source(ticket_source(path), TICKETS)
    assert_each_marker_once(3, done.kept, done.rejected)
    assert done.rejected.height == 0
    assert done.read.blank_lines == 4
    # Blank lines are numbered as a spreadsheet numbers them: the header is record 2 here.
    assert done.kept["row"].to_list() == [3, 6, 7]

    jsonl = tmp_path / "b.jsonl"
    rows = [json.dumps({"text": f"T {marker(i)}", "label": i}) for i in range(3)]
    jsonl.write_text(f"{rows[0]}\n\n  \n{rows[1]}\n{rows[2]}\n")
    done = ingest_source(Source(jsonl, "train"), TICKETS)
    assert_each_marker_once(3, done.kept, done.rejected)
    assert (done.read.blank_lines, done.kept["row"].to_list()) == (2, [1, 4, 5])


@pytest.mark.parametrize(
    ("encoding", "named"),
    [
        ("utf-16", "UTF-16 LE (byte-order mark FF FE)"),
        ("utf-16-be", "UTF-16 BE (a NUL byte in every other position)"),
        ("utf-32", "UTF-32 LE (byte-order mark FF FE 00 00)"),
    ],
)
def test_a_utf16_file_is_named_for_its_encoding(tmp_path: Path, encoding: str, named: str) -> None:
    path = tmp_path / "u.csv"
    path.write_bytes(header_csv(ticket_rows(5)).encode(encoding))
    expected = f"u.csv: encoded as {named}, not UTF-8; save it as UTF-8"
    with pytest.raises(StageError, match=re.escape(expected)):
        ingest_source(ticket_source(path), TICKETS)


def test_a_reader_that_loses_a_line_is_stopped(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(header_csv(ticket_rows(4)))
    read = ingest_source(ticket_source(path), TICKETS).read
    assert (read.counted_in, read.header_lines) == (5, 1)
    lost = SourceRead(read.candidates.slice(1), read.counted_in, "line", header_lines=1)
    with pytest.raises(StageError, match="5 lines in the file but 4 accounted for"):
        lost.check_accounted(path)


# ---- labels ------------------------------------------------------------------------------------------


def test_integral_float_labels_are_the_ids_they_spell(tmp_path: Path) -> None:
    csv_path = tmp_path / "f.csv"
    rows = [("0.0", f"T {marker(0)}"), ("1.0", f"T {marker(1)}"), ("2", f"T {marker(2)}")]
    csv_path.write_text(header_csv([*rows, ("2.5", f"T {marker(3)}")]))
    done = ingest_source(ticket_source(csv_path), TICKETS)
    assert_each_marker_once(4, done.kept, done.rejected)
    assert done.form == "ids"
    assert done.kept["label"].to_list() == [0, 1, 2]
    assert done.rejected["reason"].to_list() == ["label not an integer: '2.5'"]

    pq_path = tmp_path / "f.parquet"  # what pandas writes once the label column held a NaN
    pl.DataFrame(
        {"text": [f"T {marker(i)}" for i in range(3)], "label": [2.0, None, 0.0]}
    ).write_parquet(pq_path)
    done = ingest_source(Source(pq_path, "train"), TICKETS)
    assert done.kept["label"].to_list() == [2, 0]
    assert done.rejected["reason"].to_list() == ["label missing"]


def test_a_source_losing_more_than_the_share_stops_naming_it(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text(header_csv(ticket_rows(30)))
    floats = tmp_path / "test.jsonl"
    floats.write_text("".join(json.dumps({"text": "x", "label": "one"}) + "\n" for _ in range(20)))
    result = ingest([ticket_source(good), Source(floats, "test")], TICKETS, params(share=0.1))
    assert result.problems == [
        f"{floats}: 20 of 20 rows rejected (100%, over ingest.max_rejected_share 0.1); commonest "
        "reason: label not in labels: 'one' (expected one of ['Billing', 'Outage', 'Account']) "
        "(20 rows); label values that are no class: 'one' (20)",
        f"ingest: no test rows kept from the test sources ['{floats}']",
    ]
    assert result.rejected.height == 20  # written before the stage stops: the user sees why


def test_label_names_differing_in_case_are_shown_with_the_match(tmp_path: Path) -> None:
    path = tmp_path / "c.csv"
    rows = [
        (name.lower() if i % 3 else f" {name.upper()} ", text)
        for i, (name, text) in enumerate(ticket_rows(30))
    ]
    path.write_text(header_csv(rows))
    result = ingest([ticket_source(path)], TICKETS, params(share=0.1))
    problem = result.problems[0]
    assert problem.startswith(f"{path}: 30 of 30 rows rejected")
    assert (
        "label values that are no class: ' BILLING ' (10), 'account' (10), 'outage' (10)" in problem
    )
    assert "' BILLING ' -> 'Billing', 'account' -> 'Account', 'outage' -> 'Outage'" in problem
    assert "set ingest.fold_label_case: true" in problem

    folded = ingest([ticket_source(path)], TICKETS, params(share=0.1, fold=True))
    assert not any(str(path) in problem for problem in folded.problems)
    assert folded.kept.height == 30
    assert_each_marker_once(30, folded.kept, folded.rejected)


def test_main_writes_the_rejected_rows_then_stops(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("data/raw").mkdir(parents=True)
    Path("data/raw/train.csv").write_text(
        header_csv([("nope", f"T {marker(i)}") for i in range(4)])
    )
    Path("data/raw/test.csv").write_text(header_csv(ticket_rows(3)))
    sources = [
        {"path": "data/raw/train.csv", "split": "train", "text": "text", "label": "label"},
        {"path": "data/raw/test.csv", "split": "test", "text": "text", "label": "label"},
    ]
    Path("params.yaml").write_text(
        json.dumps(
            {
                "labels": list(TICKETS),
                "ingest": {"sources": sources, "max_rejected_share": 0.1, "fold_label_case": False},
            }
        )
    )
    with pytest.raises(StageError, match=r"train\.csv: 4 of 4 rows rejected") as err:
        main()
    assert str(paths.REJECTED) in str(err.value)
    assert pl.read_parquet(paths.REJECTED).height == 4
    assert json.loads(paths.INGEST_REPORT.read_text())["rejected"] == 4


# ---- property: random files with injected faults ---------------------------------------------------

WORDS = st.sampled_from(["news", "a,b", 'say "hi"', "x", "line\nbreak", "tab\there", "café", "--"])
FAULTS = ("none", "stray_quote", "bad_label", "float_label", "case_label", "control", "bad_byte")
FAULTS += ("extra_field", "blank_after", "long")
BAD_BYTE = "¤"  # written as the byte 0xFF: not UTF-8


@st.composite
def corrupted_file(draw) -> tuple[str, bytes, int]:
    """(format, file bytes, number of records): each record's text holds its marker."""
    fmt = draw(st.sampled_from(["original", "header", "jsonl"]))
    n = draw(st.integers(1, 12))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=newline)
    if fmt == "header":
        writer.writerow(["label", "text"])
    for i in range(n):
        fault = draw(st.sampled_from(FAULTS))
        words = draw(st.lists(WORDS, max_size=4))
        text = " ".join([marker(i), *words])
        label_id = draw(st.integers(0, 3))
        label = {
            "original": str(label_id + 1),
            "header": AG_NEWS_LABELS[label_id],
            "jsonl": label_id,
        }[fmt]
        if fault == "bad_label":
            label = "9"
        elif fault == "float_label":
            label = f"{label_id + (fmt == 'original')}.0"
        elif fault == "case_label" and fmt == "header":
            label = label.lower()
        elif fault == "control":
            text += "\x07"
        elif fault == "bad_byte":
            text += BAD_BYTE
        elif fault == "long":
            text += " long" * 30_000
        fields = [label, text] if fmt != "original" else [label, text, "desc"]
        if fault == "extra_field":
            fields.append("extra")
        if fmt == "jsonl":
            line = json.dumps({"text": text, "label": label}, ensure_ascii=False)
            if fault == "stray_quote":
                line = line[:-1]  # cut the closing brace: not JSON
            out.write(line + newline)
        elif fault == "stray_quote":
            out.write(f'{fields[0]},"{text.replace(chr(34), "")},{",".join(fields[2:])}{newline}')
        else:
            writer.writerow(fields)
        if fault == "blank_after":
            out.write(newline)
    data = out.getvalue().encode("utf-8").replace(BAD_BYTE.encode(), b"\xff")
    return fmt, data, n


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corrupted_file())
def test_random_faulty_files_lose_and_merge_no_record(tmp_path_factory, case) -> None:
    fmt, data, n = case
    path = tmp_path_factory.mktemp("prop") / ("f.jsonl" if fmt == "jsonl" else "f.csv")
    path.write_bytes(data)
    source = Source(path, "train") if fmt != "header" else Source(path, "train", ("text",), "label")
    try:
        done = ingest_source(source, AG_NEWS_LABELS)
    except StageError as err:
        # Only a file whose rows mostly lack the expected fields stops as a whole.
        assert "wrong columns" in str(err)
        return
    assert_each_marker_once(n, done.kept, done.rejected)
    done.read.check_accounted(path)
