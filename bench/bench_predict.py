"""`newsclf predict --json -f FILE` at 20k and 1M lines: peak memory, texts/s, time to first result.

    python -m bench.bench_predict                         # after `dvc repro export`
    python -m bench.bench_predict --sizes 20000 --baseline-ref 308120f

Lines are resampled (seed 0) from the test split's texts. Each run is the real command in a fresh
process, its resident memory sampled every 0.1 s, its output counted as it arrives. `--baseline-ref`
runs the same command from that git commit too (a temporary worktree), for the sizes up to
`--baseline-max-lines`: the reference for "throughput within 10% of today's". A run longer than
`--max-seconds` is stopped there and reported with the results it had printed (memory of a streaming
run is flat after its first chunk; the point of 1M lines is to show that). Writes
`reports/bench_predict.json` and prints a table; the two versions alternate, so both see the same
load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import psutil

from stages import paths
from stages.common import write_json

TEST_FILE = paths.TEST
OUT_FILE = Path("reports/bench_predict.json")
SAMPLE_S = 0.1


def write_lines(path: Path, n: int) -> None:
    texts = pl.read_parquet(TEST_FILE, columns=["text"])["text"]
    sample = texts.sample(n, with_replacement=True, seed=0).str.replace_all(r"[\r\n]+", " ")
    path.write_text("\n".join(sample.to_list()) + "\n", encoding="utf-8")


def run_predict(code_dir: Path, lines: Path, model: Path, batch: int, max_s: float) -> dict:
    # `main()` called from -c: older versions of newsclf/cli.py have no `__main__` block.
    call = "import sys; from newsclf.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", call, "predict", "--json", "-f", str(lines)]
    cmd += ["--model", str(model), "--batch-size", str(batch)]
    env = os.environ | {"PYTHONPATH": str(code_dir)}
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=code_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    seen = {"lines": 0, "first_s": None}

    def count() -> None:
        for _ in proc.stdout:
            if seen["first_s"] is None:
                seen["first_s"] = time.perf_counter() - start
            seen["lines"] += 1

    reader = threading.Thread(target=count, daemon=True)
    reader.start()
    watched = psutil.Process(proc.pid)
    peak, stopped = 0, False
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, watched.memory_info().rss)
        if time.perf_counter() - start > max_s:
            proc.terminate()
            stopped = True
            break
        time.sleep(SAMPLE_S)
    proc.wait()
    reader.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0 and not stopped:
        raise SystemExit(f"{' '.join(cmd)} failed with status {proc.returncode}")
    return {
        "results": seen["lines"],
        "seconds": round(seconds, 1),
        "texts_per_s": round(seen["lines"] / seconds, 1),
        "first_result_s": None if seen["first_s"] is None else round(seen["first_s"], 2),
        "peak_rss_mb": round(peak / 1e6, 1),
        "stopped_at_max_seconds": stopped,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 1_000_000])
    parser.add_argument("--model", type=Path, default=paths.ONNX)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--baseline-ref", help="git commit of the version to compare against")
    parser.add_argument("--baseline-max-lines", type=int, default=20_000)
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument(
        "--update", action="store_true", help="replace these runs in the JSON, keep the others"
    )
    args = parser.parse_args()
    model = args.model.resolve()
    records: list[dict[str, Any]] = []
    if args.update and OUT_FILE.exists():
        records = json.loads(OUT_FILE.read_text())["runs"]
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        versions = {"this checkout": Path.cwd()}
        if args.baseline_ref:
            worktree = Path(tmp) / "baseline"
            subprocess.run(
                ["git", "worktree", "add", "--detach", str(worktree), args.baseline_ref],
                check=True,
                capture_output=True,
            )
            versions = {f"baseline {args.baseline_ref}": worktree} | versions
        try:
            for size in args.sizes:
                lines = Path(tmp) / f"lines_{size}.txt"
                write_lines(lines, size)
                for name, code_dir in versions.items():
                    if code_dir != Path.cwd() and size > args.baseline_max_lines:
                        continue
                    records = [r for r in records if (r["version"], r["lines"]) != (name, size)]
                    record = {"version": name, "lines": size}
                    record |= run_predict(code_dir, lines, model, args.batch_size, args.max_seconds)
                    records.append(record)
                    print(record, flush=True)
        finally:
            if args.baseline_ref:
                subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], check=True)
    report = {
        "model": str(args.model),
        "batch_size": args.batch_size,
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "runs": records,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(report, OUT_FILE)
    with pl.Config(tbl_width_chars=160):
        print(pl.DataFrame(records))


if __name__ == "__main__":
    main()
