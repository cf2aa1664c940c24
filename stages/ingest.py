"""ingest: read every raw source into one table; quarantine faulty rows with their reason.

Formats, told apart by extension, and the columns read from them (`text` and `label` of a source
entry in params.yaml name them):
- `.csv` without `text`/`label`: the original AG News release: no header, three fields
  `"class 1-n","title","description"`, text = title + " " + description.
- `.csv` with `text`/`label`: a CSV with a header row.
- `.parquet`, `.jsonl`: columns/fields `text` and `label` unless the entry names others.
`text` is one column or a list of columns joined by one space; `label` holds class names from the
top-level `labels:` or integer ids 0..n-1 (the stage logs which it found in each source).

A row's id is `<file name>:<row number>`, the row number being the 1-based record number in that
file (a header row and blank lines count, so it is the row a spreadsheet shows): stable across runs
and pointing straight at the row in the raw file. Faults in the structure of a source stop the stage
with a message naming the file and column; faults in one row quarantine that row in
`rejected.parquet` with its reason. What came in is counted from the file itself (physical lines,
or the rows a Parquet file declares), apart from the parser, and every line must be a header, a
blank line or part of exactly one kept or rejected row. A source that loses more than
`ingest.max_rejected_share` of its rows, or a split left without rows, stops the stage after the
outputs are written, so that `rejected.parquet` shows why.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
from tqdm import tqdm

from newsclf.inputs import CSV_FIELD_LIMIT  # over csv's 131,072: clean's max_chars decides
from stages import paths
from stages.common import (
    SPLITS,
    StageError,
    get_logger,
    load_labels,
    run_main,
    write_json,
    write_table,
)
from stages.params import load_section
from stages.sections import IngestParams

log = get_logger("ingest")

CSV_FIELDS = ("class", "title", "description")
# C0 controls and DEL, except tab, line feed and carriage return (whitespace that `clean` collapses).
CONTROL_CHARS = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F]"
# Row candidates, before validation: where the row came from (row number, first physical line and
# lines spanned), its fields as read, and a fault found while reading it (quoting, field count,
# bytes), if any.
CANDIDATE_SCHEMA = {
    "row": pl.Int64,
    "line": pl.Int64,
    "lines": pl.Int64,
    "label_raw": pl.String,
    "text": pl.String,
    "raw": pl.String,
    "read_fault": pl.String,
}
KEPT_SCHEMA = {
    "id": pl.String,
    "split": pl.String,
    "label": pl.Int64,
    "text": pl.String,
    "source": pl.String,
    "row": pl.Int64,
}
REJECTED_SCHEMA = {
    "source": pl.String,
    "split": pl.String,
    "row": pl.Int64,
    "reason": pl.String,
    "raw": pl.String,
}


@dataclass(frozen=True)
class Source:
    """One raw file. `text`/`label` name its columns; both None for an original AG News CSV."""

    path: Path
    split: str
    text: tuple[str, ...] | None = None
    label: str | None = None
    # What its row ids and rejected rows call it: the file name, or where two sources share one,
    # the path under data/raw/ (set by parse_sources).
    key: str | None = None

    @property
    def name(self) -> str:
        return self.key or self.path.name

    @property
    def format(self) -> str:
        return {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl"}.get(
            self.path.suffix.lower(), ""
        )

    @property
    def is_original_csv(self) -> bool:
        return self.format == "csv" and self.label is None

    @property
    def text_columns(self) -> tuple[str, ...]:
        return self.text or ("text",)

    @property
    def label_column(self) -> str:
        return self.label or "label"


SOURCE_KEYS = ("path", "split", "text", "label")


def check_under_raw(path: Path, where: str) -> None:
    """A source must lie under data/raw/, the folder dvc.yaml declares as ingest's dependency:
    DVC would not see a file elsewhere change, and would skip ingest with stale rows."""
    parts = path.parts
    if path.is_absolute() or ".." in parts or parts[: len(paths.RAW.parts)] != paths.RAW.parts:
        raise StageError(
            f"{where}.path {str(path)!r}: outside {paths.RAW}/, the folder dvc.yaml declares as "
            f"the ingest stage's dependency, so `dvc repro` would not see the file change; move "
            f"or link it under {paths.RAW}/ and list it by that path"
        )


def parse_sources(entries: list[dict]) -> list[Source]:
    """Validate the `ingest.sources` param: each entry `{path, split[, text, label]}` a file under
    data/raw/, listed once; a CSV names both `text` and `label` (header layout) or neither
    (original layout). Sources are keyed by file name, or by their path under data/raw/ where two
    share a name."""
    if not entries:
        raise StageError("params.yaml ingest.sources: empty; list at least one {path, split}")
    sources, listed = [], set()
    for i, entry in enumerate(entries):
        where = f"params.yaml ingest.sources[{i}]"
        if (
            not isinstance(entry, dict)
            or not {"path", "split"} <= set(entry)
            or not set(entry) <= set(SOURCE_KEYS)
        ):
            raise StageError(f"{where}: expected {{path, split[, text, label]}}, got {entry!r}")
        if not isinstance(entry["path"], str) or not entry["path"]:
            raise StageError(f"{where}.path: a file path, got {entry['path']!r}")
        text = entry.get("text")
        if isinstance(text, str):
            text = [text]
        if text is not None and (
            not isinstance(text, list)
            or not text
            or not all(isinstance(c, str) and c for c in text)
        ):
            raise StageError(
                f"{where}.text: a column name or a list of them, got {entry['text']!r}"
            )
        label = entry.get("label")
        if label is not None and (not isinstance(label, str) or not label):
            raise StageError(f"{where}.label: a column name, got {label!r}")
        path = Path(entry["path"])
        if path.is_absolute() and path.is_relative_to(Path.cwd()):
            path = path.relative_to(Path.cwd())  # inside the repository: as dvc.yaml names it
        source = Source(path, entry["split"], tuple(text) if text else None, label)
        check_under_raw(source.path, where)
        if source.split not in SPLITS:
            raise StageError(f"{source.path}: split {source.split!r} is not one of {SPLITS}")
        if source.format == "csv" and (text is None) != (label is None):
            raise StageError(
                f"{where}: a .csv source names both `text` and `label` (a CSV with a header) or "
                "neither (the original AG News layout)"
            )
        if source.path in listed:
            raise StageError(f"{where}.path {str(source.path)!r}: listed twice in ingest.sources")
        listed.add(source.path)
        sources.append(source)
    file_names = [source.path.name for source in sources]
    return [
        replace(source, key=source.path.relative_to(paths.RAW).as_posix())
        if file_names.count(source.path.name) > 1
        else source
        for source in sources
    ]


def _printable(field: str) -> str:
    """A field read with surrogateescape, with undecodable bytes shown as \\xNN."""
    return field.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# Magic bytes of files that are never a text source, whatever their extension says (Parquet, ZIP,
# gzip, zstd, xz, 7z): such a file fails as a whole, while a stray control byte is a row fault.
BINARY_MAGIC = (
    b"PAR1",
    b"PK\x03\x04",
    b"\x1f\x8b",
    b"\x28\xb5\x2f\xfd",
    b"\xfd7zXZ",
    b"7z\xbc\xaf",
)
# Byte-order marks of the encodings a spreadsheet may save in instead of UTF-8 (longest first).
UNICODE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32 LE"),
    (codecs.BOM_UTF32_BE, "UTF-32 BE"),
    (codecs.BOM_UTF16_LE, "UTF-16 LE"),
    (codecs.BOM_UTF16_BE, "UTF-16 BE"),
)
TEXT_BYTES = bytes(range(0x20, 0x100)) + b"\t\n\r"
MAX_CONTROL_SHARE = 0.1  # of the first 64 KiB; text has none beyond a stray byte in a row


def _wide_encoding(head: bytes) -> str | None:
    """UTF-16/32 told by its byte-order mark, or UTF-16 without one by NULs in every other byte."""
    for bom, name in UNICODE_BOMS:
        if head.startswith(bom):
            return f"{name} (byte-order mark {bom.hex(' ').upper()})"
    pairs = len(head) // 2
    for parity, name in ((1, "UTF-16 LE"), (0, "UTF-16 BE")):
        if pairs >= 8 and head[parity::2].count(0) > 0.9 * pairs:
            return f"{name} (a NUL byte in every other position)"
    return None


def read_text_bytes(path: Path, kind: str) -> bytes:
    """A text source's bytes, a UTF-8 byte-order mark removed; an empty file, a binary one or one
    in another Unicode encoding is a StageError (a stray control byte is left to its row)."""
    data = path.read_bytes()
    if not data:
        raise StageError(f"{path}: empty file, no rows")
    head = data[:65536]
    if encoding := _wide_encoding(head):
        raise StageError(
            f"{path}: encoded as {encoding}, not UTF-8; save it as UTF-8 (e.g. `iconv -f UTF-16 "
            f"-t UTF-8`, or CSV UTF-8 in a spreadsheet)"
        )
    controls = len(head.translate(None, TEXT_BYTES))
    if head.startswith(BINARY_MAGIC) or controls > MAX_CONTROL_SHARE * len(head):
        raise StageError(
            f"{path}: not a {kind} text file (binary content: {controls} control bytes in the "
            f"first {len(head)})"
        )
    return data.removeprefix(codecs.BOM_UTF8)


def as_lf_lines(data: bytes) -> bytes:
    """A file whose lines end in a bare CR (classic Mac OS, some exports) with those CRs read as
    line ends: it has one line for each. A file with more LFs than bare CRs (LF or CRLF line ends,
    a stray CR in a field) is returned as it is."""
    bare_cr = data.count(b"\r") - data.count(b"\r\n")
    if bare_cr <= data.count(b"\n"):
        return data
    return re.sub(rb"\r(?!\n)", b"\n", data)


def count_lines(data: bytes) -> int:
    """Physical lines in a text file's bytes (a last line without \\n counts): what came in,
    counted apart from any parser, so that every line can be accounted for after parsing."""
    return data.count(b"\n") + (not data.endswith(b"\n"))


def _undecodable(fields: list[str]) -> bool:
    return any("\udc80" <= ch <= "\udcff" for f in fields for ch in f)


@dataclass(frozen=True)
class CsvRecord:
    """One record of a CSV: the physical line it starts on (from 1), how many lines it spans,
    its fields, and a quoting fault (then `fields` is its first line alone)."""

    line: int
    lines: int
    fields: list[str]
    fault: str | None = None

    @property
    def is_blank(self) -> bool:
        return self.fault is None and self.lines == 1 and "".join(self.fields).strip() == ""


class _LineFeed:
    """The lines of a file from `start` on, for csv.reader, telling how many it has handed out."""

    def __init__(self, lines: list[str], start: int) -> None:
        self.lines, self.next = lines, start

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        if self.next == len(self.lines):
            raise StopIteration
        self.next += 1
        return self.lines[self.next - 1]


def _bare(line: str) -> str:
    return line.removesuffix("\n").removesuffix("\r")


def _alone(line: str) -> list[str] | None:
    """The fields of one physical line parsed on its own, None when its quoting is broken."""
    try:
        return next(csv.reader([line], strict=True), [])
    except csv.Error:
        return None


def csv_records(
    lines: list[str], start: int, n_fields: int | None, is_row: Callable[[list[str]], bool]
) -> Iterator[CsvRecord]:
    """The records of `lines[start:]` under strict CSV quoting (RFC 4180: a quoted field may hold
    line breaks). A record whose quoting breaks the rules or never closes is a fault of its first
    line alone, and so is one over several lines without `n_fields` fields, or with a later line
    that `is_row` takes for a row of its own (a stray quote swallowed the rows after it); reading
    then resumes at the next line, so that no later row is lost or merged into another."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    pos = start
    while pos < len(lines):
        feed = _LineFeed(lines, pos)
        try:
            for fields in csv.reader(feed, strict=True):
                end = feed.next
                if end - pos > 1 and n_fields is not None:
                    swallowed = [
                        n + 1
                        for n in range(pos + 1, end)
                        if (alone := _alone(lines[n])) is not None and is_row(alone)
                    ]
                    if swallowed or len(fields) != n_fields:
                        what = (
                            f"holds the row on line {swallowed[0]}"
                            if swallowed
                            else f"makes {len(fields)} fields, not {n_fields}"
                        )
                        yield CsvRecord(
                            pos + 1,
                            1,
                            [_bare(lines[pos])],
                            f"unclosed quote from line {pos + 1}: it runs to line {end} and {what}",
                        )
                        pos += 1
                        break
                yield CsvRecord(pos + 1, end - pos, fields)
                pos = end
            else:
                return
        except csv.Error as err:
            if feed.next == len(lines) and "end of data" in str(err):
                fault = f"unclosed quote from line {pos + 1}: it runs to the end of the file"
            elif feed.next - pos > 1:
                fault = f"unclosed quote from line {pos + 1}: it runs to line {feed.next} ({err})"
            else:
                fault = f"broken quoting on line {pos + 1} ({err})"
            yield CsvRecord(pos + 1, 1, [_bare(lines[pos])], fault)
            pos += 1


