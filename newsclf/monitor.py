"""`newsclf monitor DIR`: have the texts the service was asked drifted from those the model
learned from?

It reads the text log that `newsclf serve --log DIR` writes (newsclf/textlog.py) and compares it
with the model's train texts (`--reference`, data/processed/train.parquet) and with the model's
own confidence on the test split (`calibration.confidence_reference` in the model folder's
newsclf_onnx.json). Five checks, each a statistic against a bound of params.yaml `monitor:`:

1. label shares: total variation distance between the predicted top-label shares and the train
   label shares;
2. confidence: the drop of the mean top-label confidence below the test split's mean;
3. text length: the two-sample Kolmogorov-Smirnov statistic of lengths in characters;
4. vocabulary: the share of word tokens unseen in half of the train texts, above the share that
   the other half of the train texts has (the baseline a same-distribution sample shows);
5. text drift (Evidently's method): the cross-validated ROC AUC of a TF-IDF + logistic
   regression classifier trained to tell logged texts from train texts (0.5: indistinguishable),
   with the words most typical of the logged texts.

Memory stays bounded at any log size: shares, lengths and the confidence histogram are
aggregated by Polars' streaming engine from the columns they need, and only a seeded sample of
`monitor.sample_texts` texts is read for checks 4 and 5. It writes `monitor.json` and
`monitor.html` to `--out`, prints a table, and exits 0 (no check flagged), 1 (drift: some check
flagged) or 2 (a usage or input fault, one line naming the file). Imports no torch or
transformers; Polars, scikit-learn and Jinja2 only when run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from newsclf.textlog import LABELS_KEY, log_files

REFERENCE_OP = "original"  # train rows that are not augmented copies (column `op`, when present)
WORD = r"\p{L}+"  # a word token: a run of letters in any script (numbers are left out)
TOP_WORDS = 10  # unseen and characteristic words reported
TYPICAL_TEXTS = 5  # logged texts the domain classifier finds most unlike the train texts
CV_FOLDS = 5
DIGITS = 6  # floats in monitor.json: stable across runs and machines
EXIT_CLEAN, EXIT_DRIFT, EXIT_FAULT = 0, 1, 2
TEMPLATE = "monitor.html.j2"


class MonitorError(Exception):
    """A usage or input fault (no log, no model metadata, labels that do not match): one line
    naming the file, exit status 2."""


@dataclass(frozen=True)
class Check:
    """One check: its statistic against its bound, and why it is flagged, in words."""

    name: str
    statistic: str
    value: float
    threshold: float
    flagged: bool
    reason: str | None
    details: dict[str, Any]


@dataclass(frozen=True)
class Histogram:
    """Counts over bins given by `edges` (len(edges) == len(counts) + 1), numpy.histogram's
    convention: [a, b) bins, the last one closed."""

    edges: list[float]
    counts: list[int]

    def shares(self) -> list[float]:
        total = sum(self.counts)
        return [c / total for c in self.counts]


@dataclass(frozen=True)
class LoggedTexts:
    """What the log holds after the filters: aggregates over every row, and a seeded sample of
    texts for the text checks."""

    files: list[Path]
    labels: list[str]
    rows_in_files: int
    rows: int
    first_time: str | None
    last_time: str | None
    models: dict[str, int]  # model_sha256 -> rows
    label_counts: dict[str, int]  # top_label -> rows
    abstained: int
    truncated: int
    confidence_mean: float
    confidence: Histogram
    lengths: dict[int, int]  # length in characters -> rows
    sample: list[str]


@dataclass(frozen=True)
class Reference:
    """The model's train texts and labels (genuine rows only)."""

    path: Path
    texts: list[str]
    label_counts: dict[str, int]


def rounded(value: Any) -> Any:
    """Floats rounded to DIGITS everywhere in a JSON-able value."""
    if isinstance(value, float):
        return round(value, DIGITS)
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(item) for item in value]
    return value


