"""Stage `report`: one self-contained HTML page of the whole run, `reports/index.html`.

It reads what the other stages wrote (their JSON reports, plot data, the label-issue ranking and the
processed tables) and lays out: the data funnel (rows per stage and why rows left), class balance,
token lengths, the top label suspects, augmentation counts, training curves, the confusion matrix,
per-class metrics, and the ONNX export's size, speed and parity. Charts are PNGs drawn with
matplotlib and embedded as data URIs; the page has no script, stylesheet, font or image from
anywhere else, so it opens offline and can be mailed as one file.

The page is a pure function of its inputs: PNGs carry no timestamp or software metadata, so the
same run gives the same bytes.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import matplotlib

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from stages import paths
from stages.common import (  # noqa: E402
    SPLITS,
    StageError,
    get_logger,
    load_labels,
    read_table,
    require_file,
    run_main,
)
from stages.params import load_section
from stages.sections import ReportParams

JSON_INPUTS = {
    "ingest": paths.INGEST_REPORT,
    "clean": paths.CLEAN_REPORT,
    "tokens": paths.TOKENS_REPORT,
    "label_issues": paths.LABEL_ISSUES_REPORT,
    "augment": paths.AUGMENT_REPORT,
    "metrics": paths.METRICS,
    "export": paths.EXPORT_REPORT,
    "export_speed": paths.EXPORT_SPEED,
}
PROCESSED = {"train": paths.TRAIN, "test": paths.TEST}

log = get_logger("report")

# PNG metadata would otherwise carry matplotlib's version, which is not part of the run.
PNG_METADATA = {"Software": None}
COLORS = {"train": "#4c72b0", "test": "#dd8452", "removed": "#c44e52"}


@dataclass(frozen=True)
class FunnelStep:
    """Rows of each split after one step, and the rows that left there, by reason."""

    step: str
    train: int
    test: int
    left: dict[str, int]


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(require_file(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise StageError(f"{path}: not valid JSON ({err})") from err


def read_csv(path: Path) -> pl.DataFrame:
    return pl.read_csv(require_file(path))


def funnel(reports: dict[str, dict[str, Any]]) -> list[FunnelStep]:
    """Rows per split from the raw files to the rows the model was trained and scored on."""
    ingest, clean, augment = reports["ingest"], reports["clean"], reports["augment"]
    metrics = reports["metrics"]
    raw = dict.fromkeys(SPLITS, 0)
    rejected: dict[str, int] = {}
    for source in ingest["sources"]:
        raw[source["split"]] += source["rows_in"]
        for reason, count in source["rejected_by_reason"].items():
            rejected[reason] = rejected.get(reason, 0) + count
    kept = ingest["kept_per_split"]
    cleaned = clean["per_split"]
    removed = {rule: n for rule, n in clean["removed_by_rule"].items() if n}
    # After label_issues.action and people's decisions over it (`augment.reviews`).
    after_issues = augment["train_rows_kept"]
    dropped = augment["train_rows_in"] - after_issues
    return [
        FunnelStep("raw files", raw["train"], raw["test"], {}),
        FunnelStep("ingest", kept.get("train", 0), kept.get("test", 0), rejected),
        FunnelStep("clean", cleaned["train"]["rows_out"], cleaned["test"]["rows_out"], removed),
        FunnelStep(
            "label_issues",
            after_issues,
            augment["test_rows"],
            {"dropped as label issue or by a reviewer": dropped} if dropped else {},
        ),
        FunnelStep("augment", augment["train_rows_out"], augment["test_rows"], {}),
        FunnelStep(
            "train / evaluate",
            metrics["n_train"],
            metrics["n_test"],
            {
                "validation slice (or beyond max_train_samples)": augment["train_rows_out"]
                - metrics["n_train"]
            },
        ),
    ]


def class_balance(tables: dict[str, pl.DataFrame], label_names: Sequence[str]) -> pl.DataFrame:
    """Rows per class and split of the processed tables (what train and evaluate read)."""
    counts = {
        split: tables[split].group_by("label").len().sort("label")
        for split in SPLITS
        if split in tables
    }
    frame = pl.DataFrame({"label": list(range(len(label_names)))})
    for split, count in counts.items():
        frame = frame.join(count.rename({"len": split}), on="label", how="left")
    return (
        frame.fill_null(0)
        .with_columns(pl.col("label").replace_strict(dict(enumerate(label_names))).alias("class"))
        .select("class", *counts)
    )


def top_suspects(issues: pl.DataFrame, n: int, label_names: Sequence[str]) -> pl.DataFrame:
    """The `n` train rows cleanlab ranks most likely mislabelled, with the suggested class."""
    names = dict(enumerate(label_names))
    return (
        issues.filter(pl.col("is_label_issue"))
        .sort("rank")
        .head(n)
        .select(
            "rank",
            "id",
            pl.col("label").replace_strict(names).alias("given"),
            pl.col("suggested_label").replace_strict(names).alias("suggested"),
            pl.col("suggested_confidence").round(3).alias("confidence"),
            "action",
            "text",
        )
    )


def confusion_matrix(confusion: pl.DataFrame, label_names: Sequence[str]) -> np.ndarray:
    """Counts [true, predicted] from the evaluate stage's `actual,predicted` rows."""
    index = {name: i for i, name in enumerate(label_names)}
    unknown = set(confusion["actual"]) | set(confusion["predicted"])
    unknown -= set(index)
    if unknown:
        raise StageError(f"{paths.CONFUSION}: unknown class names {sorted(unknown)}")
    matrix = np.zeros((len(label_names), len(label_names)), dtype=np.int64)
    for actual, predicted in confusion.select("actual", "predicted").iter_rows():
        matrix[index[actual], index[predicted]] += 1
    return matrix


