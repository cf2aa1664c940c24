"""Every file and folder that passes between stages, named once (as Kedro's catalog names its
datasets). Stages read and write through these names; tests/test_dvc_yaml.py checks each stage's
`deps`, `outs`, `metrics` and `plots` in dvc.yaml against the names its module uses.

Relative to the repository root, where `dvc repro` runs the stages.
"""

from __future__ import annotations

from pathlib import Path

# What every stage depends on: written only once params.yaml is valid throughout.
PARAMS_CHECKED = Path("reports/params_checked.json")

RAW = Path("data/raw")  # what `ingest.sources` point into

INGESTED = Path("data/interim/ingested.parquet")
REJECTED = Path("data/interim/rejected.parquet")
INGEST_REPORT = Path("reports/ingest.json")

CLEAN = Path("data/interim/clean.parquet")
REMOVED = Path("data/interim/removed.parquet")
CLEAN_REPORT = Path("reports/clean.json")

TOKENS = Path("data/interim/tokens.parquet")
TOKENS_REPORT = Path("reports/tokens.json")
TOKEN_LENGTHS = Path("reports/plots/token_lengths.csv")

LABEL_ISSUES = Path("data/interim/label_issues.parquet")
LABEL_ISSUES_REPORT = Path("reports/label_issues.json")
LABEL_ISSUES_MD = Path("reports/label_issues.md")

TRAIN = Path("data/processed/train.parquet")
TEST = Path("data/processed/test.parquet")
AUGMENT_REPORT = Path("reports/augment.json")

ADAPTER = Path("models/adapter")
CHECKPOINTS = Path("models/checkpoints")
TRAIN_LIVE = Path("reports/train")  # dvclive: metrics.json and plots/metrics/
TRAIN_CURVES = TRAIN_LIVE / "plots" / "metrics"
TRAIN_METRICS = TRAIN_LIVE / "metrics.json"  # dvclive's summary: last step's figures
TRAIN_RESOLVED = TRAIN_LIVE / "resolved.yaml"  # what `auto` params became, device, versions
# The kept model on the held-out train rows: what `newsclf sweep` selects by (never the test split).
VALIDATION = TRAIN_LIVE / "validation.json"
VAL_PREDICTIONS = TRAIN_LIVE / "val_predictions.csv"

# The project's Hugging Face `evaluate` metric, loaded by path wherever the caller runs.
METRIC_MODULE = Path(__file__).resolve().parents[1] / "metrics" / "newsclf_metrics"
METRICS = Path("reports/metrics.json")
CONFUSION = Path("reports/plots/confusion.csv")
ROC = Path("reports/plots/roc.csv")
ERRORS = Path("reports/errors.csv")
# Temperature scaling (fitted on held-out train rows): the temperature export ships, and the
# reliability diagram and risk-coverage curve behind metrics.json's calibration figures.
CALIBRATION = Path("reports/calibration.json")
RELIABILITY = Path("reports/plots/reliability.csv")
RISK_COVERAGE = Path("reports/plots/risk_coverage.csv")
# The shipped model's PyTorch logits per test row: export checks its ONNX graphs against them.
TEST_LOGITS = Path("data/evaluated/test_logits.parquet")

ONNX = Path("models/onnx")
EXPORT_REPORT = Path("reports/export.json")
EXPORT_SPEED = Path("reports/export_speed.json")  # timings, apart so export.json is reproducible

REPORT_PAGE = Path("reports/index.html")