def spells_label(value: str, label_names: tuple[str, ...], fold: bool) -> bool:
    """Whether a raw label value is a class of `labels` in any form ingest reads: a name (folded
    when `fold`), an id 0..n-1, or a class 1..n of the original CSV (integral floats included)."""
    value = value.strip()
    names = {fold_label(n) for n in label_names} if fold else set(label_names)
    if (fold_label(value) if fold else value) in names:
        return True
    try:
        number = float(value)
    except ValueError:
        return False
    return number.is_integer() and 0 <= number <= len(label_names)


@dataclass(frozen=True)
class SourceRead:
    """What a reader made of one file: row candidates (with the physical `line` each starts on and
    the `lines` it spans), and what came in counted from the file itself, apart from the parser:
    `lines_in` physical lines of a text file, or the rows a Parquet file's metadata declares."""

    candidates: pl.DataFrame
    counted_in: int
    unit: str  # what `counted_in` counts: "line" or "row"
    header_lines: int = 0
    blank_lines: int = 0

    @property
    def multiline_records(self) -> int:
        return self.candidates.filter(pl.col("lines") > 1).height

    def check_accounted(self, path: Path) -> None:
        """Every line (row) that came in is a header, a blank line or part of exactly one row
        candidate; anything else is a reader fault, stopped here, never a silent loss."""
        accounted = self.header_lines + self.blank_lines + int(self.candidates["lines"].sum())
        if accounted != self.counted_in:
            raise StageError(
                f"{path}: {self.counted_in} {self.unit}s in the file but {accounted} accounted "
                f"for ({self.header_lines} header, {self.blank_lines} blank, "
                f"{self.candidates.height} rows): a reader fault, please report it"
            )


