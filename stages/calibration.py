"""How far a classifier's scores are from probabilities of being right, and the one-parameter fix.

Temperature scaling (Guo et al., 2017): logits divided by one temperature T fitted by maximum
likelihood on held-out rows; the argmax, hence every label and the accuracy, is unchanged. The
measures are the usual ones: expected calibration error over equal-width confidence bins, the
multi-class Brier score and the log loss. Selective classification: the risk-coverage curve
(accuracy of the texts kept when only the most confident are answered) and the share of texts
that can be answered at a given accuracy. Pure numpy/scipy functions; `evaluate` calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 15
# The search range of T: wide enough for any model seen (0.3-3 in practice), bounded so that a
# degenerate held-out set (every row right, with growing margins) cannot run T to 0 or infinity.
T_MIN, T_MAX = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of `logits / temperature`, float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of the true labels under softmax(logits / temperature)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(scaled - top).sum(axis=1))
    return float((log_norm - scaled[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the NLL of `labels` (bounded scalar search on log T)."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("fit_temperature: no rows to fit on")
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=(np.log(T_MIN), np.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(result.x))


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per equal-width bin of top-label confidence (right-closed, the first includes 0): its
    bounds, rows, mean confidence and accuracy (NaN-free: empty bins are listed with 0 rows)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        in_bin = index == b
        n = int(in_bin.sum())
        rows.append(
            {
                "bin_low": float(edges[b]),
                "bin_high": float(edges[b + 1]),
                "rows": n,
                "confidence": float(confidence[in_bin].mean()) if n else 0.0,
                "accuracy": float(correct[in_bin].mean()) if n else 0.0,
            }
        )
    return rows


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """ECE: the row-weighted mean gap |accuracy - mean confidence| over `reliability_bins`."""
    bins = reliability_bins(probs, labels, n_bins)
    total = sum(b["rows"] for b in bins)
    return float(sum(b["rows"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / total)


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over rows of the squared distance to the one-hot label."""
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log probability of the true label (probabilities floored at 1e-15)."""
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-15, None)).mean())


def scores(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, float]:
    labels = np.asarray(labels, dtype=np.int64)
    return {
        "ece": expected_calibration_error(probs, labels, n_bins),
        "brier": brier_score(probs, labels),
        "log_loss": log_loss(probs, labels),
    }


@dataclass(frozen=True)
class RiskCoverage:
    """Texts answered most confident first: after k of them, the share answered (coverage), the
    accuracy of those answered, and the confidence of the k-th."""

    coverage: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray


def risk_coverage(probs: np.ndarray, labels: np.ndarray) -> RiskCoverage:
    """The curve at every distinct confidence threshold: answering the texts whose top score is
    at least a threshold keeps all the texts tied at it (what `--min-confidence` does)."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    kept_correct = np.cumsum(correct[order])
    # Last index of each run of equal confidences: a threshold keeps a whole tie or none of it.
    ends = np.flatnonzero(np.r_[sorted_conf[1:] != sorted_conf[:-1], True])
    kept = ends + 1
    return RiskCoverage(
        coverage=kept / len(confidence),
        accuracy=kept_correct[ends] / kept,
        confidence=sorted_conf[ends],
    )


def coverage_at_accuracy(curve: RiskCoverage, target: float) -> tuple[float, float | None]:
    """The largest coverage whose answered texts are at least `target` accurate, and the
    confidence threshold that gives it (0.0 and None when even the most confident miss it)."""
    meets = np.flatnonzero(curve.accuracy >= target)
    if meets.size == 0:
        return 0.0, None
    best = meets[-1]
    return float(curve.coverage[best]), float(curve.confidence[best])


def curve_points(curve: RiskCoverage, n_points: int = 101) -> list[dict[str, float]]:
    """The curve at `n_points` evenly spaced coverages (the last point at or below each), for a
    plot of a size that does not grow with the test split."""
    targets = np.linspace(curve.coverage[0], 1.0, n_points)
    picks = np.unique(np.searchsorted(curve.coverage, targets, side="right") - 1)
    picks = picks[picks >= 0]
    return [
        {
            "coverage": float(curve.coverage[i]),
            "accuracy": float(curve.accuracy[i]),
            "min_confidence": float(curve.confidence[i]),
        }
        for i in picks
    ]


def confidence_histogram(probs: np.ndarray, n_bins: int = 20) -> dict:
    """Top-label confidence of these rows as a histogram over [0, 1] and its mean: the reference
    `newsclf monitor` compares served texts' confidence with."""
    confidence = probs.max(axis=1)
    counts, edges = np.histogram(confidence, bins=n_bins, range=(0.0, 1.0))
    return {
        "n": int(len(confidence)),
        "mean": round(float(confidence.mean()), 6),
        "histogram": {
            "edges": [round(float(e), 6) for e in edges],
            "counts": [int(c) for c in counts],
        },
    }
