"""CPU experiments for the train + evaluate params: accuracy against time, one run per call.

    python -m bench.bench_train_cpu --name r8_qv -S train.learning_rate=0.002 -S train.epochs=2

Trains with `params.yaml`'s `train:` section overridden by each `-S key=value` (YAML values,
dotted keys as in `dvc exp run -S`), scores the test rows with `evaluate.batch_size`, and appends
one record (params, accuracy, macro-F1, wall and CPU seconds per phase, load average, threads) to
`reports/bench_train_cpu.json`, then prints the table of all records so far.

The data defaults to the pipeline's `data/processed/{train,test}.parquet`; `--data DIR` points at a
folder with the same two files. The machine is shared, so each record keeps the load average and
the process CPU time beside the wall time: compare runs made under similar load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import torch
import yaml

from bench.training import load_bench_data, train_in
from stages.common import load_params
from stages.evaluate import EvaluateParams, compute_metrics, merged_logits, probabilities
from stages.params import load_section, parse_section
from stages.train_params import TrainParams

OUT_FILE = Path("reports/bench_train_cpu.json")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.removeprefix("train.").split(".")
    node = raw
    for key in keys[:-1]:
        node = node[key]
    if keys[-1] not in node:
        raise SystemExit(f"unknown param train.{dotted}")
    node[keys[-1]] = value


def run(name: str, overrides: list[str], data_dir: Path, eval_batch: int) -> dict[str, Any]:
    raw = load_params("train")
    for item in overrides:
        key, _, value = item.partition("=")
        _set(raw, key, yaml.safe_load(value))
    params = parse_section(raw, TrainParams, "train")
    if params.torch_threads is not None:
        torch.set_num_threads(params.torch_threads)
    data = load_bench_data(data_dir, params)
    test = data.test
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        result, adapter_dir = train_in(Path(tmp), data, params)
        t1, c1 = time.perf_counter(), _cpu_seconds()
        probs = probabilities(
            merged_logits(
                adapter_dir,
                params.base_model,
                data.label_names,
                test["text"].to_list(),
                params.max_length,
                eval_batch,
            )
        )
        t2, c2 = time.perf_counter(), _cpu_seconds()
    metrics = compute_metrics(probs, test["label"].to_list(), data.label_names)
    return {
        "name": name,
        "overrides": overrides,
        "eval_batch_size": eval_batch,
        "threads": torch.get_num_threads(),
        "n_train": result.n_train,
        "n_val": result.n_val,
        "n_test": test.height,
        "steps": result.global_step,
        "val_accuracy": result.best_val_accuracy,
        "val_loss": result.best_val_loss,
        "accuracy": round(metrics["accuracy"], 4),
        "macro_f1": round(metrics["macro_f1"], 4),
        "train_wall_s": round(t1 - t0, 1),
        "train_cpu_s": round(c1 - c0, 1),
        "score_wall_s": round(t2 - t1, 1),
        "score_cpu_s": round(c2 - c1, 1),
        "loadavg_1m_before": round(load_before[0], 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def print_table(records: list[dict[str, Any]]) -> None:
    cols = [
        "name",
        "accuracy",
        "macro_f1",
        "val_accuracy",
        "train_wall_s",
        "train_cpu_s",
        "score_wall_s",
        "score_cpu_s",
        "loadavg_1m_before",
        "loadavg_1m_after",
    ]
    print(pl.DataFrame([{c: r.get(c) for c in cols} for r in records]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="label of this run in the table")
    parser.add_argument("-S", "--set", action="append", default=[], help="train.KEY=VALUE")
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--eval-batch", type=int, default=None, help="default: evaluate.batch_size")
    args = parser.parse_args()
    eval_batch = args.eval_batch or load_section("evaluate", EvaluateParams).batch_size
    record = run(args.name, args.set, args.data, eval_batch)
    records = json.loads(OUT_FILE.read_text()) if OUT_FILE.exists() else []
    records.append(record)
    OUT_FILE.parent.mkdir(parents=True, exist_ok=True)
    OUT_FILE.write_text(json.dumps(records, indent=2) + "\n")
    print_table(records)


if __name__ == "__main__":
    main()
