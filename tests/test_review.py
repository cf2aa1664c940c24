"""`newsclf review` (newsclf/review.py): the rows under review and their neighbours, decisions
written at once and undone, stale decisions shown as such, 4xx naming the field, filters, the
Label Studio and spreadsheet round trips, and one real browser driving the page by keyboard."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest
import yaml
from starlette.testclient import TestClient

from newsclf import review
from stages import reviews
from tests.pipeline_fixture import AG_NEWS_LABELS as LABELS
from tests.pipeline_fixture import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")

# (id, text, label, suggested_label, suggested_confidence, rank, is_label_issue): 4 suspects.
ROWS = [
    ("t:1", "Red Sox beat the Yankees in the baseball playoff game", 0, 1, 0.97, 1, True),
    ("t:2", "Stocks fall as oil prices rise and the market slides", 1, 2, 0.91, 3, True),
    ("t:3", "New chip from Intel doubles laptop processor speed", 2, 3, 0.85, 2, True),
    ("t:4", "Peace talks resume as the president meets rebels", 3, 0, 0.60, 4, True),
    ("t:5", "Yankees pitcher wins the baseball game in extra innings", 1, 1, 0.99, 5, False),
    ("t:6", "Red Sox fans cheer the playoff win over Boston rivals", 1, 1, 0.98, 6, False),
    ("t:7", "Baseball season ends with the Yankees on top", 1, 1, 0.97, 7, False),
    ("t:8", "Oil prices push the stock market lower on Wall Street", 2, 2, 0.96, 8, False),
    ("t:9", "Market rally lifts stocks as investors cheer earnings", 2, 2, 0.95, 9, False),
    ("t:10", "Intel unveils a faster processor for laptop computers", 3, 3, 0.96, 10, False),
    ("t:11", "A new laptop chip promises longer battery life", 3, 3, 0.94, 11, False),
    ("t:12", "The president meets rebels to talk about peace", 0, 0, 0.93, 12, False),
    ("t:13", "Rebels and the government agree to peace talks", 0, 0, 0.92, 13, False),
]


def write_issues(path: Path, rows=ROWS, n_labels: int = len(LABELS), probs: bool = True) -> Path:
    """A label_issues table as the stage writes it; with `probs`, two detectors and their mean."""
    columns = list(zip(*rows, strict=True))
    table = pl.DataFrame(
        {
            "id": list(columns[0]),
            "text": list(columns[1]),
            "label": pl.Series(columns[2], dtype=pl.Int64),
            "suggested_label": pl.Series(columns[3], dtype=pl.Int64),
            "suggested_confidence": pl.Series(columns[4], dtype=pl.Float64),
            "label_quality": pl.Series([1 - c for c in columns[4]], dtype=pl.Float64),
            "rank": pl.Series(columns[5], dtype=pl.Int64),
            "is_label_issue": pl.Series(columns[6], dtype=pl.Boolean),
            "action": ["flagged" if issue else "none" for issue in columns[6]],
        }
    )
    if probs:
        one_hot = [
            [c if k == s else (1 - c) / (n_labels - 1) for k in range(n_labels)]
            for s, c in zip(columns[3], columns[4], strict=True)
        ]
        flat = [[1 / n_labels] * n_labels for _ in rows]
        table = table.with_columns(
            probs_tfidf_lr=pl.Series(one_hot, dtype=pl.List(pl.Float64)),
            probs_embedding_knn=pl.Series(flat, dtype=pl.List(pl.Float64)),
            oof_probs=pl.Series(
                [
                    [(a + b) / 2 for a, b in zip(x, y, strict=True)]
                    for x, y in zip(one_hot, flat, strict=True)
                ],
                dtype=pl.List(pl.Float64),
            ),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    table.write_parquet(path)
    return path


@pytest.fixture
def issues(tmp_path: Path) -> Path:
    return write_issues(tmp_path / "label_issues.parquet")


@pytest.fixture
def reviews_file(tmp_path: Path) -> Path:
    return tmp_path / "reviews" / "labels.csv"


@pytest.fixture
def client(issues: Path, reviews_file: Path) -> Iterator[TestClient]:
    review_set = review.load_review_set(issues, LABELS)
    with TestClient(review.create_app(review_set, reviews_file, "ana")) as test_client:
        yield test_client


def test_rows_are_the_suspects_most_confident_first_with_probs_and_neighbours(
    client: TestClient, issues: Path
) -> None:
    answer = client.get("/api/rows").json()
    assert [row["id"] for row in answer["rows"]] == ["t:1", "t:2", "t:3", "t:4"]
    assert answer["progress"]["total"] == 4 and answer["progress"]["undecided"] == 4
    first = client.get("/api/rows/t:1").json()
    assert (first["given_label"], first["suggested_label"]) == ("World", "Sports")
    assert list(first["probs"]) == ["embedding_knn", "tfidf_lr", "mean"]
    assert first["probs"]["tfidf_lr"]["Sports"] == 0.97
    given, suggested = first["neighbours"]
    assert (given["role"], given["label"], suggested["label"]) == ("given", "World", "Sports")
    # The nearest Sports rows share its words; never the row itself.
    assert [n["id"] for n in suggested["rows"]] == ["t:5", "t:6", "t:7"]
    assert all(n["id"] != "t:1" for group in first["neighbours"] for n in group["rows"])
    # --all-ranked N adds the N most suspect rows; a table without probability columns still works.
    write_issues(issues, probs=False)
    more = review.load_review_set(issues, LABELS, all_ranked=6)
    assert [row["id"] for row in more.rows] == ["t:5", "t:6", "t:1", "t:2", "t:3", "t:4"]
    assert more.detectors == [] and more.rows[0]["probs"] == {}


def test_a_decision_is_written_at_once_and_undone(client: TestClient, reviews_file: Path) -> None:
    answer = client.post(
        "/api/decisions", json={"id": "t:1", "decision": "relabel", "label": "Sports"}
    )
    assert answer.status_code == 200
    row = answer.json()["row"]
    assert row["status"] == "decided" and row["decision"]["label"] == "Sports"
    assert answer.json()["progress"]["by_decision"]["relabel"] == 1
    saved = reviews.read_reviews(reviews_file, LABELS)["t:1"]
    assert (saved.decision, saved.label, saved.given_label, saved.reviewer) == (
        "relabel",
        "Sports",
        "World",
        "ana",
    )
    assert saved.text_sha256 == reviews.text_sha256(ROWS[0][1])
    # A relabel to the given label is a keep.
    kept = client.post(
        "/api/decisions", json={"id": "t:2", "decision": "relabel", "label": "Sports"}
    )
    assert kept.json()["row"]["decision"]["decision"] == "keep"
    undone = client.delete("/api/decisions/t:1").json()
    assert undone["row"]["status"] == "undecided"
    assert undone["progress"]["decided"] == 1
    assert list(reviews.read_reviews(reviews_file, LABELS)) == ["t:2"]


def test_another_writer_is_never_clobbered(client: TestClient, reviews_file: Path) -> None:
    client.post("/api/decisions", json={"id": "t:1", "decision": "drop"})
    other = reviews.make_review("t:3", ROWS[2][1], "skip", "Business", LABELS, "bo")
    reviews.record(reviews_file, other, LABELS)  # another tab or process
    assert client.get("/api/rows/t:3").json()["decision"]["reviewer"] == "bo"
    client.post("/api/decisions", json={"id": "t:2", "decision": "keep"})
    assert sorted(reviews.read_reviews(reviews_file, LABELS)) == ["t:1", "t:2", "t:3"]


def test_a_malformed_reviews_file_is_named_not_overwritten(
    client: TestClient, reviews_file: Path
) -> None:
    reviews_file.parent.mkdir(parents=True)
    reviews_file.write_text(",".join(reviews.COLUMNS) + "\nt:1,abc,maybe,,World,ana,now\n")
    answer = client.get("/api/progress")
    assert answer.status_code == 500 and answer.json()["field"] == "reviews_file"
    assert "line 2: field decision 'maybe'" in answer.json()["error"]
    client.post("/api/decisions", json={"id": "t:2", "decision": "keep"})
    assert "maybe" in reviews_file.read_text()


def test_a_decision_on_another_given_label_is_stale(client: TestClient, reviews_file: Path) -> None:
    """t:1 is World in the data now; a keep recorded when it was Sports must not count as decided."""
    old = reviews.make_review("t:1", ROWS[0][1], "keep", "Sports", LABELS, "bo")
    reviews.record(reviews_file, old, LABELS)
    row = client.get("/api/rows/t:1").json()
    assert row["status"] == "stale" and row["decision"] is None
    assert row["stale_decision"]["stale_reason"] == "label_changed"
    assert row["stale_decision"]["given_label"] == "Sports"


def test_a_decision_on_another_text_is_stale_and_the_row_new_again(
    client: TestClient, reviews_file: Path
) -> None:
    old = reviews.make_review("t:2", "an earlier text of t:2", "drop", "Sports", LABELS, "bo")
    reviews.record(reviews_file, old, LABELS)
    client.post("/api/decisions", json={"id": "t:1", "decision": "keep"})
    row = client.get("/api/rows/t:2").json()
    assert row["status"] == "stale" and row["decision"] is None
    assert row["stale_decision"]["decision"] == "drop"
    assert row["stale_decision"]["stale_reason"] == "text_changed"
    progress = client.get("/api/progress").json()
    assert (progress["decided"], progress["stale"], progress["undecided"]) == (1, 1, 2)

    def ids(query: str) -> list[str]:
        return [r["id"] for r in client.get(f"/api/rows?{query}").json()["rows"]]

    assert ids("status=new") == ["t:2", "t:3", "t:4"]
    assert ids("status=undecided") == ["t:3", "t:4"]
    assert ids("status=decided") == ["t:1"]
    assert ids("cls=Business") == ["t:3"]
    assert ids("suggested=World&status=new") == ["t:4"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("post", "/api/decisions", {"id": "t:1", "decision": "maybe"}, 422, "decision"),
        ("post", "/api/decisions", {"decision": "keep"}, 422, "id"),
        ("post", "/api/decisions", {"id": "t:9", "decision": "keep"}, 404, "id"),
        ("post", "/api/decisions", {"id": "t:1", "decision": "relabel"}, 422, "label"),
        (
            "post",
            "/api/decisions",
            {"id": "t:1", "decision": "relabel", "label": "Art"},
            422,
            "label",
        ),
        (
            "post",
            "/api/decisions",
            {"id": "t:1", "decision": "drop", "label": "Sports"},
            422,
            "label",
        ),
        ("get", "/api/rows?status=done", None, 422, "status"),
        ("get", "/api/rows?cls=Art", None, 422, "cls"),
        ("get", "/api/rows/nope", None, 404, "id"),
        ("delete", "/api/decisions/nope", None, 404, "id"),
    ],
)
def test_bad_requests_answer_4xx_naming_the_field(
    client: TestClient, reviews_file: Path, method, path, body, status, field
) -> None:
    answer = client.request(method.upper(), path, json=body)
    assert answer.status_code == status
    assert answer.json()["field"] == field and answer.json()["error"]
    assert not reviews_file.exists()


def test_a_body_that_is_not_json_is_refused(client: TestClient) -> None:
    headers = {"Content-Type": "application/json"}
    assert client.post("/api/decisions", content=b"{", headers=headers).status_code == 400
    # A cross-site form posts text/plain: refused, so that no other page can write decisions.
    form = client.post("/api/decisions", content=b'{"id": "t:1", "decision": "drop"}')
    assert form.status_code == 415


def test_the_page_gives_each_class_a_key_for_any_number_of_classes(tmp_path: Path) -> None:
    labels = tuple(f"class <{i}>" for i in range(12))
    rows = [
        (f"r:{i}", f"text {i} words", i % 12, (i + 1) % 12, 0.9, i + 1, True) for i in range(24)
    ]
    issues = write_issues(tmp_path / "issues.parquet", rows, n_labels=12)
    review_set = review.load_review_set(issues, labels)
    keys = review.class_keys(labels)
    assert list(keys.values())[:10] == [*"123456789", "a"]
    assert not set(keys.values()) & set(review.ACTION_KEYS)
    page = TestClient(review.create_app(review_set, tmp_path / "r.csv", "ana")).get("/").text
    assert "class <11>" not in page and "class &lt;11&gt;" in page  # escaped everywhere
    assert "http" not in page.split("<body>", 1)[1]  # nothing fetched from anywhere else


def namespace(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="newsclf")
    review.add_review_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["review", *argv])


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["augment"].pop("reviews", None)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_the_reviews_file_and_reviewer_must_be_known(
    issues: Path, params_file: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    args = namespace("--params", str(params_file), "--issues", str(issues))
    assert review.review_main(args) == 2
    assert "augment.reviews" in capsys.readouterr().err
    monkeypatch.setattr(review, "git_user_name", lambda: None)
    with pytest.raises(review.ReviewError, match="--reviewer"):
        review.resolve_reviewer(None)
    assert review.resolve_reviewer(" ana ") == "ana"
    # Options before the subcommand are kept.
    args = namespace("--issues", "x.parquet", "export", "--format", "csv", "out.csv")
    assert (args.issues, args.review_command, args.port) == (Path("x.parquet"), "export", 8001)


def test_label_studio_export_and_json_min_import_round_trip(
    issues: Path, reviews_file: Path, params_file: Path, tmp_path: Path, capsys
) -> None:
    common = ["--params", str(params_file), "--issues", str(issues), "--reviews", str(reviews_file)]
    tasks_file = tmp_path / "tasks.json"
    assert (
        review.review_main(
            namespace(*common, "export", "--format", "label-studio", str(tasks_file))
        )
        == 0
    )
    assert '<Choice value="drop"' in capsys.readouterr().out  # the labeling config, printed
    tasks = json.loads(tasks_file.read_text())
    assert [t["data"]["row_id"] for t in tasks] == ["t:1", "t:2", "t:3", "t:4"]
    prediction = tasks[0]["predictions"][0]
    assert prediction["score"] == 0.97
    assert prediction["result"][0]["value"] == {"choices": ["Sports"]}
    # Label Studio's JSON-MIN: the task's data, its own id, the choice under `label`, annotator.
    chosen = {"t:1": "Sports", "t:2": "Sports", "t:3": "drop", "t:4": {"choices": ["Sci/Tech"]}}
    exported = [
        task["data"] | {"id": 100 + i, "label": chosen[task["data"]["row_id"]], "annotator": 7}
        for i, task in enumerate(tasks)
    ]
    # After the export, t:4's text changes upstream and t:2's label is fixed (Sports -> Business):
    # neither decision is applied (t:2's keep of Sports would otherwise undo the fix).
    changed = {
        "t:4": lambda r: (r[0], "Peace talks fail", *r[2:]),
        "t:2": lambda r: (*r[:2], 2, *r[3:]),
    }
    write_issues(issues, [changed.get(r[0], lambda r: r)(r) for r in ROWS])
    exported.append(exported[0] | {"row_id": "t:99"})  # not in the table
    min_file = tmp_path / "min.json"
    min_file.write_text(json.dumps(exported))
    code = review.review_main(
        namespace(*common, "import", "--format", "label-studio-json-min", str(min_file))
    )
    out = capsys.readouterr()
    assert code == 1  # some skipped
    assert "record 4 (id 't:4'): the row's text changed" in out.err
    assert "record 2 (id 't:2'): the row's given label changed since the export" in out.err
    assert "record 5 (id 't:99'): no such row" in out.err
    assert "2 decision(s) recorded (relabel 1, drop 1); 3 skipped" in out.out
    saved = reviews.read_reviews(reviews_file, LABELS)
    assert {k: (r.decision, r.label) for k, r in saved.items()} == {
        "t:1": ("relabel", "Sports"),
        "t:3": ("drop", ""),
    }
    assert saved["t:1"].reviewer == "label-studio user 7"


def test_spreadsheet_export_and_import(
    issues: Path, reviews_file: Path, params_file: Path, tmp_path: Path, capsys
) -> None:
    common = ["--params", str(params_file), "--issues", str(issues), "--reviews", str(reviews_file)]
    sheet = tmp_path / "sheet.csv"
    assert review.review_main(namespace(*common, "export", "--format", "csv", str(sheet))) == 0
    lines = list(csv.DictReader(sheet.open()))
    fill = {
        "t:1": ("", "Sports"),
        "t:2": ("relabel", "Sports"),
        "t:3": ("drop", ""),
        "t:4": ("keep", "World"),
    }
    for line in lines:
        line["decision"], line["label"] = fill[line["id"]]
    # The export wrote each row's given label; one the source has since changed is refused.
    assert [line["given_label"] for line in lines] == ["World", "Sports", "Business", "Sci/Tech"]
    lines[2]["given_label"] = "World"  # t:3 was World when exported, Business now
    lines.append(
        dict.fromkeys(lines[0], "") | {"id": "t:5", "decision": "skip"}
    )  # not under review: fine
    lines.append(dict.fromkeys(lines[0], "") | {"id": "t:6"})  # no decision: left out
    with sheet.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(lines[0]) + ["reviewer"])
        writer.writeheader()
        writer.writerows([line | {"reviewer": "cy"} for line in lines])
    code = review.review_main(namespace(*common, "import", "--format", "csv", str(sheet)))
    out = capsys.readouterr()
    assert code == 1 and "line 5 (id 't:4'): decision 'keep' takes no new label" in out.err
    assert "line 4 (id 't:3'): the row's given label changed since the export" in out.err
    assert "1 without a decision" in out.out
    saved = reviews.read_reviews(reviews_file, LABELS)
    assert {k: (r.decision, r.label, r.reviewer) for k, r in saved.items()} == {
        "t:1": ("relabel", "Sports", "cy"),
        "t:2": ("keep", "Sports", "cy"),
        "t:5": ("skip", "", "cy"),
    }


# --- the page in a real browser --------------------------------------------------------------


def browser_or_skip() -> tuple[Callable, str]:
    """Playwright's sync API and Debian's Chromium; skipped without them, failed under CI=true
    (CI installs chromium: .ci/run). Never `playwright install`: it downloads a browser."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    chromium = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    missing = [
        what
        for what, there in (
            ("chromium (apt-get install chromium)", chromium),
            ("playwright (pip install playwright)", sync_playwright),
        )
        if not there
    ]
    if missing:
        reason = f"the browser test needs {' and '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return sync_playwright, chromium


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """`app` on a real uvicorn server on a free port of 127.0.0.1, in a thread: its URL."""
    import uvicorn

    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the review server did not start in 10 s"
    try:
        yield f"http://127.0.0.1:{listening.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listening.close()


