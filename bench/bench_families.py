"""Every supported base-model family at one small but not toy size, and QLoRA where it pays.

    python -m bench.bench_families [--families bert qwen2 ...] [--parts families qwen]

1. `families`: per model type, a random base of 4 layers, hidden 256 (bench/tiny_models.py, its
   BPE tokenizer trained on the train texts), built the same way for each. LoRA with
   `train.lora: auto` (params.yaml otherwise), median seconds per optimizer step at batch 16 x 128
   random tokens in fp32, bf16 autocast (where the CPU computes it natively) and QLoRA (NF4 base);
   the trainable share; then the export stage's own code (`export_folder`: merge, ONNX, ORT
   fusions, fp32 parity, int8 with the fp32-node chooser at params.yaml's bounds) and ONNX Runtime
   texts/s of fp32 and int8 on the same real test texts (tokenization included), with int8's
   top-1 agreement with fp32 there. Random weights: speed and parity mean what they say; agreement
   is that of an untrained model, whose near-tied logits flip more easily than a trained one's.
2. `qwen`: the case QLoRA exists for, a decoder of Qwen2-0.5B's shape (24 layers, hidden 896,
   14 heads / 2 KV heads, MLP 4864, its 151,936-token vocabulary; random weights, ~494M
   parameters), `--qwen-steps` steps at batch `--qwen-batch` x 128 through bench_quant's `large`
   child (its own process per mode): LoRA on the fp32 base, the same with activation
   checkpointing, and QLoRA's recipe (NF4, double quantization, activation checkpointing, bf16
   compute where native): peak RSS while training (after loading; the kernel's high-water mark,
   backward included) and seconds per step. Target: QLoRA's peak <= 2 GB and <= 40% of fp32 LoRA's.

Writes reports/bench_families.json and prints the tables; the CPU is named beside every speed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench import cpu_name

OUT_FILE = Path("reports/bench_families.json")
QWEN_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
}
SIZE = {"layers": 4, "hidden": 256, "heads": 4}
BATCH, SEQ_LEN = 16, 128
MAX_PEAK_GIB, MAX_PEAK_SHARE = 2.0, 0.40  # 2 GiB; 2 GB decimal is 1.86 GiB


def step_seconds(
    model, precision: str, vocab: int, steps: int, n_labels: int, eos_id: int | None
) -> float:
    """Median wall seconds of an optimizer step on random tokens (the first, warm-up, dropped);
    `eos_id` closes every row (T5 classifies from its `</s>`)."""
    from stages.modeling import compute_dtype

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    seconds = []
    for _ in range(steps + 1):
        # Ids above the specials (no text holds a pad id: a decoder pools its last real token).
        ids = torch.randint(16, vocab, (BATCH, SEQ_LEN), generator=generator)
        if eos_id is not None:
            ids[:, -1] = eos_id
        labels = torch.randint(0, n_labels, (BATCH,), generator=generator)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=compute_dtype(precision), enabled=precision == "bf16"):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return round(statistics.median(seconds[1:]), 4)


def onnx_speed(folder: Path, texts: list[str], batch_size: int) -> dict[str, Any]:
    """texts/s of the fp32 and int8 graphs on `texts` (tokenization included), and their top-1
    agreement there."""
    from newsclf.predict import OnnxClassifier

    out: dict[str, Any] = {}
    predicted = {}
    for precision in ("fp32", "int8"):
        classifier = OnnxClassifier(folder, precision=precision, providers=["CPUExecutionProvider"])
        start = time.perf_counter()
        logits = classifier.logits(classifier.encode(texts).ids, batch_size)
        out[f"onnx_{precision}_texts_per_s"] = round(len(texts) / (time.perf_counter() - start), 1)
        predicted[precision] = logits.argmax(1)
    out["int8_top1_agreement_with_fp32"] = round(
        float((predicted["fp32"] == predicted["int8"]).mean()), 4
    )
    return out


def run_family(model_type: str, root: Path, train_texts, test_texts, steps: int) -> dict:
    """One family: build, step times per mode, export, ONNX speed."""
    from transformers import AutoTokenizer

    from bench.tiny_models import build
    from stages.common import load_labels
    from stages.evaluate import merged_logits
    from stages.export import Int8Plan, calibration_texts, export_folder
    from stages.families import FAMILIES
    from stages.modeling import lora_choice, native_bf16, prepare_tokenizer, training_precision
    from stages.params import load_section
    from stages.sections import ExportParams
    from stages.train import build_peft_model
    from stages.train_params import TrainParams

    labels = load_labels()
    base = build(
        model_type, root / "base", **SIZE, vocab_size=8000, texts=train_texts["text"].to_list()
    )
    params = replace(load_section("train", TrainParams), base_model=str(base), max_length=SEQ_LEN)
    export = load_section("export", ExportParams)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(base), str(base))
    family = FAMILIES[model_type]
    # QLoRA computes in what `train.precision: auto` gives it for the family (bf16 where native).
    modes = {
        "lora_fp32": ("none", "fp32"),
        "qlora_nf4": ("4bit", training_precision("auto", "4bit", family, model_type, cuda=False)),
    }
    if native_bf16(cuda=False)[0]:
        modes["lora_bf16"] = ("none", "bf16")
    record: dict[str, Any] = {"kind": family.kind}
    choice = lora_choice(str(base), params.base_model, params.lora)
    record["target_modules"] = choice.peft_targets
    record["modules_to_save"] = list(choice.modules_to_save)
    adapter = root / "adapter"
    for mode, (quantization, precision) in modes.items():
        torch.manual_seed(0)
        model = build_peft_model(
            str(base), params, quantization, precision, labels, choice, tokenizer.pad_token_id
        )
        eos_id = tokenizer.eos_token_id if family.kind == "encoder-decoder" else None
        record[f"{mode}_s_per_step"] = step_seconds(
            model, precision, len(tokenizer), steps, len(labels), eos_id
        )
        if mode == "lora_fp32":
            trainable, total = model.get_nb_trainable_parameters()
            record["parameters"] = total
            record["trainable_share"] = round(trainable / total, 5)
            model.save_pretrained(str(adapter), safe_serialization=True)
            tokenizer.save_pretrained(str(adapter))
        del model
    record["precision_of_qlora_compute"] = modes["qlora_nf4"][1]
    plan = Int8Plan(
        calibration_texts(train_texts, export.int8_calibration_texts),
        export.parity.min_int8_agreement,
        export.int8_max_fp32_nodes,
        export.batch_size,
        export.int8_smoothing,
    )
    start = time.perf_counter()
    exported = export_folder(
        adapter,
        str(base),
        labels,
        root / "onnx",
        export.opset,
        SEQ_LEN,
        plan,
        test_texts,
        merged_logits(adapter, str(base), labels, test_texts, SEQ_LEN, export.batch_size),
        export.parity,
        export.batch_size,
    )
    record["export_seconds"] = round(time.perf_counter() - start, 1)
    record["fusions"] = exported.built.fusions["operators"]
    record["ort_optimizer"] = exported.built.fusions["optimizer"]
    record["fp32_max_abs_logit_diff"] = float(f"{exported.parity['fp32_max_abs_logit_diff']:.3g}")
    record["int8_kept_fp32_nodes"] = len(exported.built.int8_choice["kept_fp32"])
    record["int8_candidates"] = exported.built.int8_choice["candidates"]
    record |= onnx_speed(root / "onnx", test_texts, export.batch_size)
    return record


def build_qwen_shape(folder: Path) -> Path:
    """A random decoder of Qwen2-0.5B's shape with the tiny BPE tokenizer (the steps use random
    ids over the full vocabulary)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from bench.tiny_models import build_tokenizer

    tokenizer = build_tokenizer("none", ["a few words for a tokenizer"], 300)
    torch.manual_seed(0)
    config = Qwen2Config(
        **QWEN_05B, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def run_qwen(root: Path, steps: int, batch: int) -> dict[str, Any]:
    """bench_quant's `large` child per mode on the Qwen2-0.5B-shaped decoder."""
    from bench.bench_quant import spawn

    folder = build_qwen_shape(root / "qwen2-0.5b-shape")
    runs = {}
    for mode in ("fp32", "fp32+gc", "nf4+gc"):
        argv = ["--child", "large", "--mode", mode, "--model-dir", str(folder)]
        argv += ["--large-steps", str(steps), "--large-batch", str(batch)]
        runs[mode] = spawn(argv, root / f"{mode}.json", torch.get_num_threads())
    summary: dict[str, Any] = {"runs": runs}
    if all("error" not in r for r in runs.values()):
        qlora = runs["nf4+gc"]["peak_rss_training_gib"]
        fp32 = runs["fp32"]["peak_rss_training_gib"]
        summary["qlora_peak_rss_gib"] = qlora
        summary["qlora_peak_vs_fp32_lora"] = round(qlora / fp32, 3)
        summary["qlora_peak_vs_fp32_lora_gc"] = round(
            qlora / runs["fp32+gc"]["peak_rss_training_gib"], 3
        )
        summary["target_peak_le_2gib"] = qlora <= MAX_PEAK_GIB
        summary["target_share_le_40pct"] = qlora / fp32 <= MAX_PEAK_SHARE
    return summary


def print_tables(report: dict[str, Any]) -> None:
    import polars as pl

    cols = [
        "family",
        "trainable_share",
        "lora_fp32_s_per_step",
        "lora_bf16_s_per_step",
        "qlora_nf4_s_per_step",
        "onnx_fp32_texts_per_s",
        "onnx_int8_texts_per_s",
        "int8_top1_agreement_with_fp32",
        "ort_optimizer",
        "fusions",
    ]
    rows = [
        {c: r.get(c) for c in cols[1:-1]}
        | {"family": name, "fusions": ", ".join(f"{op} {n}" for op, n in r["fusions"].items())}
        for name, r in report.get("families", {}).items()
        if "error" not in r
    ]
    print(f"CPU: {report['cpu']}")
    with pl.Config(tbl_rows=30, tbl_cols=12, tbl_width_chars=220, fmt_str_lengths=120):
        if rows:
            print(pl.DataFrame(rows).select(cols))
        for key in sorted(k for k in report if k.startswith("qwen2_0_5b_shape")):
            qwen = report[key]
            print(key)
            table = [
                {"mode": m} | {k: r.get(k) for k in ("seconds_per_step", "peak_rss_training_gib")}
                for m, r in qwen["runs"].items()
            ]
            print(pl.DataFrame(table))
            print({k: v for k, v in qwen.items() if k != "runs"})


def main() -> None:
    from stages import paths
    from stages.common import load_labels
    from stages.families import FAMILIES
    from stages.processed import read_processed

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--parts", nargs="+", choices=("families", "qwen"))
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode and family")
    parser.add_argument("--texts", type=int, default=512, help="test texts for parity and speed")
    parser.add_argument("--qwen-steps", type=int, default=3)
    # bench_quant's `large` batch: 8 x 128.
    parser.add_argument("--qwen-batch", type=int, default=8)
    args = parser.parse_args()
    parts = args.parts or ["families", "qwen"]
    labels = load_labels()
    train = read_processed(paths.TRAIN, "train", labels)
    test = read_processed(paths.TEST, "test", labels)
    test_texts = test.sample(n=min(args.texts, test.height), seed=0)["text"].to_list()
    report: dict[str, Any] = json.loads(OUT_FILE.read_text()) if OUT_FILE.exists() else {}
    report |= {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "versions": {
            p: importlib.metadata.version(p)
            for p in ("torch", "transformers", "peft", "bitsandbytes", "onnxruntime")
        },
        "size": SIZE | {"batch": BATCH, "seq_len": SEQ_LEN},
        "weights": "random (speed, parity and memory only; agreement is an untrained model's)",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if "families" in parts:
            families = report.setdefault("families", {})
            for model_type in args.families:
                print(f"{model_type} ...", flush=True)
                families[model_type] = run_family(
                    model_type, Path(tmp) / model_type, train, test_texts, args.steps
                )
                print(json.dumps(families[model_type]), flush=True)
                write(report)  # each family as it is done: a later failure loses no figure
        if "qwen" in parts:
            report[f"qwen2_0_5b_shape_batch{args.qwen_batch}"] = run_qwen(
                Path(tmp), args.qwen_steps, args.qwen_batch
            )
    write(report)
    print_tables(report)


def write(report: dict[str, Any]) -> None:
    report["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    OUT_FILE.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
