"""Human label decisions, versioned with the data: the reviews file (`augment.reviews`,
`data/reviews/labels.csv` by default, in git) and how `augment` applies it.

One row per reviewed train row, sorted by key, so that a pull request shows each decision as one
line of a plain diff:

    id,text_sha256,decision,label,given_label,reviewer,time

- `id`: the row's id, `<source file>:<row number>` from ingest, the same across re-ingests;
- `text_sha256`: the first 16 hex digits of the SHA-256 of the row's (clean) text: a decision is
  applied only to the text it was made on;
- `decision`: keep (the given label is right), relabel (to `label`), drop (not a usable row), or
  skip (looked at, undecided: the automatic `label_issues.action` applies);
- `label`: the label the row trains with after the decision (the given one for keep; empty for
  drop and skip), by class name; `given_label`: the label it had when reviewed;
- `reviewer`, `time` (UTC, ISO 8601).

Writes are atomic (a temporary file renamed over the old one) under an exclusive lock, each
re-reading the file first, so two writers (two browser tabs, two processes) never lose each
other's decisions. A malformed file is refused with one line naming the file, line and field.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from stages.common import StageError

COLUMNS = ("id", "text_sha256", "decision", "label", "given_label", "reviewer", "time")
DECISIONS = ("keep", "relabel", "drop", "skip")
HASH_DIGITS = 16


def text_sha256(text: str) -> str:
    """The key's text part: the first HASH_DIGITS hex digits of the text's SHA-256 (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_DIGITS]


@dataclass(frozen=True)
class Review:
    id: str
    text_sha256: str
    decision: str
    label: str  # the class name the row trains with; "" for drop and skip
    given_label: str
    reviewer: str
    time: str


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def make_review(
    row_id: str,
    text: str,
    decision: str,
    given_label: str,
    label_names: Sequence[str],
    reviewer: str,
    label: str | None = None,
    time: str | None = None,
) -> Review:
    """A checked decision on the row `row_id` with `text`; ValueError naming what is wrong."""
    if decision not in DECISIONS:
        raise ValueError(f"decision {decision!r}: expected one of {', '.join(DECISIONS)}")
    if given_label not in label_names:
        raise ValueError(f"given label {given_label!r} is not a class of params.yaml `labels`")
    if decision == "relabel":
        if label not in label_names:
            raise ValueError(f"relabel needs a label among {list(label_names)}, got {label!r}")
    elif label not in (None, "", given_label if decision == "keep" else ""):
        raise ValueError(f"decision {decision!r} takes no new label (got {label!r})")
    if not reviewer.strip() or "\n" in reviewer:
        raise ValueError("reviewer: a name on one line is needed")
    trains_with = {"keep": given_label, "relabel": label, "drop": "", "skip": ""}[decision]
    return Review(
        row_id, text_sha256(text), decision, trains_with, given_label, reviewer, time or now_iso()
    )


def parse_reviews(content: str, source: str, label_names: Sequence[str]) -> dict[str, Review]:
    """The decisions of a reviews file's `content`, by id; StageError naming `source`, the line
    and the field at fault."""
    reader = csv.DictReader(io.StringIO(content))
    if reader.fieldnames is None:
        return {}
    if tuple(reader.fieldnames) != COLUMNS:
        raise StageError(f"{source}: line 1: columns {reader.fieldnames}, expected {list(COLUMNS)}")
    reviews: dict[str, Review] = {}
    for number, row in enumerate(reader, start=2):
        where = f"{source}: line {number}"
        if None in row or any(value is None for value in row.values()):
            raise StageError(f"{where}: expected {len(COLUMNS)} fields")
        if row["decision"] not in DECISIONS:
            raise StageError(
                f"{where}: field decision {row['decision']!r}: expected one of {', '.join(DECISIONS)}"
            )
        if row["given_label"] not in label_names:
            raise StageError(
                f"{where}: field given_label {row['given_label']!r} is not a class of params.yaml "
                f"`labels` {list(label_names)}"
            )
        expected = {"keep": {row["given_label"]}, "relabel": set(label_names)}.get(
            row["decision"], {""}
        )
        if row["label"] not in expected:
            raise StageError(
                f"{where}: field label {row['label']!r} does not fit decision {row['decision']!r} "
                f"(expected {'empty' if expected == {''} else sorted(expected)})"
            )
        if len(row["text_sha256"]) != HASH_DIGITS or not all(
            c in "0123456789abcdef" for c in row["text_sha256"]
        ):
            raise StageError(
                f"{where}: field text_sha256 {row['text_sha256']!r}: expected {HASH_DIGITS} "
                "lowercase hex digits"
            )
        if not row["id"]:
            raise StageError(f"{where}: field id is empty")
        if row["id"] in reviews:
            raise StageError(f"{where}: id {row['id']!r} is reviewed twice (one line per row)")
        reviews[row["id"]] = Review(**{k: row[k] for k in COLUMNS})
    return reviews