def _candidate_records(
    records: Iterator[CsvRecord], first_row: int, row_of: Callable[[list[str]], tuple]
) -> tuple[pl.DataFrame, int]:
    """Row candidates of CSV records and the blank lines skipped. `row_of(fields)` gives
    (label_raw, text, fault) of a well-quoted record. A blank line is skipped but numbered, so a
    row's number is the record number a spreadsheet shows."""
    records_out: dict[str, list] = {name: [] for name in CANDIDATE_SCHEMA}
    blank = 0
    for row, record in enumerate(records, start=first_row):
        if record.is_blank:
            blank += 1
            continue
        if record.fault is not None:
            label, text, fault = None, None, record.fault
        elif _undecodable(record.fields):
            label, text, fault = None, None, "undecodable bytes (not UTF-8)"
        else:
            label, text, fault = row_of(record.fields)
        values = (
            row,
            record.line,
            record.lines,
            label,
            text,
            json.dumps([_printable(f) for f in record.fields]),
            fault,
        )
        for name, value in zip(CANDIDATE_SCHEMA, values, strict=True):
            records_out[name].append(value)
    return pl.DataFrame(records_out, schema=CANDIDATE_SCHEMA), blank


def _check_field_counts(path: Path, candidates: pl.DataFrame, expected: str) -> None:
    if candidates.height == 0:
        raise StageError(f"{path}: empty file, no rows")
    wrong = candidates["read_fault"].str.starts_with("wrong field count").sum()
    if wrong * 2 > candidates.height:
        raise StageError(
            f"{path}: wrong columns: {wrong} of {candidates.height} rows do not have the fields "
            f"{expected}"
        )


