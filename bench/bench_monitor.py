"""`newsclf monitor`: its statistics on clean and shifted logs of real texts, and its wall time and
peak memory on 100k and 1M logged texts.

    python -m bench.bench_monitor                       # after `dvc repro export`: both parts
    python -m bench.bench_monitor --part shifts         # the statistics only (two minutes)
    python -m bench.bench_monitor --part scale --sizes 100000

Shifts: logs written with newsclf/textlog.py's TextLog, each checked against the train table with
params.yaml's bounds: `clean` (3,000 test texts, three seeds) and `clean_<n>` (`--small` sizes of
test texts, `--draws` seeds each: the margin of the bounds on small logs; a size below
`monitor.min_texts` is judged with a params copy whose minimum is lowered to it), scored with
evaluate's logits of the test split (data/evaluated/test_logits.parquet, the rows the model's
confidence reference describes); `one_class` (every test text the model calls Sports);
`other_language` (German, French and Spanish sentences) and `other_topic` (recipes and code
comments), joined one to three at a time, 3,000 texts; `truncated` (3,000 test texts cut to their
first 20 characters); these scored by the exported ONNX model. Scores are softmax(logits / T)
with the folder's calibration temperature (1 without one). The model folder is models/onnx when
its newsclf_onnx.json carries `calibration.confidence_reference`; otherwise a copy of its
metadata with one computed as evaluate does, from the test logits. The summary: per case, the
largest value of each statistic over its draws and how many draws were flagged.

Scale: `--sizes` logged texts (test texts drawn with replacement, seed 0, in files of 50,000 rows
as `serve --log` writes them) in a temporary folder; `newsclf monitor` runs in a child process that
reports its own peak resident memory (VmHWM); the wall time includes the child's start.

Writes `reports/bench_monitor.json` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from bench import cpu_name
from newsclf.monitor import monitor
from newsclf.predict import META_FILE, OnnxClassifier, read_meta
from newsclf.textlog import LogRow, TextLog
from stages import paths
from stages.calibration import confidence_histogram, softmax
from stages.common import write_json
from tests.test_monitor import OTHER_LANGUAGE, OTHER_TOPIC, other_domain_texts

OUT_FILE = Path("reports/bench_monitor.json")
START = datetime(2025, 1, 1, tzinfo=UTC)
SHIFT_TEXTS = 3_000
ROWS_PER_FILE = 50_000  # TextLog's default: what `serve --log` writes
CHECKS = ("label_shares", "confidence", "text_length", "vocabulary", "text_drift")


def model_folder(tmp: Path, test_probs: np.ndarray) -> tuple[Path, str]:
    """models/onnx when it carries the confidence reference, else a folder with its metadata and
    one computed from the test logits, as evaluate computes it."""
    meta = read_meta(paths.ONNX)
    if (meta.get("calibration") or {}).get("confidence_reference"):
        return paths.ONNX, f"{paths.ONNX} (its calibration.confidence_reference)"
    folder = tmp / "model"
    folder.mkdir()
    meta["calibration"] = {
        "temperature": 1.0,
        "confidence_reference": confidence_histogram(test_probs),
    }
    (folder / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
    return folder, f"{paths.ONNX}'s metadata + a reference from {paths.TEST_LOGITS} at T=1"


def write_log(folder: Path, texts: list[str], probs: np.ndarray, labels: list[str]) -> Path:
    """A TextLog of these texts and scores, one row a second from START."""
    log = TextLog(folder, labels, rows_per_file=ROWS_PER_FILE, flush_s=3600)
    top = probs.argmax(axis=1)
    log.append(
        [
            LogRow(
                START + timedelta(seconds=i),
                text,
                labels[top[i]],
                labels[top[i]],
                float(probs[i, top[i]]),
                probs[i].tolist(),
                "bench",
                False,
            )
            for i, text in enumerate(texts)
        ]
    )
    log.close()
    return folder


def run_shifts(
    tmp: Path, test: pl.DataFrame, probs: np.ndarray, model: Path, small: list[int], draws: int
) -> list[dict]:
    import yaml

    from stages.common import load_labels

    labels = list(load_labels())
    temperature = float((read_meta(model).get("calibration") or {}).get("temperature", 1.0))
    classifier = OnnxClassifier(paths.ONNX)
    # Small clean logs below monitor.min_texts are judged with a copy of params.yaml whose
    # min_texts is lowered to them (every bound as it is): the margin the minimum buys.
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["monitor"]["min_texts"] = min([*small, params["monitor"]["min_texts"]])
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    def scored(texts: list[str]) -> np.ndarray:
        return softmax(classifier.logits(classifier.encode(texts).ids), temperature)

    texts = test["text"].to_list()
    rng = np.random.default_rng(0)
    cases: list[tuple[str, int, list[str], np.ndarray]] = []
    for seed in range(3):
        idx = np.random.default_rng(seed).choice(len(texts), SHIFT_TEXTS, replace=False)
        cases.append(("clean", seed, [texts[i] for i in idx], probs[idx]))
    for size in small:
        for seed in range(draws):
            idx = np.random.default_rng(100 + seed).choice(len(texts), size, replace=False)
            cases.append((f"clean_{size}", seed, [texts[i] for i in idx], probs[idx]))
    sports = np.flatnonzero(probs.argmax(axis=1) == labels.index("Sports"))
    cases.append(("one_class", 0, [texts[i] for i in sports], probs[sports]))
    for name, sentences in (("other_language", OTHER_LANGUAGE), ("other_topic", OTHER_TOPIC)):
        shifted = other_domain_texts(SHIFT_TEXTS, rng, sentences)
        cases.append((name, 0, shifted, scored(shifted)))
    idx = rng.choice(len(texts), SHIFT_TEXTS, replace=False)
    cut = [texts[i][:20] for i in idx]
    cases.append(("truncated", 0, cut, scored(cut)))
    records = []
    for name, seed, case_texts, case_probs in cases:
        folder = write_log(tmp / f"{name}_{seed}", case_texts, case_probs, labels)
        start = time.perf_counter()
        report = monitor(folder, model, paths.TRAIN, params_file)
        values = {c["name"]: c["value"] for c in report["checks"]}
        records.append(
            {"case": name, "seed": seed, "texts": len(case_texts)}
            | {check: round(values[check], 4) for check in CHECKS}
            | {
                "flagged": ", ".join(report["flagged_checks"]) or "-",
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
        print(records[-1], flush=True)
    return records


def summary(records: list[dict]) -> list[dict]:
    """Per case: the largest value of each statistic over its draws, and how many were flagged."""
    table = (
        pl.DataFrame(records)
        .group_by("case", maintain_order=True)
        .agg(
            draws=pl.len(),
            texts=pl.col("texts").first(),
            **{check: pl.col(check).max() for check in CHECKS},
            flagged_draws=(pl.col("flagged") != "-").sum(),
        )
    )
    return table.to_dicts()


def write_scale_log(folder: Path, n: int, test: pl.DataFrame, probs: np.ndarray, labels) -> None:
    """`n` rows drawn from the test texts (seed 0), written file by file as serve would."""
    rng = np.random.default_rng(0)
    texts = test["text"].to_list()
    log = TextLog(folder, labels, rows_per_file=ROWS_PER_FILE, flush_s=3600)
    for first in range(0, n, ROWS_PER_FILE):
        idx = rng.integers(len(texts), size=min(ROWS_PER_FILE, n - first))
        top = probs[idx].argmax(axis=1)
        log.append(
            [
                LogRow(
                    START + timedelta(seconds=(first + j) * 2),
                    texts[i],
                    labels[top[j]],
                    labels[top[j]],
                    float(probs[i, top[j]]),
                    probs[i].tolist(),
                    "bench",
                    False,
                )
                for j, i in enumerate(idx)
            ]
        )
        # One file at a time: the writer thread keeps up, the buffer stays one file.
        while log.files_written < first // ROWS_PER_FILE + 1:
            time.sleep(0.05)
    log.close()


# The child reports its own peak RSS: the kernel's high-water mark of its address space
# (VmHWM), which exec starts afresh. getrusage's ru_maxrss would not do: Linux carries it across
# exec, so a child forked from this process (the ONNX model loaded) reports this one's size.
CHILD = """
import re, json, sys, time
from pathlib import Path
from newsclf.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
hwm_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"code": code, "in_process_s": seconds, "max_rss_kb": hwm_kb}))
"""


def run_scale(tmp: Path, sizes: list[int], test: pl.DataFrame, probs, model: Path) -> list[dict]:
    from stages.common import load_labels

    labels = list(load_labels())
    records = []
    for n in sizes:
        folder = tmp / f"log_{n}"
        write_scale_log(folder, n, test, probs, labels)
        size_mb = sum(f.stat().st_size for f in folder.glob("*.parquet")) / 1e6
        cmd = [sys.executable, "-c", CHILD, "monitor", str(folder), "--model", str(model)]
        cmd += ["--out", str(tmp / f"out_{n}")]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if done.returncode not in (0, 1):
            raise SystemExit(f"monitor failed on {n} rows: {done.stderr.strip()}")
        child = json.loads(done.stdout.strip().splitlines()[-1])
        records.append(
            {
                "logged_texts": n,
                "files": len(list(folder.glob("*.parquet"))),
                "log_mb": round(size_mb, 1),
                "wall_s": round(seconds, 2),
                "in_process_s": round(child["in_process_s"], 2),
                "peak_rss_mb": round(child["max_rss_kb"] / 1024, 1),
                "exit_status": child["code"],
            }
        )
        print(records[-1], flush=True)
        for f in folder.glob("*.parquet"):
            f.unlink()
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("shifts", "scale", "both"), default="both")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--small",
        type=int,
        nargs="+",
        default=[200, 500],
        help="sizes of the small clean logs (test texts), each drawn --draws times",
    )
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args()
    test = pl.read_parquet(paths.TEST, columns=["id", "text"]).join(
        pl.read_parquet(paths.TEST_LOGITS), on="id", how="inner", maintain_order="left"
    )
    logits = np.stack(test["logits"].to_numpy())
    report: dict = json.loads(OUT_FILE.read_text()) if OUT_FILE.exists() else {}
    with tempfile.TemporaryDirectory(prefix="bench_monitor_") as tmp:
        model, model_note = model_folder(Path(tmp), softmax(logits))
        temperature = float((read_meta(model).get("calibration") or {}).get("temperature", 1.0))
        probs = softmax(logits, temperature)
        report |= {"model": model_note, "temperature": temperature, "cpu": cpu_name()}
        if args.part in ("shifts", "both"):
            report["shifts"] = run_shifts(Path(tmp), test, probs, model, args.small, args.draws)
            report["shifts_summary"] = summary(report["shifts"])
        if args.part in ("scale", "both"):
            report["scale"] = run_scale(Path(tmp), args.sizes, test, probs, model)
    report["machine"] = {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()}
    report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(report, OUT_FILE)
    with pl.Config(tbl_width_chars=200, tbl_rows=40, tbl_cols=20):
        for part in ("shifts_summary", "scale"):
            if report.get(part):
                print(pl.DataFrame(report[part]))
    print(f"CPU: {report['cpu']}")


if __name__ == "__main__":
    main()
