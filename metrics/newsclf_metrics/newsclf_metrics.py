"""newsclf_metrics: accuracy, macro-F1, per-class precision/recall/F1 and one-vs-rest ROC AUC.

A Hugging Face `evaluate` metric kept in the repository, because hub metric scripts cannot be
fetched here (no network). Load it by local path:

    import evaluate
    metric = evaluate.load("metrics/newsclf_metrics")
    metric.compute(predictions=[0, 1], references=[0, 0], prediction_scores=[[.9, .1], [.4, .6]])

`prediction_scores` holds one row of class probabilities (or any scores) per example; its width is
the number of classes. `predictions` are usually its argmax, but any decision rule may be scored.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

_DESCRIPTION = """Multi-class classification report: accuracy, macro-F1, per-class precision, recall,
F1 and support, and one-vs-rest ROC AUC per class with its macro average."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class per example.
    references (list of int): true class per example, in 0..n_classes-1.
    prediction_scores (list of list of float): per-example scores, one column per class.
    label_names (list of str, optional): names for the per-class keys; default "0", "1", ...
Returns:
    accuracy, macro_f1, macro_precision, macro_recall, roc_auc_macro (mean of the per-class AUCs
    that are defined), and per_class: {name: {precision, recall, f1, support, roc_auc}}, where
    roc_auc is None for a class that is absent from, or the only class in, the references.
Example:
    >>> metric = evaluate.load("metrics/newsclf_metrics")
    >>> r = metric.compute(predictions=[0, 1], references=[0, 1],
    ...                    prediction_scores=[[0.8, 0.2], [0.3, 0.7]])
    >>> r["accuracy"], r["roc_auc_macro"]
    (1.0, 1.0)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NewsclfMetrics(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "prediction_scores": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(
        self,
        predictions: list[int],
        references: list[int],
        prediction_scores: list[list[float]],
        label_names: list[str] | None = None,
    ) -> dict:
        y_pred = np.asarray(predictions)
        y_true = np.asarray(references)
        scores = np.asarray(prediction_scores, dtype=np.float64)
        if scores.ndim != 2 or scores.shape[0] != len(y_true):
            raise ValueError(
                f"prediction_scores must be one row per example ({len(y_true)} rows), "
                f"got shape {scores.shape}"
            )
        n_classes = scores.shape[1]
        classes = list(range(n_classes))
        names = list(label_names) if label_names is not None else [str(c) for c in classes]
        if len(names) != n_classes:
            raise ValueError(f"{len(names)} label_names for {n_classes} score columns")
        for what, arr in (("references", y_true), ("predictions", y_pred)):
            if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
                raise ValueError(f"{what} must lie in 0..{n_classes - 1}")
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=classes, zero_division=0
        )
        per_class: dict[str, dict] = {}
        aucs = []
        for c, name in enumerate(names):
            positives = y_true == c
            # One-vs-rest AUC is undefined when the class is absent or is every example.
            auc = None
            if 0 < positives.sum() < len(y_true):
                auc = float(roc_auc_score(positives, scores[:, c]))
                aucs.append(auc)
            per_class[name] = {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
                "roc_auc": auc,
            }
        return {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(np.mean(f1)),
            "macro_precision": float(np.mean(precision)),
            "macro_recall": float(np.mean(recall)),
            "roc_auc_macro": float(np.mean(aucs)) if aucs else None,
            "per_class": per_class,
        }
