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
file (a header row counts, so it is the row a spreadsheet shows): stable across runs and pointing
straight at the row in the raw file. Faults in the structure of a source stop the stage with a
message naming the file and column; faults in one row quarantine that row in `rejected.parquet`, so
that for every source rows in = kept + rejected.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from tqdm import tqdm

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

log = get_logger("ingest")

CSV_FIELDS = ("class", "title", "description")
# C0 controls and DEL, except tab, line feed and carriage return (whitespace that `clean` collapses).
CONTROL_CHARS = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F]"
# Row candidates, before validation: where the row came from, its fields as read, and a fault found
# while reading it (field count, bytes), if any.
CANDIDATE_SCHEMA = {
    "row": pl.Int64,
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


@dataclass(frozen=True)
class IngestParams:
    """The `ingest:` section of params.yaml; each source entry is checked by `parse_sources`."""

    sources: tuple[dict, ...]


def parse_sources(entries: list[dict]) -> list[Source]:
    """Validate the `ingest.sources` param: each entry `{path, split[, text, label]}`, file names
    unique; a CSV names both `text` and `label` (header layout) or neither (original layout)."""
    if not entries:
        raise StageError("params.yaml ingest.sources: empty; list at least one {path, split}")
    sources, names = [], set()
    for i, entry in enumerate(entries):
        where = f"params.yaml ingest.sources[{i}]"
        if (
            not isinstance(entry, dict)
            or not {"path", "split"} <= set(entry)
            or not set(entry) <= set(SOURCE_KEYS)
        ):
            raise StageError(f"{where}: expected {{path, split[, text, label]}}, got {entry!r}")
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
        source = Source(Path(entry["path"]), entry["split"], tuple(text) if text else None, label)
        if source.split not in SPLITS:
            raise StageError(f"{source.path}: split {source.split!r} is not one of {SPLITS}")
        if source.format == "csv" and (text is None) != (label is None):
            raise StageError(
                f"{where}: a .csv source names both `text` and `label` (a CSV with a header) or "
                "neither (the original AG News layout)"
            )
        if source.path.name in names:
            raise StageError(f"{source.path}: a source named {source.path.name} is listed twice")
        names.add(source.path.name)
        sources.append(source)
    return sources


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
TEXT_BYTES = bytes(range(0x20, 0x100)) + b"\t\n\r"
MAX_CONTROL_SHARE = 0.1  # of the first 64 KiB; text has none beyond a stray byte in a row


def read_text_bytes(path: Path, kind: str) -> bytes:
    """A text source's bytes, a UTF-8 byte-order mark removed; an empty or binary file is a
    StageError (a stray control byte is left to its row)."""
    data = path.read_bytes()
    if not data:
        raise StageError(f"{path}: empty file, no rows")
    head = data[:65536]
    controls = len(head.translate(None, TEXT_BYTES))
    if head.startswith(BINARY_MAGIC) or controls > MAX_CONTROL_SHARE * len(head):
        raise StageError(
            f"{path}: not a {kind} text file (binary content: {controls} control bytes in the "
            f"first {len(head)})"
        )
    return data.removeprefix(codecs.BOM_UTF8)


def read_text(path: Path, kind: str) -> str:
    """A text source's content, decoded with surrogateescape so that undecodable bytes stay in
    their row (a row fault) instead of failing the file."""
    return read_text_bytes(path, kind).decode("utf-8", errors="surrogateescape")


def _undecodable(fields: list[str]) -> bool:
    return any("\udc80" <= ch <= "\udcff" for f in fields for ch in f)


def _check_field_counts(path: Path, faults: list[str | None], expected: str) -> None:
    if not faults:
        raise StageError(f"{path}: empty file, no rows")
    wrong = sum(f is not None and f.startswith("wrong field count") for f in faults)
    if wrong * 2 > len(faults):
        raise StageError(
            f"{path}: wrong columns: {wrong} of {len(faults)} rows do not have the fields {expected}"
        )


def read_original_csv(path: Path) -> pl.DataFrame:
    """Row candidates of an original-layout CSV; field-count and byte faults are marked, not raised."""
    text = read_text(path, "CSV")
    records: dict[str, list] = {name: [] for name in CANDIDATE_SCHEMA}
    for row, fields in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        fault = None
        if _undecodable(fields):
            fault = "undecodable bytes (not UTF-8)"
        elif len(fields) != len(CSV_FIELDS):
            fault = (
                f"wrong field count: expected 3 (class, title, description), found {len(fields)}"
            )
        ok = fault is None
        values = (
            row,
            fields[0] if ok else None,
            f"{fields[1]} {fields[2]}" if ok else None,
            json.dumps([_printable(f) for f in fields]),
            fault,
        )
        for name, value in zip(CANDIDATE_SCHEMA, values, strict=True):
            records[name].append(value)
    _check_field_counts(
        path, records["read_fault"], f"{CSV_FIELDS} of the original AG News CSV (no header)"
    )
    return pl.DataFrame(records, schema=CANDIDATE_SCHEMA)


def _missing_columns(path: Path, source: Source, found: list[str]) -> None:
    wanted = [*source.text_columns, source.label_column]
    missing = [c for c in dict.fromkeys(wanted) if c not in found]
    if missing:
        raise StageError(
            f"{path}: wrong columns: missing {missing} (text {list(source.text_columns)}, label "
            f"{source.label_column!r}: set `text`/`label` of this source in ingest.sources); "
            f"found {found}"
        )


def read_header_csv(path: Path, source: Source) -> pl.DataFrame:
    """Row candidates of a CSV with a header row; text and label from the columns `source` names."""
    records_in = csv.reader(io.StringIO(read_text(path, "CSV"), newline=""))
    header = next(records_in, None)
    if not header:
        raise StageError(f"{path}: empty file, no header row")
    header = [name.strip() for name in header]
    _missing_columns(path, source, header)
    text_at = [header.index(c) for c in source.text_columns]
    label_at = header.index(source.label_column)
    records: dict[str, list] = {name: [] for name in CANDIDATE_SCHEMA}
    for row, fields in enumerate(records_in, start=2):
        fault = None
        if _undecodable(fields):
            fault = "undecodable bytes (not UTF-8)"
        elif len(fields) != len(header):
            fault = f"wrong field count: expected {len(header)} {header}, found {len(fields)}"
        ok = fault is None
        values = (
            row,
            fields[label_at] if ok else None,
            " ".join(fields[i] for i in text_at) if ok else None,
            json.dumps([_printable(f) for f in fields]),
            fault,
        )
        for name, value in zip(CANDIDATE_SCHEMA, values, strict=True):
            records[name].append(value)
    _check_field_counts(path, records["read_fault"], str(header))
    return pl.DataFrame(records, schema=CANDIDATE_SCHEMA)


def read_parquet_source(path: Path, source: Source) -> pl.DataFrame:
    """Row candidates of a Parquet file; text columns joined by a space, nulls left out."""
    try:
        schema = pl.read_parquet_schema(path)
    except Exception as err:  # polars raises several types for a file that is not Parquet
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
    return df.select(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("row"),
        pl.col(source.label_column).cast(pl.String).alias("label_raw"),
        pl.concat_str(source.text_columns, separator=" ", ignore_nulls=True).alias("text"),
        pl.struct(columns).struct.json_encode().alias("raw"),
        pl.lit(None, pl.String).alias("read_fault"),
    )


def read_jsonl(path: Path, source: Source) -> pl.DataFrame:
    """Row candidates of a JSON-lines file; a line that is not a JSON object is a row fault."""
    # Split as bytes: each line is decoded on its own, so an undecodable one is a row fault.
    lines = read_text_bytes(path, "JSON-lines").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise StageError(f"{path}: empty file, no rows")
    wanted = list(dict.fromkeys([*source.text_columns, source.label_column]))
    records: dict[str, list] = {name: [] for name in CANDIDATE_SCHEMA}
    has_fields = 0
    for row, line in enumerate(lines, start=1):
        label = text = fault = None
        raw = line.decode("utf-8", "backslashreplace")
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            fault = "undecodable bytes (not UTF-8)"
        except json.JSONDecodeError as err:
            fault = f"invalid JSON: {err.msg}"
        else:
            if not isinstance(obj, dict):
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
        for name, value in zip(CANDIDATE_SCHEMA, (row, label, text, raw, fault), strict=True):
            records[name].append(value)
    if has_fields == 0:
        raise StageError(f"{path}: wrong columns: no line has all of the fields {wanted}")
    return pl.DataFrame(records, schema=CANDIDATE_SCHEMA)


def read_candidates(source: Source) -> pl.DataFrame:
    if source.is_original_csv:
        return read_original_csv(source.path)
    reader = {"csv": read_header_csv, "parquet": read_parquet_source, "jsonl": read_jsonl}
    return reader[source.format](source.path, source)


def label_form(candidates: pl.DataFrame, source: Source, label_names: tuple[str, ...]) -> str:
    """How `source` gives labels: `names` (class names from `labels`), `ids` (0..n-1), or `ids
    from 1` (the original AG News CSV). Names win when more values are names than ids."""
    if source.is_original_csv:
        return "ids from 1"
    values = candidates["label_raw"].drop_nulls().str.strip_chars()
    by_name = values.is_in(label_names).sum()
    by_id = values.cast(pl.Int64, strict=False).is_between(0, len(label_names) - 1).sum()
    return "names" if by_name > by_id else "ids"


def validate_rows(
    candidates: pl.DataFrame, source: Source, label_names: tuple[str, ...], form: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split row candidates into kept rows (contract columns) and rejected rows with a reason."""
    label_text = pl.col("label_raw").str.strip_chars()
    reason = (
        pl.when(pl.col("read_fault").is_not_null())
        .then(pl.col("read_fault"))
        .when(pl.col("label_raw").is_null())
        .then(pl.lit("label missing"))
    )
    if form == "names":
        label = label_text.replace_strict(
            list(label_names), list(range(len(label_names))), default=None, return_dtype=pl.Int64
        )
        reason = reason.when(label.is_null()).then(
            pl.format(
                f"label not in labels: '{{}}' (expected one of {list(label_names)})", "label_raw"
            )
        )
    else:
        offset = 1 if form == "ids from 1" else 0
        lo, hi = offset, offset + len(label_names) - 1
        as_int = label_text.cast(pl.Int64, strict=False)
        label = as_int - offset
        reason = (
            reason.when(as_int.is_null())
            .then(pl.format("label not an integer: '{}'", pl.col("label_raw")))
            .when((as_int < lo) | (as_int > hi))
            .then(pl.format(f"label out of range: {{}} (expected {lo}-{hi})", as_int))
        )
    reason = (
        reason.when(pl.col("text").is_null() | (pl.col("text").str.strip_chars() == ""))
        .then(pl.lit("empty text"))
        .when(pl.col("text").str.contains(CONTROL_CHARS))
        .then(pl.lit("control characters in text"))
    )
    checked = candidates.with_columns(reason.alias("reason"), label.alias("label"))
    name = source.path.name
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
    return kept.cast(KEPT_SCHEMA), rejected.cast(REJECTED_SCHEMA)


def ingest_source(
    source: Source, label_names: tuple[str, ...]
) -> tuple[pl.DataFrame, pl.DataFrame, str]:
    """Kept and rejected rows of one source and how it gives labels (see `label_form`);
    structural faults raise StageError naming the file."""
    if not source.format:
        raise StageError(
            f"{source.path}: unsupported format {source.path.suffix!r}; "
            "expected .csv (original AG News, or with a header), .parquet or .jsonl"
        )
    if not source.path.is_file():
        raise StageError(f"{source.path}: file not found (did you run `dvc pull`?)")
    candidates = read_candidates(source)
    form = label_form(candidates, source, label_names)
    return *validate_rows(candidates, source, label_names, form), form


def describe_form(form: str, n_labels: int) -> str:
    return {
        "names": "class names",
        "ids": f"ids 0-{n_labels - 1}",
        "ids from 1": f"classes 1-{n_labels} (original AG News CSV)",
    }[form]


def check_classes(kept: pl.DataFrame, label_names: tuple[str, ...]) -> None:
    """Every class needs train rows: a class with none cannot be learned (nor scored fairly)."""
    counts = dict.fromkeys(label_names, 0)
    for label, count in kept.filter(pl.col("split") == "train").group_by("label").len().iter_rows():
        counts[label_names[label]] = count
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise StageError(
            f"ingest: class(es) {empty} of `labels` have no train row after ingest (train rows "
            f"per class: {counts}); check `labels` and each source's `label` column"
        )


def ingest(
    sources: list[Source], label_names: tuple[str, ...]
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """All sources, in the order listed: (kept rows, rejected rows, report)."""
    kept_parts, rejected_parts, per_source = [], [], []
    for source in tqdm(sources, desc="ingest", unit="source"):
        kept, rejected, form = ingest_source(source, label_names)
        rows_in = kept.height + rejected.height
        per_source.append(
            {
                "path": str(source.path),
                "format": source.format,
                "split": source.split,
                "rows_in": rows_in,
                "kept": kept.height,
                "rejected": rejected.height,
                "rejected_by_reason": dict(
                    sorted(rejected.group_by("reason").len().iter_rows(), key=lambda kv: kv[0])
                ),
            }
        )
        log.info(
            "%s: %d rows in, %d kept, %d rejected; labels read as %s",
            source.path,
            rows_in,
            kept.height,
            rejected.height,
            describe_form(form, len(label_names)),
        )
        kept_parts.append(kept)
        rejected_parts.append(rejected)
    kept_all = pl.concat(kept_parts)
    rejected_all = pl.concat(rejected_parts)
    check_classes(kept_all, label_names)
    report = {
        "rows_in": kept_all.height + rejected_all.height,
        "kept": kept_all.height,
        "rejected": rejected_all.height,
        "kept_per_split": {s: kept_all.filter(pl.col("split") == s).height for s in SPLITS},
        "sources": per_source,
    }
    return kept_all, rejected_all, report


def main() -> None:
    entries = load_section("ingest", IngestParams).sources
    sources = parse_sources(list(entries))
    label_names = load_labels()
    log.info("labels %s; sources %s", list(label_names), entries)
    kept, rejected, report = ingest(sources, label_names)
    write_table(kept, paths.INGESTED)
    write_table(rejected, paths.REJECTED)
    write_json(report, paths.INGEST_REPORT)


if __name__ == "__main__":
    run_main(main, "ingest")
