"""What does human review of the label suspects buy? `python -m bench.bench_review`.

Injects known label flips into the clean train rows (10% of them, uniformly at random, seeded: the
`uniform_10pct` case of bench_label_issues) and runs `label_issues.detect` with params.yaml's
`label_issues` params (sentence embeddings computed once and cached in bench/.cache, as
bench_label_issues does). A simulated reviewer who knows the true labels then decides the first K
rows of the review page (K = 50, 100, 200, 400) through the page's own JSON API, in-process
(Starlette's TestClient over `newsclf.review.create_app`): it walks the rows in the order the page
shows them (most confident suggestion first) and, per row, keeps it when the given (noisy) label is
the true one and relabels it to the true label otherwise. `augment` then builds the training table
from the flagged table and the reviews file the page wrote (`label_issues.action: flag`, a person's
decision overriding it), and the train stage's params fine-tune an adapter on it, scored on the
whole test split.

Cases (`--cases`): `clean` (no flips: the reference), `no_review` (flips, action flag: the rows
train as given), `drop` and `relabel` (flips, the automatic `label_issues.action`, with params.yaml's
`relabel_min_confidence`), and `review_<K>` (flips, action flag, the first K rows decided on the
page). Every run trains with the same `train.seed`, so the runs differ only by their training
table. Per case it records the test accuracy, the rows of the training table, how many injected
flips still train with a wrong label, how many rows train with a wrong label in all, and how many
rows the decisions (or the automatic action) changed against `no_review`.

A full run (the defaults: 8 trainings of the train stage's params) takes about 40 min on 2 cores;
`--max-train-samples N`, `--epochs E`, `--max-test-samples N` and `--cases` make a smaller one.
`--seeds` are the injection seeds (default one). Prints a table, writes reports/bench_review.json
and the plot docs/images/bench_review.png (test accuracy against K, the other cases as lines).
Each finished run is also kept in bench/.cache (keyed by the data and the params), so a run that
was stopped takes up where it was on the next invocation (`--fresh` reruns everything).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import polars as pl

from bench.bench_label_issues import CACHE, cached_embeddings, inject_flips
from bench.training import load_bench_data, train_in
from stages import paths
from stages.augment import run as augment_run
from stages.common import cpu_model, load_labels, read_table, write_json, write_table
from stages.label_issues import LabelIssuesParams, detect
from stages.modeling import resolve_precision
from stages.params import load_section
from stages.reviews import read_reviews, reviews_table
from stages.sections import AugmentParams
from stages.train_params import TrainParams

OUT_FILE = Path("reports/bench_review.json")
PLOT_FILE = Path("docs/images/bench_review.png")
FLIP_RATE = 0.10
DEFAULT_KS = (50, 100, 200, 400)
BASELINES = ("clean", "no_review", "drop", "relabel")
DEFAULT_CASES = (*BASELINES, *(f"review_{k}" for k in DEFAULT_KS))
REVIEWER = "simulated reviewer (bench_review)"
# The page answers only loopback Host names when it serves on 127.0.0.1: the bench asks as a
# browser on this machine would.
PAGE_URL = "http://127.0.0.1:8001"
LABEL_NAMES = load_labels()


def review_k(case: str) -> int | None:
    """K of a `review_<K>` case; None for the other cases."""
    match = re.fullmatch(r"review_(\d+)", case)
    return int(match.group(1)) if match else None


def check_cases(cases: list[str]) -> None:
    for case in cases:
        if case not in BASELINES and (review_k(case) or 0) < 1:
            raise SystemExit(
                f"unknown case {case!r}: expected {', '.join(BASELINES)} or review_<K>"
            )


def with_train_labels(clean: pl.DataFrame, ids: list[str], labels: np.ndarray) -> pl.DataFrame:
    """`clean` with the train rows `ids` given `labels`; test rows and row order untouched."""
    new = pl.DataFrame({"id": ids, "new_label": pl.Series(labels, dtype=pl.Int64)})
    return (
        clean.join(new, on="id", how="left", maintain_order="left")
        .with_columns(label=pl.coalesce("new_label", "label"))
        .drop("new_label")
    )


def no_action_issues(train: pl.DataFrame) -> pl.DataFrame:
    """A label_issues table that flags nothing (for the clean reference): every row `none`."""
    return train.select(
        "id",
        "text",
        "label",
        suggested_label="label",
        suggested_confidence=pl.lit(1.0),
        label_quality=pl.lit(1.0),
        rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int64),
        is_label_issue=pl.lit(False),
        action=pl.lit("none"),
    )


# --- the simulated reviewer, through the page's API -----------------------------------------


def simulate_review(
    issues_file: Path,
    reviews_file: Path,
    k: int,
    all_ranked: int,
    true_label: dict[str, int],
) -> dict[str, Any]:
    """Decide the first `k` rows of the review page over `issues_file` through its HTTP API, as a
    reviewer who knows `true_label` (by id): keep when the given label is the true one, else
    relabel to the true label. Decisions go to `reviews_file`; returns what was decided."""
    from starlette.testclient import TestClient

    from newsclf.review import LOOPBACK_HOSTS, create_app, load_review_set

    review_set = load_review_set(issues_file, LABEL_NAMES, all_ranked)
    app = create_app(review_set, reviews_file, REVIEWER, [*LOOPBACK_HOSTS])
    decided = {"keep": 0, "relabel": 0}
    with TestClient(app, base_url=PAGE_URL) as client:

        def call(method: str, url: str, **kwargs: Any) -> dict[str, Any]:
            answer = client.request(method, url, **kwargs)
            if answer.status_code != 200:
                raise SystemExit(f"review page: {method} {url}: {answer.status_code} {answer.text}")
            return answer.json()

        # The page's own order (most confident suggestion first), as it lists the new rows.
        rows = call("GET", "/api/rows", params={"status": "new"})["rows"]
        if len(rows) < k:
            raise SystemExit(f"the page lists {len(rows)} rows, fewer than K={k}")
        for row in rows[:k]:
            # What the page loads for the current row (the text, its neighbours).
            shown = call("GET", f"/api/rows/{quote(row['id'], safe='')}")
            if shown["id"] != row["id"] or not shown["neighbours"]:
                raise SystemExit(f"review page: row {row['id']!r} came back as {shown['id']!r}")
            truth = LABEL_NAMES[true_label[row["id"]]]
            body = (
                {"id": row["id"], "decision": "keep"}
                if truth == row["given_label"]
                else {"id": row["id"], "decision": "relabel", "label": truth}
            )
            answer = call("POST", "/api/decisions", json=body)
            decision = answer["row"]["decision"]
            if answer["row"]["status"] != "decided" or decision["label"] != truth:
                raise SystemExit(f"review page: {body} was recorded as {answer['row']}")
            decided[decision["decision"]] += 1
        progress = call("GET", "/api/progress")
        listed = [r["id"] for r in call("GET", "/api/rows", params={"status": "decided"})["rows"]]
    if progress["decided"] != k or listed != [r["id"] for r in rows[:k]]:
        raise SystemExit(f"review page: {k} decisions posted, progress says {progress}")
    if {d: progress["by_decision"][d] for d in decided} != decided:
        raise SystemExit(f"review page: decided {decided}, progress says {progress}")
    return {
        "page_rows": len(rows),
        "decided": k,
        "keep": decided["keep"],
        "relabel": decided["relabel"],
        "decided_ids": [r["id"] for r in rows[:k]],
    }


# --- the training tables ---------------------------------------------------------------------


def table_stats(
    table: pl.DataFrame,
    true_label: dict[str, int],
    flipped: set[str],
    reference: pl.DataFrame | None,
) -> dict[str, int]:
    """Rows of a training table, its wrong labels (against the truth) and the rows it changed
    against `reference` (the no-review table: dropped or trained with another label)."""
    truth = pl.DataFrame(
        {"id": list(true_label), "true_label": pl.Series(list(true_label.values()), dtype=pl.Int64)}
    )
    rows = table.join(truth, on="id", how="left")
    wrong = rows.filter(pl.col("label") != pl.col("true_label"))
    wrong_ids = set(wrong["id"].to_list())
    present = set(rows["id"].to_list())
    stats = {
        "rows": table.height,
        "wrong_labels": wrong.height,
        "flips_still_wrong": len(wrong_ids & flipped),
        "flips_dropped": len(flipped - present),
        "flips_fixed": len((flipped & present) - wrong_ids),
        "correct_made_wrong": len(wrong_ids - flipped),
    }
    if reference is not None:
        joined = reference.select("id", ref_label="label").join(
            table.select("id", "label"), on="id", how="left"
        )
        stats["changed_vs_no_review"] = int(
            joined.filter(
                pl.col("label").is_null() | (pl.col("label") != pl.col("ref_label"))
            ).height
        )
    return stats


def build_tables(
    clean: pl.DataFrame,
    tokens: pl.DataFrame,
    issues: pl.DataFrame,
    augment_params: AugmentParams,
    reviews_file: Path | None,
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """`augment` without its files: the train and test tables, with the reviews file applied."""
    if reviews_file is None:
        return augment_run(clean, tokens, issues, augment_params, LABEL_NAMES)
    reviews = reviews_table(read_reviews(reviews_file, LABEL_NAMES), LABEL_NAMES)
    return augment_run(clean, tokens, issues, augment_params, LABEL_NAMES, reviews=reviews)


def train_and_score(
    train: pl.DataFrame,
    test: pl.DataFrame,
    params: TrainParams,
    eval_batch: int,
    max_test_samples: int | None,
) -> dict[str, Any]:
    """Fine-tune on `train` as the train stage does (its validation split included) and score
    the merged model on the test rows."""
    from stages.evaluate import merged_logits

    if max_test_samples is not None and max_test_samples < test.height:
        test = test.sample(max_test_samples, seed=0)
    with tempfile.TemporaryDirectory(prefix="bench_review_") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        write_table(train, data_dir / "train.parquet")
        write_table(test, data_dir / "test.parquet")
        data = load_bench_data(data_dir, params)
        start = time.perf_counter()
        result, adapter_dir = train_in(Path(tmp), data, params)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        logits = merged_logits(
            adapter_dir,
            params.base_model,
            data.label_names,
            data.test["text"].to_list(),
            params.max_length,
            eval_batch,
        )
        eval_s = time.perf_counter() - start
    accuracy = float((logits.argmax(axis=1) == data.test["label"].to_numpy()).mean())
    return {
        "accuracy": round(accuracy, 4),
        "test_rows": data.test.height,
        "trained_rows": result.n_train,
        "val_rows": result.n_val,
        "steps": result.global_step,
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
    }


# --- report ----------------------------------------------------------------------------------


def summarise(runs: list[dict], cases: list[str]) -> dict[str, dict[str, float]]:
    """Per case, the mean over the injection seeds of the accuracy and the table counts."""
    keys = (
        "accuracy",
        "rows",
        "flips_still_wrong",
        "wrong_labels",
        "changed_vs_no_review",
        "train_s",
    )
    summary = {}
    for case in cases:
        rows = [r for r in runs if r["case"] == case]
        summary[case] = {
            key: round(float(np.mean([r[key] for r in rows])), 4)
            for key in keys
            if rows and all(r.get(key) is not None for r in rows)
        } | {"seeds": len(rows)}
    return summary


def markdown_table(report: dict) -> str:
    """The summary as the Markdown table of docs/review.md."""
    summary, runs = report["summary"], report["runs"]
    clean = summary.get("clean", {}).get("accuracy")
    base = summary.get("no_review", {}).get("accuracy")
    lines = [
        "| case | reviewed rows | test accuracy | vs no review | train rows | flips still wrong "
        "| wrong labels in all | rows changed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, s in summary.items():
        k = review_k(case)
        delta = (
            "" if base is None or case in ("no_review", "clean") else f"{s['accuracy'] - base:+.4f}"
        )
        if case == "clean" and clean is not None and base is not None:
            delta = f"{clean - base:+.4f}"
        seeds = [r for r in runs if r["case"] == case]
        relabels = (
            f" ({round(float(np.mean([r['review']['relabel'] for r in seeds])))} relabel)"
            if k
            else ""
        )
        lines.append(
            f"| {case} | {k or 0}{relabels} | {s['accuracy']:.4f} | {delta} | {s['rows']:,.0f} | "
            f"{s.get('flips_still_wrong', 0):,.0f} | {s.get('wrong_labels', 0):,.0f} | "
            f"{s.get('changed_vs_no_review', 0):,.0f} |"
        )
    return "\n".join(lines)


def plot(report: dict, out: Path) -> None:
    """Test accuracy against K (each seed and the mean), the other cases as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, runs = report["summary"], report["runs"]
    ks = sorted(k for case in summary if (k := review_k(case)))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if ks:
        ax.plot(
            ks,
            [summary[f"review_{k}"]["accuracy"] for k in ks],
            "o-",
            color="#2ca02c",
            label="review of the top K (flag + decisions)",
        )
        for run in runs:
            if (k := review_k(run["case"])) and report["seeds"][1:]:
                ax.plot(k, run["accuracy"], ".", color="#2ca02c", alpha=0.4)
    styles = {
        "clean": ("no flips (reference)", "#555555", ":"),
        "no_review": ("no review (flag)", "#d62728", "--"),
        "drop": ("automatic drop", "#ff7f0e", "-."),
        "relabel": ("automatic relabel", "#1f77b4", "-."),
    }
    for case, (label, color, style) in styles.items():
        if case in summary:
            accuracy = summary[case]["accuracy"]
            ax.axhline(accuracy, color=color, linestyle=style, label=f"{label}: {accuracy:.4f}")
    if ks:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
    ax.set_xlabel("K: suspects decided on the review page (most confident first)")
    ax.set_ylabel("test accuracy")
    flips = report["flips"]
    ax.set_title(
        f"AG News, {flips:,} of {report['train_rows']:,} train labels flipped "
        f"({FLIP_RATE:.0%}), {report['test_rows']:,} test rows",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


# --- resuming --------------------------------------------------------------------------------


def partial_file(settings: dict[str, Any]) -> Path:
    """Where the finished runs of these settings go, one JSON line each, as they finish: a run
    that was stopped takes up again from there (the data file's bytes are part of the key)."""
    digest = hashlib.sha256(Path(paths.CLEAN).read_bytes())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return CACHE / f"bench_review-{digest.hexdigest()[:16]}.jsonl"


def finished_runs(path: Path) -> dict[tuple[str, int | None], dict]:
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["case"], r["injection_seed"]): r for r in records}


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases",
        nargs="+",
        default=list(DEFAULT_CASES),
        help=f"of {', '.join(BASELINES)}, review_<K> (default: {' '.join(DEFAULT_CASES)})",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="injection seeds")
    parser.add_argument("--max-train-samples", type=int, help="train.max_train_samples")
    parser.add_argument("--epochs", type=float, help="train.epochs")
    parser.add_argument("--max-test-samples", type=int, help="a seeded sample of the test rows")
    parser.add_argument("--out", type=Path, default=OUT_FILE)
    parser.add_argument("--plot", type=Path, default=PLOT_FILE)
    parser.add_argument(
        "--fresh", action="store_true", help="rerun the runs an interrupted run already finished"
    )
    args = parser.parse_args()
    check_cases(args.cases)
    if "reviews" not in inspect.signature(augment_run).parameters:
        raise SystemExit("stages.augment.run takes no `reviews` argument yet")
    started = time.perf_counter()
    when = datetime.now(UTC).replace(microsecond=0)

    li_params = load_section("label_issues", LabelIssuesParams)
    train_params = load_section("train", TrainParams)
    overrides = {
        key: value
        for key, value in (
            ("max_train_samples", args.max_train_samples),
            ("epochs", args.epochs),
        )
        if value is not None
    }
    train_params = replace(train_params, **overrides)
    augment_params = load_section("augment", AugmentParams)
    from stages.evaluate import EvaluateParams

    eval_batch = load_section("evaluate", EvaluateParams).batch_size

    clean = read_table(paths.CLEAN)
    tokens = read_table(paths.TOKENS)
    train_rows = clean.filter(pl.col("split") == "train")
    ids = train_rows["id"].to_list()
    labels = train_rows["label"].to_numpy()
    true_label = dict(zip(ids, labels.tolist(), strict=True))
    embeddings, embed_s = None, None
    if any(m.startswith("embedding") for m in li_params.models):
        precision = resolve_precision(li_params.precision, cuda=False, key="label_issues.precision")
        embeddings, embed_s = cached_embeddings(
            train_rows["text"].to_list(), li_params.embedding_model, precision
        )
    ks = sorted({k for case in args.cases if (k := review_k(case))})
    flip_cases = [c for c in args.cases if c != "clean"]

    runs: list[dict] = []
    detection: dict[str, dict] = {}
    partial = partial_file(
        {
            "label_issues": asdict(li_params),
            "train": asdict(train_params),
            "augment": asdict(augment_params),
            "eval_batch": eval_batch,
            "max_test_samples": args.max_test_samples,
            "flip_rate": FLIP_RATE,
        }
    )
    done = {} if args.fresh else finished_runs(partial)
    if args.fresh:
        partial.unlink(missing_ok=True)

    def cached(case: str, seed: int | None) -> bool:
        """Take the run from an earlier, interrupted invocation when it finished there."""
        record = done.get((case, seed))
        if record is not None:
            print(f"--- {case} (seed {seed}): accuracy {record['accuracy']:.4f} from {partial}")
            runs.append(record)
        return record is not None

    def run_case(
        case: str, seed: int | None, train: pl.DataFrame, test: pl.DataFrame, since: float, **extra
    ):
        print(f"--- {case} (seed {seed}): training on {train.height} rows", flush=True)
        scored = train_and_score(train, test, train_params, eval_batch, args.max_test_samples)
        record = {"case": case, "injection_seed": seed, **extra, **scored}
        record["wall_s"] = round(time.perf_counter() - since, 1)
        runs.append(record)
        CACHE.mkdir(parents=True, exist_ok=True)
        with partial.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(
            f"    {case}: accuracy {scored['accuracy']:.4f}, train {scored['train_s']:.0f}s, "
            f"rows {extra.get('rows')}, flips still wrong {extra.get('flips_still_wrong')}, "
            f"changed {extra.get('changed_vs_no_review')}",
            flush=True,
        )

    with tempfile.TemporaryDirectory(prefix="bench_review_pages_") as scratch:
        scratch_dir = Path(scratch)
        if "clean" in args.cases and not cached("clean", None):
            since = time.perf_counter()
            train, test, _ = build_tables(
                clean, tokens, no_action_issues(train_rows), augment_params, None
            )
            stats = table_stats(train, true_label, set(), None)
            run_case("clean", None, train, test, since, **stats)
        for seed in args.seeds if flip_cases else []:
            noisy = inject_flips(labels, FLIP_RATE, False, seed)
            flipped = {i for i, a, b in zip(ids, labels, noisy, strict=True) if a != b}
            noisy_clean = with_train_labels(clean, ids, noisy)
            tables: dict[str, pl.DataFrame] = {}
            for action in ("flag", "drop", "relabel"):
                if action == "flag" or action in args.cases:
                    start = time.perf_counter()
                    tables[action], report = detect(
                        noisy_clean,
                        replace(li_params, action=action),
                        LABEL_NAMES,
                        embeddings=embeddings,
                    )
                    print(
                        f"detect ({action}, seed {seed}): {report['flagged']} flagged, "
                        f"{report['dropped']} dropped, {report['relabelled']} relabelled "
                        f"in {time.perf_counter() - start:.0f}s",
                        flush=True,
                    )
            flag = tables["flag"]
            for action, table in tables.items():
                if not table.select("id", "rank", "is_label_issue").equals(
                    flag.select("id", "rank", "is_label_issue")
                ):
                    raise SystemExit(f"detect with action {action} ranked otherwise than flag")
            suspects = set(flag.filter("is_label_issue")["id"].to_list())
            n_suspects = len(suspects)
            all_ranked = max(ks) if ks and n_suspects < max(ks) else 0
            detection[str(seed)] = {
                "flips": len(flipped),
                "flagged": n_suspects,
                "flagged_flips": len(suspects & flipped),
                "precision": round(len(suspects & flipped) / max(n_suspects, 1), 4),
                "recall": round(len(suspects & flipped) / len(flipped), 4),
                "all_ranked": all_ranked,
            }
            if all_ranked:
                print(
                    f"only {n_suspects} suspects (< K={max(ks)}): the page also lists the "
                    f"{all_ranked} most suspect rows (--all-ranked {all_ranked})",
                    flush=True,
                )
            issues_file = scratch_dir / f"label_issues_seed{seed}.parquet"
            write_table(flag, issues_file)
            reference, test, _ = build_tables(noisy_clean, tokens, flag, augment_params, None)
            for case in flip_cases:
                if cached(case, seed):
                    continue
                since = time.perf_counter()
                k = review_k(case)
                extra: dict[str, Any] = {}
                if k:
                    reviews_file = scratch_dir / f"reviews_seed{seed}_k{k}.csv"
                    start = time.perf_counter()
                    review = simulate_review(issues_file, reviews_file, k, all_ranked, true_label)
                    review["page_s"] = round(time.perf_counter() - start, 1)
                    decided_ids = review.pop("decided_ids")
                    review["flips_among_decided"] = len(set(decided_ids) & flipped)
                    print(
                        f"review_{k}: {review['keep']} keep, {review['relabel']} relabel through "
                        f"the page in {review['page_s']:.0f}s",
                        flush=True,
                    )
                    train, _, aug_report = build_tables(
                        noisy_clean, tokens, flag, augment_params, reviews_file
                    )
                    extra["review"] = review
                    extra["augment_report"] = {
                        key: value for key, value in aug_report.items() if "review" in key
                    }
                elif case == "no_review":
                    train = reference
                else:  # the automatic action: drop or relabel
                    train, _, _ = build_tables(
                        noisy_clean, tokens, tables[case], augment_params, None
                    )
                stats = table_stats(train, true_label, flipped, reference)
                run_case(case, seed, train, test, since, **stats, **extra)

    report = {
        "machine": {"cpu": cpu_model(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "date": when.isoformat().replace("+00:00", "Z"),
        "command": " ".join(["python -m bench.bench_review", *sys.argv[1:]]),
        "seeds": args.seeds,
        "flip_rate": FLIP_RATE,
        "flips": int(round(FLIP_RATE * len(ids))),
        "train_rows": len(ids),
        "test_rows": runs[0]["test_rows"] if runs else 0,
        "label_issues": {
            "models": list(li_params.models),
            "folds": li_params.folds,
            "filter_by": li_params.filter_by,
            "relabel_min_confidence": li_params.relabel_min_confidence,
            "embedding_seconds": None if embed_s is None else round(embed_s, 1),
        },
        "train_params": {
            k: v
            for k, v in asdict(train_params).items()
            if k in ("base_model", "finetune", "epochs", "max_train_samples", "seed", "batch_size")
        },
        "detection": detection,
        "summary": summarise(runs, args.cases),
        "runs": runs,
    }
    report["wall_s"] = round(time.perf_counter() - started, 1)
    resumed = [r for r in runs if (r["case"], r["injection_seed"]) in done]
    report["resumed_runs"] = [f"{r['case']} (seed {r['injection_seed']})" for r in resumed]
    # The runs taken from an interrupted invocation count with their own wall time.
    report["wall_s_with_resumed"] = round(report["wall_s"] + sum(r["wall_s"] for r in resumed), 1)
    print("\n" + markdown_table(report))
    print(
        f"wall time {report['wall_s'] / 60:.1f} min"
        + (f" ({report['wall_s_with_resumed'] / 60:.1f} with the resumed runs)" if resumed else "")
        + f" on {report['machine']['cpu']}"
    )
    write_json(report, args.out)
    plot(report, args.plot)
    print(f"wrote {args.out} and {args.plot} ({args.plot.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