# --- inputs ----------------------------------------------------------------------------------


def load_params(params_file: Path):
    """params.yaml's `monitor:` section and `labels`, a MonitorError naming the fault."""
    import yaml

    from stages.common import StageError, load_labels
    from stages.params import load_section
    from stages.sections import MonitorParams

    try:
        return load_section("monitor", MonitorParams, params_file), list(load_labels(params_file))
    except StageError as err:
        raise MonitorError(str(err)) from None
    except yaml.YAMLError as err:  # a params file that is not YAML: name it, one line
        first = " ".join(str(err).split())
        raise MonitorError(f"{params_file}: not valid YAML ({first})") from None


def confidence_reference(model_dir: Path) -> tuple[dict, Histogram, float, int]:
    """The model folder's metadata and its test-split confidence histogram, mean and row count."""
    from newsclf.predict import META_FILE, PredictError, read_meta

    where = model_dir / META_FILE
    try:
        meta = read_meta(model_dir)
    except PredictError as err:
        raise MonitorError(str(err)) from None
    except ValueError as err:
        raise MonitorError(f"{where}: not valid JSON ({err})") from None
    reference = (meta.get("calibration") or {}).get("confidence_reference")
    if reference is None:
        raise MonitorError(
            f"{where}: no calibration.confidence_reference (the model's confidence on the test "
            "split, which export writes since calibration was added): rerun `dvc repro export`"
        )
    try:
        histogram = Histogram(
            [float(e) for e in reference["histogram"]["edges"]],
            [int(c) for c in reference["histogram"]["counts"]],
        )
        mean, n = float(reference["mean"]), int(reference["n"])
    except (KeyError, TypeError, ValueError) as err:
        raise MonitorError(
            f"{where}: calibration.confidence_reference is malformed ({err})"
        ) from None
    if len(histogram.edges) != len(histogram.counts) + 1 or sum(histogram.counts) < 1:
        raise MonitorError(
            f"{where}: calibration.confidence_reference.histogram needs len(edges) == "
            "len(counts) + 1 and some counts"
        )
    return meta, histogram, mean, n


def log_labels(files: Sequence[Path]) -> tuple[list[str], int]:
    """The `labels` metadata the files share, and their rows; a MonitorError naming the file that
    differs (a log written by two models with other classes is never mixed)."""
    import pyarrow.parquet as pq

    labels, first, rows = None, None, 0
    for path in files:
        try:
            footer = pq.read_metadata(path)  # the footer only: schema metadata and row count
            these = json.loads((footer.metadata or {})[LABELS_KEY])
        except KeyError:
            raise MonitorError(
                f"{path}: no `labels` metadata: not written by `newsclf serve --log`"
            ) from None
        except (OSError, ValueError) as err:  # unreadable, deleted meanwhile, or not JSON
            raise MonitorError(f"{path}: not a readable log file ({err})") from None
        rows += footer.num_rows
        if labels is None:
            labels, first = these, path
        elif these != labels:
            raise MonitorError(
                f"{path}: labels {these} differ from {labels} of {first.name}: the log mixes "
                "models with other classes; monitor each model's log folder on its own"
            )
    return labels, rows


