"""The reviews file (stages/reviews.py): keys that survive a re-ingest, decisions never applied to
another text, atomic locked writes from concurrent writers, and one-line errors for a bad file."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import polars as pl
import pytest

from stages import reviews
from stages.common import StageError
from tests.pipeline_fixture import AG_NEWS_LABELS as LABELS


def train_rows(texts: dict[str, str], labels: dict[str, str] | None = None) -> pl.DataFrame:
    """Train rows as augment reads them; labels by name (World unless given)."""
    given = [LABELS.index((labels or {}).get(i, "World")) for i in texts]
    return pl.DataFrame({"id": list(texts), "text": list(texts.values()), "label": given})


def test_a_decision_is_keyed_by_row_id_and_text_and_survives_a_reingest(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    review = reviews.make_review(
        "train.csv:7", "Red Sox beat the Yankees", "relabel", "World", LABELS, "ana", "Sports"
    )
    reviews.record(path, review, LABELS)
    # A re-ingest of the same source gives the same id and text: the decision still applies.
    again = train_rows({"train.csv:7": "Red Sox beat the Yankees", "train.csv:8": "Other"})
    table = reviews.reviews_table(reviews.read_reviews(path, LABELS), LABELS)
    assert reviews.stale_reviews(again, table) == {
        "missing": [],
        "text_changed": [],
        "label_changed": [],
    }
    assert table.row(0, named=True) == {
        "id": "train.csv:7",
        "text_sha256": reviews.text_sha256("Red Sox beat the Yankees"),
        "decision": "relabel",
        "review_label": LABELS.index("Sports"),
        "label_when_reviewed": LABELS.index("World"),
    }
    # The file is one line per decision, readable in a diff.
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(reviews.COLUMNS)
    assert lines[1].startswith("train.csv:7,") and ",relabel,Sports,World,ana," in lines[1]


def test_a_decision_on_a_changed_or_vanished_text_or_label_is_stale() -> None:
    decided = {
        "a:1": reviews.make_review("a:1", "old text", "drop", "World", LABELS, "ana"),
        "a:2": reviews.make_review("a:2", "gone", "keep", "Sports", LABELS, "ana"),
        "a:3": reviews.make_review("a:3", "same", "keep", "Sports", LABELS, "ana"),
        # Kept as Sports; the source has since fixed the row to World: keeping must not undo it.
        "a:4": reviews.make_review("a:4", "fixed", "keep", "Sports", LABELS, "ana"),
    }
    now = train_rows(
        {"a:1": "new text", "a:3": "same", "a:4": "fixed"}, {"a:3": "Sports", "a:4": "World"}
    )
    stale = reviews.stale_reviews(now, reviews.reviews_table(decided, LABELS))
    assert stale == {"missing": ["a:2"], "text_changed": ["a:1"], "label_changed": ["a:4"]}


def writer(path: str, start: int, n: int) -> None:
    for i in range(start, start + n):
        review = reviews.make_review(f"r:{i:03d}", f"text {i}", "keep", "World", LABELS, "w")
        reviews.record(Path(path), review, LABELS)


def test_two_concurrent_writers_lose_no_decision(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=writer, args=(str(path), s, 40)) for s in (0, 40)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    decided = reviews.read_reviews(path, LABELS)
    assert sorted(decided) == [f"r:{i:03d}" for i in range(80)]
    assert not list(tmp_path.glob(".labels.csv.*.tmp"))  # no temporary file left behind


def test_the_lock_beside_a_reviews_file_stays_out_of_git() -> None:
    """The lock file `record` leaves beside the reviews file must not show up in `git status`."""
    import subprocess

    from tests.pipeline_fixture import REPO_ROOT

    for reviews_file in ("data/reviews/labels.csv", "elsewhere/team_labels.tsv"):
        lock = reviews.lock_file(Path(reviews_file))
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(lock)], cwd=REPO_ROOT, check=False
        )
        assert ignored.returncode == 0, f"{lock} is not git-ignored"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("id,decision\n", "line 1: columns ['id', 'decision'], expected"),
        (
            "id,text_sha256,decision,label,given_label,reviewer,time\n"
            "a:1,0123456789abcdef,maybe,,World,ana,2026-01-01T00:00:00Z\n",
            "line 2: field decision 'maybe': expected one of keep, relabel, drop, skip",
        ),
        (
            "id,text_sha256,decision,label,given_label,reviewer,time\n"
            "a:1,0123456789abcdef,keep,World,World,ana,2026-01-01T00:00:00Z\n"
            "a:2,0123456789abcdef,relabel,Weather,World,ana,2026-01-01T00:00:00Z\n",
            "line 3: field label 'Weather' does not fit decision 'relabel'",
        ),
        (
            "id,text_sha256,decision,label,given_label,reviewer,time\n"
            "a:1,xyz,drop,,World,ana,2026-01-01T00:00:00Z\n",
            "line 2: field text_sha256 'xyz': expected 16 lowercase hex digits",
        ),
        (
            "id,text_sha256,decision,label,given_label,reviewer,time\n"
            "a:1,0123456789abcdef,drop,,World,ana\n",
            "line 2: expected 7 fields",
        ),
        (
            "id,text_sha256,decision,label,given_label,reviewer,time\n"
            "a:1,0123456789abcdef,drop,,World,ana,t\na:1,0123456789abcdef,skip,,World,ana,t\n",
            "line 3: id 'a:1' is reviewed twice",
        ),
    ],
)
def test_a_malformed_reviews_file_is_one_line_naming_the_line(
    tmp_path: Path, content: str, says: str
) -> None:
    path = tmp_path / "labels.csv"
    path.write_text(content)
    with pytest.raises(StageError) as err:
        reviews.read_reviews(path, LABELS)
    assert str(err.value).startswith(f"{path}: ") and says in str(err.value)
    assert "\n" not in str(err.value)


def test_make_review_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="relabel needs a label among"):
        reviews.make_review("a:1", "t", "relabel", "World", LABELS, "ana")
    with pytest.raises(ValueError, match="takes no new label"):
        reviews.make_review("a:1", "t", "drop", "World", LABELS, "ana", "Sports")
    with pytest.raises(ValueError, match="reviewer"):
        reviews.make_review("a:1", "t", "keep", "World", LABELS, " ")
