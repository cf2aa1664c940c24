"""Stage `label_issues`: find train rows whose label looks wrong, with cleanlab, and act on them.

Every train row gets out-of-fold predicted probabilities from an ensemble of fast models that never
saw it (K-fold cross-validation); cleanlab compares them with the given label. Test rows are never
read into the model, scored or changed: the stage's table holds train rows only.

Why an ensemble: cleanlab is only as good as the probabilities it gets. On this data TF-IDF +
logistic regression alone (the anchor) reaches precision 0.60 at recall 0.86 on 10% injected flips;
averaging it with two views of frozen MiniLM sentence embeddings (logistic regression, and a
similarity-weighted k-nearest-neighbour vote) ranks the flips markedly better (docs/label_issues_augment.md).
"""

from __future__ import annotations

import numpy as np
import polars as pl
from cleanlab.count import compute_confident_joint, estimate_latent
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from tqdm import tqdm

from stages import paths
from stages.common import (
    StageError,
    check_contract,
    get_logger,
    load_labels,
    read_table,
    run_main,
    write_json,
    write_table,
)
from stages.modeling import resolve_base_model, resolve_precision
from stages.params import load_section
from stages.sections import LabelIssuesParams

# Model settings picked on the bench (10% injected flips) and kept out of params on purpose: they
# are properties of the detector, not choices a user is expected to tune per run.
TFIDF_C = 4.0  # sparse word features need weaker regularisation than sklearn's default C=1
EMBEDDING_C = 1.0
KNN_K = 25
KNN_TEMPERATURE = 0.1  # cosine similarities of MiniLM embeddings are close together: sharpen them
KNN_PRIOR = 0.01  # pseudo-count per class (the nearest neighbour weighs 1): no probability is 0
# Memory for one chunk of k-NN similarities: bounds the stage's RSS at 120k rows and beyond, and is
# above what a fold of the real data (1.2k x 4.7k) needs, so it is scored in one chunk as before.
KNN_CHUNK_BYTES = 512 * 2**20
EMBED_MAX_LENGTH = 128  # word pieces; AG News title + description fits in this for ~99% of rows
EMBED_BATCH = 64
TOP_SUSPECTS = 30

log = get_logger("label_issues")


def validate_train(labels: np.ndarray, folds: int, label_names: tuple[str, ...]) -> None:
    """Refuse inputs on which K-fold out-of-fold probabilities are undefined, saying why."""
    if len(labels) < folds:
        raise StageError(
            f"{paths.CLEAN}: {len(labels)} train rows is fewer than label_issues.folds={folds}"
        )
    counts = np.bincount(labels, minlength=len(label_names))
    for cls, count in enumerate(counts):
        if count == 0:
            raise StageError(
                f"{paths.CLEAN}: class {cls} ({label_names[cls]}) has no train rows; every class "
                "must be present to estimate label noise"
            )
        if count == 1:
            # A single row is in its own held-out fold, so no fold could learn its class.
            raise StageError(
                f"{paths.CLEAN}: class {cls} ({label_names[cls]}) has a single train row; "
                "out-of-fold probabilities need at least 2 rows per class"
            )


