"""The data stages at the full train split's size and ten times it: wall time and peak memory.

    python -m bench.bench_scale                                   # 120k and 1.2M rows
    python -m bench.bench_scale --label-issues    # + label_issues at 120k (--label-issues-max-rows)

Builds a corpus of `size` train rows resampled from the real ones (`data/interim/ingested.parquet`),
each made distinct by a " (copy N)" suffix so that deduplication keeps it, half in the original AG
News CSV layout and half in the Hugging Face Parquet layout (ids are unique: file:row), plus the real
test split. Then runs the stages themselves (`python -m stages.ingest`, `clean`, `tokenize` with
`tokenize.n_process` 1 and 2; with `--label-issues`, `label_issues` with `[tfidf_lr]` and with the
default models) in a scratch project, sampling the resident memory of each stage's process tree
(workers included) every 0.1 s. Writes `reports/bench_scale.json` and prints a table. The machine is
shared: the figures that matter are per-row ratios between sizes measured in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import psutil
import yaml

from stages.common import write_json

POOL_FILE = Path("data/interim/ingested.parquet")
TEST_FILE = Path("data/raw/ag_news/test.csv")
OUT_FILE = Path("reports/bench_scale.json")
SAMPLE_S = 0.1


def build_corpus(root: Path, size: int, seed: int = 0) -> list[dict[str, str]]:
    """Write the scaled raw files under `root/data/raw/`; the `ingest.sources` entries for them."""
    pool = pl.read_parquet(POOL_FILE).filter(pl.col("split") == "train").select("label", "text")
    rows = pool.sample(size, with_replacement=True, seed=seed).with_row_index("n", offset=1)
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    half = size // 2
    csv_rows = rows.head(half).select(
        (pl.col("label") + 1).cast(pl.String).alias("class"),
        pl.col("text").alias("title"),
        pl.format("(copy {})", pl.col("n")).alias("description"),
    )
    # The original layout: no header, every field quoted (as the AG News release is).
    csv_rows.write_csv(raw / "train_scaled.csv", include_header=False, quote_style="always")
    rows.tail(size - half).select(
        pl.format("{} (copy {})", pl.col("text"), pl.col("n")).alias("text"), "label"
    ).write_parquet(raw / "train_scaled.parquet")
    shutil.copy(TEST_FILE, raw / "test.csv")
    return [
        {"path": "data/raw/train_scaled.csv", "split": "train"},
        {"path": "data/raw/train_scaled.parquet", "split": "train"},
        {"path": "data/raw/test.csv", "split": "test"},
    ]


def set_params(root: Path, values: dict[str, Any]) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in values.items():
        *path, last = dotted.split(".")
        node = params
        for key in path:
            node = node[key]
        node[last] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(root: Path, stage: str) -> dict[str, Any]:
    """Run `python -m stages.<stage>` in `root`; wall time and peak RSS (whole process tree)."""
    env = os.environ | {"PYTHONPATH": str(Path.cwd())}
    log_file = root / f"{stage}.log"
    start = time.perf_counter()
    # The log goes to a file: a pipe nobody reads until the end fills up and blocks the stage.
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"stages.{stage}"], cwd=root, env=env, stdout=log, stderr=log
        )
    parent = psutil.Process(proc.pid)
    peak_tree = peak_process = 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            rss = [p.memory_info().rss for p in tree]
        except psutil.Error:  # a worker ended between listing and reading
            continue
        peak_tree, peak_process = max(peak_tree, sum(rss)), max(peak_process, max(rss))
        time.sleep(SAMPLE_S)
    stderr = log_file.read_text()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed in {root}:\n{stderr[-3000:]}")
    return {
        "stage": stage,
        "seconds": round(seconds, 2),
        "peak_rss_gb": round(peak_tree / 1e9, 3),
        "peak_rss_one_process_gb": round(peak_process / 1e9, 3),
    }


def bench_size(size: int, label_issues: bool, only: set[str] | None) -> list[dict[str, Any]]:
    records = []
    with tempfile.TemporaryDirectory(prefix=f"bench_scale_{size}_") as tmp:
        root = Path(tmp)
        shutil.copy("params.yaml", root / "params.yaml")
        set_params(root, {"ingest.sources": build_corpus(root, size)})
        steps: list[tuple[str, str, dict[str, Any]]] = [
            ("ingest", "ingest", {}),
            ("clean", "clean", {}),
            ("tokenize", "tokenize n_process=1", {"tokenize.n_process": 1}),
            ("tokenize", "tokenize n_process=2", {"tokenize.n_process": 2}),
        ]
        if label_issues:
            default_models = yaml.safe_load(Path("params.yaml").read_text())["label_issues"][
                "models"
            ]
            steps += [
                ("label_issues", "label_issues [tfidf_lr]", {"label_issues.models": ["tfidf_lr"]}),
                (
                    "label_issues",
                    f"label_issues {default_models}",
                    {"label_issues.models": default_models},
                ),
            ]
        for stage, name, values in steps:
            if only is not None and stage not in only and stage not in ("ingest", "clean"):
                continue  # ingest and clean always run: the later stages read their outputs
            set_params(root, values)
            record = {"rows": size, "step": name, **run_stage(root, stage)}
            if stage == "ingest":
                report = json.loads((root / "reports" / "ingest.json").read_text())
                record["rows_out"] = report["kept"]
            elif stage == "clean":
                report = json.loads((root / "reports" / "clean.json").read_text())
                record["rows_out"] = report["rows_out"]
            elif stage == "tokenize":
                stats = json.loads((root / "reports" / "tokens.json").read_text())
                record["rows_out"] = stats["rows"]
                record["tokens"] = stats["tokens"]
                record["tokens_per_s"] = round(stats["tokens"] / record["seconds"])
            record["us_per_row"] = round(1e6 * record["seconds"] / size, 1)
            records.append(record)
            print(json.dumps(record), flush=True)
    return records


def summary(records: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """Time per row at the largest size over time per row at the smallest, per step."""
    small, large = min(sizes), max(sizes)
    per_row = {(r["rows"], r["step"]): r["us_per_row"] for r in records}
    ratios = {
        step: round(per_row[(large, step)] / per_row[(small, step)], 2)
        for (rows, step) in per_row
        if rows == large and (small, step) in per_row and large != small
    }
    return {
        f"time_per_row_{large}_over_{small}": ratios,
        "max_peak_rss_gb": {
            step: max(r["peak_rss_gb"] for r in records if r["step"] == step)
            for step in dict.fromkeys(r["step"] for r in records)
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[120_000, 1_200_000])
    parser.add_argument(
        "--label-issues", action="store_true", help="also label_issues at each size"
    )
    parser.add_argument(
        "--label-issues-max-rows",
        type=int,
        default=120_000,
        help="label_issues only at sizes up to this (its embedding pass is the slow part)",
    )
    parser.add_argument(
        "--update", action="store_true", help="replace these steps in the JSON, keep the others"
    )
    parser.add_argument(
        "--only", nargs="+", help="stages to run (ingest and clean always run), e.g. --only clean"
    )
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    records = []
    earlier = json.loads(OUT_FILE.read_text())["runs"] if args.update and OUT_FILE.exists() else []
    for size in args.sizes:
        with_label_issues = args.label_issues and size <= args.label_issues_max_rows
        records += bench_size(size, with_label_issues, set(args.only) if args.only else None)
    ran = {(r["rows"], r["step"]) for r in records}
    records = [r for r in earlier if (r["rows"], r["step"]) not in ran] + records
    order = ["ingest", "clean", "tokenize", "label_issues"]
    records.sort(key=lambda r: (r["rows"], order.index(r["stage"]), r["step"]))
    report = {
        "machine": {"cpus": os.cpu_count(), "polars": pl.__version__},
        "load_average_at_start": load_at_start,
        "runs": records,
        # Over every size in the JSON: an --update at one size keeps the ratios to the others.
        "summary": summary(records, sorted({r["rows"] for r in records})),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(report, OUT_FILE)
    cols = ["rows", "step", "seconds", "us_per_row", "peak_rss_gb", "tokens_per_s"]
    with pl.Config(tbl_rows=50, tbl_width_chars=140):
        print(
            pl.DataFrame(records).select(
                [c for c in cols if c in records[0] or c == "tokens_per_s"]
            )
        )
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
