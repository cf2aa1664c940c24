"""GPU benchmark: LoRA (bf16) against QLoRA (4-bit NF4) — memory, time and accuracy.

    python -m bench.bench_gpu [--data data/processed] [--large-steps 300]

Needs a CUDA GPU and bitsandbytes (`pip install -e '.[gpu,dev]'`); without CUDA it exits with
status 2 and says so, writing nothing. Two parts, both written to `reports/bench_gpu.json` with the
device named:

1. The project model: the `train` stage's code and `params.yaml` params, once with
   `quantization: none` (LoRA, bf16 mixed precision) and once with `4bit` (QLoRA), on the same rows;
   records peak GPU memory while training, the model's memory footprint, seconds per epoch and
   test accuracy. Target: QLoRA accuracy within 0.5 pt of LoRA's.
2. A randomly initialised BERT-large-sized classifier (24 layers, 1024 wide; no weights needed),
   trained `--large-steps` steps on random tokens with LoRA and with QLoRA; records peak memory.
   MiniLM is too small for weight memory to matter, so this is where 4-bit shows. Target: QLoRA's
   peak ≤ 50% of LoRA's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl
import torch

from bench.training import load_bench_data, train_in
from stages.common import NUM_LABELS, load_params, resolve_base_model
from stages.evaluate import compute_metrics, load_classifier, predict_proba
from stages.train import build_peft_model, parse_params

OUT_FILE = Path("reports/bench_gpu.json")
MODES = ("none", "4bit")
GIB = 1024**3


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_cuda() -> None:
    """Exit with a clear message (status 2) where this benchmark cannot run."""
    if not torch.cuda.is_available():
        print("bench_gpu: torch sees no CUDA GPU; run this on a CUDA machine", file=sys.stderr)
        raise SystemExit(2)
    if _version("bitsandbytes") is None:
        print("bench_gpu: bitsandbytes is missing: pip install -e '.[gpu,dev]'", file=sys.stderr)
        raise SystemExit(2)


def bench_project_model(data_dir: Path, eval_batch: int) -> list[dict[str, Any]]:
    params = parse_params(load_params("train"))
    data = load_bench_data(data_dir, params)
    test = data.test
    rows = []
    for mode in MODES:
        run_params = replace(params, quantization=mode)
        footprint = build_peft_model(
            resolve_base_model(params.base_model), run_params, mode
        ).get_memory_footprint()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as tmp:
            result, adapter_dir = train_in(Path(tmp), data, run_params)
            peak = torch.cuda.max_memory_allocated()
            model, tokenizer = load_classifier(adapter_dir, params.base_model, mode)
            t0 = time.perf_counter()
            probs = predict_proba(
                model, tokenizer, test["text"].to_list(), params.max_length, eval_batch
            )
            score_s = time.perf_counter() - t0
        metrics = compute_metrics(probs, test["label"].to_list())
        rows.append(
            {
                "part": "minilm",
                "mode": "LoRA bf16" if mode == "none" else "QLoRA 4-bit NF4",
                "quantization": mode,
                "n_train": result.n_train,
                "n_test": test.height,
                "epochs": float(params.epochs),
                "steps": result.global_step,
                "peak_train_memory_gib": round(peak / GIB, 3),
                "model_footprint_gib": round(footprint / GIB, 4),
                "seconds_per_epoch": round(result.train_seconds / float(params.epochs), 1),
                "score_seconds": round(score_s, 1),
                "accuracy": round(metrics["accuracy"], 4),
                "macro_f1": round(metrics["macro_f1"], 4),
            }
        )
        del model
        torch.cuda.empty_cache()
    return rows


def bench_large(steps: int, batch_size: int, seq_len: int) -> list[dict[str, Any]]:
    """Peak memory of LoRA vs QLoRA training on a random BERT-large-sized classifier."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    params = parse_params(load_params("train"))
    config = BertConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=512,
        num_labels=NUM_LABELS,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # Saved once so both modes load the same weights through from_pretrained, as train does.
        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(resolve_base_model(params.base_model)).save_pretrained(tmp)
        for mode in MODES:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model = build_peft_model(tmp, replace(params, quantization=mode), mode)
            if mode == "none":
                model.to("cuda")  # the 4-bit load already placed the model on the GPU
            footprint = model.get_memory_footprint()
            optimizer = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=params.learning_rate
            )
            gen = torch.Generator(device="cuda").manual_seed(0)
            model.train()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                ids = torch.randint(
                    1000, config.vocab_size, (batch_size, seq_len), device="cuda", generator=gen
                )
                labels = torch.randint(0, NUM_LABELS, (batch_size,), device="cuda", generator=gen)
                # bf16 autocast, as the Trainer's `bf16=True` does for the LoRA run.
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            rows.append(
                {
                    "part": "bert-large-random",
                    "mode": "LoRA bf16" if mode == "none" else "QLoRA 4-bit NF4",
                    "quantization": mode,
                    "steps": steps,
                    "batch_size": batch_size,
                    "seq_len": seq_len,
                    "peak_train_memory_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
                    "model_footprint_gib": round(footprint / GIB, 4),
                    "seconds_per_step": round((time.perf_counter() - t0) / steps, 4),
                    "final_loss": round(float(loss), 4),
                }
            )
            del model, optimizer
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--large-steps", type=int, default=300)
    parser.add_argument("--large-batch", type=int, default=8)
    parser.add_argument("--large-seq-len", type=int, default=128)
    args = parser.parse_args()
    require_cuda()
    eval_batch = int(load_params("evaluate")["batch_size"])
    rows = bench_project_model(args.data, eval_batch)
    rows += bench_large(args.large_steps, args.large_batch, args.large_seq_len)
    minilm = {r["quantization"]: r for r in rows if r["part"] == "minilm"}
    large = {r["quantization"]: r for r in rows if r["part"] == "bert-large-random"}
    accuracy_gap = abs(minilm["none"]["accuracy"] - minilm["4bit"]["accuracy"])
    peak_ratio = large["4bit"]["peak_train_memory_gib"] / large["none"]["peak_train_memory_gib"]
    report = {
        "device": torch.cuda.get_device_name(0),
        "versions": {
            p: _version(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
        },
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": rows,
        "targets": {
            "qlora_accuracy_gap_pt": round(100 * accuracy_gap, 2),
            "qlora_accuracy_within_0_5pt": accuracy_gap <= 0.005,
            "large_qlora_peak_over_lora_peak": round(peak_ratio, 3),
            "large_qlora_peak_at_most_half": peak_ratio <= 0.5,
        },
    }
    OUT_FILE.parent.mkdir(parents=True, exist_ok=True)
    OUT_FILE.write_text(json.dumps(report, indent=2) + "\n")
    print(f"device: {report['device']}")
    print(pl.DataFrame(rows))
    print(json.dumps(report["targets"], indent=2))


if __name__ == "__main__":
    main()
