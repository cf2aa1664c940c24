"""LoRA against QLoRA: accuracy, speed and memory of each training precision, CPU or CUDA.

    python -m bench.bench_quant [--seeds 42 7] [--modes fp32 bf16 nf4 int8] [--large-steps 5] [--parts minilm large speed]

Two parts, each run in its own child process per configuration (so that peak RSS is that
configuration's own), written to `reports/bench_quant.json` with the device named, then printed:

1. `minilm`: the `train` stage's code and `params.yaml` params on `data/processed` (the real
   5.9k train rows, scored on the 7,600 official test rows), once per mode and seed, the mode
   setting only `train.quantization` and `train.precision`:
   fp32 = LoRA in fp32, bf16 = LoRA under bf16 autocast, nf4 = QLoRA (4-bit NF4 base, double
   quantization, bf16 compute), int8 = LoRA on an 8-bit base. Records test accuracy of the model
   export ships (adapter merged into fp32) and of the adapter as trained (on its quantized base),
   macro-F1, median seconds per optimizer step, total train time, peak RSS of the training
   process (peak GPU memory on CUDA) and the model's `get_memory_footprint()`.
2. `large`: a randomly initialised BERT-large-sized classifier (24 layers, 1024 wide; no weights
   needed), `--large-steps` optimizer steps on random tokens at batch 8 x 128 for fp32, bf16 and
   nf4, and fp32 and nf4 with activation checkpointing (`train.activation_checkpointing`, which
   QLoRA's recipe trains with): footprint, peak RSS while loading and while training (the
   kernel's high-water mark, reset after loading: the backward pass included), or GPU memory, and
   seconds per step. MiniLM is too small for weight memory to matter; this is where 4-bit shows.

3. `speed`: one child holds a MiniLM model per mode and trains them in turn, one optimizer step
   each per round (`--speed-rounds` rounds, a batch of 32 real train texts at `train.max_length`),
   so that every mode sees the same load: the median step time per mode, and its ratio to fp32's,
   is the throughput figure least disturbed by a shared machine.

On a CPU, `--jobs 2` (default) runs two children at a time with one torch thread each, the
modes of one seed side by side.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stages.modeling import native_bf16

OUT_FILE = Path("reports/bench_quant.json")
GIB = 1024**3
# name: (label, train.quantization, train.precision)
MODES: dict[str, tuple[str, str, str]] = {
    "fp32": ("LoRA fp32", "none", "fp32"),
    "bf16": ("LoRA bf16", "none", "bf16"),
    "nf4": ("QLoRA NF4, bf16 compute", "4bit", "bf16"),
    "int8": ("LoRA on 8-bit base, bf16", "8bit", "bf16"),
}
# "+gc": with activation checkpointing (activations recomputed in the backward pass), as the QLoRA
# recipe trains; at batch 8 x 128 on 24 layers the activations, not the weights, fill the memory.
LARGE_MODES = ("fp32", "bf16", "nf4", "fp32+gc", "nf4+gc")


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return f"CPU ({os.cpu_count()} cores)"


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)


def training_peak_rss_gib() -> float:
    """The kernel's high-water mark of this process's RSS since it was last reset (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / GIB, 3)
    raise RuntimeError("/proc/self/status has no VmHWM line")


