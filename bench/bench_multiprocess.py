"""One process with 2 threads against 2 data-parallel processes with 1 thread each, on the real data.

    python -m bench.bench_multiprocess                 # seeds 42 and 7, both layouts, interleaved
    python -m bench.bench_multiprocess --seeds 42

Each run is the `train` stage itself, started as `train.launcher` would start it (`python -m
stages.train`, or `torchrun --standalone --nproc_per_node 2 -m stages.train`), in a scratch project
holding params.yaml (the repository's, with the layout's `train.batch_size`, `train.torch_threads` and
`train.seed`) and links to `data/processed/`. The global batch stays `train.batch_size` of
params.yaml: 2 processes take half of it each. The adapter is then scored on the test split as
`evaluate` scores it (merged into fp32). Writes `reports/bench_multiprocess.json` and prints a table.
The machine is shared: the layouts alternate, so both see the same load, and the ratio is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import torch
import yaml

from stages.common import PARAMS_FILE, load_labels
from stages.evaluate import EvaluateParams, compute_metrics, merged_logits, probabilities
from stages.params import load_section, parse_section
from stages.processed import read_processed
from stages.train_params import TrainParams

OUT_FILE = Path("reports/bench_multiprocess.json")
LABEL_NAMES = load_labels()
DATA_DIR = Path("data/processed")
CORES = 2
LAYOUTS = {
    # name: (processes, threads per process)
    "1 process x 2 threads": (1, 2),
    "2 processes x 1 thread": (2, 1),
}


def launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "stages.train"]
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone"),
        *("--nproc_per_node", str(processes), "-m", "stages.train"),
    ]


def make_project(root: Path, processes: int, threads: int, seed: int) -> dict[str, Any]:
    params = yaml.safe_load(PARAMS_FILE.read_text())
    train = params["train"]
    if int(train["batch_size"]) % processes:
        raise SystemExit(f"train.batch_size={train['batch_size']} does not split over {processes}")
    # train.batch_size is the global batch (each process takes its share); `launcher()` starts the
    # processes itself, so the project's own launcher is one process.
    train.update(launcher="python", torch_threads=threads, seed=seed)
    (root / "data").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "data" / "processed").symlink_to(DATA_DIR.resolve())
    return train


def run(name: str, seed: int, test: pl.DataFrame) -> dict[str, Any]:
    processes, threads = LAYOUTS[name]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = make_project(root, processes, threads, seed)
        env = os.environ | {
            "PYTHONPATH": str(Path.cwd()),
            "OMP_NUM_THREADS": str(threads),
        }
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        done = subprocess.run(
            launcher(processes), cwd=root, env=env, capture_output=True, text=True, check=False
        )
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{name}, seed {seed}: train failed\n{done.stderr[-3000:]}")
        world = re.search(r"world size (\d+)", done.stderr)
        summary = re.search(
            r"done: (\d+) steps in (\d+) s, best validation loss ([\d.]+)", done.stderr
        )
        assert world and summary, done.stderr[-2000:]
        params = parse_section(train, TrainParams, "train")
        torch.set_num_threads(CORES)
        probs = probabilities(
            merged_logits(
                root / "models" / "adapter",
                params.base_model,
                LABEL_NAMES,
                test["text"].to_list(),
                params.max_length,
                load_section("evaluate", EvaluateParams).batch_size,
            )
        )
    metrics = compute_metrics(probs, test["label"].to_list(), LABEL_NAMES)
    return {
        "layout": name,
        "seed": seed,
        "world_size": int(world.group(1)),
        "threads_per_process": threads,
        "per_process_batch": params.batch_size,
        "global_batch": params.batch_size * processes,
        "steps": int(summary.group(1)),
        "train_s": int(summary.group(2)),
        "wall_s": round(wall, 1),
        "best_val_loss": float(summary.group(3)),
        "accuracy": round(metrics["accuracy"], 4),
        "macro_f1": round(metrics["macro_f1"], 4),
        "loadavg_1m_before": round(load_before, 2),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    by = {name: [r for r in records if r["layout"] == name] for name in LAYOUTS}
    mean = {
        name: {k: sum(r[k] for r in rs) / len(rs) for k in ("accuracy", "wall_s")}
        for name, rs in by.items()
    }
    one, two = (mean[name] for name in LAYOUTS)
    return {
        "mean": mean,
        "accuracy_diff_pt": round(100 * (two["accuracy"] - one["accuracy"]), 2),
        "speedup_2_processes": round(one["wall_s"] / two["wall_s"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument(
        "--update", action="store_true", help="replace these runs in the JSON, keep the others"
    )
    args = parser.parse_args()
    test = read_processed(DATA_DIR / "test.parquet", "test", LABEL_NAMES)
    records = []
    if args.update and OUT_FILE.exists():
        records = json.loads(OUT_FILE.read_text())["runs"]
    for seed in args.seeds:
        for name in args.layouts:
            records = [r for r in records if (r["layout"], r["seed"]) != (name, seed)]
            records.append(run(name, seed, test))
            print(json.dumps(records[-1]), flush=True)
    records.sort(key=lambda r: (-r["seed"], list(LAYOUTS).index(r["layout"])))
    result = {
        "machine": {"cores": os.cpu_count(), "torch": torch.__version__},
        "runs": records,
        "summary": summarize(records),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    OUT_FILE.parent.mkdir(parents=True, exist_ok=True)
    OUT_FILE.write_text(json.dumps(result, indent=2) + "\n")
    print(pl.DataFrame(records).select("layout", "seed", "steps", "wall_s", "train_s", "accuracy"))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
