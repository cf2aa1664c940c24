"""evaluate stage: the project's HF-evaluate metric module, scoring, baseline and reports."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from stages import calibration, paths
from stages.common import StageError
from stages.evaluate import (
    baseline_proba,
    confusion_rows,
    error_rows,
    held_out_labels,
    predict_logits,
    probabilities,
    roc_curves,
)
from tests.pipeline_fixture import AG_NEWS_LABELS as LABEL_NAMES

# Six examples, three classes; every number below is worked out by hand in the comments.
REFS = [0, 0, 1, 1, 2, 2]
PREDS = [0, 1, 1, 1, 2, 0]
SCORES = [
    [0.7, 0.2, 0.1],
    [0.4, 0.5, 0.1],
    [0.1, 0.8, 0.1],
    [0.2, 0.6, 0.2],
    [0.1, 0.1, 0.8],
    [0.5, 0.1, 0.4],
]


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(str(paths.METRIC_MODULE))


def test_metric_module_matches_hand_computed_numbers(metric):
    r = metric.compute(
        predictions=PREDS, references=REFS, prediction_scores=SCORES, label_names=["a", "b", "c"]
    )
    assert r["accuracy"] == pytest.approx(4 / 6)
    # a: TP 1 (row 0), FP 1 (row 5), FN 1 (row 1).  b: TP 2, FP 1 (row 1).  c: TP 1, FN 1 (row 5).
    a, b, c = r["per_class"]["a"], r["per_class"]["b"], r["per_class"]["c"]
    assert (a["precision"], a["recall"], a["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (b["precision"], b["recall"], b["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert [a["support"], b["support"], c["support"]] == [2, 2, 2]
    assert r["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # AUC a: positives score .7 and .4 against negatives .1 .2 .1 .5: 7 of 8 pairs ordered.
    assert a["roc_auc"] == pytest.approx(7 / 8)
    assert b["roc_auc"] == pytest.approx(1.0) and c["roc_auc"] == pytest.approx(1.0)
    assert r["roc_auc_macro"] == pytest.approx((7 / 8 + 2) / 3)


def test_metric_module_auc_is_none_for_an_absent_class_and_rejects_bad_input(metric):
    r = metric.compute(
        predictions=[0, 1, 0],
        references=[0, 1, 1],
        prediction_scores=[[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]],
    )
    assert r["per_class"]["2"]["roc_auc"] is None and r["per_class"]["2"]["support"] == 0
    assert r["roc_auc_macro"] == pytest.approx(1.0)  # mean of classes 0 and 1 only
    with pytest.raises(ValueError, match="must lie in 0..2"):
        metric.compute(predictions=[0, 3], references=[0, 1], prediction_scores=SCORES[:2])


def test_the_temperature_is_fitted_on_the_labels_validation_scores_against() -> None:
    """Held-out rows: a person's label where one decided, else the label as ingested."""
    rows = pl.DataFrame(
        {"label": [0, 2, 1], "given_label": [0, 1, 3], "reviewed_label": [None, None, 1]},
        schema_overrides={"reviewed_label": pl.Int64},
    )
    assert held_out_labels(rows).tolist() == [0, 1, 1]
    assert held_out_labels(rows.drop("reviewed_label")).tolist() == [0, 1, 3]