def embed_texts(
    texts: list[str], model_dir: str, batch_size: int = EMBED_BATCH, precision: str = "fp32"
) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings of a frozen BERT-style encoder (float32).

    `precision` bf16 runs the encoder under bf16 autocast (pooling and normalisation stay fp32).
    """
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    # Batches of similar length waste little compute on padding; the order is undone below.
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    mixed = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), batch_size), desc="embed", unit="batch"):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=EMBED_MAX_LENGTH,
                return_tensors="pt",
            )
            with mixed:
                hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out[idx] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out


def _lr_proba(x_train, y_train: np.ndarray, x_test, c: float, n_labels: int) -> np.ndarray:
    """Logistic-regression probabilities over all classes, even one a training fold lacks."""
    model = LogisticRegression(C=c, max_iter=1000).fit(x_train, y_train)
    proba = np.zeros((x_test.shape[0], n_labels))
    proba[:, model.classes_] = model.predict_proba(x_test)
    return proba


def _knn_proba(
    e_train: np.ndarray,
    y_train: np.ndarray,
    e_test: np.ndarray,
    n_labels: int,
    chunk_bytes: int = KNN_CHUNK_BYTES,
) -> np.ndarray:
    """Similarity-weighted vote of the K nearest training rows (cosine on normalised embeddings).

    The test rows are scored in chunks whose similarity matrix (and its float and index
    partitions) stays within about `chunk_bytes`: a full fold at 120k rows would need 24k x 96k
    similarities plus their int64 ranks, ~28 GB. Each row's vote depends on its own row only, so
    the chunking changes a value only by float32 rounding: the BLAS may sum a row's products in
    another order for another number of rows (2e-6 seen on an AMD EPYC between chunks of 7 and 97).
    """
    k = min(KNN_K, len(y_train))
    votes = np.full((len(e_test), n_labels), KNN_PRIOR)
    # Per test row: float32 similarities + int64 argpartition + float32 copy of the top K.
    rows_per_chunk = max(1, chunk_bytes // (len(e_train) * 16))
    for start in range(0, len(e_test), rows_per_chunk):
        stop = start + rows_per_chunk
        sims = e_test[start:stop] @ e_train.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(sims, top, axis=1)
        del sims
        # Weights relative to each row's nearest neighbour, so the prior means the same for every row.
        weights = np.exp((top_sims - top_sims.max(axis=1, keepdims=True)) / KNN_TEMPERATURE)
        top_labels = y_train[top]
        for cls in range(n_labels):
            votes[start:stop, cls] += (weights * (top_labels == cls)).sum(axis=1)
    return votes / votes.sum(axis=1, keepdims=True)


def out_of_fold_probs(
    texts: list[str],
    labels: np.ndarray,
    embeddings: np.ndarray | None,
    models: list[str],
    folds: int,
    seed: int,
    label_names: tuple[str, ...],
) -> np.ndarray:
    """Average of each model's out-of-fold class probabilities: no row is scored by a model that
    was trained on it."""
    by_model = out_of_fold_probs_by_model(
        texts, labels, embeddings, models, folds, seed, label_names
    )
    return np.mean([by_model[m] for m in models], axis=0)


def out_of_fold_probs_by_model(
    texts: list[str],
    labels: np.ndarray,
    embeddings: np.ndarray | None,
    models: list[str],
    folds: int,
    seed: int,
    label_names: tuple[str, ...],
) -> dict[str, np.ndarray]:
    """Each model's out-of-fold class probabilities (one row per text, one column per class)."""
    validate_train(labels, folds, label_names)
    n_labels = len(label_names)
    if any(m.startswith("embedding") for m in models) and embeddings is None:
        raise StageError("label_issues: an embedding model is selected but no embeddings given")
    # The vocabulary is fitted on all train texts without labels, which leaks nothing about them.
    x_words = (
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2).fit_transform(texts)
        if "tfidf_lr" in models
        else None
    )
    probs = {m: np.zeros((len(labels), n_labels)) for m in models}
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # StratifiedKFold warns when a class has fewer rows than folds; it still works (validated).
    split = list(splitter.split(np.zeros(len(labels)), labels))
    for train_idx, test_idx in tqdm(split, desc="folds", unit="fold"):
        y_train = labels[train_idx]
        if x_words is not None:
            probs["tfidf_lr"][test_idx] = _lr_proba(
                x_words[train_idx], y_train, x_words[test_idx], TFIDF_C, n_labels
            )
        if "embedding_lr" in models:
            probs["embedding_lr"][test_idx] = _lr_proba(
                embeddings[train_idx], y_train, embeddings[test_idx], EMBEDDING_C, n_labels
            )
        if "embedding_knn" in models:
            probs["embedding_knn"][test_idx] = _knn_proba(
                embeddings[train_idx], y_train, embeddings[test_idx], n_labels
            )
    return probs


