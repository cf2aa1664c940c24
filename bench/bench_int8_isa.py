"""The shipped int8 graph's agreement with PyTorch on this CPU and as an AVX2-only CPU computes it.

    python -m bench.bench_int8_isa [--model-dir models/onnx] [--limit N]

Scores `models/onnx/`'s int8 graph (and its fp32 graph, natively) on the test rows with the same
tokenizer and session code as `newsclf predict`, and compares each with `evaluate`'s PyTorch
logits (`data/evaluated/test_logits.parquet`): top-1 agreement, test accuracy, the largest logit
difference. Twice: natively (this CPU's int8 instructions, e.g. AVX512-VNNI) and in a child
process that QEMU emulates as a Haswell (`qemu-x86_64 -cpu Haswell`, Debian's qemu-user), so that
ONNX Runtime picks its AVX2 int8 kernels, as on an AMD EPYC Zen 3. The emulated run is ~15-20x
slower: `--limit` scores every k-th test row instead of all of them (both runs score the same
rows). The child imports neither torch nor transformers (`newsclf.predict` is torch-free).

Writes `reports/bench_int8_isa.json` and prints a table. The graph is the one export shipped;
export measures the native figure itself (`reports/export.json`), this adds the other ISA.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

OUT_FILE = Path("reports/bench_int8_isa.json")
TEST = Path("data/processed/test.parquet")
REFERENCE = Path("data/evaluated/test_logits.parquet")
EXPORT_REPORT = Path("reports/export.json")
# What an AVX2-only CPU runs: QEMU's Haswell model has AVX2 + FMA, no AVX-512 or VNNI. numpy's own
# AVX2 sort kernels crash QEMU 7.2 (docs/testing.md), so numpy keeps to x86-64-v2 code there.
EMULATED_ENV = {"NPY_DISABLE_CPU_FEATURES": "X86_V3"}
EMULATED_CPU = "Haswell"


def rows_scored(n_rows: int, limit: int | None) -> list[int]:
    """Every row, or `limit` of them spread evenly over the table (every k-th)."""
    if limit is None or limit >= n_rows:
        return list(range(n_rows))
    return np.linspace(0, n_rows - 1, num=limit).round().astype(int).tolist()


def score(model_dir: Path, precisions: list[str], rows: list[int]) -> dict[str, dict]:
    """Logits of the chosen test rows per graph, with their texts/s (one ORT thread)."""
    from newsclf.predict import OnnxClassifier

    texts = pl.read_parquet(TEST)["text"].to_list()
    out = {}
    for precision in precisions:
        classifier = OnnxClassifier(model_dir, precision=precision, threads=1)
        ids = classifier.encode([texts[i] for i in rows]).ids
        start = time.perf_counter()
        logits = classifier.logits(ids, batch_size=64)
        seconds = time.perf_counter() - start
        out[precision] = {"logits": logits.tolist(), "texts_per_s": round(len(rows) / seconds, 2)}
    return out


def figures(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {
        "top1_agreement": round(float((logits.argmax(1) == reference.argmax(1)).mean()), 6),
        "accuracy": round(float((logits.argmax(1) == labels).mean()), 6),
        "max_abs_logit_diff": round(float(np.abs(logits - reference).max()), 6),
    }


def emulated(model_dir: Path, rows: list[int]) -> dict[str, dict]:
    """`score` of the int8 graph in a child process emulated as a Haswell by QEMU, on one core."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise SystemExit("needs qemu-x86_64 for the AVX2 run: apt-get install qemu-user")
    rows_file = OUT_FILE.with_suffix(".rows.json")
    rows_file.write_text(json.dumps(rows))
    command = [qemu, "-cpu", EMULATED_CPU, sys.executable, "-m", "bench.bench_int8_isa"]
    command += ["--child", str(rows_file), "--model-dir", str(model_dir)]
    if shutil.which("taskset"):
        command = ["taskset", "-c", "0", *command]
    proc = subprocess.run(
        command, env=os.environ | EMULATED_ENV, capture_output=True, text=True, check=False
    )
    rows_file.unlink()
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.splitlines() if "TCG" not in line)[-3000:]
        raise SystemExit(f"the emulated run failed (rc {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    from stages.common import cpu_model, int8_instructions, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/onnx"))
    parser.add_argument("--limit", type=int, help="score this many test rows, spread evenly")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:  # the emulated process: print the logits as one JSON line
        print(json.dumps(score(args.model_dir, ["int8"], json.loads(args.child.read_text()))))
        return
    test = pl.read_parquet(TEST)
    reference_table = pl.read_parquet(REFERENCE)
    if reference_table["id"].to_list() != test["id"].to_list():
        raise SystemExit(f"{REFERENCE}: not the rows of {TEST}; run `dvc repro evaluate`")
    rows = rows_scored(test.height, args.limit)
    reference = np.asarray(reference_table["logits"].to_list(), dtype=np.float32)[rows]
    labels = test["label"].to_numpy()[rows]
    meta = json.loads((args.model_dir / "newsclf_onnx.json").read_text())
    native = score(args.model_dir, ["fp32", "int8"], rows)
    start = time.perf_counter()
    avx2 = emulated(args.model_dir, rows)
    emulated_s = time.perf_counter() - start
    int8_native = np.asarray(native["int8"]["logits"], dtype=np.float32)
    int8_avx2 = np.asarray(avx2["int8"]["logits"], dtype=np.float32)
    result = {
        "cpu": cpu_model(),
        "model_dir": str(args.model_dir),
        # How export made the int8 graph (weights, smoothing, nodes kept fp32), where it is known.
        "int8_export": (
            {
                k: v
                for k, v in json.loads(EXPORT_REPORT.read_text()).get("int8", {}).items()
                if k != "sensitivity"
            }
            if args.model_dir == Path("models/onnx") and EXPORT_REPORT.is_file()
            else None
        ),
        "n_texts": len(rows),
        "pytorch_accuracy": round(float((reference.argmax(1) == labels).mean()), 6),
        "native": {
            "int8_instructions": int8_instructions(),
            "fp32": figures(np.asarray(native["fp32"]["logits"]), reference, labels)
            | {"texts_per_s_1_thread": native["fp32"]["texts_per_s"]},
            "int8": figures(int8_native, reference, labels)
            | {"texts_per_s_1_thread": native["int8"]["texts_per_s"]},
        },
        "avx2": {
            "int8_instructions": f"AVX2, no VNNI (qemu-x86_64 -cpu {EMULATED_CPU})",
            "int8": figures(int8_avx2, reference, labels)
            | {"texts_per_s_emulated": avx2["int8"]["texts_per_s"]},
            "seconds_emulated": round(emulated_s, 1),
        },
        "int8_native_vs_avx2": {
            "max_abs_logit_diff": round(float(np.abs(int8_native - int8_avx2).max()), 6),
            "top1_differs": int((int8_native.argmax(1) != int8_avx2.argmax(1)).sum()),
        },
        "min_agreement": meta.get("int8_parity", {}).get("min_agreement"),
    }
    write_json(result, OUT_FILE)
    bound = result["min_agreement"]
    print(f"{result['cpu']}; {len(rows)} test rows; PyTorch accuracy {result['pytorch_accuracy']}")
    print(f"{'graph / int8 instructions':<44} {'agreement':>10} {'accuracy':>9} {'meets':>6}")
    for name, isa, graph in (
        ("fp32", result["native"]["int8_instructions"], result["native"]["fp32"]),
        ("int8", result["native"]["int8_instructions"], result["native"]["int8"]),
        ("int8", result["avx2"]["int8_instructions"], result["avx2"]["int8"]),
    ):
        meets = "" if bound is None or name == "fp32" else str(graph["top1_agreement"] >= bound)
        label = f"{name} / {isa}"
        print(f"{label:<44} {graph['top1_agreement']:>10} {graph['accuracy']:>9} {meets:>6}")
    print(f"int8 native vs AVX2: {result['int8_native_vs_avx2']}")
    print(f"wrote {OUT_FILE}")


if __name__ == "__main__":
    main()
