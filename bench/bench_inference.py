"""Inference benchmark: `python -m bench.bench_inference` (best after `dvc repro export`).

Times PyTorch fp32 (the merged model, transformers' default SDPA attention), ONNX Runtime fp32
and ONNX Runtime int8 — exported here by the export stage's own functions into a temporary folder —
on the same real test texts, pre-tokenised once with the predict path's tokenizer (so only the
forward pass is timed, and every backend sees identical, identically padded batches in test order):
throughput (texts/s) at batch 1, 8 and 64, and latency p50/p95 at batch 1. Then the cold-start wall
time of `newsclf predict "one headline"` in a fresh process, over several runs, and — when the
trained adapter is there — accuracy of the three on the full test split.

With no trained adapter yet (`models/adapter/` missing), a freshly LoRA-wrapped MiniLM (random,
untrained LoRA and head) is benched instead: speed does not depend on training; accuracy is then
not measured. The JSON says which. The machine is shared: compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from newsclf.predict import CUDA_PROVIDER, OnnxClassifier, default_providers, pad_batch
from stages import paths
from stages.common import StageError, load_labels, read_table, write_json
from stages.evaluate import merged_logits
from stages.export import ExportParams, export_folder, int8_plan, parity_texts
from stages.modeling import prepare_tokenizer, resolve_base_model
from stages.params import load_section
from stages.processed import read_processed
from stages.train import build_peft_model
from stages.train_params import TrainParams

# Test texts the export's fp32 parity check runs on here (the stage checks export.parity.n_texts).
PARITY_TEXTS = 64

BATCH_SIZES = (1, 8, 64)
HEADLINE = "Stocks rally as the central bank holds interest rates steady"


def fresh_adapter(base_model: str, label_names: tuple[str, ...], out: Path) -> Path:
    """A LoRA-wrapped base (params.yaml's `train.lora`, resolved for the base) with random
    (non-zero) LoRA weights, saved with its tokenizer as train saves them."""
    from transformers import AutoTokenizer

    params = load_section("train", TrainParams)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(base_model), base_model)
    peft_model = build_peft_model(
        base_model, params, "none", "fp32", label_names, pad_token_id=tokenizer.pad_token_id
    )
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # zero at init: perturb so the merge changes the weights
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def load_test(path: Path | None) -> tuple[pl.DataFrame, str]:
    """Test rows (id, label, text) and where they came from."""
    if path is None:
        path = paths.TEST if paths.TEST.exists() else paths.CLEAN
    table = read_table(path, columns=["split", "label", "text"]).filter(pl.col("split") == "test")
    if table.is_empty():
        raise StageError(f"{path}: no test rows")
    return table, str(path)


def time_interleaved(
    runners: dict[str, Callable[[dict[str, np.ndarray]], Any]], batches: list[dict]
) -> dict[str, list[float]]:
    """Seconds per batch for each runner, after one untimed warm-up batch each.

    The runners take turns on every batch, so load from other processes on this shared machine
    falls on all of them alike and the ratios stay fair.
    """
    for run in runners.values():
        run(batches[0])
    times: dict[str, list[float]] = {name: [] for name in runners}
    for batch in batches:
        for name, run in runners.items():
            start = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - start)
    return times


def torch_runner(model: torch.nn.Module, device: str) -> Callable[[dict], Any]:
    def run(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            inputs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()}
            return model(**inputs).logits.float().cpu().numpy()

    return run


def ort_runner(classifier: OnnxClassifier) -> Callable[[dict], Any]:
    return lambda batch: classifier.session.run(None, batch)[0]


def cold_predict(model_dir: Path, runs: int) -> list[float]:
    """Wall seconds of `newsclf predict HEADLINE` in a fresh process, `runs` times."""
    script = Path(sys.executable).with_name("newsclf")
    if not script.exists():
        raise StageError(f"{script}: console script missing; run `pip install -e .`")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(
            [str(script), "predict", "--model", str(model_dir), HEADLINE],
            check=True,
            capture_output=True,
        )
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=Path, default=None, help="test table (default: processed)")
    parser.add_argument("--n-texts", type=int, default=512, help="texts per throughput run")
    parser.add_argument("--latency-texts", type=int, default=200, help="batch-1 calls timed")
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("reports/bench_inference.json"))
    args = parser.parse_args()

    train = load_section("train", TrainParams)
    export = load_section("export", ExportParams)
    label_names = load_labels()
    max_length = train.max_length
    base_model = resolve_base_model(train.base_model)
    test, source = load_test(args.texts)
    trained = (paths.ADAPTER / "adapter_config.json").is_file()
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        adapter = (
            paths.ADAPTER
            if trained
            else fresh_adapter(base_model, label_names, Path(tmp) / "adapter")
        )
        onnx_dir = Path(tmp) / "onnx"
        int8 = int8_plan(read_processed(paths.TRAIN, "train", label_names), export)
        parity = parity_texts(test["text"].to_list(), PARITY_TEXTS)
        model = export_folder(
            adapter,
            base_model,
            label_names,
            onnx_dir,
            export.opset,
            max_length,
            int8,
            parity,
            merged_logits(adapter, base_model, label_names, parity, max_length, export.batch_size),
            export.parity,
            export.batch_size,
        ).built.model
        backends: dict[str, Callable[[dict], Any]] = {"pytorch_fp32": torch_runner(model, "cpu")}
        classifiers = {}
        for precision in ("fp32", "int8"):
            classifiers[precision] = OnnxClassifier(
                onnx_dir, precision, providers=["CPUExecutionProvider"]
            )
            backends[f"ort_{precision}"] = ort_runner(classifiers[precision])
        # On a GPU machine, add the CUDA provider's and torch's CUDA figures beside the CPU ones.
        if CUDA_PROVIDER in default_providers():
            cuda = OnnxClassifier(onnx_dir, "fp32", providers=default_providers())
            backends["ort_fp32_cuda"] = ort_runner(cuda)
        if torch.cuda.is_available():
            backends["pytorch_fp32_cuda"] = torch_runner(model.to("cuda"), "cuda")

        texts = test["text"].to_list()
        encoded = classifiers["fp32"].encode(texts[: args.n_texts]).ids
        pad_id = classifiers["fp32"].pad_id
        results: dict[str, dict[str, float]] = {name: {} for name in backends}
        for size in BATCH_SIZES:
            chunk = encoded[: args.latency_texts] if size == 1 else encoded
            batches = [pad_batch(chunk[i : i + size], pad_id) for i in range(0, len(chunk), size)]
            for name, times in time_interleaved(backends, batches).items():
                results[name][f"texts_per_s_b{size}"] = round(len(chunk) / sum(times), 1)
                if size == 1:
                    results[name]["p50_ms_b1"] = round(1000 * statistics.median(times), 2)
                    results[name]["p95_ms_b1"] = round(1000 * float(np.percentile(times, 95)), 2)
            print(f"batch {size}: done", file=sys.stderr)

        cold = cold_predict(onnx_dir, args.cold_runs)
        accuracy = {}
        if trained:
            labels = test["label"].to_numpy()
            all_ids = classifiers["fp32"].encode(texts).ids
            for precision, classifier in classifiers.items():
                predicted = classifier.logits(all_ids, batch_size=64).argmax(1)
                accuracy[f"ort_{precision}"] = round(float((predicted == labels).mean()), 6)
            ref = torch_runner(model.to("cpu"), "cpu")
            predicted = np.concatenate(
                [
                    ref(pad_batch(all_ids[i : i + 64], pad_id)).argmax(1)
                    for i in range(0, len(all_ids), 64)
                ]
            )
            accuracy["pytorch_fp32"] = round(float((predicted == labels).mean()), 6)

    ratio = results["ort_int8"]["texts_per_s_b64"] / results["pytorch_fp32"]["texts_per_s_b64"]
    report = {
        "model": "trained adapter models/adapter"
        if trained
        else f"freshly LoRA-wrapped {train['base_model']} (untrained; speed only)",
        "base_model": train["base_model"],
        "texts": source,
        "n_texts": len(encoded),
        "latency_texts": min(args.latency_texts, len(encoded)),
        "max_length": max_length,
        "machine": {
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
            # Other processes on a shared machine slow every backend: record how busy it was.
            "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "results": results,
        "int8_vs_pytorch_fp32_b64": round(ratio, 2),
        "cold_predict_s": {
            "runs": [round(t, 3) for t in cold],
            "median": round(statistics.median(cold), 3),
            "max": round(max(cold), 3),
        },
        "accuracy_full_test": accuracy or None,
    }
    write_json(report, args.out)
    print_table(report)


def print_table(report: dict[str, Any]) -> None:
    cols = [f"texts_per_s_b{b}" for b in BATCH_SIZES] + ["p50_ms_b1", "p95_ms_b1"]
    print(f"model: {report['model']}; texts: {report['texts']} (max_length {report['max_length']})")
    print(f"load average (1 min) before/after: {report['machine']['load_average_1m']}")
    print(f"{'backend':<18}" + "".join(f"{c:>17}" for c in cols))
    for name, row in report["results"].items():
        print(f"{name:<18}" + "".join(f"{row[c]:>17}" for c in cols))
    print(f"ORT int8 / PyTorch fp32 throughput at batch 64: {report['int8_vs_pytorch_fp32_b64']}x")
    cold = report["cold_predict_s"]
    print(f"cold `newsclf predict` wall: median {cold['median']} s, max {cold['max']} s")
    if report["accuracy_full_test"]:
        print(f"accuracy (full test split): {report['accuracy_full_test']}")


if __name__ == "__main__":
    main()
