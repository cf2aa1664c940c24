"""label_issues: out-of-fold detection of injected flips, the action modes, reports and bad input."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from stages import label_issues as li
from stages import paths
from stages.common import StageError
from stages.params import parse_section
from stages.sections import FILTERS, MODELS
from tests.pipeline_fixture import AG_NEWS_LABELS as LABEL_NAMES

# Words that only one class uses, so a small, clean corpus is easy to learn and a flipped label
# stands out.
CLASS_WORDS = (
    ("minister", "election", "troops", "embassy", "treaty", "rebels", "parliament", "refugees"),
    ("striker", "goal", "coach", "season", "tournament", "championship", "pitcher", "medal"),
    ("shares", "profit", "investors", "merger", "earnings", "dividend", "retailer", "bank"),
    ("software", "chip", "internet", "browser", "laptop", "satellite", "processor", "genome"),
)
FILLER = ("the", "a", "on", "after", "with", "today", "new", "report", "says", "week")
RAW_PARAMS = {
    "models": ["tfidf_lr", "embedding_lr", "embedding_knn"],
    "embedding_model": "unused-when-embeddings-are-given",
    "precision": "auto",
    "folds": 4,
    "seed": 0,
    "filter_by": "low_self_confidence",
    "action": "flag",
    "relabel_min_confidence": 0.5,
}
PARAMS = parse_section(RAW_PARAMS, li.LabelIssuesParams, "label_issues")
FLIPPED = (3, 50, 97, 140)  # row positions whose label the noisy corpus changes


def corpus(per_class: int = 40, seed: int = 0) -> tuple[pl.DataFrame, np.ndarray]:
    """Train + test rows with one class's words each, and topic embeddings of the true class;
    the labels of FLIPPED train rows are moved to the next class."""
    rng = np.random.default_rng(seed)
    rows, true = [], []
    for split, n in (("train", per_class), ("test", 3)):
        for cls in range(4):
            for i in range(n):
                words = list(rng.choice(CLASS_WORDS[cls], 4)) + list(rng.choice(FILLER, 3))
                rng.shuffle(words)
                rows.append((f"{split}-{cls}-{i:03d}", split, cls, " ".join(words)))
                true.append(cls)
    clean = pl.DataFrame(rows, schema=["id", "split", "label", "text"], orient="row")
    noisy = clean["label"].to_numpy().copy()
    noisy[list(FLIPPED)] = (noisy[list(FLIPPED)] + 1) % 4
    clean = clean.with_columns(label=pl.Series(noisy))
    train_true = np.array(true)[: per_class * 4]
    emb = np.eye(4)[train_true] + rng.normal(0, 0.35, (len(train_true), 4))
    emb = np.hstack([emb, rng.normal(0, 0.35, (len(train_true), 4))])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return clean, emb.astype(np.float32)


@pytest.fixture(scope="module")
def detected() -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """The noisy corpus and what `detect` makes of it with the default models."""
    clean, emb = corpus()
    return clean, *li.detect(clean, PARAMS, LABEL_NAMES, embeddings=emb)


def test_detect_flags_the_injected_flips_and_only_scores_train_rows(detected) -> None:
    clean, table, report = detected
    train_ids = clean.filter(pl.col("split") == "train")["id"].to_list()
    assert sorted(table["id"].to_list()) == sorted(train_ids)  # no test row scored
    flagged = set(table.filter("is_label_issue")["id"].to_list())
    flipped = {train_ids[i] for i in FLIPPED}
    assert flipped <= flagged
    assert len(flagged - flipped) <= 2
    # Ranked: rank 1 is the lowest label quality, and the flips are the top suspects.
    assert table["rank"].to_list() == list(range(1, table.height + 1))
    assert table["label_quality"].is_sorted()
    assert set(table.head(len(FLIPPED))["id"].to_list()) == flipped
    # Each flip is suggested back to its true class (the next one was injected).
    for row in table.filter(pl.col("id").is_in(list(flipped))).iter_rows(named=True):
        assert row["suggested_label"] == (row["label"] - 1) % 4
    assert report["rows_scored"] == table.height
    assert report["flagged"] == len(flagged)
    assert sum(c["flagged"] for c in report["per_class"].values()) == len(flagged)
    assert report["dropped"] == report["relabelled"] == 0
    for true_name, given in report["noise_matrix_given_by_true"].items():
        assert true_name in LABEL_NAMES
        assert sum(given.values()) == pytest.approx(1.0, abs=1e-3)


def test_each_model_alone_gives_probabilities() -> None:
    clean, emb = corpus()
    train = clean.filter(pl.col("split") == "train")
    labels = train["label"].to_numpy()
    for model in MODELS:
        probs = li.out_of_fold_probs(
            train["text"].to_list(), labels, emb, [model], 4, 0, LABEL_NAMES
        )
        assert probs.shape == (train.height, 4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
        assert (probs.argmax(axis=1) == labels).mean() > 0.85


@pytest.mark.kernels
def test_knn_in_chunks_equals_one_pass() -> None:
    # A chunk budget of a few rows must give the votes of one pass over all rows, up to float32
    # rounding of the similarities (the budget is what keeps 120k rows in bounded memory).
    rng = np.random.default_rng(3)
    e_train = rng.normal(size=(300, 8)).astype(np.float32)
    e_test = rng.normal(size=(97, 8)).astype(np.float32)
    y_train = rng.integers(0, 4, 300)
    one_pass = li._knn_proba(e_train, y_train, e_test, 4, chunk_bytes=10**9)
    chunked = li._knn_proba(e_train, y_train, e_test, 4, chunk_bytes=300 * 16 * 7)
    np.testing.assert_allclose(chunked, one_pass, rtol=0, atol=1e-5)
    np.testing.assert_allclose(chunked.sum(axis=1), 1.0)


def test_same_seed_same_table(detected) -> None:
    clean, first, _ = detected
    second, _ = li.detect(clean, PARAMS, LABEL_NAMES, embeddings=corpus()[1])
    assert first.equals(second)


@pytest.fixture(scope="module")
def scored() -> tuple[pl.DataFrame, np.ndarray]:
    """The noisy train rows and their out-of-fold probabilities, computed once for this module."""
    clean, emb = corpus()
    train = clean.filter(pl.col("split") == "train")
    labels = train["label"].to_numpy()
    return train, li.out_of_fold_probs(
        train["text"].to_list(), labels, emb, list(MODELS), 4, 0, LABEL_NAMES
    )


@pytest.mark.parametrize(
    ("action", "min_conf", "expected"),
    [
        ("flag", 0.5, {"flagged"}),
        ("drop", 0.5, {"dropped"}),
        ("relabel", 0.0, {"relabelled"}),
        ("relabel", 1.0, {"flagged"}),  # no suggestion is that sure: issues are only flagged
    ],
)
def test_action_modes(scored, action: str, min_conf: float, expected: set[str]) -> None:
    train, probs = scored
    table = li.score_issues(train, probs, "low_self_confidence", action, min_conf)
    report = li.build_report(
        table, {"filter_by": "low_self_confidence", "action": action}, LABEL_NAMES
    )
    issues = table.filter("is_label_issue")
    assert issues.height >= len(FLIPPED)
    assert set(issues["action"].to_list()) == expected
    assert set(table.filter(~pl.col("is_label_issue"))["action"].to_list()) == {"none"}
    assert report["dropped"] == (issues.height if action == "drop" else 0)
    relabelled = table.filter(pl.col("action") == "relabelled")
    assert report["relabelled"] == relabelled.height
    assert (relabelled["suggested_label"] != relabelled["label"]).all()


def test_relabel_threshold_splits_issues(scored) -> None:
    train, probs = scored
    table = li.score_issues(train, probs, "low_self_confidence", "flag", 0.0)
    cut = float(table.filter("is_label_issue")["suggested_confidence"].median())
    relabelled = li.score_issues(train, probs, "low_self_confidence", "relabel", cut)
    got = relabelled.filter(pl.col("action") == "relabelled")
    assert got.height >= 1
    assert (got["suggested_confidence"] >= cut).all()
    kept = relabelled.filter(pl.col("action") == "flagged")
    assert (kept["suggested_confidence"] < cut).all()


@pytest.mark.parametrize("filter_by", FILTERS)
def test_every_filter_finds_the_flips(scored, filter_by: str) -> None:
    train, probs = scored
    table = li.score_issues(train, probs, filter_by, "flag", 0.0)
    flipped = {train["id"][i] for i in FLIPPED}
    assert flipped <= set(table.filter("is_label_issue")["id"].to_list())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda df: df.filter(pl.col("label") != 2), "class 2 (Business) has no train rows"),
        (
            lambda df: df.filter((pl.col("label") != 1) | (pl.col("id") == "train-1-000")),
            "class 1 (Sports) has a single train row",
        ),
        (lambda df: df.filter(pl.col("split") == "test"), "0 train rows is fewer than"),
        (
            lambda df: df.with_columns(
                label=pl.when(pl.col("id") == "train-0-001").then(pl.lit(7, pl.Int64))
            ).with_columns(pl.col("label").fill_null(0)),
            "row id=train-0-001: label 7 is not an id of labels 0-3",
        ),
        (lambda df: df.drop("text"), "missing column `text`"),
    ],
)
def test_bad_input_is_a_clear_error(mutate, message: str) -> None:
    clean, emb = corpus()
    with pytest.raises(StageError, match=re.escape(message)):
        li.detect(mutate(clean), PARAMS, LABEL_NAMES, embeddings=emb)


def test_fewer_rows_than_folds() -> None:
    clean, emb = corpus()
    few = clean.filter(pl.col("id").str.slice(-3).cast(pl.Int64) < 2)  # 2 rows per class and split
    with pytest.raises(StageError, match="8 train rows is fewer than label_issues.folds=10"):
        li.detect(few, replace(PARAMS, folds=10), LABEL_NAMES, embeddings=emb[:8])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("models", ["tfidf_lr", "bert_finetune"], "label_issues.models"),
        ("action", "delete", "label_issues.action"),
        ("filter_by", "most_suspicious", "label_issues.filter_by"),
        ("relabel_min_confidence", 1.5, "label_issues.relabel_min_confidence"),
        ("folds", 1, r"label_issues.folds=1 \(must be >= 2\)"),
        ("models", [], "label_issues.models"),
    ],
)
def test_bad_params_are_clear_errors(key: str, value, message: str) -> None:
    with pytest.raises(StageError, match=message):
        parse_section({**RAW_PARAMS, key: value}, li.LabelIssuesParams, "label_issues")


def test_embed_texts_is_normalised_and_independent_of_batching(tiny_bert_dir: Path) -> None:
    texts = ["Stocks rise", "A much longer sentence about the championship final tonight", "Hi"]
    one = li.embed_texts(texts, str(tiny_bert_dir), batch_size=1)
    many = li.embed_texts(texts, str(tiny_bert_dir), batch_size=8)
    assert one.shape == (3, 32)
    assert one.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one, many, atol=1e-5)


@pytest.mark.kernels
def test_bf16_embeddings_stay_close_to_fp32(tiny_bert_dir: Path) -> None:
    texts = ["Stocks rise", "A much longer sentence about the championship final tonight", "Hi"]
    fp32 = li.embed_texts(texts, str(tiny_bert_dir), precision="fp32")
    bf16 = li.embed_texts(texts, str(tiny_bert_dir), precision="bf16")
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    assert not np.array_equal(fp32, bf16)  # bf16 really ran
    assert ((fp32 * bf16).sum(axis=1) > 0.99).all()  # cosine similarity


def test_markdown_lists_the_top_suspects(detected) -> None:
    _, table, report = detected
    md = li.render_markdown(table, report, LABEL_NAMES, top=5)
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 5  # header + 5 suspects
    assert rows[1].startswith(f"| 1 | {table['id'][0]} |")


def test_main_writes_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean, _ = corpus()
    params = {
        "labels": list(LABEL_NAMES),
        "label_issues": {**RAW_PARAMS, "models": ["tfidf_lr"], "action": "drop"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data" / "interim").mkdir(parents=True)
    clean.write_parquet(tmp_path / paths.CLEAN)
    monkeypatch.chdir(tmp_path)
    li.main()
    table = pl.read_parquet(paths.LABEL_ISSUES)
    report = json.loads(paths.LABEL_ISSUES_REPORT.read_text())
    assert table.height == report["rows_scored"] == 160
    assert report["dropped"] == table.filter(pl.col("action") == "dropped").height > 0
    assert "# Label issues: top suspects" in paths.LABEL_ISSUES_MD.read_text()
    first = paths.LABEL_ISSUES.read_bytes()
    li.main()
    assert paths.LABEL_ISSUES.read_bytes() == first  # byte-identical on a rerun


def test_the_report_grows_linearly_with_the_classes() -> None:
    """At 500 classes every per-class table keeps its few largest entries (a full suggested-to
    table was 500x499 counts, 12 MB in git); at 4 classes each row is whole, zeros included."""
    rng = np.random.default_rng(0)
    for n_classes in (4, 500):
        names = tuple(f"class {i}" for i in range(n_classes))
        n = 20 * n_classes
        labels = np.arange(n) % n_classes
        probs = rng.dirichlet(np.full(n_classes, 0.05), size=n)
        believed = np.where(
            np.arange(n) % 7 == 0, (labels + 1 + np.arange(n) % 3) % n_classes, labels
        )
        probs[np.arange(n), believed] += 1.0  # mostly the given label, one row in 7 another
        probs /= probs.sum(axis=1, keepdims=True)
        table = pl.DataFrame(
            {
                "label": labels,
                "suggested_label": probs.argmax(axis=1),
                "is_label_issue": probs[np.arange(n), labels] < 0.5,
                "action": "flagged",
            }
        )
        report = li.build_report(table, {}, names)
        report["noise_matrix_given_by_true"] = li.noise_matrix(labels, probs, names)
        rows = [c["suggested_to"] for c in report["per_class"].values()]
        matrix = list(report["noise_matrix_given_by_true"].values())
        if n_classes == 4:
            assert all(len(row) == 3 for row in rows) and all(len(row) == 4 for row in matrix)
            continue
        assert max(len(row) for row in rows + matrix) <= li.REPORT_TOP_N
        assert all(all(v > 0 for v in row.values()) for row in rows + matrix)
        assert sum(len(row) for row in rows) > 0  # the flagged rows' suggestions are there
        assert len(json.dumps(report)) < 400 * n_classes
        # What is kept is the largest: no dropped count exceeds a kept one.
        flagged = table.filter("is_label_issue")
        cls = int(flagged["label"][0])
        full = li.suggested_to(table.filter(pl.col("label") == cls), cls, names)
        kept = report["per_class"][names[cls]]["suggested_to"]
        assert min(kept.values()) >= max([v for k, v in full.items() if k not in kept] or [0])