def gpu_peak_memory() -> dict[str, float]:
    if torch.cuda.is_available():
        return {"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / GIB, 3)}
    return {}


def peak_memory() -> dict[str, float]:
    return {"peak_rss_gib": peak_rss_gib(), **gpu_peak_memory()}


def trim_heap() -> None:
    """Return freed heap to the OS (glibc `malloc_trim`), so RSS shows what is held."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def step_timer():
    """A Trainer callback that records the wall time of each optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def run_minilm(mode: str, seed: int, data_dir: Path) -> dict[str, Any]:
    """Train with one mode and seed as the train stage does, then score as evaluate does."""
    from bench.training import load_bench_data
    from stages.evaluate import (
        EvaluateParams,
        as_trained_proba,
        compute_metrics,
        load_classifier,
        predict_proba,
    )
    from stages.modeling import resolve_base_model
    from stages.params import load_section
    from stages.train import build_peft_model, train_model
    from stages.train_params import TrainParams

    label, quantization, precision = MODES[mode]
    params = replace(
        load_section("train", TrainParams),
        quantization=quantization,
        precision=precision,
        seed=seed,
    )
    eval_batch = load_section("evaluate", EvaluateParams).batch_size
    data = load_bench_data(data_dir, params)
    texts, labels = data.test["text"].to_list(), data.test["label"].to_list()
    timer = step_timer()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train_model(
            data.train,
            data.val,
            params,
            data.label_names,
            data_path=data.train_file,
            checkpoint_dir=Path(tmp) / "checkpoints",
            adapter_dir=Path(tmp) / "adapter",
            live_dir=None,
            extra_callbacks=[timer],
        )
        train_wall = time.perf_counter() - t0
        memory = peak_memory()  # before anything else is loaded
        base_path = resolve_base_model(params.base_model)
        footprint = build_peft_model(base_path, params, quantization, precision, data.label_names)
        footprint = footprint.get_memory_footprint()
        model, tokenizer = load_classifier(
            Path(tmp) / "adapter", params.base_model, data.label_names
        )
        t1 = time.perf_counter()
        shipped = compute_metrics(
            predict_proba(model, tokenizer, texts, params.max_length, eval_batch),
            labels,
            data.label_names,
        )
        score_wall = time.perf_counter() - t1
        _, probs = as_trained_proba(
            Path(tmp) / "adapter", params, data.label_names, tokenizer, texts, eval_batch
        )
        as_trained = (
            compute_metrics(probs, labels, data.label_names) if probs is not None else shipped
        )
    return {
        "part": "minilm",
        "lora_dropout": params.lora.dropout,
        "mode": mode,
        "label": label,
        "quantization": quantization,
        "precision": precision,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "n_train": result.n_train,
        "n_test": len(labels),
        "steps": result.global_step,
        "val_loss": result.best_val_loss,
        "accuracy": round(shipped["accuracy"], 4),
        "accuracy_as_trained": round(as_trained["accuracy"], 4),
        "macro_f1": round(shipped["macro_f1"], 4),
        "seconds_per_step": round(statistics.median(timer.seconds), 3),
        "train_seconds": round(train_wall, 1),
        "score_seconds": round(score_wall, 1),
        **{k.replace("peak_", "peak_train_"): v for k, v in memory.items()},
        "footprint_gib": round(footprint / GIB, 4),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }


LARGE_CONFIG = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "max_position_embeddings": 512,
}