def read_curves(folder: Path) -> dict[str, pl.DataFrame]:
    """dvclive's step-wise TSVs (`train/loss.tsv`, `eval/accuracy.tsv`, ...) by `train/loss` name."""
    if not folder.is_dir():
        raise StageError(f"{folder}: not found; run the train stage")
    return {
        str(path.relative_to(folder).with_suffix("")): pl.read_csv(path, separator="\t")
        for path in sorted(folder.rglob("*.tsv"))
    }


# ---- charts -------------------------------------------------------------------------------------


def png_data_uri(fig: plt.Figure) -> str:
    """The figure as an embeddable `data:image/png;base64,...` URI; closes the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight", metadata=PNG_METADATA)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def funnel_chart(steps: Sequence[FunnelStep]) -> str:
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(steps) + 1))
    y = np.arange(len(steps))
    for offset, split in ((-0.2, "train"), (0.2, "test")):
        values = [getattr(step, split) for step in steps]
        bars = ax.barh(y + offset, values, height=0.4, color=COLORS[split], label=split)
        ax.bar_label(bars, labels=[f"{v:,}" for v in values], padding=3, fontsize=8)
    ax.set_yticks(y, [step.step for step in steps])
    ax.invert_yaxis()
    ax.set_xlabel("rows after the step")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.margins(x=0.15)
    return png_data_uri(fig)


def class_balance_chart(balance: pl.DataFrame) -> str:
    fig, ax = plt.subplots(figsize=(6, 3))
    splits = [c for c in balance.columns if c != "class"]
    x = np.arange(balance.height)
    width = 0.8 / max(len(splits), 1)
    for i, split in enumerate(splits):
        ax.bar(
            x + (i - (len(splits) - 1) / 2) * width,
            balance[split],
            width,
            label=split,
            color=COLORS.get(split),
        )
    ax.set_xticks(x, balance["class"].to_list())
    ax.set_ylabel("rows")
    ax.legend()
    return png_data_uri(fig)


def token_lengths_chart(lengths: pl.DataFrame) -> str:
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(lengths["n_tokens"].to_list(), lengths["rows"].to_list(), color=COLORS["train"])
    ax.set_xlabel("spaCy tokens per row (bins of 8)")
    ax.set_ylabel("rows")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    return png_data_uri(fig)


def training_chart(curves: dict[str, pl.DataFrame]) -> str:
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(10, 3.2), sharex=True)
    for name, style in (("train/loss", "-"), ("eval/loss", "o-")):
        if name in curves:
            frame = curves[name]
            loss_ax.plot(frame["step"], frame[frame.columns[1]], style, label=name)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.legend()
    lowest = 1.0
    for name in ("eval/accuracy", "eval/macro_f1"):
        if name in curves:
            frame = curves[name]
            score_ax.plot(frame["step"], frame[frame.columns[1]], "o-", label=name)
            lowest = min(lowest, float(frame[frame.columns[1]].min()))
    # A fixed top keeps one epoch's single point from filling the axis with rounding noise.
    score_ax.set_ylim(max(0.0, lowest - 0.05), 1.0)
    score_ax.set_xlabel("step")
    score_ax.set_ylabel("validation score")
    score_ax.legend()
    fig.tight_layout()
    return png_data_uri(fig)


def calibration_chart(reliability: pl.DataFrame, risk_coverage: pl.DataFrame) -> str:
    """Reliability diagram (accuracy against mean confidence per bin, before and after
    temperature scaling, beside the diagonal) and the risk-coverage curve."""
    fig, (rel_ax, cov_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    rel_ax.plot([0, 1], [0, 1], ":", color="grey", label="calibrated would lie here")
    for name, style in (("uncalibrated", "o--"), ("calibrated", "o-")):
        rows = reliability.filter(pl.col("scores") == name)
        rel_ax.plot(rows["confidence"], rows["accuracy"], style, label=name)
    rel_ax.set_xlabel("mean confidence (bin)")
    rel_ax.set_ylabel("accuracy (bin)")
    rel_ax.set_xlim(0, 1)
    rel_ax.set_ylim(0, 1)
    rel_ax.legend(fontsize=8)
    cov_ax.plot(risk_coverage["coverage"], risk_coverage["accuracy"], "-")
    cov_ax.set_xlabel("share of texts answered (most confident first)")
    cov_ax.set_ylabel("accuracy of those answered")
    cov_ax.set_xlim(0, 1)
    fig.tight_layout()
    return png_data_uri(fig)


def confusion_chart(matrix: np.ndarray, label_names: Sequence[str]) -> str:
    # Four classes fit the default size; more classes widen the chart so their names stay legible.
    extra = 0.5 * max(0, len(label_names) - 4)
    fig, ax = plt.subplots(figsize=(4.8 + extra, 4 + extra))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ticks = range(len(label_names))
    ax.set_xticks(ticks, label_names, rotation=30)
    ax.set_yticks(ticks, label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if count > threshold else "black"
        ax.text(j, i, f"{count:,}", ha="center", va="center", color=color, fontsize=9)
    return png_data_uri(fig)


# ---- HTML ---------------------------------------------------------------------------------------

# Autoescaped: every text from the data is HTML-escaped; trailing newlines kept as written.
PAGE = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
).get_template("report.html.j2")


def table_rows(reports: dict[str, dict[str, Any]], steps: Sequence[FunnelStep]) -> dict[str, list]:
    """The rows of the page's tables that are not a table already, from the run's reports."""
    metrics, issues, augment = reports["metrics"], reports["label_issues"], reports["augment"]
    export, speed = reports["export"], reports["export_speed"]
    return {
        "funnel_rows": [
            (s.step, s.train, s.test, "; ".join(f"{r}: {n:,}" for r, n in s.left.items()))
            for s in steps
        ],
        "suspect_classes": [
            (
                name,
                c["rows"],
                c["flagged"],
                ", ".join(f"{k} {v}" for k, v in c["suggested_to"].items()),
            )
            for name, c in issues["per_class"].items()
        ],
        "augment_rows": [
            (op, v["rate"], v["added"], v["skipped"]) for op, v in augment["ops"].items()
        ],
        "class_rows": [
            (name, c["precision"], c["recall"], c["f1"], c["roc_auc"], c["support"])
            for name, c in metrics["per_class"].items()
        ],
        "export_rows": [
            (
                name,
                export["size_mb"][name],
                export["accuracy"][name],
                speed[f"{name}_texts_per_s"],
            )
            for name in export["size_mb"]
        ],
    }


def render_html(
    reports: dict[str, dict[str, Any]],
    steps: Sequence[FunnelStep],
    balance: pl.DataFrame,
    lengths: pl.DataFrame,
    suspects: pl.DataFrame,
    curves: dict[str, pl.DataFrame],
    matrix: np.ndarray,
    label_names: Sequence[str],
    reliability: pl.DataFrame,
    risk_coverage: pl.DataFrame,
) -> str:
    """The whole page, from templates/report.html.j2; every chart inline."""
    charts = {
        "calibration": calibration_chart(reliability, risk_coverage),
        "funnel": funnel_chart(steps),
        "balance": class_balance_chart(balance),
        "tokens": token_lengths_chart(lengths),
        "training": training_chart(curves),
        "confusion": confusion_chart(matrix, label_names),
    }
    return PAGE.render(
        reports=reports,
        labels=list(label_names),
        charts=charts,
        balance=balance,
        suspects=suspects,
        **table_rows(reports, steps),
    )


def main() -> None:
    params = load_section("report", ReportParams)
    label_names = load_labels()
    log.info("labels %s; params %s", list(label_names), params)
    reports = {name: read_json(path) for name, path in JSON_INPUTS.items()}
    tables = {split: read_table(path, columns=["label"]) for split, path in PROCESSED.items()}
    issues = read_table(paths.LABEL_ISSUES)
    page = render_html(
        reports,
        funnel(reports),
        class_balance(tables, label_names),
        read_csv(paths.TOKEN_LENGTHS),
        top_suspects(issues, params.top_suspects, label_names),
        read_curves(paths.TRAIN_CURVES),
        confusion_matrix(read_csv(paths.CONFUSION), label_names),
        label_names,
        read_csv(paths.RELIABILITY),
        read_csv(paths.RISK_COVERAGE),
    )
    paths.REPORT_PAGE.write_text(page, encoding="utf-8")
    log.info("wrote %s (%.0f kB)", paths.REPORT_PAGE, len(page.encode()) / 1024)


if __name__ == "__main__":
    run_main(main, "report")