def score_issues(
    train: pl.DataFrame,
    probs: np.ndarray,
    filter_by: str,
    action: str,
    relabel_min_confidence: float,
) -> pl.DataFrame:
    """One row per scored train row: cleanlab's verdict, its rank, and the action taken on it.

    `action`: `flag` keeps every row (issues are only marked), `drop` removes the issues
    downstream, `relabel` gives an issue cleanlab's suggested label when the ensemble's probability
    for it is at least `relabel_min_confidence` and otherwise only flags it.
    """
    labels = train["label"].to_numpy()
    is_issue = find_label_issues(labels, probs, filter_by=filter_by)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    suggested = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    if action == "flag":
        taken = np.where(is_issue, "flagged", "none")
    elif action == "drop":
        taken = np.where(is_issue, "dropped", "none")
    else:
        # An issue whose suggestion equals its label (possible with prune_by_class) is only flagged.
        relabel = is_issue & (confidence >= relabel_min_confidence) & (suggested != labels)
        taken = np.where(relabel, "relabelled", np.where(is_issue, "flagged", "none"))
    table = train.select("id", "text", "label").with_columns(
        suggested_label=pl.Series(suggested, dtype=pl.Int64),
        suggested_confidence=pl.Series(confidence, dtype=pl.Float64),
        label_quality=pl.Series(quality, dtype=pl.Float64),
        is_label_issue=pl.Series(is_issue, dtype=pl.Boolean),
        action=pl.Series(taken, dtype=pl.String),
    )
    # Rank 1 is the most suspect row; ties are broken by id so the ranking is reproducible.
    return (
        table.sort(["label_quality", "id"])
        .with_row_index("rank", offset=1)
        .with_columns(pl.col("rank").cast(pl.Int64))
        .select(
            "id",
            "text",
            "label",
            "suggested_label",
            "suggested_confidence",
            "label_quality",
            "rank",
            "is_label_issue",
            "action",
        )
    )


# Per-class tables of the report (suggested-to counts, noise matrix rows) list every class up to
# this many classes; beyond, each row keeps its REPORT_TOP_N largest non-zero entries, so that the
# report grows linearly with the classes (500 classes: 12 MB as a full table, tracked in git).
MAX_DENSE_CLASSES = 10
REPORT_TOP_N = 5


def report_row(values: dict[str, float | int], n_labels: int) -> dict[str, float | int]:
    """A per-class row of the report: whole for a few classes, else its largest non-zero entries
    (ties by label order), kept in label order."""
    if n_labels <= MAX_DENSE_CLASSES:
        return values
    ranked = sorted((name for name, v in values.items() if v), key=lambda n: -values[n])
    kept = set(ranked[:REPORT_TOP_N])
    return {name: v for name, v in values.items() if name in kept}


