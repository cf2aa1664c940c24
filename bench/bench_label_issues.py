"""How well does `label_issues` find wrong labels? `python -m bench.bench_label_issues`.

Injects known label flips into the clean train rows (after `dvc repro tokenize`): 5% and 10%
uniformly at random (each flipped row gets one of the three other classes), and 10% concentrated
on the Business <-> Sci/Tech confusion. Runs the stage's `detect` with the params of params.yaml
(action forced to `flag`) and, as the anchor, TF-IDF (1-2 grams) + logistic regression, 5-fold
out-of-fold probabilities and cleanlab's `find_label_issues` defaults. Reports precision and recall
of the flagged rows against the injected flips, the area under the precision-recall curve of the
label-quality score (average precision), and run times, to reports/bench_label_issues.json.

The sentence embeddings depend on the texts only, not on the labels, so they are computed once per
precision and timed on their own; a `dvc repro` of the stage pays embedding + one case. Rows
already mislabelled in AG News count as false positives here, so precision is a lower bound.

`--precisions fp32 bf16` (default) runs every case on the embeddings of each precision of the
embedding pass (`label_issues.precision`): bf16 is the default where the CPU computes it natively
only while precision and recall at 10% uniform flips stay within 0.01 of fp32's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from stages import paths
from stages.common import load_labels, read_table, write_json
from stages.label_issues import LabelIssuesParams, detect, embed_texts
from stages.modeling import resolve_base_model
from stages.params import load_section

CACHE = Path("bench/.cache")
# The AG News classes of params.yaml: the pair case flips between two of them by name.
LABEL_NAMES = load_labels()
NUM_LABELS = len(LABEL_NAMES)
BUSINESS, SCI_TECH = LABEL_NAMES.index("Business"), LABEL_NAMES.index("Sci/Tech")
CASES: tuple[tuple[str, float, bool], ...] = (
    ("uniform_5pct", 0.05, False),
    ("uniform_10pct", 0.10, False),
    ("business_scitech_10pct", 0.10, True),
)


def inject_flips(labels: np.ndarray, rate: float, pair_only: bool, seed: int) -> np.ndarray:
    """Noisy copy of `labels` with round(rate * n) rows flipped to another class."""
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    n_flips = int(round(rate * len(labels)))
    if pair_only:
        pool = np.flatnonzero((labels == BUSINESS) | (labels == SCI_TECH))
        idx = rng.choice(pool, n_flips, replace=False)
        noisy[idx] = np.where(labels[idx] == BUSINESS, SCI_TECH, BUSINESS)
    else:
        idx = rng.choice(len(labels), n_flips, replace=False)
        # Adding 1..n-1 modulo n picks one of the other classes uniformly.
        noisy[idx] = (labels[idx] + rng.integers(1, NUM_LABELS, n_flips)) % NUM_LABELS
    return noisy


def scores(flagged: np.ndarray, quality: np.ndarray, flips: np.ndarray) -> dict:
    tp = int((flagged & flips).sum())
    precision = tp / max(int(flagged.sum()), 1)
    recall = tp / int(flips.sum())
    return {
        "flagged": int(flagged.sum()),
        "true_positives": tp,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(2 * precision * recall / max(precision + recall, 1e-12), 4),
        # Low quality = suspect, so rank by minus quality.
        "pr_auc": round(float(average_precision_score(flips, -quality)), 4),
    }


def anchor(texts: list[str], labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference detector: TF-IDF 1-2 grams + LR, 5-fold OOF, find_label_issues defaults."""
    x = TfidfVectorizer(ngram_range=(1, 2)).fit_transform(texts)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    probs = cross_val_predict(
        LogisticRegression(max_iter=1000), x, labels, cv=folds, method="predict_proba"
    )
    return find_label_issues(labels, probs), get_label_quality_scores(labels, probs)


def cached_embeddings(texts: list[str], model: str, precision: str) -> tuple[np.ndarray, float]:
    """The stage's embeddings of `texts`, from bench/.cache when an earlier run made them (they
    depend on texts, model and precision only), with the seconds it took to compute them."""
    key = hashlib.sha256("\n".join([model, precision, *texts]).encode()).hexdigest()[:16]
    array_file, time_file = CACHE / f"embeddings-{key}.npy", CACHE / f"embeddings-{key}.json"
    if array_file.exists() and time_file.exists():
        print(f"embeddings from {array_file}")
        seconds = json.loads(time_file.read_text())["seconds"]
        return np.load(array_file, allow_pickle=False), seconds
    start = time.perf_counter()
    embeddings = embed_texts(texts, resolve_base_model(model), precision=precision)
    seconds = time.perf_counter() - start
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(array_file, embeddings, allow_pickle=False)
    time_file.write_text(json.dumps({"seconds": seconds, "rows": len(texts)}))
    return embeddings, seconds