def since_time(text: str | None) -> datetime | None:
    """`--since` as an aware UTC datetime (an ISO date or date-time; naive means UTC)."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise MonitorError(
            f"--since {text!r}: expected an ISO date or time, e.g. 2025-01-31T12:00"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def read_log(
    folder: Path,
    edges: Sequence[float],
    sample_texts: int,
    seed: int,
    since: datetime | None = None,
    model_sha256: str | None = None,
) -> LoggedTexts:
    """Aggregate the log's rows (after the filters) with Polars' streaming engine, reading only
    the columns each aggregate needs, then read a seeded sample of `sample_texts` texts."""
    import numpy as np
    import polars as pl

    if not folder.is_dir():
        raise MonitorError(
            f"{folder}: no such log folder (`newsclf serve --log {folder}` writes it)"
        )
    files = log_files(folder)
    if not files:
        raise MonitorError(
            f"{folder}: no scored-*.parquet log files (`newsclf serve --log` writes them)"
        )
    labels, rows_in_files = log_labels(files)
    keep = pl.lit(True)  # (a filter on `text` here would make every query read the texts)
    if since is not None:
        keep &= pl.col("time") >= since
    if model_sha256 is not None:
        keep &= pl.col("model_sha256").str.starts_with(model_sha256.lower())
    rows = pl.scan_parquet(files).filter(keep)
    # Bin index of each confidence: how many inner edges it reaches ([a, b) bins, as numpy's).
    conf_bin = pl.sum_horizontal([(pl.col("confidence") >= e).cast(pl.Int32) for e in edges[1:-1]])
    try:
        # One streaming query each: collect_all would share the scan between them by caching
        # it whole (measured: 360 MB at 1M texts, against 130 MB for the largest query alone).
        totals, per_file, models, shares, conf_bins, lengths = (
            query.collect(engine="streaming")
            for query in (
                rows.select(
                    rows=pl.len(),
                    first=pl.col("time").min(),
                    last=pl.col("time").max(),
                    abstained=pl.col("label").is_null().sum(),
                    truncated=pl.col("truncated").sum(),
                    confidence_mean=pl.col("confidence").mean(),
                ),
                pl.scan_parquet(files, include_file_paths="file")
                .filter(keep)
                .group_by("file")
                .len(),
                rows.group_by("model_sha256").len().sort("model_sha256"),
                rows.group_by("top_label").len().sort("top_label"),
                rows.select(bin=conf_bin).group_by("bin").len().sort("bin"),
                rows.select(length=pl.col("text").str.len_chars())
                .drop_nulls()
                .group_by("length")
                .len(),
            )
        )
        n = totals["rows"][0]
        chosen = np.sort(
            np.random.default_rng(seed).choice(n, size=min(sample_texts, n), replace=False)
        )
        # The sampled rows, read file by file: a row index over the whole scan would hold every
        # text in memory at once (measured: 270 MB at 1M texts), one file's is bounded.
        kept_rows = dict(per_file.iter_rows())
        sample, offset = [], 0
        for path in files:
            count = kept_rows.get(str(path), 0)
            local = chosen[(chosen >= offset) & (chosen < offset + count)] - offset
            offset += count
            if len(local):
                sample += (
                    pl.scan_parquet(path)
                    .filter(keep)
                    .select("text")
                    .with_row_index("row")
                    .filter(pl.col("row").is_in(pl.Series(local, dtype=pl.UInt32).implode()))
                    .collect()["text"]
                    .drop_nulls()
                    .to_list()
                )
    except (pl.exceptions.PolarsError, OSError) as err:
        raise MonitorError(f"{folder}: cannot read the log files ({err})") from None
    counts = [0] * (len(edges) - 1)
    for index, count in conf_bins.iter_rows():
        counts[index] += count
    lengths = lengths.sort("length")
    first, last = totals["first"][0], totals["last"][0]
    return LoggedTexts(
        files=files,
        labels=labels,
        rows_in_files=rows_in_files,
        rows=n,
        first_time=None if first is None else first.isoformat(),
        last_time=None if last is None else last.isoformat(),
        models=dict(models.iter_rows()),
        label_counts=dict(shares.iter_rows()),
        abstained=totals["abstained"][0],
        truncated=totals["truncated"][0] or 0,
        confidence_mean=totals["confidence_mean"][0] or 0.0,
        confidence=Histogram(list(edges), counts),
        lengths=dict(lengths.iter_rows()),
        sample=sample,
    )


def read_reference(path: Path, labels: Sequence[str]) -> Reference:
    """The train texts and their label counts; augmented copies left out (column `op`)."""
    import polars as pl

    if not path.is_file():
        raise MonitorError(
            f"{path}: reference texts not found (`dvc pull` or `dvc repro augment` makes the "
            "train table), or pass --reference FILE"
        )
    try:
        table = pl.scan_parquet(path)
        columns = table.collect_schema().names()
        missing = [c for c in ("text", "label") if c not in columns]
        if missing:
            raise MonitorError(f"{path}: no column(s) {missing} (found {columns})")
        if "op" in columns:
            table = table.filter(pl.col("op") == REFERENCE_OP)
        table = table.select("text", "label").drop_nulls().collect()
    except pl.exceptions.PolarsError as err:
        raise MonitorError(f"{path}: not a readable Parquet table ({err})") from None
    if table.is_empty():
        raise MonitorError(f"{path}: no reference rows")
    bad = table.filter(~pl.col("label").is_between(0, len(labels) - 1))
    if not bad.is_empty():
        raise MonitorError(
            f"{path}: label {bad['label'][0]} is not an id of labels 0-{len(labels) - 1} "
            f"{list(labels)}"
        )
    counts = table.group_by("label").len()
    label_counts = {name: 0 for name in labels}
    for label_id, count in counts.iter_rows():
        label_counts[labels[label_id]] = count
    return Reference(path=path, texts=table["text"].to_list(), label_counts=label_counts)


def model_hashes(model_dir: Path, meta: dict) -> dict[str, str]:
    """SHA-256 -> file name of the folder's ONNX graphs that are there (what serve logs)."""
    hashes = {}
    for name in sorted(set((meta.get("models") or {}).values())):
        path = model_dir / name
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
            hashes[digest.hexdigest()] = name
    return hashes


