"""Where a training step's time goes on this CPU: torch.profiler over the train stage's own model.

    python -m bench.bench_train_step [--steps 8] [--precision fp32]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python -m bench.bench_train_step          # as an AVX2-only CPU computes it

One process, one thread: what each of the `auto` launcher's data-parallel processes does (its
share of `train.batch_size`), on the train stage's model (`build_peft_model`: params.yaml's base,
LoRA and dropout) and real train rows batched as the Trainer batches them with
`train.group_by_length` (transformers' LengthGroupedSampler, the run's seed). Reports seconds per
step (forward, backward, AdamW), the share of the profiled CPU time per operator group (matrix
products, dropout masks, softmax, GELU, layer norm, the optimizer, the rest) and the padding the
batches carry. The all-reduce of the other processes is not in it (one process): its size is the
trainable parameters', printed beside. Writes `reports/bench_train_step.json` (or
`..._avx2.json` when PyTorch is pinned below AVX-512).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench import cpu_name
from stages import paths
from stages.common import available_cores, load_labels, write_json
from stages.modeling import resolve_base_model
from stages.params import load_section
from stages.processed import read_processed
from stages.train import build_peft_model, data_parallel_processes
from stages.train_params import TrainParams

GROUPS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "dropout masks": ("aten::bernoulli_", "aten::native_dropout", "aten::dropout"),
    "softmax": ("aten::_softmax", "aten::_softmax_backward_data"),
    "gelu": ("aten::gelu", "aten::gelu_backward"),
    "layer norm": ("aten::native_layer_norm", "aten::native_layer_norm_backward"),
}


def grouped_batches(lengths: list[int], batch: int, seed: int, n: int) -> list[list[int]]:
    """The first `n` batches the Trainer's LengthGroupedSampler draws for these lengths."""
    from transformers.trainer_pt_utils import LengthGroupedSampler

    generator = torch.Generator().manual_seed(seed)
    order = list(LengthGroupedSampler(batch, lengths=lengths, generator=generator))
    return [order[i : i + batch] for i in range(0, batch * n, batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=8, help="profiled steps (after 2 warm-up)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--processes",
        type=int,
        help="the auto launcher's process count to take a share of (default: this machine's cores)",
    )
    args = parser.parse_args()
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    params = load_section("train", TrainParams)
    labels = load_labels()
    base = resolve_base_model(params.base_model)
    model = build_peft_model(
        base, replace(params, precision=args.precision), "none", "fp32", labels
    )
    model.train()
    tokenizer = AutoTokenizer.from_pretrained(base)
    train = read_processed(paths.TRAIN, "train", labels)
    encoded = tokenizer(train["text"].to_list(), truncation=True, max_length=params.max_length)
    ids = encoded["input_ids"]
    # The auto launcher's share a process: as many processes as cores that divide the batch.
    cores = (args.processes or available_cores()) if params.launcher == "auto" else 1
    batch = params.batch_size // data_parallel_processes(params.batch_size, cores)
    order = (
        grouped_batches([len(x) for x in ids], batch, params.seed, args.steps + 2)
        if params.group_by_length
        else [list(range(i, i + batch)) for i in range(0, batch * (args.steps + 2), batch)]
    )
    inputs = [
        tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt") for rows in order
    ]
    targets = [torch.tensor([int(train["label"][i]) for i in rows]) for rows in order]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(i: int) -> None:
        with autocast:
            loss = model(**inputs[i], labels=targets[i]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for i in range(2):
        step(i)
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(2, args.steps + 2):
            step(i)
    seconds = (time.perf_counter() - start) / args.steps
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    shares = {
        group: round(sum(self_us.get(op, 0) for op in ops) / total, 3)
        for group, ops in GROUPS.items()
    }
    shares["optimizer"] = round(
        sum(v for k, v in self_us.items() if k.startswith("Optimizer.") or "adamw" in k.lower())
        / total,
        3,
    )
    shares["rest"] = round(1 - sum(shares.values()), 3)
    real = sum(len(ids[i]) for rows in order[2:] for i in rows)
    padded = sum(inputs[i]["input_ids"].numel() for i in range(2, args.steps + 2))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:10]
    result = {
        "cpu": cpu_name(),
        "pytorch_kernels": torch.backends.cpu.get_cpu_capability(),
        "precision": args.precision,
        "rows_per_step": batch,
        "steps": args.steps,
        "seconds_per_step": round(seconds, 3),
        "share_of_cpu_time": shares,
        "top_operators": {k: round(v / total, 3) for k, v in top},
        "mean_padded_length": round(padded / (batch * args.steps), 1),
        "padding_share": round(1 - real / padded, 3),
        "trainable_parameters_all_reduced": trainable,
        "lora_dropout": params.lora.dropout,
        "mean_text_tokens": round(float(np.mean([len(x) for x in ids])), 1),
    }
    out = Path(
        "reports/bench_train_step_avx2.json"
        if result["pytorch_kernels"] != "AVX512"
        else "reports/bench_train_step.json"
    )
    write_json(result, out)
    print(f"{result['cpu']}; PyTorch kernels {result['pytorch_kernels']}; {args.precision}")
    print(f"{batch} rows a step, one thread: {result['seconds_per_step']} s a step")
    for group, share in shares.items():
        print(f"  {group:<16} {100 * share:5.1f}%")
    print(f"padding {100 * result['padding_share']:.1f}% of tokens; wrote {out}")


if __name__ == "__main__":
    main()