def _text_lines(path: Path) -> tuple[list[str], int]:
    """A CSV's physical lines (each with its \\n), decoded with surrogateescape so that
    undecodable bytes stay in their row (a row fault), and their number counted from the bytes."""
    data = as_lf_lines(read_text_bytes(path, "CSV"))
    lines = data.decode("utf-8", errors="surrogateescape").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line + "\n" for line in lines], count_lines(data)


def read_original_csv(path: Path, label_names: tuple[str, ...], fold: bool) -> SourceRead:
    """Row candidates of an original-layout CSV; field-count, quoting and byte faults are marked."""
    lines, lines_in = _text_lines(path)

    def is_row(fields: list[str]) -> bool:
        return len(fields) == len(CSV_FIELDS) and spells_label(fields[0], label_names, fold)

    def row_of(fields: list[str]) -> tuple:
        if len(fields) != len(CSV_FIELDS):
            found = len(fields)
            return (
                None,
                None,
                f"wrong field count: expected 3 (class, title, description), found {found}",
            )
        return fields[0], f"{fields[1]} {fields[2]}", None

    candidates, blank = _candidate_records(
        csv_records(lines, 0, len(CSV_FIELDS), is_row), 1, row_of
    )
    _check_field_counts(path, candidates, f"{CSV_FIELDS} of the original AG News CSV (no header)")
    return SourceRead(candidates, lines_in, "line", blank_lines=blank)


def _missing_columns(path: Path, source: Source, found: list[str]) -> None:
    wanted = [*source.text_columns, source.label_column]
    missing = [c for c in dict.fromkeys(wanted) if c not in found]
    if missing:
        raise StageError(
            f"{path}: wrong columns: missing {missing} (text {list(source.text_columns)}, label "
            f"{source.label_column!r}: set `text`/`label` of this source in ingest.sources); "
            f"found {found}"
        )