# --- the checks ------------------------------------------------------------------------------


def label_shares_check(logged: LoggedTexts, reference: Reference, bound: float) -> Check:
    labels = list(reference.label_counts)
    ref_total, cur_total = sum(reference.label_counts.values()), logged.rows
    rows = [
        {
            "label": label,
            "reference": reference.label_counts[label] / ref_total,
            "logged": logged.label_counts.get(label, 0) / cur_total,
        }
        for label in labels
    ]
    tvd = 0.5 * sum(abs(r["logged"] - r["reference"]) for r in rows)
    flagged = tvd > bound
    reason = None
    if flagged:
        moved = max(rows, key=lambda r: abs(r["logged"] - r["reference"]))
        reason = (
            f"predicted label shares moved from the train shares (TVD {tvd:.3f} > {bound:g}): "
            f"{moved['label']} is {moved['logged']:.1%} of logged texts, {moved['reference']:.1%} "
            "of train texts"
        )
    return Check(
        "label_shares", "total variation distance", tvd, bound, flagged, reason, {"shares": rows}
    )


def confidence_check(
    logged: LoggedTexts, histogram: Histogram, reference_mean: float, reference_n: int, bound: float
) -> Check:
    drop = reference_mean - logged.confidence_mean
    cur, ref = logged.confidence.shares(), histogram.shares()
    histogram_tvd = 0.5 * sum(abs(c - r) for c, r in zip(cur, ref, strict=True))
    flagged = drop > bound
    reason = None
    if flagged:
        reason = (
            f"mean confidence {logged.confidence_mean:.3f}, {drop:.3f} below the test split's "
            f"{reference_mean:.3f} (> {bound:g}): the model is less sure of these texts"
        )
    bins = [
        {"low": low, "high": high, "reference": r, "logged": c}
        for low, high, r, c in zip(histogram.edges[:-1], histogram.edges[1:], ref, cur, strict=True)
    ]
    details = {
        "logged_mean": logged.confidence_mean,
        "reference_mean": reference_mean,
        "reference_rows": reference_n,
        "histogram_tvd": histogram_tvd,
        "bins": bins,
    }
    return Check("confidence", "drop of mean confidence", drop, bound, flagged, reason, details)