def read_reviews(path: Path, label_names: Sequence[str]) -> dict[str, Review]:
    """The decisions in `path` by id; none when the file does not exist."""
    if not path.is_file():
        return {}
    return parse_reviews(path.read_text(encoding="utf-8"), str(path), label_names)


def render_reviews(reviews: Mapping[str, Review]) -> str:
    """The file's content: the header, then one line per decision sorted by id."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for key in sorted(reviews):
        writer.writerow(asdict(reviews[key]).values())
    return out.getvalue()


def lock_file(path: Path) -> Path:
    """The lock file of the reviews file `path`: `.<name>.reviews-lock` beside it, whatever the
    file's name (.gitignore ignores the suffix)."""
    return path.parent / f".{path.name}.reviews-lock"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`'s lock file (`lock_file`), for read-modify-write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file(path), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomically(path: Path, content: str) -> None:
    """`content` to `path` through a temporary file in the same folder and a rename: a crash
    leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record(path: Path, review: Review, label_names: Sequence[str]) -> dict[str, Review]:
    """Add or replace `review` (by id) in the reviews file, under the lock, atomically; returns
    the file's decisions after the write."""
    with locked(path):
        reviews = read_reviews(path, label_names)
        reviews[review.id] = review
        write_atomically(path, render_reviews(reviews))
    return reviews


def forget(path: Path, row_id: str, label_names: Sequence[str]) -> dict[str, Review]:
    """Take the decision on `row_id` back (the row is undecided again)."""
    with locked(path):
        reviews = read_reviews(path, label_names)
        if reviews.pop(row_id, None) is not None:
            write_atomically(path, render_reviews(reviews))
    return reviews


def reviews_table(reviews: Mapping[str, Review], label_names: Sequence[str]) -> pl.DataFrame:
    """The decisions as a table: id, text_sha256, decision, the label index it trains with
    (null for drop and skip) and the index of the label the row had when reviewed
    (`label_when_reviewed`)."""
    index = {name: i for i, name in enumerate(label_names)}
    return pl.DataFrame(
        {
            "id": [r.id for r in reviews.values()],
            "text_sha256": [r.text_sha256 for r in reviews.values()],
            "decision": [r.decision for r in reviews.values()],
            "review_label": [index.get(r.label) for r in reviews.values()],
            "label_when_reviewed": [index.get(r.given_label) for r in reviews.values()],
        },
        schema={
            "id": pl.String,
            "text_sha256": pl.String,
            "decision": pl.String,
            "review_label": pl.Int64,
            "label_when_reviewed": pl.Int64,
        },
    )


STALE_REASONS = ("missing", "text_changed", "label_changed")


def stale_reviews(train: pl.DataFrame, reviews: pl.DataFrame) -> dict[str, list[str]]:
    """Decisions that must not be applied: their row is gone (`missing`), its text is not the
    one reviewed (`text_changed`), or its given label is not the one reviewed (`label_changed`:
    a `keep` would otherwise put back a label since fixed in the data). Ids, sorted; each id
    under its first reason."""
    current = train.select(
        "id",
        current_sha256=pl.col("text").map_elements(text_sha256, pl.String),
        current_label=pl.col("label").cast(pl.Int64),
    )
    joined = reviews.join(current, on="id", how="left").with_columns(
        reason=pl.when(pl.col("current_sha256").is_null())
        .then(pl.lit("missing"))
        .when(pl.col("current_sha256") != pl.col("text_sha256"))
        .then(pl.lit("text_changed"))
        .when(pl.col("current_label") != pl.col("label_when_reviewed"))
        .then(pl.lit("label_changed"))
    )
    return {
        reason: joined.filter(pl.col("reason") == reason)["id"].sort().to_list()
        for reason in STALE_REASONS
    }
