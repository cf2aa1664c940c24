"""evaluate: score the fine-tuned adapter and a TF-IDF baseline on the full test split.

Reads `models/adapter/` and `data/processed/{train,test}.parquet`. The model scored is the one
`export` ships: the adapter merged into a fresh fp32 base. For a quantized (QLoRA / 8-bit) run it
also scores the adapter on the quantized base it was trained on (`accuracy_as_trained`), so what
merging a QLoRA adapter into full weights costs shows on every run. Computes accuracy, macro-F1,
per-class precision/recall/F1 and one-vs-rest ROC AUC with the project's own Hugging Face `evaluate`
module (`metrics/newsclf_metrics`, loaded by local path: nothing is fetched from the hub), and the
accuracy of a TF-IDF + logistic-regression baseline trained on exactly the rows `train` trained on.

Writes `reports/metrics.json`, `reports/plots/confusion.csv` (one row per test example, for DVC's
`confusion` template), `reports/plots/roc.csv` (one-vs-rest ROC curve per class, a `class` column naming it),
`reports/errors.csv` (misclassified test rows, most confident first) and
`data/evaluated/test_logits.parquet` (the shipped model's logits per test row: `export` checks its
ONNX graphs against them rather than scoring the PyTorch model again).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from stages import calibration, paths
from stages.common import (
    StageError,
    get_logger,
    load_labels,
    run_main,
    write_csv,
    write_json,
    write_table,
)
from stages.modeling import (
    KBIT,
    base_family,
    linears_on_onednn,
    load_as_trained,
    load_merged_model,
    require_adapter,
    resolve_base_model,
    resolve_quantization,
    training_precision,
)
from stages.params import load_section
from stages.processed import read_processed, scored_labels, split_train_val
from stages.sections import EvaluateParams
from stages.train_params import TrainParams

log = get_logger("evaluate")
# Accuracies at which metrics.json reports the share of texts the model can answer (selective
# classification: the rest abstain, `--min-confidence`).
COVERAGE_TARGETS = (0.95, 0.98)


def load_classifier(adapter_dir: Path, base_model: str, label_names: tuple[str, ...]):
    """The shipped model (adapter merged into a fresh fp32 base) and the adapter's tokenizer;
    on a CPU its linear layers run on oneDNN (`linears_on_onednn`)."""
    from transformers import AutoTokenizer

    require_adapter(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    model = load_merged_model(
        adapter_dir, resolve_base_model(base_model), label_names, tokenizer.pad_token_id
    )
    if torch.cuda.is_available():
        return model.to("cuda"), tokenizer
    return linears_on_onednn(model), tokenizer


def predict_logits(
    model,
    tokenizer,
    texts: list[str],
    max_length: int,
    batch_size: int,
    precision: str = "fp32",
    desc: str = "scoring",
) -> np.ndarray:
    """Logits (float32), one row per text, in input order.

    Texts are scored shortest first so each batch pads only to its own longest row; news texts vary
    from a dozen to hundreds of tokens, so this saves most of the padding a random order costs.
    `precision` bf16 scores under bf16 autocast, as a model trained with it ran.
    """
    if not texts:
        return np.zeros((0, model.config.num_labels), dtype=np.float32)
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    device = next(model.parameters()).device
    logits = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    mixed = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode(), mixed:
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
            rows = order[start : start + batch_size]
            batch = tokenizer.pad(
                {
                    "input_ids": [ids[i] for i in rows],
                    "attention_mask": [enc["attention_mask"][i] for i in rows],
                },
                return_tensors="pt",
            ).to(device)
            logits[rows] = model(**batch).logits.float().cpu().numpy()
    return logits


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax of float32 logits, row by row, as float64 for the metrics."""
    return torch.softmax(torch.from_numpy(logits), dim=-1).numpy().astype(np.float64)


def merged_logits(
    adapter_dir: Path,
    base_model: str,
    label_names: tuple[str, ...],
    texts: list[str],
    max_length: int,
    batch_size: int,
) -> np.ndarray:
    """Logits of the shipped model (the adapter merged into its fp32 base) for `texts`: what
    `evaluate` scores and writes for `export`'s parity check."""
    return merged_logits_of(adapter_dir, base_model, label_names, [texts], max_length, batch_size)[
        0
    ]


def merged_logits_of(
    adapter_dir: Path,
    base_model: str,
    label_names: tuple[str, ...],
    text_sets: list[list[str]],
    max_length: int,
    batch_size: int,
) -> list[np.ndarray]:
    """`merged_logits` of several sets of texts (the test rows, the held-out rows the
    temperature is fitted on) from one load of the model."""
    model, tokenizer = load_classifier(adapter_dir, base_model, label_names)
    return [
        predict_logits(
            model,
            tokenizer,
            texts,
            max_length,
            batch_size,
            desc=f"merged fp32 ({i + 1}/{len(text_sets)})",
        )
        for i, texts in enumerate(text_sets)
    ]