def ks_statistic(a: dict[int, int], b: dict[int, int]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic of two samples given as value -> count."""
    import numpy as np

    support = np.array(sorted(set(a) | set(b)))

    def cdf(counts: dict[int, int]) -> np.ndarray:
        on_support = np.array([counts.get(int(v), 0) for v in support], dtype=np.float64)
        return np.cumsum(on_support) / on_support.sum()

    return float(np.abs(cdf(a) - cdf(b)).max())


def quantiles(counts: dict[int, int], qs: Sequence[float]) -> list[int]:
    """Quantiles (lower) of a sample given as value -> count."""
    import numpy as np

    values = np.array(sorted(counts))
    cumulative = np.cumsum([counts[v] for v in values])
    total = cumulative[-1]
    return [int(values[np.searchsorted(cumulative, q * total)]) for q in qs]


def length_check(logged: LoggedTexts, reference: Reference, bound: float) -> Check:
    ref_lengths: dict[int, int] = {}
    for text in reference.texts:
        ref_lengths[len(text)] = ref_lengths.get(len(text), 0) + 1
    ks = ks_statistic(logged.lengths, ref_lengths)
    qs = (0.05, 0.5, 0.95)
    cur_q, ref_q = quantiles(logged.lengths, qs), quantiles(ref_lengths, qs)
    truncated_share = logged.truncated / logged.rows
    flagged = ks > bound
    reason = None
    if flagged:
        reason = (
            f"text lengths differ from the train texts' (KS {ks:.3f} > {bound:g}): median "
            f"{cur_q[1]} characters, {ref_q[1]} in train"
        )
        if truncated_share:
            reason += f"; {truncated_share:.1%} of logged texts were cut to the model's max length"
    details = {
        "quantiles": [
            {"quantile": q, "logged": c, "reference": r}
            for q, c, r in zip(qs, cur_q, ref_q, strict=True)
        ],
        "truncated_share": truncated_share,
    }
    return Check("text_length", "Kolmogorov-Smirnov statistic", ks, bound, flagged, reason, details)


def word_tokens(texts: Sequence[str]):
    """Lowercase word tokens (runs of letters) of the texts, one Series."""
    import polars as pl

    return (
        pl.Series("word", texts, dtype=pl.String)
        .str.to_lowercase()
        .str.extract_all(WORD)
        .explode()
        .drop_nulls()
    )


def vocabulary_check(logged: LoggedTexts, reference: Reference, bound: float, seed: int) -> Check:
    """Unseen-word share of the logged sample, against that of held-out train texts: both
    measured on the vocabulary of the same (seeded) half of the train texts."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(reference.texts))
    half = len(order) // 2
    vocabulary = word_tokens([reference.texts[i] for i in order[:half]]).unique()
    held_out = word_tokens([reference.texts[i] for i in order[half:]])
    current = word_tokens(logged.sample)
    baseline = float((~held_out.is_in(vocabulary.implode())).mean()) if len(held_out) else 0.0
    unseen = current.filter(~current.is_in(vocabulary.implode()))
    share = len(unseen) / len(current) if len(current) else 1.0  # no words at all: nothing known
    increase = share - baseline
    # Ties broken by the word: value_counts' own order is not fixed, and the report must be.
    counts = unseen.value_counts(name="count").sort(["count", "word"], descending=[True, False])
    common = counts.head(TOP_WORDS)
    top = [{"word": w, "count": c} for w, c in common.iter_rows()]
    flagged = increase > bound
    reason = None
    if flagged:
        words = ", ".join(t["word"] for t in top[:5])
        reason = (
            f"{share:.1%} of logged words are unseen in train, {baseline:.1%} of held-out train "
            f"words (+{increase:.3f} > {bound:g}): another language or vocabulary; "
            f"commonest: {words}"
        )
    details = {
        "logged_share": share,
        "baseline_share": baseline,
        "logged_words": len(current),
        "baseline_words": len(held_out),
        "vocabulary_words": len(vocabulary),
        "commonest_unseen": top,
    }
    return Check(
        "vocabulary", "increase of unseen-word share", increase, bound, flagged, reason, details
    )


def domain_check(
    logged: LoggedTexts, reference: Reference, bound: float, sample_texts: int, seed: int
) -> Check:
    """Evidently's text drift: a TF-IDF + logistic regression classifier trained to tell logged
    from train texts on balanced, seeded samples; its out-of-fold ROC AUC (0.5: alike)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    rng = np.random.default_rng(seed)
    per_side = min(sample_texts, len(reference.texts), len(logged.sample))
    ref_texts = [
        reference.texts[i]
        for i in np.sort(rng.choice(len(reference.texts), per_side, replace=False))
    ]
    cur_texts = [
        logged.sample[i] for i in np.sort(rng.choice(len(logged.sample), per_side, replace=False))
    ]
    texts = ref_texts + cur_texts
    is_logged = np.r_[np.zeros(per_side, dtype=int), np.ones(per_side, dtype=int)]

    def classifier():
        # liblinear: fast on a few thousand sparse rows; seeded, as it may shuffle them
        return make_pipeline(
            TfidfVectorizer(sublinear_tf=True, min_df=2),
            LogisticRegression(solver="liblinear", random_state=seed),
        )

    folds = StratifiedKFold(CV_FOLDS, shuffle=True, random_state=seed)
    scores = cross_val_predict(classifier(), texts, is_logged, cv=folds, method="decision_function")
    auc = float(roc_auc_score(is_logged, scores))
    # The words typical of the logged texts: the largest weights of a classifier fitted on all.
    fitted = classifier().fit(texts, is_logged)
    names, weights = fitted[0].get_feature_names_out(), fitted[-1].coef_[0]
    words = [
        {"word": str(names[i]), "weight": float(weights[i])}
        for i in np.lexsort((names, -weights))[:TOP_WORDS]
        if weights[i] > 0
    ]
    typical = np.argsort(-scores[per_side:], kind="stable")[:TYPICAL_TEXTS]
    flagged = auc > bound
    reason = None
    if flagged:
        shown = ", ".join(w["word"] for w in words[:5]) or "none (no shared words)"
        reason = (
            f"a classifier tells logged texts from train texts (ROC AUC {auc:.3f} > {bound:g}); "
            f"words typical of logged texts: {shown}"
        )
    details = {
        "texts_per_side": per_side,
        "folds": CV_FOLDS,
        "characteristic_words": words,
        "typical_texts": [cur_texts[i] for i in typical],
    }
    return Check("text_drift", "domain classifier ROC AUC", auc, bound, flagged, reason, details)


# --- the command -----------------------------------------------------------------------------


def monitor(
    log_dir: Path,
    model_dir: Path,
    reference_path: Path,
    params_file: Path,
    since: str | None = None,
    model_sha256: str | None = None,
) -> dict[str, Any]:
    """Every check on the log; the report as a JSON-able dict (its `flagged` says if any was)."""
    params, param_labels = load_params(params_file)
    meta, histogram, reference_mean, reference_n = confidence_reference(model_dir)
    model_labels = list(meta.get("labels") or [])
    if model_labels != param_labels:
        raise MonitorError(
            f"{model_dir}: the model's labels {model_labels} differ from {params_file}'s "
            f"{param_labels}: the reference's label ids would name other classes"
        )
    logged = read_log(
        log_dir, histogram.edges, params.sample_texts, params.seed, since_time(since), model_sha256
    )
    if logged.labels != model_labels:
        raise MonitorError(
            f"{logged.files[0]}: the log's labels {logged.labels} differ from {model_dir}'s "
            f"{model_labels}: it was written by another model; pass that model's --model"
        )
    filters = " after --since/--model-sha256" if since or model_sha256 else ""
    if logged.rows < params.min_texts:
        raise MonitorError(
            f"{log_dir}: {logged.rows} logged texts{filters}, fewer than monitor.min_texts="
            f"{params.min_texts} in {params_file}: too few to judge drift"
        )
    reference = read_reference(reference_path, model_labels)
    checks = [
        label_shares_check(logged, reference, params.max_label_tvd),
        confidence_check(
            logged, histogram, reference_mean, reference_n, params.max_confidence_drop
        ),
        length_check(logged, reference, params.max_length_ks),
        vocabulary_check(logged, reference, params.max_oov_increase, params.seed),
        domain_check(logged, reference, params.max_domain_auc, params.sample_texts, params.seed),
    ]
    notes = []
    known = model_hashes(model_dir, meta)
    others = {sha: n for sha, n in logged.models.items() if sha not in known}
    if known and others:
        notes.append(
            f"{sum(others.values()):,} of {logged.rows:,} logged texts were scored by a model file "
            f"other than {model_dir}'s ({', '.join(s[:12] for s in others)}): same labels, another "
            "model's predictions; select one model with --model-sha256"
        )
    elif len(logged.models) > 1:
        notes.append(
            f"the log holds texts scored by {len(logged.models)} model files: select one with "
            "--model-sha256"
        )
    report = {
        "flagged": any(c.flagged for c in checks),
        "flagged_checks": [c.name for c in checks if c.flagged],
        "log": {
            "folder": str(log_dir),
            "files": len(logged.files),
            "rows_in_files": logged.rows_in_files,
            "rows": logged.rows,
            "since": since,
            "model_sha256_filter": model_sha256,
            "first_time": logged.first_time,
            "last_time": logged.last_time,
            "models": logged.models,
            "abstained_share": logged.abstained / logged.rows,
            "sampled_texts": len(logged.sample),
        },
        "reference": {
            "texts": str(reference_path),
            "rows": len(reference.texts),
            "model": str(model_dir),
            "confidence_rows": reference_n,
        },
        "labels": model_labels,
        "params": asdict(params),
        "checks": [asdict(c) for c in checks],
        "notes": notes,
    }
    return rounded(report)


def render_html(report: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(
            Path(__file__).resolve().parents[1] / "stages" / "templates"
        ),
        autoescape=True,  # logged texts are user input: never reach the page unescaped
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    checks = {check["name"]: check for check in report["checks"]}
    return env.get_template(TEMPLATE).render(report=report, checks=checks)


def table(report: dict[str, Any]) -> str:
    """The checks as a plain-text table for stdout."""
    lines = [f"{'check':<14} {'statistic':<32} {'value':>8} {'bound':>7}  result"]
    for c in report["checks"]:
        result = "FLAGGED" if c["flagged"] else "ok"
        lines.append(
            f"{c['name']:<14} {c['statistic']:<32} {c['value']:>8.3f} {c['threshold']:>7.3g}  "
            + result
        )
    for c in report["checks"]:
        if c["flagged"]:
            lines.append(f"{c['name']}: {c['reason']}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "monitor.json", out_dir / "monitor.html"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path


def run_command(args: argparse.Namespace) -> int:
    """`newsclf monitor`: 0 clean, 1 drift, 2 a fault (one line on stderr)."""
    try:
        report = monitor(
            args.log_dir, args.model, args.reference, args.params, args.since, args.model_sha256
        )
        json_path, html_path = write_report(report, args.out)
    except MonitorError as err:
        print(f"newsclf: error: {err}", file=sys.stderr)
        return EXIT_FAULT
    log = report["log"]
    print(
        f"{log['rows']:,} logged texts ({log['first_time']} to {log['last_time']}) against "
        f"{report['reference']['rows']:,} train texts"
    )
    print(table(report))
    for note in report["notes"]:
        print(f"note: {note}")
    verdict = f"drift: {', '.join(report['flagged_checks'])}" if report["flagged"] else "no drift"
    print(f"{verdict} ({json_path}, {html_path})")
    return EXIT_DRIFT if report["flagged"] else EXIT_CLEAN
