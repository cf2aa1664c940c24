"""How the int8 graph is made: SmoothQuant's alpha and 7- against 8-bit weights, on the shipped model.

    python -m bench.bench_int8_settings [--alphas 0 0.6 0.7 0.8 0.9] [--model-dir models/onnx]

Quantises the shipped fp32 graph (`models/onnx/model.onnx`) once per setting with the export
stage's own functions (`smooth_for_int8`, `quantize_int8`, every candidate node int8) and scores
each int8 graph on this CPU against the fp32 graph:

- on the export stage's calibration texts (`export.int8_calibration_texts` genuine train rows
  spread over the length range): mean squared logit error and top-1 agreement, what a choice of
  setting may be made on;
- on the held-out validation rows of the last training run (`reports/train/val_predictions.csv`:
  train rows the model never trained on): the same two figures;
- on the test split (`data/evaluated/test_logits.parquet`, PyTorch): top-1 agreement and accuracy,
  reported, never chosen on.

Writes `reports/bench_int8_settings.json` and prints a table, with the CPU and its int8
instructions: the figures are this CPU's int8 kernels' (bench_int8_isa.py adds an AVX2 one).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from bench import cpu_name
from newsclf.predict import OnnxClassifier
from stages import paths
from stages.common import int8_instructions, load_labels, write_json
from stages.export import (
    FP32_FILE,
    calibration_texts,
    int8_candidates,
    quantize_int8,
    session_logits,
    smooth_for_int8,
)
from stages.params import load_section
from stages.processed import read_processed
from stages.sections import ExportParams

OUT_FILE = Path("reports/bench_int8_settings.json")
VALIDATION_ROWS = Path("reports/train/val_predictions.csv")


def agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    return round(float((logits.argmax(1) == reference.argmax(1)).mean()), 6)


def mse(logits: np.ndarray, reference: np.ndarray) -> float:
    return float(f"{float(((logits - reference) ** 2).mean()):.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model-dir", type=Path, default=paths.ONNX)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0, 0.6, 0.7, 0.8, 0.9])
    args = parser.parse_args()
    params = load_section("export", ExportParams)
    labels = load_labels()
    train = read_processed(paths.TRAIN, "train", labels)
    test = read_processed(paths.TEST, "test", labels)
    held_out = pl.read_csv(VALIDATION_ROWS, schema_overrides={"id": pl.Utf8})["id"].to_list()
    classifier = OnnxClassifier(args.model_dir, precision="fp32")
    pad = classifier.pad_id
    sets = {
        "calibration": classifier.encode(
            calibration_texts(train, params.int8_calibration_texts)
        ).ids,
        "held_out": classifier.encode(train.filter(pl.col("id").is_in(held_out))["text"]).ids,
        "test": classifier.encode(test["text"].to_list()).ids,
    }
    fp32_path = args.model_dir / FP32_FILE
    reference = {
        "calibration": session_logits(fp32_path, sets["calibration"], pad, params.batch_size),
        "held_out": session_logits(fp32_path, sets["held_out"], pad, params.batch_size),
        "test": np.asarray(
            pl.read_parquet(paths.TEST_LOGITS)["logits"].to_list(), dtype=np.float32
        ),
    }
    truth = test["label"].to_numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for alpha in args.alphas:
            source = fp32_path
            if alpha > 0:
                source = Path(tmp) / f"smoothed_{alpha}.onnx"
                smooth_for_int8(
                    fp32_path, source, sets["calibration"], pad, alpha, params.batch_size
                )
            for seven_bit in (True, False):
                int8 = Path(tmp) / "int8.onnx"
                quantize_int8(source, int8, [], seven_bit=seven_bit)
                logits = {
                    name: session_logits(int8, ids, pad, params.batch_size)
                    for name, ids in sets.items()
                }
                row = {"alpha": alpha or None, "weights": "7-bit" if seven_bit else "8-bit"}
                for name in ("calibration", "held_out"):
                    row[f"{name}_mse"] = mse(logits[name], reference[name])
                    row[f"{name}_agreement"] = agreement(logits[name], reference[name])
                row["test_agreement"] = agreement(logits["test"], reference["test"])
                row["test_accuracy"] = round(float((logits["test"].argmax(1) == truth).mean()), 6)
                rows.append(row)
                print(row, flush=True)
    result = {
        "cpu": cpu_name(),
        "int8_instructions": int8_instructions(),
        "candidates": len(int8_candidates(fp32_path)),
        "n_texts": {name: len(ids) for name, ids in sets.items()},
        "pytorch_test_accuracy": round(float((reference["test"].argmax(1) == truth).mean()), 6),
        "settings": rows,
    }
    write_json(result, OUT_FILE)
    print(f"{result['cpu']}, int8: {result['int8_instructions']}; texts {result['n_texts']}")
    header = ("alpha", "weights", "cal. MSE", "cal. agr.", "held-out MSE", "held-out agr.")
    print(" | ".join(header + ("test agr.", "test acc.")))
    for row in rows:
        print(" | ".join(str(value) for value in row.values()))
    print(f"wrote {OUT_FILE}")


if __name__ == "__main__":
    main()