def as_trained_proba(
    adapter_dir: Path,
    params: TrainParams,
    label_names: tuple[str, ...],
    texts: list[str],
    batch_size: int,
) -> tuple[str, np.ndarray | None]:
    """The quantization the run trained with, and for a 4-/8-bit base the class probabilities of
    the adapter on that base, in the training precision (None for an unquantized base, whose
    merged model is the trained one)."""
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    quantization = resolve_quantization(params.quantization, cuda)
    if quantization not in KBIT:
        return quantization, None
    base_path = resolve_base_model(params.base_model)
    model_type, family = base_family(base_path, params.base_model)
    precision = training_precision(params.precision, quantization, family, model_type, cuda)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    model = load_as_trained(
        adapter_dir,
        base_path,
        label_names,
        quantization,
        precision,
        tokenizer.pad_token_id,
    )
    logits = predict_logits(
        model,
        tokenizer,
        texts,
        params.max_length,
        batch_size,
        precision=precision,
        desc=f"as trained ({quantization})",
    )
    return quantization, probabilities(logits)


def baseline_proba(
    train_texts: list[str],
    train_labels: list[int],
    test_texts: list[str],
    seed: int,
    n_labels: int,
) -> np.ndarray:
    """TF-IDF (word 1-2 grams) + logistic regression: the yardstick the fine-tuning must beat."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipeline = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        LogisticRegression(C=10.0, max_iter=2000, random_state=seed),
    )
    pipeline.fit(train_texts, train_labels)
    if list(pipeline.classes_) != list(range(n_labels)):
        raise StageError(
            f"baseline: train rows hold labels {pipeline.classes_.tolist()}, "
            f"not every id 0-{n_labels - 1}"
        )
    return pipeline.predict_proba(test_texts)


def compute_metrics(
    probs: np.ndarray, labels: list[int], label_names: tuple[str, ...]
) -> dict[str, Any]:
    """The project metric module's report for these probabilities (prediction = argmax)."""
    import evaluate

    metric = evaluate.load(str(paths.METRIC_MODULE))
    return metric.compute(
        predictions=probs.argmax(axis=1).tolist(),
        references=labels,
        prediction_scores=probs.tolist(),
        label_names=list(label_names),
    )


def _rounded(obj: Any) -> Any:
    """Floats to 6 decimals, so metric diffs show real changes, not float noise."""
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj


def metrics_report(
    model_metrics: dict[str, Any],
    baseline_metrics: dict[str, Any],
    n_train: int,
    as_trained_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`as_trained_metrics`: the adapter on its quantized base; None when the base was not
    quantized, where the merged model is the trained one (merging LoRA is exact up to rounding)."""
    as_trained = as_trained_metrics or model_metrics
    report = {
        "accuracy": model_metrics["accuracy"],
        "macro_f1": model_metrics["macro_f1"],
        "accuracy_as_trained": as_trained["accuracy"],
        "macro_f1_as_trained": as_trained["macro_f1"],
        "merge_gain": model_metrics["accuracy"] - as_trained["accuracy"],
        "roc_auc_macro": model_metrics["roc_auc_macro"],
        "baseline_accuracy": baseline_metrics["accuracy"],
        "baseline_macro_f1": baseline_metrics["macro_f1"],
        "gain_over_baseline": model_metrics["accuracy"] - baseline_metrics["accuracy"],
        "n_test": sum(c["support"] for c in model_metrics["per_class"].values()),
        "n_train": n_train,
        "per_class": model_metrics["per_class"],
    }
    return _rounded(report)


def logits_table(test_df: pl.DataFrame, logits: np.ndarray) -> pl.DataFrame:
    """Each test row's id and its logits, in the test table's order."""
    return pl.DataFrame({"id": test_df["id"], "logits": logits})


def confusion_rows(
    labels: list[int], preds: np.ndarray, label_names: tuple[str, ...]
) -> pl.DataFrame:
    """One row per test example, as DVC's `confusion` template counts them."""
    names = pl.Series(label_names)
    return pl.DataFrame({"actual": names.gather(labels), "predicted": names.gather(preds.tolist())})


def roc_curves(labels: list[int], probs: np.ndarray, label_names: tuple[str, ...]) -> pl.DataFrame:
    """One-vs-rest ROC curve per class, rows tagged with the class name (a class absent from the
    test rows, or the only one present, has no curve)."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels)
    curves = []
    for c, name in enumerate(label_names):
        if not 0 < (y == c).sum() < len(y):
            continue
        fpr, tpr, _ = roc_curve(y == c, probs[:, c])
        curves.append(pl.DataFrame({"class": name, "fpr": fpr.round(6), "tpr": tpr.round(6)}))
    return (
        pl.concat(curves)
        if curves
        else pl.DataFrame(schema={"class": pl.String, "fpr": pl.Float64, "tpr": pl.Float64})
    )


def error_rows(
    test_df: pl.DataFrame, probs: np.ndarray, label_names: tuple[str, ...]
) -> pl.DataFrame:
    """Misclassified rows with true and predicted labels and the model's confidence."""
    preds = probs.argmax(axis=1)
    labels = test_df["label"].to_numpy()
    names = pl.Series(label_names)
    return (
        test_df.select("id", "text")
        .with_columns(
            label=names.gather(labels.tolist()),
            predicted=names.gather(preds.tolist()),
            confidence=pl.Series(probs.max(axis=1).round(6)),
            p_label=pl.Series(probs[np.arange(len(labels)), labels].round(6)),
        )
        .filter(pl.Series(preds != labels))
        .sort(["confidence", "id"], descending=[True, False])
        .select("id", "label", "predicted", "confidence", "p_label", "text")
    )


def held_out_labels(val_rows: pl.DataFrame) -> np.ndarray:
    """The labels the held-out rows are scored against, as train's validation scores them
    (`processed.scored_labels`: a person's label, else the label as ingested)."""
    return val_rows.select(scored_labels(val_rows))[:, 0].to_numpy().astype(np.int64)


@dataclass(frozen=True)
class Calibrated:
    """Temperature scaling fitted on held-out train rows, and what it does on the test split."""

    summary: dict[str, Any]  # metrics.json's `calibration` and `selective` figures
    record: dict[str, Any]  # reports/calibration.json: the temperature export ships, and more
    reliability: pl.DataFrame  # reliability diagram, before and after
    risk_coverage: pl.DataFrame  # accuracy of the answered texts against the share answered
    probs: np.ndarray  # calibrated test probabilities


def calibrate(
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    held_out_logits: np.ndarray,
    held_out_labels: np.ndarray,
) -> Calibrated:
    """Fit the temperature on the held-out rows (never the test split), then measure ECE, Brier
    score and log loss on the test rows before and after, the reliability diagram, and the
    risk-coverage curve of the calibrated scores with the share answerable at each
    COVERAGE_TARGETS accuracy. The held-out rows are train's validation slice, which
    `train.val_fraction` (> 0) always makes."""
    if len(held_out_labels) == 0:
        raise StageError("calibration: no held-out train rows to fit the temperature on")
    temperature = calibration.fit_temperature(held_out_logits, held_out_labels)
    before = calibration.softmax(test_logits)
    after = calibration.softmax(test_logits, temperature)
    scored = {
        name: calibration.scores(p, test_labels)
        for name, p in (("before", before), ("after", after))
    }
    curve = calibration.risk_coverage(after, test_labels)
    selective: dict[str, Any] = {}
    for target in COVERAGE_TARGETS:
        coverage, threshold = calibration.coverage_at_accuracy(curve, target)
        percent = round(target * 100)
        selective[f"coverage_at_{percent}_accuracy"] = coverage
        selective[f"min_confidence_at_{percent}_accuracy"] = threshold
    summary = {
        "calibration": {
            "temperature": temperature,
            "held_out_rows": int(len(held_out_labels)),
            "ece_bins": calibration.ECE_BINS,
        }
        | {
            f"{measure}_{name}": value for name, s in scored.items() for measure, value in s.items()
        },
        "selective": selective,
    }
    reliability = pl.DataFrame(
        [
            {"scores": name} | row
            for name, p in (("uncalibrated", before), ("calibrated", after))
            for row in calibration.reliability_bins(p, test_labels)
            if row["rows"]
        ]
        # The diagonal a calibrated model lies on, as its own series.
        + [
            {
                "scores": "perfect",
                "bin_low": x,
                "bin_high": x,
                "rows": 0,
                "confidence": x,
                "accuracy": x,
            }
            for x in (0.0, 1.0)
        ]
    ).with_columns(pl.col("bin_low", "bin_high", "confidence", "accuracy").round(6))
    record = {
        "temperature": round(temperature, 6),
        "fitted": True,  # newsclf_onnx.json's flag: folders exported before calibration lack it
        "held_out_rows": int(len(held_out_labels)),
        "method": "temperature scaling (NLL on held-out train rows)",
        # The calibrated confidence of the test rows: what `newsclf monitor` compares served
        # texts with (a description of held-out data, never used to choose anything).
        "confidence_reference": calibration.confidence_histogram(after),
    }
    return Calibrated(
        summary=_rounded(summary),
        record=record,
        reliability=reliability,
        risk_coverage=pl.DataFrame(calibration.curve_points(curve)).with_columns(pl.all().round(6)),
        probs=after,
    )


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate` writes: the metrics report and the tables behind its plots."""

    report: dict[str, Any]
    logits: pl.DataFrame  # the shipped model's logits per test row: export's parity reference
    confusion: pl.DataFrame
    roc: pl.DataFrame
    errors: pl.DataFrame
    quantization: str
    calibrated: Calibrated


def run(
    test_df: pl.DataFrame,
    train_rows: pl.DataFrame,
    train_params: TrainParams,
    label_names: tuple[str, ...],
    batch_size: int,
    adapter_dir: Path = paths.ADAPTER,
    *,
    val_rows: pl.DataFrame,
) -> Evaluation:
    """Score the adapter in `adapter_dir` (merged, and as trained for a quantized base) and the
    baseline trained on `train_rows` on the rows of `test_df`; calibrate the merged model's
    scores on `val_rows` (train's held-out rows)."""
    labels = test_df["label"].to_list()
    texts = test_df["text"].to_list()
    max_length = train_params.max_length

    logits, val_logits = merged_logits_of(
        adapter_dir,
        train_params.base_model,
        label_names,
        [texts, val_rows["text"].to_list()],
        max_length,
        batch_size,
    )
    probs = probabilities(logits)
    model_metrics = compute_metrics(probs, labels, label_names)
    calibrated = calibrate(logits, np.asarray(labels), val_logits, held_out_labels(val_rows))

    quantization, as_trained = as_trained_proba(
        adapter_dir, train_params, label_names, texts, batch_size
    )
    as_trained_metrics = (
        compute_metrics(as_trained, labels, label_names) if as_trained is not None else None
    )

    log.info("baseline: TF-IDF + logistic regression on the same %d train rows", train_rows.height)
    base_probs = baseline_proba(
        train_rows["text"].to_list(),
        train_rows["label"].to_list(),
        texts,
        train_params.seed,
        len(label_names),
    )
    baseline_metrics = compute_metrics(base_probs, labels, label_names)
    return Evaluation(
        report=metrics_report(
            model_metrics, baseline_metrics, train_rows.height, as_trained_metrics
        )
        | calibrated.summary,
        logits=logits_table(test_df, logits),
        confusion=confusion_rows(labels, probs.argmax(axis=1), label_names),
        roc=roc_curves(labels, probs, label_names),
        # The confidence users are shown: the calibrated one.
        errors=error_rows(test_df, calibrated.probs, label_names),
        quantization=quantization,
        calibrated=calibrated,
    )


def main() -> None:
    params = load_section("evaluate", EvaluateParams)
    train_params = load_section("train", TrainParams)
    label_names = load_labels()
    log.info("labels %s; params %s", list(label_names), params)
    if train_params.torch_threads is not None:
        # One knob for both stages: what is fastest for training is fastest for scoring.
        torch.set_num_threads(train_params.torch_threads)

    test_df = read_processed(paths.TEST, "test", label_names)
    train_df = read_processed(paths.TRAIN, "train", label_names)
    train_rows, val_rows = split_train_val(
        train_df, train_params.val_fraction, train_params.seed, train_params.max_train_samples
    )
    result = run(
        test_df, train_rows, train_params, label_names, params.batch_size, val_rows=val_rows
    )
    report = result.report
    write_json(report, paths.METRICS)
    write_json(result.calibrated.record, paths.CALIBRATION)
    write_csv(result.calibrated.reliability, paths.RELIABILITY)
    write_csv(result.calibrated.risk_coverage, paths.RISK_COVERAGE)
    write_table(result.logits, paths.TEST_LOGITS)
    write_csv(result.confusion, paths.CONFUSION)
    write_csv(result.roc, paths.ROC)
    write_csv(result.errors, paths.ERRORS)
    log.info(
        "accuracy %.4f (as trained, %s base: %.4f), macro-F1 %.4f on %d test rows; "
        "baseline accuracy %.4f; %d errors in %s",
        report["accuracy"],
        result.quantization,
        report["accuracy_as_trained"],
        report["macro_f1"],
        report["n_test"],
        report["baseline_accuracy"],
        result.errors.height,
        paths.ERRORS,
    )
    c, sel = report["calibration"], report["selective"]
    log.info(
        "calibration: temperature %.3f fitted on %d held-out rows; test ECE %.4f -> %.4f, "
        "Brier %.4f -> %.4f, log loss %.4f -> %.4f; answerable at 95%% accuracy: %.1f%% of texts, "
        "at 98%%: %.1f%%",
        c["temperature"],
        c["held_out_rows"],
        c["ece_before"],
        c["ece_after"],
        c["brier_before"],
        c["brier_after"],
        c["log_loss_before"],
        c["log_loss_after"],
        100 * sel["coverage_at_95_accuracy"],
        100 * sel["coverage_at_98_accuracy"],
    )


if __name__ == "__main__":
    run_main(main, "evaluate")
