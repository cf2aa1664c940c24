"""Temperature scaling and the calibration / selective-classification measures (stages/calibration.py,
evaluate's `calibrate`), on synthetic logits and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from stages import calibration
from stages.common import StageError
from stages.evaluate import calibrate


def overconfident(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / temperature): the true temperature."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0.0, 2.0, size=(n, 4))
    probs = calibration.softmax(true_logits)
    labels = np.array([rng.choice(4, p=p) for p in probs])
    return true_logits * temperature, labels


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_a_known_temperature_is_recovered_within_5_percent(temperature: float) -> None:
    logits, labels = overconfident(20_000, temperature)
    fitted = calibration.fit_temperature(logits, labels)
    assert fitted == pytest.approx(temperature, rel=0.05)
    before = calibration.expected_calibration_error(calibration.softmax(logits), labels)
    after = calibration.expected_calibration_error(calibration.softmax(logits, fitted), labels)
    assert after < 0.02 < before


def test_ece_brier_and_log_loss_match_a_hand_computed_case() -> None:
    # Confidences 0.9, 0.8 (bin 0.8-0.867) and 0.6, 0.55 (bins 0.533-0.6 and 0.533-0.6).
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])
    # Bins of 15 over [0, 1]: 0.9 -> (0.867, 0.933], 0.8 -> (0.733, 0.8], 0.6 and 0.55 ->
    # (0.533, 0.6]. Gaps: |1 - 0.9| = 0.1, |0 - 0.8| = 0.8, |1 - 0.575| = 0.425 for two rows.
    expected = (0.1 + 0.8 + 2 * 0.425) / 4
    assert calibration.expected_calibration_error(probs, labels) == pytest.approx(expected)
    bins = [b for b in calibration.reliability_bins(probs, labels) if b["rows"]]
    assert [(b["rows"], b["accuracy"]) for b in bins] == [(2, 1.0), (1, 0.0), (1, 1.0)]
    brier = ((0.1**2 * 2) + (0.8**2 * 2) + (0.4**2 * 2) + (0.45**2 * 2)) / 4
    assert calibration.brier_score(probs, labels) == pytest.approx(brier)
    log_loss = -np.log([0.9, 0.2, 0.6, 0.55]).mean()
    assert calibration.log_loss(probs, labels) == pytest.approx(log_loss)


def test_risk_coverage_keeps_ties_together_and_finds_the_coverage_at_an_accuracy() -> None:
    # Confidences 0.9 (right), 0.8 (right), 0.8 (wrong), 0.7 (right), 0.6 (wrong).
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    labels = np.array([0, 0, 0, 0, 0])
    curve = calibration.risk_coverage(probs, labels)
    assert curve.coverage.tolist() == [0.2, 0.6, 0.8, 1.0]  # the tie at 0.8 kept as one step
    assert curve.accuracy.tolist() == pytest.approx([1.0, 2 / 3, 0.75, 0.6])
    assert curve.confidence.tolist() == [0.9, 0.8, 0.7, 0.6]
    assert calibration.coverage_at_accuracy(curve, 0.75) == (0.8, 0.7)
    assert calibration.coverage_at_accuracy(curve, 1.0) == (0.2, 0.9)
    assert calibration.coverage_at_accuracy(curve, 0.6) == (1.0, 0.6)
    points = calibration.curve_points(curve, n_points=5)
    assert [p["coverage"] for p in points] == [0.2, 0.6, 0.8, 1.0]


def test_calibrate_fits_on_held_out_rows_and_keeps_every_label() -> None:
    held_logits, held_labels = overconfident(3_000, 2.0, seed=1)
    test_logits, test_labels = overconfident(3_000, 2.0, seed=2)
    result = calibrate(test_logits, test_labels, held_logits, held_labels)
    c = result.summary["calibration"]
    assert c["temperature"] == pytest.approx(2.0, rel=0.1)
    assert c["held_out_rows"] == 3_000 and result.record["fitted"]
    assert c["ece_after"] < c["ece_before"] and c["log_loss_after"] < c["log_loss_before"]
    assert (result.probs.argmax(1) == test_logits.argmax(1)).all()  # no label changes
    sel = result.summary["selective"]
    assert 0 < sel["coverage_at_98_accuracy"] <= sel["coverage_at_95_accuracy"] <= 1
    coverage, threshold = calibration.coverage_at_accuracy(
        calibration.risk_coverage(result.probs, test_labels), 0.95
    )
    assert sel["coverage_at_95_accuracy"] == round(coverage, 6)
    assert sel["min_confidence_at_95_accuracy"] == round(threshold, 6)
    kept = result.probs.max(1) >= threshold
    assert kept.mean() == pytest.approx(coverage)
    assert (result.probs.argmax(1)[kept] == test_labels[kept]).mean() >= 0.95
    assert set(result.reliability["scores"]) == {"uncalibrated", "calibrated", "perfect"}
    reference = result.record["confidence_reference"]
    assert reference["n"] == 3_000 and sum(reference["histogram"]["counts"]) == 3_000


def test_without_held_out_rows_calibrate_refuses_to_guess() -> None:
    test_logits, test_labels = overconfident(500, 2.0)
    with pytest.raises(StageError, match="no held-out train rows"):
        calibrate(test_logits, test_labels, np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
