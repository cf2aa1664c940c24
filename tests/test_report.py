"""The `report` stage: funnel arithmetic, tables, and a page that needs nothing from outside."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from stages import report
from stages.common import StageError
from tests.pipeline_fixture import AG_NEWS_LABELS as LABEL_NAMES


def reports_fixture() -> dict[str, dict]:
    """The JSON reports of a small run, in the layout the stages write."""
    per_class = {
        name: {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 5, "roc_auc": 0.95}
        for name in ("World", "Sports", "Business", "Sci/Tech")
    }
    return {
        "ingest": {
            "rows_in": 60,
            "kept": 57,
            "rejected": 3,
            "kept_per_split": {"train": 37, "test": 20},
            "sources": [
                {"split": "train", "rows_in": 25, "rejected_by_reason": {"empty text": 2}},
                {"split": "train", "rows_in": 15, "rejected_by_reason": {"empty text": 1}},
                {"split": "test", "rows_in": 20, "rejected_by_reason": {}},
            ],
        },
        "clean": {
            "removed_by_rule": {"too_short": 0, "exact_duplicate": 4, "test_leakage": 1},
            "per_split": {
                "train": {"rows_in": 37, "rows_out": 32},
                "test": {"rows_in": 20, "rows_out": 20},
            },
        },
        "tokens": {
            "rows": 52,
            "tokens": 900,
            "vocabulary_size": 300,
            "n_tokens_p50": 16,
            "n_tokens_p95": 30,
            "n_tokens_p99": 33,
            "n_tokens_max": 40,
        },
        "label_issues": {
            "action": "drop",
            "rows_scored": 32,
            "flagged": 2,
            "flagged_fraction": 0.0625,
            "oof_accuracy": 0.8,
            "per_class": {
                "World": {"rows": 8, "flagged": 2, "suggested_to": {"Sports": 2}},
                "Sports": {"rows": 8, "flagged": 0, "suggested_to": {}},
            },
        },
        "augment": {
            "train_rows_in": 32,
            "test_rows": 20,
            "dropped_by_label_issues": 2,
            "train_rows_kept": 30,
            "reviews": {
                "file": "data/reviews/labels.csv",
                "decisions": 3,
                "applied": 2,
                "keep": 1,
                "relabel": 1,
                "drop": 0,
                "skip": 0,
                "labels_changed": 1,
                "stale": {"count": 1, "row_missing": ["train.csv:9"], "text_changed": []},
            },
            "n_aug": 1,
            "added": 30,
            "train_rows_out": 60,
            "ops": {"swap": {"rate": 0.1, "added": 30, "skipped": 0}},
        },
        "metrics": {
            "accuracy": 0.85,
            "accuracy_as_trained": 0.86,
            "macro_f1": 0.84,
            "baseline_accuracy": 0.8,
            "roc_auc_macro": 0.95,
            "n_train": 54,
            "n_test": 20,
            "per_class": per_class,
            "calibration": {
                "temperature": 1.5,
                "held_out_rows": 12,
                "ece_bins": 15,
                "ece_before": 0.0812,
                "ece_after": 0.0345,
                "brier_before": 0.2,
                "brier_after": 0.19,
                "log_loss_before": 0.5,
                "log_loss_after": 0.45,
            },
            "selective": {
                "coverage_at_95_accuracy": 0.6,
                "min_confidence_at_95_accuracy": 0.8,
                "coverage_at_98_accuracy": 0.3,
                "min_confidence_at_98_accuracy": 0.9,
            },
        },
        "export": {
            "opset": 17,
            "parity": {
                "n_texts": 16,
                "n_int8_texts": 20,
                "fp32_max_abs_logit_diff": 1e-6,
                "int8_top1_agreement": 0.99,
                "int8_meets_bound": False,
            },
            "int8": {"candidates": 24, "kept_fp32": ["Attention_0"]},
            "accuracy": {"n_texts": 20, "fp32": 0.85, "int8": 0.85},
            "size_mb": {"fp32": 1.5, "int8": 0.9},
        },
        "export_speed": {
            "batch_size": 64,
            "fp32_texts_per_s": 100.0,
            "fp32_n_texts": 16,
            "int8_texts_per_s": 200.0,
            "int8_n_texts": 20,
        },
    }


def test_funnel_accounts_for_every_row() -> None:
    steps = report.funnel(reports_fixture())
    by_step = {s.step: s for s in steps}
    assert [s.step for s in steps] == [
        "raw files",
        "ingest",
        "clean",
        "label_issues",
        "augment",
        "train / evaluate",
    ]
    assert (by_step["raw files"].train, by_step["raw files"].test) == (40, 20)
    assert by_step["ingest"].left == {"empty text": 3}
    assert by_step["ingest"].train == 40 - 3
    # Rules that removed nothing are not listed.
    assert by_step["clean"].left == {"exact_duplicate": 4, "test_leakage": 1}
    assert by_step["clean"].train == 37 - 5
    assert by_step["label_issues"].train == 30
    assert by_step["label_issues"].left == {"dropped as label issue or by a reviewer": 2}
    assert by_step["augment"].train == 60
    assert by_step["train / evaluate"].train == 54
    assert list(by_step["train / evaluate"].left.values()) == [6]
    assert all(s.test == 20 for s in steps)


def test_class_balance_counts_every_class() -> None:
    tables = {
        "train": pl.DataFrame({"label": [0, 0, 1, 3]}),
        "test": pl.DataFrame({"label": [2, 2, 2]}),
    }
    balance = report.class_balance(tables, LABEL_NAMES)
    assert balance.rows() == [
        ("World", 2, 0),
        ("Sports", 1, 0),
        ("Business", 0, 3),
        ("Sci/Tech", 1, 0),
    ]
    assert balance.columns == ["class", "train", "test"]


def test_top_suspects_only_issues_by_rank() -> None:
    issues = pl.DataFrame(
        {
            "id": ["a", "b", "c", "d"],
            "text": ["t1", "t2", "t3", "t4"],
            "label": [0, 1, 2, 3],
            "suggested_label": [1, 1, 3, 0],
            "suggested_confidence": [0.91234, 0.5, 0.8, 0.7],
            "label_quality": [0.01, 0.9, 0.02, 0.03],
            "rank": [3, 4, 1, 2],
            "is_label_issue": [True, False, True, True],
            "action": ["flagged", "kept", "flagged", "flagged"],
        }
    )
    top = report.top_suspects(issues, 2, LABEL_NAMES)
    assert top["id"].to_list() == ["c", "d"]
    assert top.row(0, named=True)["given"] == "Business"
    assert top.row(0, named=True)["suggested"] == "Sci/Tech"


def test_confusion_matrix_counts_and_rejects_unknown_names() -> None:
    rows = pl.DataFrame(
        {
            "actual": ["World", "World", "Sports", "Sci/Tech"],
            "predicted": ["World", "Business", "Sports", "World"],
        }
    )
    matrix = report.confusion_matrix(rows, LABEL_NAMES)
    assert matrix.sum() == 4
    assert matrix[0, 0] == 1 and matrix[0, 2] == 1 and matrix[1, 1] == 1 and matrix[3, 0] == 1
    with pytest.raises(StageError, match="unknown class names"):
        report.confusion_matrix(
            pl.DataFrame({"actual": ["Weather"], "predicted": ["World"]}), LABEL_NAMES
        )


def render(reports: dict[str, dict], suspect_text: str) -> str:
    suspects = pl.DataFrame(
        {
            "rank": [1],
            "id": ["train.csv:7"],
            "given": ["World"],
            "suggested": ["Sports"],
            "confidence": [0.9],
            "action": ["flagged"],
            "text": [suspect_text],
        }
    )
    curves = {
        "train/loss": pl.DataFrame({"step": [1, 4, 8], "loss": [1.4, 1.0, 0.7]}),
        "eval/accuracy": pl.DataFrame({"step": [8], "accuracy": [0.8]}),
    }
    return report.render_html(
        reports,
        report.funnel(reports),
        report.class_balance({"train": pl.DataFrame({"label": [0, 1, 2, 3]})}, LABEL_NAMES),
        pl.DataFrame({"n_tokens": ["008-015", "016-023"], "rows": [10, 42]}),
        suspects,
        curves,
        np.array([[5, 0, 0, 0], [0, 5, 0, 0], [0, 1, 3, 1], [0, 0, 1, 4]]),
        LABEL_NAMES,
        pl.DataFrame(
            {
                "scores": ["uncalibrated", "calibrated", "perfect", "perfect"],
                "confidence": [0.9, 0.8, 0.0, 1.0],
                "accuracy": [0.8, 0.8, 0.0, 1.0],
            }
        ),
        pl.DataFrame({"coverage": [0.5, 1.0], "accuracy": [1.0, 0.85]}),
    )


def test_page_is_self_contained_escaped_and_reproducible() -> None:
    reports = reports_fixture()
    hostile = '<script>alert("x")</script> see https://example.com/a.png'
    page = render(reports, hostile)
    # Nothing is fetched: no script, stylesheet link, frame, or non-inline image.
    assert "<script" not in page and "<link" not in page and "<iframe" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    # funnel, class balance, token lengths, training, confusion, calibration
    assert len(sources) == 6
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert "url(" not in page and "@import" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page  # markupsafe spells " as &#34;
    for section in (
        "Data funnel",
        "Class balance",
        "Token lengths",
        "Label suspects",
        "Augmentation",
        "Training curves",
        "Test results",
        "Calibration and abstaining",
        "ONNX export",
    ):
        assert f"<h2>{section}" in page
    assert "1 decision(s) not applied</strong>: their row is gone\n(train.csv:9)" in page
    assert "0.0812 before, 0.0345 after" in page and "60.00% of texts at 95% accuracy" in page
    assert "85.00%" in page and "exact_duplicate: 4" in page and "200" in page
    assert "86.00%" in page  # accuracy as trained, beside the merged model's
    assert "below the bound" in page and "1 of 24 int8 nodes kept fp32" in page
    assert render(reports, hostile) == page  # same inputs, same bytes


def test_main_names_the_missing_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(
        "labels: [World, Sports, Business, Sci/Tech]\nreport:\n  top_suspects: 5\n"
    )
    with pytest.raises(StageError, match=r"reports/ingest.json: not found"):
        report.main()
