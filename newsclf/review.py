"""`newsclf review`: decide the label suspects of the last run on a local web page, keyboard first.

The page (stages/templates/review.html.j2) lists the rows of `data/interim/label_issues.parquet`
that cleanlab flags (`is_label_issue`; `--all-ranked N` adds the N most suspect rows), most
confident suggestion first. Per row it shows the text, the given and the suggested label, each
detector's out-of-fold probabilities (the table's `probs_<model>` columns and their mean
`oof_probs`, when the table has them) and the 3 nearest train rows of each of the two labels
(TF-IDF cosine over the table's texts, computed once at start-up). Each decision is written at once
to the reviews file (`augment.reviews` in params.yaml) through stages/reviews.py, keyed by the
row id and the hash of the text it was made on; `augment` applies the file on the next run.

JSON API (the page uses it; so can a script):
- `GET /api/rows?cls=NAME&suggested=NAME&status=all|decided|undecided|new`: the rows under review
  (new = undecided or stale), with the progress counts;
- `GET /api/rows/{id}`: one row with its nearest neighbours;
- `POST /api/decisions` `{"id", "decision": keep|relabel|drop|skip, "label"?: NAME}`: record;
- `DELETE /api/decisions/{id}`: take the decision back;
- `GET /api/progress`, `GET /api/config`.
Bad requests answer 4xx `{"error", "field"}`. The reviews file is read again on every request, so
another tab or process that wrote it is never overwritten with a stale copy.

`newsclf review export` writes the rows for Label Studio (or a spreadsheet CSV) and `newsclf review
import` reads the decisions back through the same checks (docs/review.md). Like `newsclf predict`,
this imports neither torch nor transformers; its heavy imports wait until a command runs, so that
`newsclf --help` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import quoteattr

if TYPE_CHECKING:
    import polars as pl
    from starlette.applications import Starlette

    from stages.reviews import Review

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8001
NEIGHBOURS_PER_LABEL = 3
# Memory for one block of (rows under review x all rows) similarities: bounds start-up memory at
# any corpus size (100k rows: ~80 rows a block) while the 145 suspects of AG News take one block.
NEIGHBOUR_BLOCK_BYTES = 64 * 2**20
STATUSES = ("all", "decided", "undecided", "new")
PROBS_PREFIX = "probs_"  # one column per detector: its out-of-fold probabilities, one per class
MEAN_PROBS = "oof_probs"  # the detectors' mean, what cleanlab scored
# What the page and the API need of the table; label_quality and action are shown when present.
REQUIRED_COLUMNS = (
    "id",
    "text",
    "label",
    "suggested_label",
    "suggested_confidence",
    "rank",
    "is_label_issue",
)
# The keys of the page's actions: a class key is never one of these.
ACTION_KEYS = {"k": "keep", "d": "drop", "s": "skip", "j": "next", "u": "undo"}
CLASS_KEYS = [*"123456789"] + [c for c in "abcdefghilmnopqrtvwxyz" if c not in ACTION_KEYS]
MAX_BODY_BYTES = 64 * 1024  # a decision is a few dozen bytes
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

EXPORT_FORMATS = ("label-studio", "csv")
IMPORT_FORMATS = ("label-studio-json-min", "csv")
# Label Studio's labeling config that `export --format label-studio` assumes (docs/review.md):
# the choice control is named `label`, the text object `text`, and a `drop` choice drops the row.
LABEL_STUDIO_FROM_NAME = "label"
LABEL_STUDIO_TO_NAME = "text"
DROP_CHOICE = "drop"
LABEL_STUDIO_MODEL_VERSION = "newsclf label_issues"
SPREADSHEET_COLUMNS = (
    "id",
    "decision",
    "label",
    "given_label",
    "suggested_label",
    "suggested_confidence",
    "rank",
    "text_sha256",
    "text",
)


class ReviewError(Exception):
    """A fault the user can fix (a missing input, a bad option): reported in one line."""


# --- the rows under review -------------------------------------------------------------------


@dataclass(frozen=True)
class ReviewSet:
    """The rows under review, in the page's order, and what the page shows beside each."""

    label_names: tuple[str, ...]
    rows: list[dict[str, Any]]  # id, text, text_sha256, labels, scores, detectors' probabilities
    by_id: dict[str, dict[str, Any]]
    detectors: list[str]  # names of the probability columns shown, detectors first, then mean
    neighbours: dict[str, list[dict[str, Any]]]  # id -> [{label, role, rows: [...]}]