def read_header_csv(
    path: Path, source: Source, label_names: tuple[str, ...], fold: bool
) -> SourceRead:
    """Row candidates of a CSV with a header row; text and label from the columns `source` names."""
    lines, lines_in = _text_lines(path)
    leading_blank, header_record = 0, None
    for record in csv_records(lines, 0, None, bool):
        if not record.is_blank:
            header_record = record
            break
        leading_blank += 1
    if header_record is None:
        raise StageError(f"{path}: empty file, no header row")
    if header_record.fault is not None:
        raise StageError(f"{path}: header row: {header_record.fault}")
    header = [name.strip() for name in header_record.fields]
    # A column read (text or label) named twice: which one is meant? Others are never read.
    read = {*source.text_columns, source.label_column}
    repeated = {name: [i + 1 for i, h in enumerate(header) if h == name] for name in read}
    repeated = {name: at for name, at in repeated.items() if len(at) > 1}
    if repeated:
        said = "; ".join(f"{name!r} in columns {at}" for name, at in repeated.items())
        raise StageError(
            f"{path}: header row (line {header_record.line}): duplicate column name(s): {said}; "
            "rename them so that each column can be read"
        )
    _missing_columns(path, source, header)
    text_at = [header.index(c) for c in source.text_columns]
    label_at = header.index(source.label_column)

    def is_row(fields: list[str]) -> bool:
        return len(fields) == len(header) and spells_label(fields[label_at], label_names, fold)

    def row_of(fields: list[str]) -> tuple:
        if len(fields) != len(header):
            return (
                None,
                None,
                f"wrong field count: expected {len(header)} {header}, found {len(fields)}",
            )
        return fields[label_at], " ".join(fields[i] for i in text_at), None

    body_start = header_record.line - 1 + header_record.lines
    candidates, blank = _candidate_records(
        csv_records(lines, body_start, len(header), is_row), leading_blank + 2, row_of
    )
    _check_field_counts(path, candidates, str(header))
    return SourceRead(candidates, lines_in, "line", header_record.lines, leading_blank + blank)


def read_parquet_source(path: Path, source: Source) -> SourceRead:
    """Row candidates of a Parquet file; text columns joined by a space, nulls left out."""
    try:
        metadata = pq.read_metadata(path)
        schema = pl.read_parquet_schema(path)
    except Exception as err:  # pyarrow and polars raise several types for a file not Parquet
        raise StageError(f"{path}: not a readable Parquet file ({err})") from err
    _missing_columns(path, source, list(schema))
    for column in source.text_columns:
        if schema[column] != pl.String:
            raise StageError(
                f"{path}: column `{column}` has type {schema[column]}, expected a string"
            )
    columns = list(dict.fromkeys([source.label_column, *source.text_columns]))
    df = pl.read_parquet(path, columns=columns)
    if df.height == 0:
        raise StageError(f"{path}: empty file, no rows")
    candidates = df.select(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("row"),
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("line"),
        pl.lit(1, pl.Int64).alias("lines"),
        pl.col(source.label_column).cast(pl.String).alias("label_raw"),
        pl.concat_str(source.text_columns, separator=" ", ignore_nulls=True).alias("text"),
        pl.struct(columns).struct.json_encode().alias("raw"),
        pl.lit(None, pl.String).alias("read_fault"),
    )
    return SourceRead(candidates, metadata.num_rows, "row")


class _JsonObject(dict):
    """A JSON object that remembers the keys it was given more than once (json keeps the last)."""

    repeated: list[str]