def noise_matrix(
    labels: np.ndarray, probs: np.ndarray, label_names: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    """cleanlab's estimate of P(given label | true label), as {true: {given: p}} (rows sparse
    beyond MAX_DENSE_CLASSES classes: report_row)."""
    joint = compute_confident_joint(labels, probs)
    _, matrix, _ = estimate_latent(joint, labels)
    return {
        true_name: report_row(
            {
                given_name: round(float(matrix[given, true]), 4)
                for given, given_name in enumerate(label_names)
            },
            len(label_names),
        )
        for true, true_name in enumerate(label_names)
    }


def suggested_to(rows: pl.DataFrame, cls: int, label_names: tuple[str, ...]) -> dict[str, int]:
    """How many of class `cls`'s flagged rows cleanlab suggests each other class for (one pass)."""
    counts = dict(rows.filter("is_label_issue").group_by("suggested_label").len().iter_rows())
    return {name: counts.get(s, 0) for s, name in enumerate(label_names) if s != cls}


def build_report(table: pl.DataFrame, settings: dict, label_names: tuple[str, ...]) -> dict:
    """The numbers of `reports/label_issues.json`: counts overall and per given class."""
    counts = table["action"].value_counts().to_dict(as_series=False)
    by_action = dict(zip(counts["action"], counts["count"], strict=True))
    per_class = {}
    for cls, name in enumerate(label_names):
        rows = table.filter(pl.col("label") == cls)
        per_class[name] = {
            "rows": rows.height,
            "flagged": int(rows["is_label_issue"].sum()),
            "suggested_to": report_row(suggested_to(rows, cls, label_names), len(label_names)),
        }
    return {
        **settings,
        "rows_scored": table.height,
        "flagged": int(table["is_label_issue"].sum()),
        "dropped": by_action.get("dropped", 0),
        "relabelled": by_action.get("relabelled", 0),
        "flagged_fraction": round(float(table["is_label_issue"].mean()), 4),
        "per_class": per_class,
    }


def render_markdown(
    table: pl.DataFrame, report: dict, label_names: tuple[str, ...], top: int = TOP_SUSPECTS
) -> str:
    """The top suspects as a table a person can review, most suspect first."""
    lines = [
        "# Label issues: top suspects",
        "",
        f"{report['rows_scored']} train rows scored, {report['flagged']} flagged "
        f"(filter `{report['filter_by']}`, action `{report['action']}`: "
        f"{report['dropped']} dropped, {report['relabelled']} relabelled). "
        "Quality = the ensemble's out-of-fold probability of the given label.",
        "",
        "| rank | id | given | suggested (p) | quality | flagged | action | text |",
        "|---:|---|---|---|---:|---|---|---|",
    ]
    for row in table.head(top).iter_rows(named=True):
        text = row["text"] if len(row["text"]) <= 160 else row["text"][:157] + "..."
        text = text.replace("|", "\\|")
        lines.append(
            f"| {row['rank']} | {row['id']} | {label_names[row['label']]} | "
            f"{label_names[row['suggested_label']]} ({row['suggested_confidence']:.2f}) | "
            f"{row['label_quality']:.3f} | {'yes' if row['is_label_issue'] else 'no'} | "
            f"{row['action']} | {text} |"
        )
    return "\n".join(lines) + "\n"


def detect(
    clean: pl.DataFrame,
    params: LabelIssuesParams,
    label_names: tuple[str, ...],
    embeddings: np.ndarray | None = None,
) -> tuple[pl.DataFrame, dict]:
    """Score the train rows of `clean`; returns the ranked table and the report.

    `embeddings` (one row per train row, in order) may be passed in by a caller that already has
    them, such as the bench; otherwise they are computed when an embedding model is selected.
    """
    check_contract(clean, paths.CLEAN, label_names)
    train = clean.filter(pl.col("split") == "train")
    labels = train["label"].to_numpy()
    validate_train(labels, params.folds, label_names)
    models = list(params.models)
    texts = train["text"].to_list()
    if embeddings is None and any(m.startswith("embedding") for m in models):
        precision = resolve_precision(params.precision, cuda=False, key="label_issues.precision")
        log.info(
            "embedding %d train texts with %s in %s",
            len(texts),
            params.embedding_model,
            precision,
        )
        embeddings = embed_texts(
            texts, resolve_base_model(params.embedding_model), precision=precision
        )
    by_model = out_of_fold_probs_by_model(
        texts, labels, embeddings, models, params.folds, params.seed, label_names
    )
    probs = np.mean([by_model[m] for m in models], axis=0)
    table = score_issues(
        train,
        probs,
        params.filter_by,
        params.action,
        params.relabel_min_confidence,
    )
    # Each detector's probabilities and their mean, per row: what a reviewer judges by.
    detectors = pl.DataFrame(
        {"id": train["id"]}
        | {f"probs_{m}": by_model[m].round(6).tolist() for m in models}
        | {"oof_probs": probs.round(6).tolist()},
        schema={"id": pl.String}
        | {f"probs_{m}": pl.List(pl.Float64) for m in models}
        | {"oof_probs": pl.List(pl.Float64)},
    )
    table = table.join(detectors, on="id", how="left", maintain_order="left")
    settings = {
        "models": models,
        "folds": params.folds,
        "filter_by": params.filter_by,
        "action": params.action,
        "relabel_min_confidence": params.relabel_min_confidence,
        "oof_accuracy": round(float((probs.argmax(axis=1) == labels).mean()), 4),
    }
    report = build_report(table, settings, label_names)
    report["noise_matrix_given_by_true"] = noise_matrix(labels, probs, label_names)
    return table, report


def main() -> None:
    params = load_section("label_issues", LabelIssuesParams)
    label_names = load_labels()
    log.info("labels %s; params %s", list(label_names), params)
    clean = read_table(paths.CLEAN)
    table, report = detect(clean, params, label_names)
    write_table(table, paths.LABEL_ISSUES)
    write_json(report, paths.LABEL_ISSUES_REPORT)
    paths.LABEL_ISSUES_MD.write_text(render_markdown(table, report, label_names), encoding="utf-8")
    log.info(
        "%d train rows scored, %d flagged, %d dropped, %d relabelled",
        report["rows_scored"],
        report["flagged"],
        report["dropped"],
        report["relabelled"],
    )


if __name__ == "__main__":
    run_main(main, "label_issues")