def read_issues(path: Path, label_names: Sequence[str]) -> pl.DataFrame:
    """The label_issues table, checked against `label_names`; ReviewError naming what is wrong."""
    import polars as pl

    if not path.is_file():
        raise ReviewError(f"{path}: not found; run `dvc repro label_issues` (or pass --issues)")
    table = pl.read_parquet(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ReviewError(f"{path}: missing column(s) {missing} (found {table.columns})")
    for column in ("label", "suggested_label"):
        bad = table.filter(
            pl.col(column).is_null() | ~pl.col(column).is_between(0, len(label_names) - 1)
        )
        if bad.height:
            raise ReviewError(
                f"{path}: row {bad['id'][0]!r}: {column} {bad[column][0]} is not a class of "
                f"params.yaml `labels` ({len(label_names)} classes); the table is from another "
                "label set: rerun `dvc repro label_issues`"
            )
    repeated = table.filter(pl.col("id").is_duplicated())
    if repeated.height:
        raise ReviewError(f"{path}: id {repeated['id'][0]!r} is on more than one row")
    return table


def detector_columns(table: pl.DataFrame) -> list[str]:
    """The table's probability columns: each detector's, then their mean."""
    columns = sorted(c for c in table.columns if c.startswith(PROBS_PREFIX))
    return columns + ([MEAN_PROBS] if MEAN_PROBS in table.columns else [])


def detector_name(column: str) -> str:
    return "mean" if column == MEAN_PROBS else column.removeprefix(PROBS_PREFIX)


def rows_under_review(table: pl.DataFrame, all_ranked: int) -> pl.DataFrame:
    """The suspects, and the `all_ranked` most suspect rows; the most confident suggestion first
    (ties by rank), so that the quickest decisions come first."""
    import polars as pl

    chosen = table.filter(pl.col("is_label_issue") | (pl.col("rank") <= all_ranked))
    return chosen.sort(["suggested_confidence", "rank"], descending=[True, False])


def nearest_rows(
    texts: Sequence[str], labels: Sequence[int], queries: Sequence[int], wanted: Sequence[set[int]]
) -> list[dict[int, list[tuple[int, float]]]]:
    """For each query row (an index into `texts`), its NEIGHBOURS_PER_LABEL nearest other rows of
    each label in `wanted[i]`, as (row index, cosine similarity), nearest first. TF-IDF over
    `texts` (any language: no stop-word list); rows sharing no word with the query are left out."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectors = TfidfVectorizer(sublinear_tf=True, dtype=np.float32).fit_transform(texts)
    label_array = np.asarray(labels)
    columns_of = {c: np.flatnonzero(label_array == c) for c in np.unique(label_array)}
    block = max(1, NEIGHBOUR_BLOCK_BYTES // (4 * max(1, len(texts))))
    found: list[dict[int, list[tuple[int, float]]]] = []
    for start in range(0, len(queries), block):
        query_rows = np.asarray(queries[start : start + block])
        similarity = (vectors[query_rows] @ vectors.T).toarray()
        similarity[np.arange(len(query_rows)), query_rows] = -np.inf  # never the row itself
        for offset in range(len(query_rows)):
            by_label = {}
            for cls in sorted(wanted[start + offset]):
                columns = columns_of.get(cls, np.empty(0, dtype=np.int64))
                scores = similarity[offset, columns]
                k = min(NEIGHBOURS_PER_LABEL, len(columns))
                top = np.argpartition(-scores, k - 1)[:k] if k else np.empty(0, dtype=np.int64)
                top = top[np.argsort(-scores[top], kind="stable")]
                by_label[cls] = [(int(columns[i]), float(scores[i])) for i in top if scores[i] > 0]
            found.append(by_label)
    return found


def load_review_set(
    issues_path: Path, label_names: Sequence[str], all_ranked: int = 0
) -> ReviewSet:
    """What the page shows: the rows under review, their probabilities and their neighbours."""
    from stages.reviews import text_sha256

    label_names = tuple(label_names)
    table = read_issues(issues_path, label_names)
    chosen = rows_under_review(table, all_ranked)
    detectors = detector_columns(table)
    index_of = {row_id: i for i, row_id in enumerate(table["id"].to_list())}
    table_texts, table_labels = table["text"].to_list(), table["label"].to_list()
    table_ids = table["id"].to_list()
    suspect = dict(zip(table_ids, table["is_label_issue"].to_list(), strict=True))
    rows, wanted = [], []  # wanted: the labels whose neighbours each row shows
    for record in chosen.iter_rows(named=True):
        wanted.append({record["label"], record["suggested_label"]})
        probs = {}
        for column in detectors:
            values = record[column]
            if values is not None and len(values) == len(label_names):
                probs[detector_name(column)] = {
                    name: round(float(p), 4) for name, p in zip(label_names, values, strict=True)
                }
        rows.append(
            {
                "id": record["id"],
                "text": record["text"],
                "text_sha256": text_sha256(record["text"]),
                "given_label": label_names[record["label"]],
                "suggested_label": label_names[record["suggested_label"]],
                "suggested_confidence": round(float(record["suggested_confidence"]), 4),
                "label_quality": None
                if record.get("label_quality") is None
                else round(float(record["label_quality"]), 4),
                "rank": record["rank"],
                "is_label_issue": record["is_label_issue"],
                "action": record.get("action"),
                "probs": probs,
            }
        )
    queries = [index_of[row["id"]] for row in rows]
    found = nearest_rows(table_texts, table_labels, queries, wanted) if rows else []
    neighbours = {}
    for row, by_label in zip(rows, found, strict=True):
        roles = [("given", row["given_label"])]
        if row["suggested_label"] != row["given_label"]:
            roles.append(("suggested", row["suggested_label"]))
        neighbours[row["id"]] = [
            {
                "role": role,
                "label": name,
                "rows": [
                    {
                        "id": table_ids[i],
                        "text": table_texts[i],
                        "label": name,
                        "similarity": round(similarity, 3),
                        "is_label_issue": suspect[table_ids[i]],
                    }
                    for i, similarity in by_label[label_names.index(name)]
                ],
            }
            for role, name in roles
        ]
    return ReviewSet(
        label_names=label_names,
        rows=rows,
        by_id={row["id"]: row for row in rows},
        detectors=[detector_name(c) for c in detectors],
        neighbours=neighbours,
    )


# --- decisions -------------------------------------------------------------------------------


def review_json(review: Review) -> dict[str, str]:
    return {
        "decision": review.decision,
        "label": review.label,
        "given_label": review.given_label,
        "reviewer": review.reviewer,
        "time": review.time,
    }


def stale_reason(row: dict[str, Any], review: Review) -> str | None:
    """Why a decision no longer holds for this row (as augment judges it: `stages.reviews.
    stale_reviews`): another text, or another given label under this id; None when it holds."""
    if review.text_sha256 != row["text_sha256"]:
        return "text_changed"
    if review.given_label != row["given_label"]:
        return "label_changed"
    return None


def row_status(row: dict[str, Any], reviews: dict[str, Review]) -> str:
    """undecided (no decision), decided, or stale (a decision on another text or given label of
    this id)."""
    review = reviews.get(row["id"])
    if review is None:
        return "undecided"
    return "decided" if stale_reason(row, review) is None else "stale"


def row_state(row: dict[str, Any], reviews: dict[str, Review]) -> dict[str, Any]:
    """The row with its decision as the reviews file has it now. A stale decision is shown apart
    (`stale_decision`, with its `stale_reason`): the row is undecided again."""
    status = row_status(row, reviews)
    review = reviews.get(row["id"])
    return row | {
        "status": status,
        "decision": review_json(review) if status == "decided" else None,
        "stale_decision": (
            review_json(review) | {"stale_reason": stale_reason(row, review)}
            if status == "stale"
            else None
        ),
    }


def progress(review_set: ReviewSet, reviews: dict[str, Review]) -> dict[str, Any]:
    """Counts over the rows under review: decided (skip included: it is a decision to leave the
    row to `label_issues.action`), undecided, stale, and by decision."""
    from stages.reviews import DECISIONS

    by_decision = dict.fromkeys(DECISIONS, 0)
    counts = {"decided": 0, "undecided": 0, "stale": 0}
    for row in review_set.rows:
        status = row_status(row, reviews)
        counts[status] += 1
        if status == "decided":
            by_decision[reviews[row["id"]].decision] += 1
    return {"total": len(review_set.rows)} | counts | {"by_decision": by_decision}


def matches_status(status: str, wanted: str) -> bool:
    return wanted == "all" or status == wanted or (wanted == "new" and status != "decided")


def make_decision(
    row: dict[str, Any],
    decision: str,
    label: str | None,
    label_names: Sequence[str],
    reviewer: str,
    time: str | None = None,
) -> Review:
    """The review of `decision` on `row`; a relabel to the given label is a keep. ValueError
    naming what is wrong."""
    from stages.reviews import make_review

    if decision == "relabel" and label == row["given_label"]:
        decision = "keep"
    return make_review(
        row["id"], row["text"], decision, row["given_label"], label_names, reviewer, label, time
    )


# --- the web app -----------------------------------------------------------------------------


def class_keys(label_names: Sequence[str]) -> dict[str, str]:
    """The key of each class on the page: 1..9, then letters no action uses; classes beyond the
    keys are chosen by clicking."""
    return dict(zip(label_names, CLASS_KEYS, strict=False))


def render_page(config: dict[str, Any]) -> str:
    import jinja2

    import stages

    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(stages.__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    return environment.get_template("review.html.j2").render(config=config)


def create_app(
    review_set: ReviewSet,
    reviews_path: Path,
    reviewer: str,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The page and its JSON API over `review_set`, writing decisions to `reviews_path`.
    `allowed_hosts`: the Host headers answered (a page on another site cannot reach the server
    through a DNS name rebound to 127.0.0.1); None answers any."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from stages.common import StageError
    from stages.reviews import DECISIONS, forget, read_reviews, record

    label_names = review_set.label_names
    config = {
        "labels": list(label_names),
        "keys": class_keys(label_names),
        "action_keys": ACTION_KEYS,
        "detectors": review_set.detectors,
        "reviewer": reviewer,
        "reviews_file": str(reviews_path),
        "total": len(review_set.rows),
    }
    page = render_page(config)

    def refuse(status: int, message: str, field: str | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "field": field}, status_code=status)

    def current_reviews() -> dict[str, Review]:
        return read_reviews(reviews_path, label_names)  # every time: another writer may have run

    def unknown_row(row_id: str) -> JSONResponse:
        return refuse(
            404,
            f"id {row_id!r} is not among the {len(review_set.rows)} rows under review "
            "(restart with --all-ranked N to review more of the ranking)",
            "id",
        )

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def get_config(request: Request) -> Response:
        return JSONResponse(config)

    async def list_rows(request: Request) -> Response:
        cls = request.query_params.get("cls", "")
        suggested = request.query_params.get("suggested", "")
        status = request.query_params.get("status", "all")
        for field, value in (("cls", cls), ("suggested", suggested)):
            if value and value not in label_names:
                return refuse(422, f"{field} {value!r}: expected one of {list(label_names)}", field)
        if status not in STATUSES:
            return refuse(422, f"status {status!r}: expected one of {list(STATUSES)}", "status")
        reviews = current_reviews()
        rows = [
            row_state(row, reviews)
            for row in review_set.rows
            if (not cls or row["given_label"] == cls)
            and (not suggested or row["suggested_label"] == suggested)
            and matches_status(row_status(row, reviews), status)
        ]
        return JSONResponse({"rows": rows, "progress": progress(review_set, reviews)})

    async def get_row(request: Request) -> Response:
        row_id = request.path_params["row_id"]
        row = review_set.by_id.get(row_id)
        if row is None:
            return unknown_row(row_id)
        state = row_state(row, current_reviews())
        return JSONResponse(state | {"neighbours": review_set.neighbours[row_id]})

    async def get_progress(request: Request) -> Response:
        return JSONResponse(progress(review_set, current_reviews()))

    async def post_decision(request: Request) -> Response:
        # A JSON content type makes a cross-site form or script post preflighted, hence refused.
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return refuse(415, "send the decision as Content-Type: application/json")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return refuse(413, f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return refuse(400, f"the body is not valid JSON ({err})")
        if not isinstance(payload, dict):
            return refuse(422, 'expected a JSON object {"id", "decision", "label"?}')
        row_id, decision, label = payload.get("id"), payload.get("decision"), payload.get("label")
        if not isinstance(row_id, str) or not row_id:
            return refuse(422, "id: a row id (a string) is needed", "id")
        if decision not in DECISIONS:
            return refuse(
                422, f"decision {decision!r}: expected one of {list(DECISIONS)}", "decision"
            )
        if label is not None and not isinstance(label, str):
            return refuse(422, f"label {label!r}: expected a class name or null", "label")
        row = review_set.by_id.get(row_id)
        if row is None:
            return unknown_row(row_id)
        try:
            review = make_decision(row, decision, label, label_names, reviewer)
        except ValueError as err:
            return refuse(422, str(err), "label")
        reviews = await run_in_threadpool(record, reviews_path, review, label_names)
        return JSONResponse(
            {"row": row_state(row, reviews), "progress": progress(review_set, reviews)}
        )

    async def delete_decision(request: Request) -> Response:
        row_id = request.path_params["row_id"]
        row = review_set.by_id.get(row_id)
        if row is None:
            return unknown_row(row_id)
        reviews = await run_in_threadpool(forget, reviews_path, row_id, label_names)
        return JSONResponse(
            {"row": row_state(row, reviews), "progress": progress(review_set, reviews)}
        )

    async def reviews_file_fault(request: Request, err: Exception) -> Response:
        return refuse(500, f"the reviews file cannot be used: {err}", "reviews_file")

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/config", get_config, methods=["GET"]),
        Route("/api/rows", list_rows, methods=["GET"]),
        Route("/api/rows/{row_id:path}", get_row, methods=["GET"]),
        Route("/api/progress", get_progress, methods=["GET"]),
        Route("/api/decisions", post_decision, methods=["POST"]),
        Route("/api/decisions/{row_id:path}", delete_decision, methods=["DELETE"]),
    ]
    middleware = (
        [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))]
        if allowed_hosts
        else []
    )
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={StageError: reviews_file_fault},
    )


def serve(app: Starlette, host: str, port: int) -> int:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0


# --- Label Studio and spreadsheets -----------------------------------------------------------


def labeling_config(label_names: Sequence[str]) -> str:
    """Label Studio's labeling config that the exported tasks assume: one single choice among
    the classes and `drop`, named `label` over the text object `text`."""
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in label_names)
    return (
        "<View>\n"
        '  <Header value="Given label"/>\n'
        '  <Text name="given_label" value="$given_label"/>\n'
        f'  <Text name="{LABEL_STUDIO_TO_NAME}" value="$text"/>\n'
        f'  <Choices name="{LABEL_STUDIO_FROM_NAME}" toName="{LABEL_STUDIO_TO_NAME}" '
        'choice="single-radio" showInline="true">\n'
        f"{choices}\n"
        f'    <Choice value="{DROP_CHOICE}" background="#c44e52"/>\n'
        "  </Choices>\n"
        "</View>\n"
    )


def label_studio_tasks(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Label Studio import tasks: the row's text and keys as data, the suggested label as a
    prediction with its out-of-fold confidence as the score (shown pre-selected)."""
    return [
        {
            "data": {
                "text": row["text"],
                "row_id": row["id"],
                "given_label": row["given_label"],
                "text_sha256": row["text_sha256"],
            },
            "predictions": [
                {
                    "model_version": LABEL_STUDIO_MODEL_VERSION,
                    "score": row["suggested_confidence"],
                    "result": [
                        {
                            "from_name": LABEL_STUDIO_FROM_NAME,
                            "to_name": LABEL_STUDIO_TO_NAME,
                            "type": "choices",
                            "value": {"choices": [row["suggested_label"]]},
                        }
                    ],
                }
            ],
        }
        for row in rows
    ]


def spreadsheet_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a CSV to fill in: `decision` and `label` (prefilled with the current
    decision), and the text's hash, which `import` checks."""
    out = io.StringIO()
    writer = csv.DictWriter(out, SPREADSHEET_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        decided = row.get("decision") or {}
        writer.writerow(
            {name: row.get(name, "") for name in SPREADSHEET_COLUMNS}
            | {"decision": decided.get("decision", ""), "label": decided.get("label", "")}
        )
    return out.getvalue()


@dataclass(frozen=True)
class ImportedDecision:
    """One decision read from an import file, before it is checked against the table."""

    where: str  # "record 3" / "line 4", for the report
    row_id: str
    decision: str  # keep/relabel/drop/skip, or "" to take it from `label`
    label: str
    reviewer: str  # "" for the default reviewer
    time: str  # "" for now
    text: str | None  # the text it was made on, when the file has it verbatim
    text_sha256: str  # that text's hash, when the file has it ("" otherwise)
    given_label: str = ""  # the row's given label when exported, when the file has it


def label_studio_choice(value: Any) -> str:
    """JSON-MIN writes one chosen option as the string, several as {"choices": [...]}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("choices"), list):
        if len(value["choices"]) == 1 and isinstance(value["choices"][0], str):
            return value["choices"][0]
        raise ValueError(f"one choice expected, got {value['choices']}")
    if value is None:
        return ""
    raise ValueError(f"unreadable choice {value!r}")


def iso_utc(value: Any) -> str:
    """Label Studio's annotation time as the reviews file writes times; "" when unreadable."""
    if not isinstance(value, str) or not value:
        return ""
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return ""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    utc = when.astimezone(UTC).replace(microsecond=0)
    return utc.isoformat().replace("+00:00", "Z")


def read_label_studio_json_min(path: Path) -> Iterator[ImportedDecision | tuple[str, str]]:
    """Label Studio's JSON-MIN export: one object per annotation, the task's data fields beside
    the choice (key `label`) and `annotator`. Yields decisions, or (where, why) for a record
    that cannot be read."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReviewError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(records, list):
        raise ReviewError(f"{path}: expected a JSON list (Label Studio's JSON-MIN export)")
    for number, item in enumerate(records, start=1):
        where = f"record {number}"
        if not isinstance(item, dict) or not isinstance(item.get("row_id"), str):
            yield where, "no `row_id` (not a task exported by `newsclf review export`)"
            continue
        try:
            choice = label_studio_choice(item.get(LABEL_STUDIO_FROM_NAME))
        except ValueError as err:
            yield f"{where} (id {item['row_id']!r})", f"field {LABEL_STUDIO_FROM_NAME}: {err}"
            continue
        annotator = item.get("annotator")
        reviewer = (
            annotator.strip()
            if isinstance(annotator, str)
            else f"label-studio user {annotator}"
            if isinstance(annotator, int)
            else ""
        )
        yield ImportedDecision(
            where=where,
            row_id=item["row_id"],
            decision=DROP_CHOICE if choice == DROP_CHOICE else "",
            label="" if choice == DROP_CHOICE else choice,
            reviewer=reviewer,
            time=iso_utc(item.get("updated_at") or item.get("created_at")),
            text=item.get("text") if isinstance(item.get("text"), str) else None,
            text_sha256=str(item.get("text_sha256") or ""),
            given_label=item["given_label"] if isinstance(item.get("given_label"), str) else "",
        )


def read_spreadsheet(path: Path) -> Iterator[ImportedDecision | tuple[str, str]]:
    """A CSV with columns id, decision, label (and optionally reviewer, text_sha256, text)."""
    try:
        content = path.read_text(encoding="utf-8-sig")  # a spreadsheet may write a BOM
    except (OSError, UnicodeDecodeError) as err:
        raise ReviewError(f"{path}: not a readable UTF-8 file ({err})") from err
    reader = csv.DictReader(io.StringIO(content))
    needed = ["id", "decision", "label"]
    missing = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing:
        raise ReviewError(
            f"{path}: line 1: missing column(s) {missing} (found {reader.fieldnames}); "
            "expected id, decision, label[, reviewer]"
        )
    for number, row in enumerate(reader, start=2):
        values = {k: (v or "").strip() for k, v in row.items() if k is not None}
        yield ImportedDecision(
            where=f"line {number}",
            row_id=values["id"],
            decision=values["decision"],
            label=values["label"],
            reviewer=values.get("reviewer", ""),
            time="",
            text=None,  # for reading only: a spreadsheet may rewrite it (spaces, quotes)
            text_sha256=values.get("text_sha256", ""),
            given_label=values.get("given_label", ""),
        )


@dataclass
class ImportReport:
    applied: dict[str, int]  # by decision
    skipped: list[str]  # "where (id): why", one per record not applied
    undecided: int  # records without a decision (a spreadsheet line left empty)


def import_decisions(
    items: Iterator[ImportedDecision | tuple[str, str]],
    table: pl.DataFrame,
    label_names: Sequence[str],
    reviews_path: Path,
    default_reviewer: Callable[[], str],
) -> ImportReport:
    """Each decision checked against the table and written through `stages.reviews.record`: a row
    the table does not have, or whose text or given label is not the one decided on (where the
    file says), is reported and skipped, never applied to another row or label. A chosen label
    equal to the given one is a keep, another class a relabel, `drop` a drop."""
    from stages.reviews import DECISIONS, record, text_sha256

    label_names = tuple(label_names)
    rows = {
        r["id"]: {"id": r["id"], "text": r["text"], "given_label": label_names[r["label"]]}
        for r in table.select("id", "text", "label").iter_rows(named=True)
    }
    report = ImportReport(dict.fromkeys(DECISIONS, 0), [], 0)
    for item in items:
        if isinstance(item, tuple):
            report.skipped.append(f"{item[0]}: {item[1]}")
            continue
        where = f"{item.where} (id {item.row_id!r})"
        if not item.decision and not item.label:
            report.undecided += 1
            continue
        row = rows.get(item.row_id)
        if row is None:
            report.skipped.append(f"{where}: no such row in the label_issues table")
            continue
        decided_on = {item.text_sha256} | ({text_sha256(item.text)} if item.text else set())
        if decided_on - {"", text_sha256(row["text"])}:
            report.skipped.append(f"{where}: the row's text changed since the export")
            continue
        if item.given_label and item.given_label != row["given_label"]:
            # A keep of the old label would otherwise come back as a relabel undoing the fix.
            report.skipped.append(
                f"{where}: the row's given label changed since the export "
                f"({item.given_label} then, {row['given_label']} now)"
            )
            continue
        decision = item.decision.lower() or (
            "keep" if item.label == row["given_label"] else "relabel"
        )
        try:
            review = make_decision(
                row,
                decision,
                item.label or None,
                label_names,
                item.reviewer or default_reviewer(),
                item.time or None,
            )
        except ValueError as err:
            report.skipped.append(f"{where}: {err}")
            continue
        record(reviews_path, review, label_names)
        report.applied[review.decision] += 1
    return report


# --- the command -----------------------------------------------------------------------------


def git_user_name() -> str | None:
    try:
        done = subprocess.run(
            ["git", "config", "user.name"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    name = done.stdout.strip()
    return name if done.returncode == 0 and name else None


def resolve_reviewer(given: str | None) -> str:
    """--reviewer, else git's user.name; ReviewError saying what to pass otherwise."""
    name = (given or "").strip() or git_user_name()
    if not name:
        raise ReviewError(
            "who is reviewing? pass --reviewer NAME (or set `git config user.name`): every "
            "decision in the reviews file carries its reviewer"
        )
    if "\n" in name:
        raise ReviewError("--reviewer: a name on one line is needed")
    return name


def reviews_path_from_params(params_file: Path) -> Path:
    """params.yaml `augment.reviews`; ReviewError when the key is absent (no silent default)."""
    from stages.params import load_section
    from stages.sections import AugmentParams

    reviews = getattr(load_section("augment", AugmentParams, params_file), "reviews", None)
    if not isinstance(reviews, str) or not reviews:
        raise ReviewError(
            f"{params_file}: no `augment.reviews` (the reviews file's path); add it, e.g. "
            "`reviews: data/reviews/labels.csv`, or pass --reviews PATH"
        )
    return Path(reviews)


def common_options(suppress: bool) -> argparse.ArgumentParser:
    """Options of `review` and of its export/import; under a subcommand they default to nothing,
    so that `newsclf review --issues X export ...` keeps X (argparse would reset it)."""
    from stages.paths import LABEL_ISSUES

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--issues",
        type=Path,
        default=default(LABEL_ISSUES),
        metavar="PATH",
        help=f"the label_issues table (default {LABEL_ISSUES})",
    )
    options.add_argument(
        "--reviews",
        type=Path,
        default=default(None),
        metavar="PATH",
        help="the reviews file (default: params.yaml `augment.reviews`)",
    )
    options.add_argument(
        "--params",
        type=Path,
        default=default(Path("params.yaml")),
        metavar="PATH",
        help="the params file: its `labels` and `augment.reviews` (default params.yaml)",
    )
    options.add_argument(
        "--reviewer",
        default=default(None),
        metavar="NAME",
        help="who decides (default: `git config user.name`)",
    )
    options.add_argument(
        "--all-ranked",
        type=int,
        default=default(0),
        metavar="N",
        help="also the N most suspect rows of the ranking, flagged or not",
    )
    return options


def add_review_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`newsclf review [export|import]` on the console command's subparsers."""
    p = commands.add_parser(
        "review",
        parents=[common_options(suppress=False)],
        help="decide the label suspects on a local web page (or export/import them)",
        description="Serve a local page to decide the rows label_issues flags (keep, relabel, "
        "drop, skip), keyboard first; each decision goes at once to the reviews file that "
        "`augment` applies (docs/review.md). `export`/`import`: the same rows through Label "
        "Studio or a spreadsheet.",
    )
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    actions = p.add_subparsers(dest="review_command", metavar="{export,import}")
    e = actions.add_parser(
        "export",
        parents=[common_options(suppress=True)],
        help="write the rows under review for Label Studio or a spreadsheet",
        description="label-studio: Label Studio's import JSON (tasks with the suggested label as "
        "a prediction); the labeling config it assumes is printed. csv: a spreadsheet with "
        "id, decision, label to fill in.",
    )
    e.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    e.add_argument("--status", choices=STATUSES, default="all", help="which rows (default all)")
    e.add_argument("out", type=Path, metavar="OUT", help="the file to write")
    i = actions.add_parser(
        "import",
        parents=[common_options(suppress=True)],
        help="record decisions from Label Studio's JSON-MIN export or a spreadsheet CSV",
        description="Each decision is checked against the label_issues table (the row must "
        "exist and have the text decided on) and written to the reviews file; the others are "
        "reported and skipped. Exit status 0: all applied, 1: some skipped, 2: a usage fault.",
    )
    i.add_argument("--format", choices=IMPORT_FORMATS, required=True)
    i.add_argument("file", type=Path, metavar="FILE", help="the file to read")
    p.set_defaults(run=review_main)
    return p


def export_rows(args: argparse.Namespace, label_names: tuple[str, ...], reviews_path: Path) -> int:
    from stages.reviews import read_reviews

    if args.format == "label-studio" and DROP_CHOICE in label_names:
        raise ReviewError(
            f"a class is named {DROP_CHOICE!r}, the Label Studio choice that drops a row; "
            "export --format csv instead"
        )
    review_set = load_review_set(args.issues, label_names, args.all_ranked)
    reviews = read_reviews(reviews_path, label_names)
    rows = [
        row_state(row, reviews)
        for row in review_set.rows
        if matches_status(row_status(row, reviews), args.status)
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "label-studio":
        tasks = label_studio_tasks(rows)
        args.out.write_text(json.dumps(tasks, indent=1, ensure_ascii=False) + "\n", "utf-8")
        print(f"{args.out}: {len(tasks)} Label Studio tasks. The labeling config they assume:")
        print(labeling_config(label_names), end="")
    else:
        args.out.write_text(spreadsheet_csv(rows), encoding="utf-8")
        print(f"{args.out}: {len(rows)} rows; fill in decision and/or label, then import it")
    return 0


def import_file(args: argparse.Namespace, label_names: tuple[str, ...], reviews_path: Path) -> int:
    reader = read_spreadsheet if args.format == "csv" else read_label_studio_json_min
    table = read_issues(args.issues, label_names)
    reviewer: list[str] = []

    def default_reviewer() -> str:  # asked only when a record names none
        if not reviewer:
            reviewer.append(resolve_reviewer(args.reviewer))
        return reviewer[0]

    report = import_decisions(reader(args.file), table, label_names, reviews_path, default_reviewer)
    for line in report.skipped:
        print(f"newsclf review import: {args.file}: {line}: skipped", file=sys.stderr)
    applied = sum(report.applied.values())
    counts = ", ".join(f"{k} {v}" for k, v in report.applied.items() if v)
    print(
        f"{reviews_path}: {applied} decision(s) recorded"
        + (f" ({counts})" if counts else "")
        + f"; {len(report.skipped)} skipped"
        + (f"; {report.undecided} without a decision" if report.undecided else "")
    )
    return 1 if report.skipped else 0


def review_main(args: argparse.Namespace) -> int:
    """`newsclf review`: serve the page, or export/import. Exit status 2 on a usage or input
    fault, said in one line."""
    from stages.common import StageError, load_labels
    from stages.reviews import read_reviews

    try:
        if args.all_ranked < 0:
            raise ReviewError("--all-ranked must be 0 or more")
        label_names = load_labels(args.params)
        reviews_path = args.reviews or reviews_path_from_params(args.params)
        read_reviews(reviews_path, label_names)  # a malformed file fails here, before any work
        if args.review_command == "export":
            return export_rows(args, label_names, reviews_path)
        if args.review_command == "import":
            return import_file(args, label_names, reviews_path)
        reviewer = resolve_reviewer(args.reviewer)
        review_set = load_review_set(args.issues, label_names, args.all_ranked)
        loopback = args.host in LOOPBACK_HOSTS
        app = create_app(
            review_set, reviews_path, reviewer, [*LOOPBACK_HOSTS] if loopback else None
        )
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(
            f"newsclf review: http://{shown}:{args.port}/ ({len(review_set.rows)} rows; "
            f"decisions to {reviews_path} as {reviewer!r}; Ctrl-C stops)",
            flush=True,
        )
        return serve(app, args.host, args.port)
    except (ReviewError, StageError) as err:
        print(f"newsclf review: error: {err}", file=sys.stderr)
        return 2