def run_cases(
    train: pl.DataFrame,
    params: LabelIssuesParams,
    embeddings: np.ndarray | None,
    seeds: list[int],
    tag: str,
) -> list[dict]:
    """Every injected-flip case and seed: the stage's detector against the anchor."""
    texts, labels = train["text"].to_list(), train["label"].to_numpy()
    rows = []
    for case, rate, pair_only in CASES:
        for seed in seeds:
            noisy = inject_flips(labels, rate, pair_only, seed)
            flips = noisy != labels
            noisy_clean = train.with_columns(label=pl.Series(noisy, dtype=pl.Int64))
            start = time.perf_counter()
            table, _ = detect(noisy_clean, params, LABEL_NAMES, embeddings=embeddings)
            stage_s = time.perf_counter() - start
            # The table is ranked; put it back in input order to compare with the flips.
            table = train.select("id").join(table, on="id", how="left", maintain_order="left")
            ours = scores(
                table["is_label_issue"].to_numpy(), table["label_quality"].to_numpy(), flips
            )
            start = time.perf_counter()
            a_flagged, a_quality = anchor(texts, noisy, seed)
            anchor_s = time.perf_counter() - start
            base = scores(a_flagged, a_quality, flips)
            rows.append(
                {
                    "precision_of_embeddings": tag,
                    "case": case,
                    "seed": seed,
                    "flips": int(flips.sum()),
                    "stage": {**ours, "seconds": round(stage_s, 1)},
                    "anchor": {**base, "seconds": round(anchor_s, 1)},
                }
            )
            print(
                f"{tag:4s} {case:24s} seed {seed} flips {int(flips.sum()):4d} | stage P "
                f"{ours['precision']:.3f} R {ours['recall']:.3f} AP {ours['pr_auc']:.3f} "
                f"{stage_s:5.1f}s | anchor P {base['precision']:.3f} R {base['recall']:.3f} "
                f"AP {base['pr_auc']:.3f} {anchor_s:5.1f}s",
                flush=True,
            )
    return rows


def summarise(rows: list[dict]) -> dict:
    summary = {}
    for case, _, _ in CASES:
        case_rows = [r for r in rows if r["case"] == case]
        summary[case] = {
            who: {
                key: round(float(np.mean([r[who][key] for r in case_rows])), 4)
                for key in ("precision", "recall", "f1", "pr_auc", "seconds")
            }
            for who in ("stage", "anchor")
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="injection seeds")
    parser.add_argument(
        "--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"]
    )
    args = parser.parse_args()
    params = replace(load_section("label_issues", LabelIssuesParams), action="flag")
    clean = read_table(paths.CLEAN)
    train = clean.filter(pl.col("split") == "train")
    texts = train["text"].to_list()
    uses_embeddings = any(m.startswith("embedding") for m in params.models)

    rows, by_precision, embed_seconds = [], {}, {}
    for precision in args.precisions if uses_embeddings else ["fp32"]:
        embeddings = None
        if uses_embeddings:
            embeddings, embed_seconds[precision] = cached_embeddings(
                texts, params.embedding_model, precision
            )
        runs = run_cases(train, params, embeddings, args.seeds, precision)
        rows += runs
        by_precision[precision] = summarise(runs)

    print(f"\n{'precision case (mean)':29s} | {'stage P/R/AP/s':28s} | anchor P/R/AP/s")
    for precision, summary in by_precision.items():
        for case, s in summary.items():
            st, an = s["stage"], s["anchor"]
            print(
                f"{precision:4s} {case:24s} | {st['precision']:.3f} {st['recall']:.3f} "
                f"{st['pr_auc']:.3f} {st['seconds']:5.1f}s      | {an['precision']:.3f} "
                f"{an['recall']:.3f} {an['pr_auc']:.3f} {an['seconds']:5.1f}s"
            )
    for precision, seconds in embed_seconds.items():
        print(f"embeddings ({precision}): {len(texts)} texts in {seconds:.1f}s (once, cached)")
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "train_rows": len(texts),
        "params": {
            "models": list(params.models),
            "folds": params.folds,
            "filter_by": params.filter_by,
            "embedding_model": params.embedding_model,
        },
        "embedding_seconds": {k: round(v, 1) for k, v in embed_seconds.items()},
        "target_uniform_10pct": {"precision": 0.75, "recall": 0.80, "seconds": 90},
        "summary_by_precision": by_precision,
        "runs": rows,
    }
    if {"fp32", "bf16"} <= set(by_precision):
        fp32, bf16 = (by_precision[p]["uniform_10pct"]["stage"] for p in ("fp32", "bf16"))
        report["bf16_minus_fp32_uniform_10pct"] = {
            k: round(bf16[k] - fp32[k], 4) for k in ("precision", "recall", "pr_auc")
        }
        print("bf16 - fp32 at 10% uniform flips:", report["bf16_minus_fp32_uniform_10pct"])
    write_json(report, "reports/bench_label_issues.json")
    print("wrote reports/bench_label_issues.json")


if __name__ == "__main__":
    main()