def test_predict_logits_sorted_batches_match_one_by_one_in_input_order(tiny_bert_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = ["short", "a much longer text with many more words in it than the others", "mid size"]
    batched = predict_logits(model, tokenizer, texts, max_length=32, batch_size=2)
    single = np.vstack([predict_logits(model, tokenizer, [t], 32, 1) for t in texts])
    assert batched.shape == (3, len(LABEL_NAMES)) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_allclose(probabilities(batched).sum(axis=1), 1.0, atol=1e-6)


def test_baseline_learns_the_topics_and_needs_every_label(news_rows):
    train, test = news_rows(10), news_rows(3, split="test")
    probs = baseline_proba(train["text"].to_list(), train["label"].to_list(), test["text"], 0, 4)
    assert (probs.argmax(axis=1) == test["label"].to_numpy()).mean() == 1.0
    three = train.filter(pl.col("label") < 3)
    with pytest.raises(StageError, match="labels \\[0, 1, 2\\], not every id 0-3"):
        baseline_proba(three["text"].to_list(), three["label"].to_list(), ["x"], 0, 4)


def test_report_tables():
    test = pl.DataFrame({"id": ["t1", "t2", "t3"], "label": [0, 1, 3], "text": ["a", "b", "c"]})
    probs = np.array([[0.9, 0.1, 0, 0], [0.6, 0.3, 0.1, 0], [0.1, 0.1, 0.7, 0.1]])
    conf = confusion_rows(test["label"].to_list(), probs.argmax(axis=1), LABEL_NAMES)
    assert conf.rows() == [("World", "World"), ("Sports", "World"), ("Sci/Tech", "Business")]
    errors = error_rows(test, probs, LABEL_NAMES)
    # Most confident mistake first.
    assert errors["id"].to_list() == ["t3", "t2"]
    assert errors.row(0, named=True) == {
        "id": "t3",
        "label": "Sci/Tech",
        "predicted": "Business",
        "confidence": 0.7,
        "p_label": 0.1,
        "text": "c",
    }
    curves = roc_curves(test["label"].to_list(), probs, LABEL_NAMES)
    # Business never occurs in this tiny test: no curve for it.
    assert curves["class"].unique(maintain_order=True).to_list() == ["World", "Sports", "Sci/Tech"]
    assert curves.filter(pl.col("class") == "World")["tpr"].to_list()[-1] == 1.0


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_evaluate_scores_a_trained_adapter_end_to_end(quantization, trained_adapter, news_rows):
    """The stage's core on the session's tiny adapters, no params file; with a 4-bit base,
    evaluate scores the adapter merged into fp32 (what export ships) and as trained."""
    from stages import evaluate as evaluate_stage

    trained = trained_adapter(quantization)
    train_rows = trained.train_rows
    test = news_rows(4, split="test")
    held_out = news_rows(2, split="train")

    def evaluate():
        return evaluate_stage.run(
            test,
            train_rows,
            trained.params,
            LABEL_NAMES,
            4,
            adapter_dir=trained.adapter_dir,
            val_rows=held_out,
        )

    evaluation = evaluate()
    report = evaluation.report
    assert report["n_test"] == test.height == 16
    assert report["n_train"] == train_rows.height == 32
    # The fixture's topics are separable by their words: both models beat chance (0.25) by far.
    assert report["accuracy"] >= 0.75 and report["baseline_accuracy"] >= 0.75
    assert report["accuracy_as_trained"] >= 0.75
    # Every figure agrees with the tables written beside it.
    confusion = evaluation.confusion
    hits = (confusion["actual"] == confusion["predicted"]).sum()
    assert report["accuracy"] == pytest.approx(hits / 16, abs=1e-6)
    assert evaluation.errors.height == 16 - hits
    assert evaluation.quantization == quantization
    if quantization == "none":  # the merged model is the trained one: no second pass
        assert report["accuracy_as_trained"] == report["accuracy"]
        assert report["merge_gain"] == 0
    assert set(report["per_class"]) == set(LABEL_NAMES)
    assert evaluation.roc.columns == ["class", "fpr", "tpr"]
    assert set(evaluation.roc["class"]) == set(LABEL_NAMES)
    # Calibrated on the held-out rows: a temperature, the test figures before and after, and
    # the same labels (the errors table, on calibrated scores, lists the same rows).
    calibrated = report["calibration"]
    assert calibrated["held_out_rows"] == held_out.height == 8
    assert evaluation.calibrated.record["fitted"]
    assert calibration.T_MIN <= calibrated["temperature"] <= calibration.T_MAX
    assert {"ece_before", "ece_after", "brier_after", "log_loss_after"} <= set(calibrated)
    assert 0 <= report["selective"]["coverage_at_95_accuracy"] <= 1
    assert evaluation.calibrated.probs.argmax(1).tolist() == [
        LABEL_NAMES.index(p) for p in confusion["predicted"]
    ]
    assert evaluate().report == report


def test_evaluate_names_a_missing_adapter(tmp_path):
    from stages.evaluate import load_classifier

    with pytest.raises(StageError, match="no adapter_config.json \\+ adapter_model.safetensors"):
        load_classifier(tmp_path, "unused", LABEL_NAMES)