def make_large_model(folder: Path) -> None:
    """A random BERT-large-sized classifier saved as the train stage loads a base (safetensors)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from stages.common import load_labels
    from stages.modeling import PACKAGED_BASE_MODEL, resolve_base_model

    torch.manual_seed(0)
    config = BertConfig(**LARGE_CONFIG, num_labels=len(load_labels()))
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(resolve_base_model(PACKAGED_BASE_MODEL)).save_pretrained(folder)


def run_large(mode: str, model_dir: Path, steps: int, batch: int, seq_len: int) -> dict[str, Any]:
    """`steps` LoRA optimizer steps on random tokens; memory and time per step. The model folder
    may hold any supported family (bench_families runs a Qwen2-0.5B-shaped decoder here)."""
    from transformers import AutoTokenizer

    from stages.common import load_labels
    from stages.modeling import compute_dtype, prepare_tokenizer
    from stages.params import load_section
    from stages.train import build_peft_model
    from stages.train_params import TrainParams

    base_mode, checkpointing = mode.removesuffix("+gc"), mode.endswith("+gc")
    label, quantization, precision = MODES[base_mode]
    if precision == "bf16" and not native_bf16(torch.cuda.is_available())[0]:
        precision = "fp32"  # QLoRA's compute dtype where bf16 would be emulated
    params = replace(
        load_section("train", TrainParams),
        base_model=str(model_dir),
        activation_checkpointing=checkpointing,
    )
    label_names = load_labels()
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir), str(model_dir))
    model = build_peft_model(
        str(model_dir),
        params,
        quantization,
        precision,
        label_names,
        pad_token_id=tokenizer.pad_token_id,
    )
    if checkpointing:
        label += " + activation checkpointing"
    # Loading a 4-bit base reads fp32 tensors and frees them once quantized; glibc keeps freed heap
    # in the process's RSS unless trimmed, which would hide what training itself holds. Then the
    # kernel's high-water mark starts again, so that it is training's own peak, backward included.
    load_peak = peak_rss_gib()
    trim_heap()
    Path("/proc/self/clear_refs").write_text("5")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if quantization == "none":
        model.to(device)  # a k-bit base is placed on its device when loaded
    footprint = model.get_memory_footprint()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=params.learning_rate
    )
    generator = torch.Generator(device=device).manual_seed(0)
    vocab = model.config.vocab_size
    trainable, total = model.get_nb_trainable_parameters()
    model.train()
    seconds = []
    for _ in range(steps):
        ids = torch.randint(1000, vocab, (batch, seq_len), device=device, generator=generator)
        labels = torch.randint(0, len(label_names), (batch,), device=device, generator=generator)
        start = time.perf_counter()
        with torch.autocast(device, dtype=compute_dtype(precision), enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return {
        "part": "large",
        "lora_dropout": params.lora.dropout,
        "mode": mode,
        "label": label,
        "quantization": quantization,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "batch_size": batch,
        "seq_len": seq_len,
        "footprint_gib": round(footprint / GIB, 4),
        "trainable_share": round(trainable / total, 5),
        "peak_rss_loading_gib": load_peak,
        "peak_rss_training_gib": training_peak_rss_gib(),
        **gpu_peak_memory(),
        "seconds_per_step": round(statistics.median(seconds[1:] or seconds), 2),
        "final_loss": round(float(loss), 4),
    }


def run_speed(data_dir: Path, rounds: int, batch: int) -> dict[str, Any]:
    """Interleaved optimizer steps of every mode on the same real batches: median s/step."""
    from transformers import AutoTokenizer

    from stages.common import load_labels
    from stages.modeling import compute_dtype, resolve_base_model
    from stages.params import load_section
    from stages.processed import read_processed
    from stages.train import build_peft_model
    from stages.train_params import TrainParams

    params = load_section("train", TrainParams)
    label_names = load_labels()
    base_path = resolve_base_model(params.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    train = read_processed(data_dir / "train.parquet", "train", label_names).sample(
        n=batch * rounds, seed=params.seed, with_replacement=batch * rounds > 5000
    )
    labels = torch.tensor(train["label"].to_list())
    models, optimizers = {}, {}
    for mode in MODES:
        _, quantization, precision = MODES[mode]
        models[mode] = build_peft_model(
            base_path, params, quantization, precision, label_names
        ).train()
        optimizers[mode] = torch.optim.AdamW(
            [p for p in models[mode].parameters() if p.requires_grad], lr=params.learning_rate
        )
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    tokens = []
    for r in range(rounds):
        rows = slice(r * batch, (r + 1) * batch)
        enc = tokenizer(
            train["text"][rows].to_list(),
            padding=True,
            truncation=True,
            max_length=params.max_length,
            return_tensors="pt",
        )
        tokens.append(int(enc["input_ids"].shape[1]))
        for mode, model in models.items():
            precision = MODES[mode][2]
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=compute_dtype(precision), enabled=precision == "bf16"):
                loss = model(**enc, labels=labels[rows]).loss
            loss.backward()
            optimizers[mode].step()
            optimizers[mode].zero_grad(set_to_none=True)
            seconds[mode].append(time.perf_counter() - start)
    median = {mode: statistics.median(s[1:]) for mode, s in seconds.items()}
    return {
        "part": "speed",
        "lora_dropout": params.lora.dropout,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "batch_size": batch,
        "median_padded_tokens": statistics.median(tokens),
        "seconds_per_step": {m: round(v, 3) for m, v in median.items()},
        "throughput_vs_fp32": {m: round(median["fp32"] / v, 2) for m, v in median.items()},
    }


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.child == "minilm":
        record = run_minilm(args.mode, args.seed, args.data)
    elif args.child == "speed":
        record = run_speed(args.data, args.speed_rounds, 32)
    else:
        record = run_large(args.mode, args.model_dir, args.large_steps, args.large_batch, 128)
    args.out.write_text(json.dumps(record) + "\n")


def spawn(argv: list[str], out: Path, threads: int) -> dict[str, Any]:
    """Run one configuration in a child process; its record, or the error it died with."""
    cmd = [sys.executable, "-m", "bench.bench_quant", *argv, "--out", str(out)]
    cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        print(f"FAILED: {' '.join(argv)}\n{tail}", file=sys.stderr)
        return {"argv": argv, "error": tail}
    record = json.loads(out.read_text())
    print(f"done: {' '.join(argv)}: {record}", file=sys.stderr, flush=True)
    return record


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary per `train.lora.dropout` the runs were made with (its masks cost the same in
    every precision, so it changes the ratios)."""
    dropouts = sorted({r["lora_dropout"] for r in runs if "lora_dropout" in r})
    summary = {
        f"lora_dropout={d}": summarise_one([r for r in runs if r.get("lora_dropout") == d])
        for d in dropouts
    }
    failed = [" ".join(r["argv"]) for r in runs if "error" in r]
    return summary | ({"failed": failed} if failed else {})


