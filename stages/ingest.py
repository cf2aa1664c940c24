"""ingest: read every raw source into one table; quarantine faulty rows with their reason.

Formats, told apart by extension:
- `.csv`: the original AG News release: no header, three fields `"class 1-4","title","description"`.
- `.parquet`, `.jsonl`: the Hugging Face datasets layout: `text` (title + " " + description), `label` 0-3.

A row's id is `<file name>:<row number>` (1-based record number in that file): stable across runs and
pointing straight at the row in the raw file. Faults in the structure of a source stop the stage with a
message naming the file; faults in one row quarantine that row in `rejected.parquet`, so that for every
source rows in = kept + rejected.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from tqdm import tqdm

from stages.common import (
    NUM_LABELS,
    SPLITS,
    StageError,
    get_logger,
    load_params,
    run_main,
    write_json,
    write_table,
)

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
    path: Path
    split: str

    @property
    def format(self) -> str:
        return {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl"}.get(
            self.path.suffix.lower(), ""
        )

    @property
    def label_offset(self) -> int:
        """The original CSV counts classes from 1; the HF layout from 0."""
        return 1 if self.format == "csv" else 0


def parse_sources(entries: list[dict]) -> list[Source]:
    """Validate the `ingest.sources` param: each entry `{path, split}`, file names unique."""
    if not entries:
        raise StageError("params.yaml ingest.sources: empty; list at least one {path, split}")
    sources, names = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"path", "split"}:
            raise StageError(
                f"params.yaml ingest.sources[{i}]: expected {{path, split}}, got {entry!r}"
            )
        source = Source(Path(entry["path"]), entry["split"])
        if source.split not in SPLITS:
            raise StageError(f"{source.path}: split {source.split!r} is not one of {SPLITS}")
        if source.path.name in names:
            raise StageError(f"{source.path}: a source named {source.path.name} is listed twice")
        names.add(source.path.name)
        sources.append(source)
    return sources


def _printable(field: str) -> str:
    """A field read with surrogateescape, with undecodable bytes shown as \\xNN."""
    return field.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_original_csv(path: Path) -> pl.DataFrame:
    """Row candidates of an original-layout CSV; field-count and byte faults are marked, not raised."""
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise StageError(f"{path}: not a CSV text file (binary content)")
    # surrogateescape keeps undecodable bytes through parsing so that only their row is quarantined.
    text = data.decode("utf-8", errors="surrogateescape")
    rows, labels, texts, raws, faults = [], [], [], [], []
    for row, fields in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        raw = json.dumps([_printable(f) for f in fields])
        fault = None
        if any("\udc80" <= ch <= "\udcff" for f in fields for ch in f):
            fault = "undecodable bytes (not UTF-8)"
        elif len(fields) != len(CSV_FIELDS):
            fault = (
                f"wrong field count: expected 3 (class, title, description), found {len(fields)}"
            )
        ok = fault is None
        rows.append(row)
        labels.append(fields[0] if ok else None)
        texts.append(f"{fields[1]} {fields[2]}" if ok else None)
        raws.append(raw)
        faults.append(fault)
    if not rows:
        raise StageError(f"{path}: empty file, no rows")
    wrong_count = sum(f is not None and f.startswith("wrong field count") for f in faults)
    if wrong_count * 2 > len(rows):
        raise StageError(
            f"{path}: wrong columns: {wrong_count} of {len(rows)} rows do not have the 3 fields "
            f"{CSV_FIELDS} of the original AG News CSV (no header)"
        )
    return pl.DataFrame(
        {"row": rows, "label_raw": labels, "text": texts, "raw": raws, "read_fault": faults},
        schema=CANDIDATE_SCHEMA,
    )


def _require_columns(path: Path, columns: list[str]) -> None:
    missing = [c for c in ("text", "label") if c not in columns]
    if missing:
        raise StageError(
            f"{path}: wrong columns: missing {missing}; the HF layout needs `text` and `label` (0-3), "
            f"found {columns}"
        )


def read_hf_parquet(path: Path) -> pl.DataFrame:
    """Row candidates of a Hugging Face-layout Parquet file."""
    try:
        df = pl.read_parquet(path)
    except Exception as err:  # polars raises several types for a file that is not Parquet
        raise StageError(f"{path}: not a readable Parquet file ({err})") from err
    _require_columns(path, df.columns)
    if df.schema["text"] != pl.String:
        raise StageError(f"{path}: column `text` has type {df.schema['text']}, expected a string")
    if df.height == 0:
        raise StageError(f"{path}: empty file, no rows")
    return df.select(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("row"),
        pl.col("label").cast(pl.String).alias("label_raw"),
        pl.col("text"),
        pl.struct("label", "text").struct.json_encode().alias("raw"),
        pl.lit(None, pl.String).alias("read_fault"),
    )


def read_hf_jsonl(path: Path) -> pl.DataFrame:
    """Row candidates of a JSON-lines file; a line that is not a JSON object is a row fault."""
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise StageError(f"{path}: empty file, no rows")
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
            elif "text" not in obj or "label" not in obj:
                fault = f"missing field(s): {[k for k in ('text', 'label') if k not in obj]}"
            else:
                has_fields += 1
                label = str(obj["label"]) if obj["label"] is not None else None
                text = obj["text"] if isinstance(obj["text"], str) else None
        for name, value in zip(CANDIDATE_SCHEMA, (row, label, text, raw, fault), strict=True):
            records[name].append(value)
    if has_fields == 0:
        raise StageError(f"{path}: wrong columns: no line has both `text` and `label`")
    return pl.DataFrame(records, schema=CANDIDATE_SCHEMA)


READERS = {"csv": read_original_csv, "parquet": read_hf_parquet, "jsonl": read_hf_jsonl}


def validate_rows(candidates: pl.DataFrame, source: Source) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split row candidates into kept rows (contract columns) and rejected rows with a reason."""
    lo, hi = source.label_offset, source.label_offset + NUM_LABELS - 1
    label_text = pl.col("label_raw").str.strip_chars()
    label = label_text.cast(pl.Int64, strict=False)
    reason = (
        pl.when(pl.col("read_fault").is_not_null())
        .then(pl.col("read_fault"))
        .when(pl.col("label_raw").is_null())
        .then(pl.lit("label missing"))
        .when(label.is_null())
        .then(pl.format("label not an integer: '{}'", pl.col("label_raw")))
        .when((label < lo) | (label > hi))
        .then(pl.format(f"label out of range: {{}} (expected {lo}-{hi})", label))
        .when(pl.col("text").is_null() | (pl.col("text").str.strip_chars() == ""))
        .then(pl.lit("empty text"))
        .when(pl.col("text").str.contains(CONTROL_CHARS))
        .then(pl.lit("control characters in text"))
    )
    checked = candidates.with_columns(reason.alias("reason"), label.alias("label"))
    name = source.path.name
    kept = checked.filter(pl.col("reason").is_null()).select(
        pl.format("{}:{}", pl.lit(name), pl.col("row")).alias("id"),
        pl.lit(source.split).alias("split"),
        (pl.col("label") - source.label_offset).alias("label"),
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


def ingest_source(source: Source) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Kept and rejected rows of one source; structural faults raise StageError naming the file."""
    if not source.format:
        raise StageError(
            f"{source.path}: unsupported format {source.path.suffix!r}; "
            "expected .csv (original AG News), .parquet or .jsonl (HF layout)"
        )
    if not source.path.is_file():
        raise StageError(f"{source.path}: file not found (did you run `dvc pull`?)")
    return validate_rows(READERS[source.format](source.path), source)


def ingest(sources: list[Source]) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """All sources, in the order listed: (kept rows, rejected rows, report)."""
    kept_parts, rejected_parts, per_source = [], [], []
    for source in tqdm(sources, desc="ingest", unit="source"):
        kept, rejected = ingest_source(source)
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
            "%s: %d rows in, %d kept, %d rejected",
            source.path,
            rows_in,
            kept.height,
            rejected.height,
        )
        kept_parts.append(kept)
        rejected_parts.append(rejected)
    kept_all = pl.concat(kept_parts)
    rejected_all = pl.concat(rejected_parts)
    report = {
        "rows_in": kept_all.height + rejected_all.height,
        "kept": kept_all.height,
        "rejected": rejected_all.height,
        "kept_per_split": {s: kept_all.filter(pl.col("split") == s).height for s in SPLITS},
        "sources": per_source,
    }
    return kept_all, rejected_all, report


def main() -> None:
    sources = parse_sources(load_params("ingest")["sources"])
    kept, rejected, report = ingest(sources)
    write_table(kept, "data/interim/ingested.parquet")
    write_table(rejected, "data/interim/rejected.parquet")
    write_json(report, "reports/ingest.json")


if __name__ == "__main__":
    run_main(main, "ingest")