@pytest.fixture
def served(issues: Path, reviews_file: Path) -> Iterator[str]:
    app = review.create_app(
        review.load_review_set(issues, LABELS), reviews_file, "ana", ["127.0.0.1"]
    )
    with serving(app) as url:
        yield url


@pytest.mark.browser
def test_the_page_decides_rows_by_keyboard_in_a_browser(served: str, reviews_file: Path) -> None:
    sync_playwright, chromium = browser_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(served)
            status, current = page.locator("#status"), page.locator(".item.current")
            page.locator("#row-text").filter(has_text="Red Sox beat").wait_for()
            assert page.locator("#progress").inner_text().startswith("0 of 4 decided")
            # t:1 (World): its suggestion Sports by its key; then t:2 dropped, t:3 kept.
            page.keyboard.press(review.class_keys(LABELS)["Sports"])
            page.locator("#row-text").filter(has_text="Stocks fall").wait_for()
            page.keyboard.press("d")
            page.locator("#row-text").filter(has_text="New chip").wait_for()
            page.keyboard.press("k")
            page.locator("#row-text").filter(has_text="Peace talks").wait_for()
            assert "saved: t:3: keep" in status.inner_text()
            page.keyboard.press("ArrowUp")
            page.keyboard.press("u")  # undo t:3, then keep it again
            page.locator(".item.current .badge.undecided").wait_for()
            page.keyboard.press("k")
            page.locator("#progress").filter(has_text="3 of 4 decided").wait_for()
            page.reload()
            page.locator(".item .badge.drop").wait_for()
            badges = page.locator(".item .badge").all_inner_texts()
            assert badges == ["relabel → Sports", "drop", "keep", "undecided"]
            assert current.get_attribute("data-id") == "t:1"
            page.select_option("#filter-status", "new")
            page.locator(".item").first.filter(has_text="Peace talks").wait_for()
            assert page.locator(".item").count() == 1
        finally:
            browser.close()
    saved = reviews.read_reviews(reviews_file, LABELS)
    assert {k: (r.decision, r.label) for k, r in saved.items()} == {
        "t:1": ("relabel", "Sports"),
        "t:2": ("drop", ""),
        "t:3": ("keep", "Business"),
    }
