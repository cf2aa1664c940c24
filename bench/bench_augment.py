"""Does `augment` help? `python -m bench.bench_augment` (after `dvc repro tokenize`).

Trains the fast classifier (TF-IDF 1-2 grams + logistic regression C=4, as in label_issues) on 500,
2,000 and all clean train rows, without and with the stage's augmentations (each op alone and all
ops together, at the rates of params.yaml) and with exact copies as a control (more rows, no new
text), and scores accuracy on the whole test split. Subsets are stratified-random and repeated
over `--seeds` (the full set once: it has no subset to vary). Prints a table and writes
reports/bench_augment.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import polars as pl
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from stages import paths
from stages.augment import (
    OPS,
    AugmentParams,
    OpParams,
    OpsParams,
    attach_tokens,
    augment_rows,
    enabled_ops,
    synonyms_for,
)
from stages.common import read_table, write_json
from stages.label_issues import TFIDF_C
from stages.params import load_section

SIZES = (500, 2000, None)  # None: every train row


def accuracy(train: pl.DataFrame, test: pl.DataFrame) -> float:
    # min_df=1: with a count threshold, a copy of a row would let its rare words through, and
    # augmentation would win by duplication alone (the `duplicate` control checks the rest).
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x_train = vectorizer.fit_transform(train["text"].to_list())
    model = LogisticRegression(C=TFIDF_C, max_iter=1000).fit(x_train, train["label"].to_numpy())
    predicted = model.predict(vectorizer.transform(test["text"].to_list()))
    return float((predicted == test["label"].to_numpy()).mean())


def subset(rows: pl.DataFrame, size: int | None, seed: int) -> pl.DataFrame:
    """`size` rows, the same share from every class (all rows when size is None)."""
    if size is None or size >= rows.height:
        return rows
    rng = np.random.default_rng(seed)
    labels = rows["label"].to_numpy()
    keep = np.concatenate(
        [
            rng.choice(idx, round(len(idx) * size / rows.height), replace=False)
            for idx in (np.flatnonzero(labels == c) for c in np.unique(labels))
        ]
    )
    return rows[np.sort(keep)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-aug", type=int, nargs="+", default=[1, 4], help="for all ops together")
    parser.add_argument("--single-op-n-aug", type=int, default=2)
    args = parser.parse_args()
    params = load_section("augment", AugmentParams)
    # Every op at its params rate, whether or not params switch it on: the bench decides that.
    rates = {op: getattr(params.ops, op).rate for op in OPS}
    clean = read_table(paths.CLEAN)
    test = clean.filter(pl.col("split") == "test")
    train = attach_tokens(clean.filter(pl.col("split") == "train"), read_table(paths.TOKENS))
    start = time.perf_counter()
    synonyms = synonyms_for(train, params)
    lexicon_s = time.perf_counter() - start
    print(f"synonym lexicon: {len(synonyms)} words in {lexicon_s:.1f}s")

    configs: list[tuple[str, dict[str, float], int]] = [
        ("none", {}, 0),
        ("duplicate", {}, args.single_op_n_aug),  # control: exact copies, no augmentation
    ]
    configs += [(op, {op: rates[op]}, args.single_op_n_aug) for op in OPS]
    configs += [(f"all_ops_x{n}", rates, n) for n in args.n_aug]
    enabled_ops(  # validates the rates
        OpsParams(**{op: OpParams(enabled=True, rate=r) for op, r in rates.items()})
    )

    rows = []
    for size in SIZES:
        for seed in args.seeds if size is not None else args.seeds[:1]:
            base = subset(train, size, seed)
            for name, ops, n_aug in configs:
                start = time.perf_counter()
                if name == "duplicate":
                    added = pl.concat([base.select("text", "label")] * n_aug)
                else:
                    added, _ = augment_rows(base, ops, n_aug, seed, synonyms)
                aug_s = time.perf_counter() - start
                fit_rows = pl.concat([base.select("text", "label"), added.select("text", "label")])
                start = time.perf_counter()
                acc = accuracy(fit_rows, test)
                fit_s = time.perf_counter() - start
                rows.append(
                    {
                        "train_rows": base.height,
                        "seed": seed,
                        "config": name,
                        "n_aug": n_aug,
                        "added": added.height,
                        "accuracy": round(acc, 4),
                        "augment_seconds": round(aug_s, 2),
                        "fit_seconds": round(fit_s, 1),
                    }
                )
                print(
                    f"{base.height:5d} rows seed {seed} {name:12s} +{added.height:6d} "
                    f"acc {acc:.4f} ({aug_s:.1f}s augment, {fit_s:.1f}s fit)",
                    flush=True,
                )

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for size_rows in sorted({r["train_rows"] for r in rows}):
        at_size = [r for r in rows if r["train_rows"] == size_rows]
        baseline = np.mean([r["accuracy"] for r in at_size if r["config"] == "none"])
        summary[str(size_rows)] = {
            name: {
                "accuracy": round(float(np.mean(accs)), 4),
                "delta_vs_none": round(float(np.mean(accs) - baseline), 4),
                "std": round(float(np.std(accs)), 4),
                "runs": len(accs),
            }
            for name, *_ in configs
            for accs in [[r["accuracy"] for r in at_size if r["config"] == name]]
        }
    names = [name for name, *_ in configs]
    print("\ntest accuracy (mean over seeds; delta vs none in brackets)")
    print(f"{'train rows':>10s} " + " ".join(f"{n:>16s}" for n in names))
    for size_rows, by_name in summary.items():
        cells = [
            f"{v['accuracy']:.4f} ({v['delta_vs_none']:+.4f})"
            if n != "none"
            else f"{v['accuracy']:.4f}"
            for n in names
            for v in [by_name[n]]
        ]
        print(f"{size_rows:>10s} " + " ".join(f"{c:>16s}" for c in cells))
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "classifier": f"TF-IDF 1-2 grams (sublinear) + logistic regression C={TFIDF_C}",
        "test_rows": test.height,
        "rates": rates,
        "synonym_lexicon_words": len(synonyms),
        "synonym_lexicon_seconds": round(lexicon_s, 1),
        "summary": summary,
        "runs": rows,
    }
    write_json(report, "reports/bench_augment.json")
    print("wrote reports/bench_augment.json")


if __name__ == "__main__":
    main()