def summarise_one(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds per mode, and the issue's targets against fp32 LoRA."""
    ok = [r for r in runs if "error" not in r]
    summary: dict[str, Any] = {}
    minilm: dict[str, dict[str, float]] = {}
    for mode in MODES:
        rows = [r for r in ok if r["part"] == "minilm" and r["mode"] == mode]
        if rows:
            minilm[mode] = {
                key: round(statistics.mean(r[key] for r in rows), 4)
                for key in ("accuracy", "accuracy_as_trained", "macro_f1", "seconds_per_step")
            }
            minilm[mode]["seeds"] = len(rows)
    summary["minilm_mean_over_seeds"] = minilm
    if "fp32" in minilm:
        base = minilm["fp32"]
        for mode in ("bf16", "nf4", "int8"):
            if mode in minilm:
                summary[f"{mode}_accuracy_gap_pt"] = round(
                    100 * (minilm[mode]["accuracy"] - base["accuracy"]), 2
                )
                summary[f"{mode}_throughput_vs_fp32"] = round(
                    base["seconds_per_step"] / minilm[mode]["seconds_per_step"], 2
                )
    speed = next((r for r in ok if r["part"] == "speed"), None)
    if speed is not None:
        summary["interleaved_throughput_vs_fp32"] = speed["throughput_vs_fp32"]
    large = {r["mode"]: r for r in ok if r["part"] == "large"}
    if "fp32" in large and "nf4" in large:
        rss = "peak_gpu_gib" if "peak_gpu_gib" in large["fp32"] else "peak_rss_training_gib"
        summary["large_nf4_footprint_vs_fp32"] = round(
            large["nf4"]["footprint_gib"] / large["fp32"]["footprint_gib"], 3
        )
        # Each pair: (numerator, denominator) of a peak-memory ratio. "+gc" = with activation
        # checkpointing, which QLoRA's recipe trains with (the paper, PEFT's default).
        pairs = {
            "large_nf4_peak_memory_vs_fp32": ("nf4", "fp32"),
            "large_qlora_recipe_nf4_gc_peak_memory_vs_fp32": ("nf4+gc", "fp32"),
            "large_nf4_gc_peak_memory_vs_fp32_gc": ("nf4+gc", "fp32+gc"),
        }
        for key, (mode, base) in pairs.items():
            if mode in large and base in large:
                summary[key] = round(large[mode][rss] / large[base][rss], 3)
    return summary


def print_table(runs: list[dict[str, Any]]) -> None:
    import polars as pl

    ok = [r for r in runs if "error" not in r]
    cols = {
        "minilm": [
            "lora_dropout",
            "mode",
            "seed",
            "accuracy",
            "accuracy_as_trained",
            "macro_f1",
            "seconds_per_step",
            "train_seconds",
            "peak_train_rss_gib",
            "footprint_gib",
        ],
        "large": [
            "lora_dropout",
            "mode",
            "seconds_per_step",
            "footprint_gib",
            "peak_rss_loading_gib",
            "peak_rss_training_gib",
        ],
    }
    with pl.Config(tbl_rows=50, tbl_cols=20, tbl_width_chars=160):
        for part, names in cols.items():
            rows = [{c: r.get(c) for c in names} for r in ok if r.get("part") == part]
            if rows:
                print(f"{part}:")
                print(pl.DataFrame(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--parts", nargs="+", choices=("minilm", "large", "speed"))
    parser.add_argument("--large-steps", type=int, default=5)
    parser.add_argument("--large-batch", type=int, default=8, help="rows per step of `large`")
    parser.add_argument("--speed-rounds", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1 if torch.cuda.is_available() else 2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child")
    # Internal: one configuration in a child process.
    parser.add_argument("--child", choices=("minilm", "large", "speed"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=[*MODES, *LARGE_MODES], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        concurrent.futures.ThreadPoolExecutor(args.jobs) as pool,
    ):
        jobs: list[list[str]] = []
        parts = args.parts or ["minilm", "large", "speed"]
        if "minilm" in parts:
            # Seed by seed, modes side by side: pairs that share the machine are comparable.
            jobs += [
                ["--child", "minilm", "--mode", m, "--seed", str(s), "--data", str(args.data)]
                for s in args.seeds
                for m in args.modes
            ]
        if "speed" in parts:
            jobs.append(
                ["--child", "speed", "--data", str(args.data)]
                + ["--speed-rounds", str(args.speed_rounds)]
            )
        if "large" in parts:
            large_dir = Path(tmp) / "bert-large-random"
            make_large_model(large_dir)
            jobs += [
                ["--child", "large", "--mode", m, "--model-dir", str(large_dir)]
                + ["--large-steps", str(args.large_steps)]
                for m in LARGE_MODES
                if m.removesuffix("+gc") in args.modes
            ]
        futures = [
            pool.submit(spawn, argv, Path(tmp) / f"run{i}.json", args.threads)
            for i, argv in enumerate(jobs)
        ]
        runs = [f.result() for f in futures]
    report = {
        "device": device_name(),
        "versions": {
            p: _version(p) for p in ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
        },
        "jobs_at_once": args.jobs,
        "threads_per_job": args.threads,
        "started_utc": started,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs,
        "summary": summarise(runs),
    }
    if OUT_FILE.exists() and args.parts:
        previous = json.loads(OUT_FILE.read_text())["runs"]
        # A run of some parts keeps every other record, and those of other lora.dropout values.
        made = {(r.get("part"), r.get("lora_dropout")) for r in runs}
        runs = [r for r in previous if (r.get("part"), r.get("lora_dropout")) not in made] + runs
        report["runs"], report["summary"] = runs, summarise(runs)
    OUT_FILE.parent.mkdir(parents=True, exist_ok=True)
    OUT_FILE.write_text(json.dumps(report, indent=2) + "\n")
    print(f"device: {report['device']}")
    print_table(runs)
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