def _object_keeping_repeats(pairs: list[tuple[str, object]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    obj.repeated = sorted(k for k, n in Counter(key for key, _ in pairs).items() if n > 1)
    return obj


def read_jsonl(path: Path, source: Source) -> SourceRead:
    """Row candidates of a JSON-lines file; a line that is not a JSON object is a row fault, a
    blank line is skipped (and counted)."""
    # Split as bytes: each line is decoded on its own, so an undecodable one is a row fault.
    data = as_lf_lines(read_text_bytes(path, "JSON-lines"))
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    wanted = list(dict.fromkeys([*source.text_columns, source.label_column]))
    records: dict[str, list] = {name: [] for name in CANDIDATE_SCHEMA}
    has_fields = blank = 0
    for row, line in enumerate(lines, start=1):
        if not line.strip():
            blank += 1
            continue
        label = text = fault = None
        raw = line.decode("utf-8", "backslashreplace")
        try:
            obj = json.loads(line.decode("utf-8"), object_pairs_hook=_object_keeping_repeats)
        except UnicodeDecodeError:
            fault = "undecodable bytes (not UTF-8)"
        except json.JSONDecodeError as err:
            fault = f"invalid JSON: {err.msg}"
        else:
            repeated = [k for k in getattr(obj, "repeated", []) if k in wanted]
            if repeated:
                fault = f"field(s) {repeated} given twice in one object (which value is meant?)"
            elif not isinstance(obj, dict):
                fault = "not a JSON object"
            elif missing := [k for k in wanted if k not in obj]:
                fault = f"missing field(s): {missing}"
            else:
                has_fields += 1
                parts = [obj[c] for c in source.text_columns if obj[c] is not None]
                if not all(isinstance(part, str) for part in parts):
                    fault = f"text field(s) {list(source.text_columns)} not all strings"
                else:
                    text = " ".join(parts)
                label = (
                    str(obj[source.label_column]) if obj[source.label_column] is not None else None
                )
        values = (row, row, 1, label, text, raw, fault)
        for name, value in zip(CANDIDATE_SCHEMA, values, strict=True):
            records[name].append(value)
    if len(lines) == blank:
        raise StageError(f"{path}: empty file, no rows")
    if has_fields == 0:
        raise StageError(f"{path}: wrong columns: no line has all of the fields {wanted}")
    candidates = pl.DataFrame(records, schema=CANDIDATE_SCHEMA)
    return SourceRead(candidates, count_lines(data), "line", blank_lines=blank)


def read_source(source: Source, label_names: tuple[str, ...], fold: bool) -> SourceRead:
    if source.is_original_csv:
        return read_original_csv(source.path, label_names, fold)
    if source.format == "csv":
        return read_header_csv(source.path, source, label_names, fold)
    reader = {"parquet": read_parquet_source, "jsonl": read_jsonl}
    return reader[source.format](source.path, source)


def fold_label(name: str) -> str:
    """A class name as `ingest.fold_label_case` compares it: case and runs of spaces ignored."""
    return " ".join(name.split()).lower()


def _folded(text: pl.Expr) -> pl.Expr:
    return text.str.replace_all(r"\s+", " ").str.strip_chars().str.to_lowercase()


def _as_id(text: pl.Expr) -> pl.Expr:
    """A label spelled as an integer, or as an integral float (`2.0`: what pandas writes once a
    column held a NaN), as that Int64; null for anything else."""
    number = text.cast(pl.Float64, strict=False)
    return (
        pl.when(number.is_finite() & (number == number.floor()))
        .then(number.cast(pl.Int64, strict=False))
        .otherwise(None)
    )


def _label_names_match(text: pl.Expr, label_names: tuple[str, ...], fold: bool) -> pl.Expr:
    """The id of the class name `text` spells (compared folded when `fold`), else null."""
    names = [fold_label(n) for n in label_names] if fold else list(label_names)
    return (_folded(text) if fold else text).replace_strict(
        names, list(range(len(label_names))), default=None, return_dtype=pl.Int64
    )


def label_form(
    candidates: pl.DataFrame, source: Source, label_names: tuple[str, ...], fold: bool
) -> str:
    """How `source` gives labels: `names` (class names from `labels`), `ids` (0..n-1), or `ids
    from 1` (the original AG News CSV). The form more values fit wins; when as many fit either (none,
    say), numbers mean ids and words mean names, so a bad value is named for what it tried to be."""
    if source.is_original_csv:
        return "ids from 1"
    values = candidates.select(pl.col("label_raw").drop_nulls().str.strip_chars().alias("v"))
    fits = values.select(
        by_name=_label_names_match(pl.col("v"), label_names, fold).is_not_null().sum(),
        by_id=_as_id(pl.col("v")).is_between(0, len(label_names) - 1).sum(),
        numeric=pl.col("v").cast(pl.Float64, strict=False).is_not_null().sum(),
    ).row(0, named=True)
    if fits["by_name"] != fits["by_id"]:
        return "names" if fits["by_name"] > fits["by_id"] else "ids"
    return "ids" if fits["numeric"] * 2 >= values.height else "names"


def validate_rows(
    candidates: pl.DataFrame,
    source: Source,
    label_names: tuple[str, ...],
    form: str,
    fold: bool = False,
) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:
    """Split row candidates into kept rows (contract columns) and rejected rows with a reason;
    also the label values rejected for not being a label, with their counts (commonest first)."""
    label_text = pl.col("label_raw").str.strip_chars()
    reason = (
        pl.when(pl.col("read_fault").is_not_null())
        .then(pl.col("read_fault"))
        .when(pl.col("label_raw").is_null())
        .then(pl.lit("label missing"))
    )
    if form == "names":
        label = _label_names_match(label_text, label_names, fold)
        reason = reason.when(label.is_null()).then(
            pl.format(
                f"label not in labels: '{{}}' (expected one of {list(label_names)})", "label_raw"
            )
        )
        is_label_fault = label.is_null()
    else:
        offset = 1 if form == "ids from 1" else 0
        lo, hi = offset, offset + len(label_names) - 1
        as_int = _as_id(label_text)
        label = as_int - offset
        reason = (
            reason.when(as_int.is_null())
            .then(pl.format("label not an integer: '{}'", pl.col("label_raw")))
            .when((as_int < lo) | (as_int > hi))
            .then(pl.format(f"label out of range: {{}} (expected {lo}-{hi})", as_int))
        )
        is_label_fault = as_int.is_null() | (as_int < lo) | (as_int > hi)
    reason = (
        reason.when(pl.col("text").is_null() | (pl.col("text").str.strip_chars() == ""))
        .then(pl.lit("empty text"))
        .when(pl.col("text").str.contains(CONTROL_CHARS))
        .then(pl.lit("control characters in text"))
    )
    checked = candidates.with_columns(
        reason.alias("reason"),
        label.alias("label"),
        (pl.col("read_fault").is_null() & pl.col("label_raw").is_not_null() & is_label_fault).alias(
            "label_fault"
        ),
    )
    name = source.name
    kept = checked.filter(pl.col("reason").is_null()).select(
        pl.format("{}:{}", pl.lit(name), pl.col("row")).alias("id"),
        pl.lit(source.split).alias("split"),
        pl.col("label"),
        pl.col("text"),
        pl.lit(name).alias("source"),
        pl.col("row"),
    )
    rejected = checked.filter(pl.col("reason").is_not_null()).select(
        pl.lit(name).alias("source"),
        pl.lit(source.split).alias("split"),
        "row",
        "reason",
        "raw",
    )
    bad_labels = (
        checked.filter("label_fault")
        .group_by("label_raw")
        .len()
        .sort(["len", "label_raw"], descending=[True, False])
    )
    return kept.cast(KEPT_SCHEMA), rejected.cast(REJECTED_SCHEMA), dict(bad_labels.iter_rows())


def label_hint(bad_labels: dict[str, int], label_names: tuple[str, ...]) -> str:
    """The label values a source had that are no class, commonest first, and the class each one
    spells once case and spacing are ignored (the fix is then `ingest.fold_label_case: true`)."""
    shown = ", ".join(f"{value!r} ({n})" for value, n in list(bad_labels.items())[:MAX_SHOWN])
    more = len(bad_labels) - MAX_SHOWN
    hint = f"label values that are no class: {shown}" + (f" and {more} more" if more > 0 else "")
    by_fold = {fold_label(name): name for name in label_names}
    matches = {v: by_fold[fold_label(v)] for v in bad_labels if fold_label(v) in by_fold}
    if matches:
        pairs = ", ".join(f"{v!r} -> {name!r}" for v, name in list(matches.items())[:MAX_SHOWN])
        hint += (
            f"; {pairs} match `labels` once case and spacing are ignored: set "
            "ingest.fold_label_case: true to read them so"
        )
    return hint


MAX_SHOWN = 5  # label values named in a message, commonest first


@dataclass(frozen=True)
class IngestedSource:
    """One source ingested: kept and rejected rows, how it gave labels, what its reader counted,
    and the label values rejected (with counts)."""

    source: Source
    kept: pl.DataFrame
    rejected: pl.DataFrame
    form: str
    read: SourceRead
    bad_labels: dict[str, int]

    @property
    def rows_in(self) -> int:
        return self.read.candidates.height


def check_every_row_once(
    read: SourceRead, kept: pl.DataFrame, rejected: pl.DataFrame, path: Path
) -> None:
    """Each row candidate's number is in exactly one of kept and rejected."""
    out = pl.concat([kept["row"], rejected["row"]])
    if out.len() != read.candidates.height or not out.sort().equals(read.candidates["row"].sort()):
        raise StageError(
            f"{path}: {read.candidates.height} rows read, {kept.height} kept + {rejected.height} "
            "rejected do not match them row for row: a validation fault, please report it"
        )


def ingest_source(
    source: Source, label_names: tuple[str, ...], fold_label_case: bool = False
) -> IngestedSource:
    """One source's kept and rejected rows, every line (row) of the file accounted for;
    structural faults raise StageError naming the file."""
    if not source.format:
        raise StageError(
            f"{source.path}: unsupported format {source.path.suffix!r}; "
            "expected .csv (original AG News, or with a header), .parquet or .jsonl"
        )
    if not source.path.is_file():
        what = "a folder, not a file" if source.path.is_dir() else "file not found"
        raise StageError(f"{source.path}: {what} (did you run `dvc pull`?)")
    read = read_source(source, label_names, fold_label_case)
    read.check_accounted(source.path)
    form = label_form(read.candidates, source, label_names, fold_label_case)
    kept, rejected, bad_labels = validate_rows(
        read.candidates, source, label_names, form, fold_label_case
    )
    check_every_row_once(read, kept, rejected, source.path)
    return IngestedSource(source, kept, rejected, form, read, bad_labels)


def describe_form(form: str, n_labels: int) -> str:
    return {
        "names": "class names",
        "ids": f"ids 0-{n_labels - 1}",
        "ids from 1": f"classes 1-{n_labels} (original AG News CSV)",
    }[form]


def source_report(done: IngestedSource) -> dict:
    read = done.read
    counted = {"lines_in": read.counted_in} if read.unit == "line" else {}
    return {
        "path": str(done.source.path),
        "format": done.source.format,
        "split": done.source.split,
        **counted,
        "rows_in": done.rows_in,
        "kept": done.kept.height,
        "rejected": done.rejected.height,
        "rejected_by_reason": dict(
            sorted(done.rejected.group_by("reason").len().iter_rows(), key=lambda kv: kv[0])
        ),
        "blank_lines": read.blank_lines,
        "multiline_records": read.multiline_records,
    }


def loss_problem(
    done: IngestedSource, max_share: float, label_names: tuple[str, ...]
) -> str | None:
    """Why a source that lost more than `max_share` of its rows stops the stage: its commonest
    reason, and for label faults what values were found."""
    if done.rejected.height <= max_share * done.rows_in:
        return None
    reason, count = (
        done.rejected.group_by("reason")
        .len()
        .sort(["len", "reason"], descending=[True, False])
        .row(0)
    )
    problem = (
        f"{done.source.path}: {done.rejected.height} of {done.rows_in} rows rejected "
        f"({done.rejected.height / done.rows_in:.0%}, over ingest.max_rejected_share "
        f"{max_share:g}); commonest reason: {reason} ({count} rows)"
    )
    if done.bad_labels:
        problem += "; " + label_hint(done.bad_labels, label_names)
    return problem


def class_problem(kept: pl.DataFrame, label_names: tuple[str, ...]) -> str | None:
    """Every class needs train rows: a class with none cannot be learned (nor scored fairly)."""
    counts = dict.fromkeys(label_names, 0)
    for label, count in kept.filter(pl.col("split") == "train").group_by("label").len().iter_rows():
        counts[label_names[label]] = count
    empty = [name for name, count in counts.items() if count == 0]
    if not empty:
        return None
    return (
        f"ingest: class(es) {empty} of `labels` have no train row after ingest (train rows "
        f"per class: {counts}); check `labels` and each source's `label` column"
    )


@dataclass(frozen=True)
class Ingested:
    """All sources ingested: the tables and report to write, and the problems that then stop the
    stage (written first, so that `rejected.parquet` shows why)."""

    kept: pl.DataFrame
    rejected: pl.DataFrame
    report: dict
    problems: list[str]


def ingest(sources: list[Source], label_names: tuple[str, ...], params: IngestParams) -> Ingested:
    """All sources, in the order listed."""
    if params.fold_label_case:
        folded = [fold_label(n) for n in label_names]
        if len(set(folded)) < len(folded):
            raise StageError(
                f"params.yaml: ingest.fold_label_case is true but `labels` {list(label_names)} "
                "has names that differ only in case or spacing"
            )
    done_all, problems = [], []
    for source in tqdm(sources, desc="ingest", unit="source"):
        done = ingest_source(source, label_names, params.fold_label_case)
        read = done.read
        log.info(
            "%s: %d %ss in: %d rows (%d kept, %d rejected)%s; labels read as %s",
            source.path,
            read.counted_in,
            read.unit,
            done.rows_in,
            done.kept.height,
            done.rejected.height,
            "".join(
                f", {n} {what}"
                for n, what in (
                    (read.header_lines, "header line(s)"),
                    (read.blank_lines, "blank line(s) skipped"),
                    (read.multiline_records, "row(s) over several lines"),
                )
                if n
            ),
            describe_form(done.form, len(label_names)),
        )
        if done.bad_labels:
            log.warning("%s: %s", source.path, label_hint(done.bad_labels, label_names))
        if problem := loss_problem(done, params.max_rejected_share, label_names):
            problems.append(problem)
        done_all.append(done)
    kept_all = pl.concat([done.kept for done in done_all])
    rejected_all = pl.concat([done.rejected for done in done_all])
    kept_per_split = {s: kept_all.filter(pl.col("split") == s).height for s in SPLITS}
    for split, count in kept_per_split.items():
        if count == 0:
            listed = [str(s.path) for s in sources if s.split == split]
            problems.append(
                f"ingest: no {split} rows kept "
                + (
                    f"from the {split} sources {listed}"
                    if listed
                    else f"(no source has split {split})"
                )
            )
    if problem := class_problem(kept_all, label_names):
        problems.append(problem)
    report = {
        "rows_in": sum(done.rows_in for done in done_all),
        "kept": kept_all.height,
        "rejected": rejected_all.height,
        "kept_per_split": kept_per_split,
        "sources": [source_report(done) for done in done_all],
    }
    return Ingested(kept_all, rejected_all, report, problems)


def main() -> None:
    params = load_section("ingest", IngestParams)
    sources = parse_sources(list(params.sources))
    label_names = load_labels()
    log.info("labels %s; sources %s", list(label_names), list(params.sources))
    result = ingest(sources, label_names, params)
    write_table(result.kept, paths.INGESTED)
    write_table(result.rejected, paths.REJECTED)
    write_json(result.report, paths.INGEST_REPORT)
    if result.problems:
        raise StageError(
            "\n".join(result.problems) + f"\n(every rejected row and its reason: {paths.REJECTED})"
        )


if __name__ == "__main__":
    run_main(main, "ingest")
