"""The floor under the PyTorch stages: the matrix products each must compute, at the fastest rate
this CPU runs them.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python -m bench.bench_floor      # as an AVX2-only CPU computes it

For `label_issues` (the embedding pass), `train` and `evaluate` (PyTorch, fp32): the floating-point
operations of their matrix products, counted from the model's shapes (hidden and intermediate
sizes, layers; a BERT encoder: another is refused), the LoRA rank and targets, and the token count
of every text each stage scores or trains on (tokenised as the stages tokenise, no padding counted):

- a forward pass: per layer, the six linears (and their LoRA pairs, 2nr(in + out) each) and the
  attention's two products (2 x 2n^2H);
- a training step adds the products autograd computes in its backward (`Shapes.backward`: a
  gradient only where something before it trains, so layer 0, which reads the frozen embeddings,
  computes fewer); train also scores its held-out rows once per epoch. label_issues embeds with
  its own `embedding_model`, and only when an `embedding_*` model is listed.

The counts equal PyTorch's own FLOP counter on a tiny BERT for several LoRA target sets
(tests/test_bench_floor.py).

Dropout masks are counted too, for train: every element LoRA's, the attention's and the hidden
states' dropout draws (`Shapes.mask_elements`), at what `bernoulli_` costs per element here. The
mask is part of the numerics (another generator gives other masks, and one seed moves test accuracy
by up to 0.9 pt), so its cost is a floor as long as the random stream stays; `dropout_masks`
reports whether this CPU's masks are the serial MT19937 stream (torch's path on a CPU not made by
Intel) and what that stream alone costs in numpy.

The rate is measured, not assumed: `torch.nn.functional.linear` on the model's own shapes at several
batch sizes, in one thread (each of train's two data-parallel processes) and in all cores (the
scoring passes), the fastest of each taken. The floor is a lower bound: padding, softmax, layer
norm, GELU, the optimizer, imports and Python are left out, and the attention products run slower
than the large projections in practice. Compared with the stage times of
`reports/bench_repro_avx2.json` (`after`, measured with the same pins) when it was pinned as this
run is; the two come from different moments, so the shares move with the machine's load. Writes
`reports/bench_floor.json` (`..._avx2.json` pinned).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench import cpu_name
from bench.bench_repro import AVX2_PINS, PINNED_FILE
from stages import paths
from stages.common import available_cores, load_labels, read_table, write_json
from stages.label_issues import EMBED_MAX_LENGTH
from stages.modeling import resolve_base_model
from stages.params import load_section
from stages.processed import read_processed, split_train_val
from stages.sections import LabelIssuesParams
from stages.train_params import TrainParams

OUT_FILE = Path("reports/bench_floor.json")
OUT_FILE_AVX2 = Path("reports/bench_floor_avx2.json")
# Rows (tokens) per matrix product timed: a train process's 16 texts of ~50 tokens is ~800; a
# scoring batch of 32-64 texts is 1,600-3,200.
TOKEN_ROWS = (512, 1024, 2048, 4096)


# LoRA target names this bench counts, as BERT names its linears (`dense` matches three).
BERT_TARGETS = ("query", "key", "value", "dense")


@dataclass(frozen=True)
class Shapes:
    """A BERT encoder's sizes and which of its linears carry a LoRA pair. Each counting method
    takes `n`, the token counts of the texts, and sums over them."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    lora_rank: int
    lora_targets: tuple[str, ...]  # of BERT_TARGETS
    lora_dropout: bool  # LoRA masks its targets' inputs
    attention_dropout: bool
    hidden_dropout: bool

    def linears(self) -> dict[str, tuple[int, int, bool, str]]:
        """Each layer's six linears, in forward order: (in, out, carries LoRA, the activation
        it reads)."""
        h, i, t = self.hidden, self.intermediate, set(self.lora_targets)
        return {
            "query": (h, h, "query" in t, "input"),
            "key": (h, h, "key" in t, "input"),
            "value": (h, h, "value" in t, "input"),
            "attention_output": (h, h, "dense" in t, "context"),
            "intermediate": (h, i, "dense" in t, "hidden"),
            "output": (i, h, "dense" in t, "intermediate"),
        }

    def forward(self, n: np.ndarray, lora: bool) -> float:
        """Forward FLOPs: per layer, the six linears (and their LoRA pairs when `lora`), and the
        attention's two products (scores, weighted values)."""
        r = self.lora_rank
        per_token = sum(
            2 * d_in * d_out + (2 * r * (d_in + d_out) if lora and has_lora else 0)
            for d_in, d_out, has_lora, _ in self.linears().values()
        )
        return float(self.layers * (n * per_token + 2 * 2 * n * n * self.hidden).sum())

    def backward(self, n: np.ndarray) -> float:
        """The products autograd computes in a LoRA step's backward (frozen base, trained pairs):
        a gradient is computed only where something before it trains. Layer 0 reads the frozen
        embeddings; every later layer reads a hidden state that needs a gradient (when any linear
        carries LoRA). Per LoRA pair: B's weight gradient, A's output gradient and A's weight
        gradient always, A's input gradient where its input needs one."""
        r, h = self.lora_rank, self.hidden
        lin = self.linears()
        total = np.zeros_like(n, dtype=np.float64)
        for layer in range(self.layers):
            # Which activations need a gradient, in forward order.
            needs = {"input": layer > 0 and any(lora for _, _, lora, _ in lin.values())}
            for name in ("query", "key", "value"):
                needs[name] = lin[name][2] or needs["input"]
            needs["probs"] = needs["query"] or needs["key"]
            needs["context"] = needs["probs"] or needs["value"]
            needs["attention_output"] = needs["context"] or lin["attention_output"][2]
            needs["hidden"] = needs["attention_output"] or needs["input"]
            needs["intermediate"] = needs["hidden"] or lin["intermediate"][2]
            for d_in, d_out, has_lora, reads in lin.values():
                if needs[reads]:
                    total += 2 * n * d_in * d_out  # the frozen weight's input gradient
                if has_lora:
                    total += 2 * n * r * (2 * d_out + d_in) + (
                        2 * n * r * d_in if needs[reads] else 0
                    )
            # Weighted values: the probabilities' and V's gradients; scores: Q's and K's.
            for product_needed in (needs["probs"], needs["value"], needs["query"], needs["key"]):
                if product_needed:
                    total += 2 * n * n * h
        return float(total.sum())

    def train_step(self, n: np.ndarray) -> float:
        """A training step's matrix-product FLOPs: the forward with LoRA, and its backward."""
        return self.forward(n, lora=True) + self.backward(n)

    def mask_elements(self, n: np.ndarray) -> float:
        """Dropout-mask elements a training forward draws: LoRA's (each pair masks its own copy of
        its linear's input), the attention probabilities', and the hidden states' (after
        attention, after the FFN, and once after the embeddings)."""
        lora_widths = sum(d_in for d_in, _, has_lora, _ in self.linears().values() if has_lora)
        layer = (
            self.lora_dropout * n * lora_widths
            + self.attention_dropout * self.heads * n * n
            + self.hidden_dropout * 2 * n * self.hidden
        )
        return float((self.layers * layer + self.hidden_dropout * n * self.hidden).sum())


def bert_shapes(config, lora_rank: int, target_modules, lora_dropout: float) -> Shapes:
    """The shapes of a BERT `config` with LoRA pairs of `lora_rank` on `target_modules` (names
    from BERT_TARGETS; anything else is refused rather than counted as nothing)."""
    if config.model_type != "bert":
        raise ValueError(f"bench_floor counts BERT encoders only, not {config.model_type!r}")
    if isinstance(target_modules, str) or not set(target_modules) <= set(BERT_TARGETS):
        raise ValueError(
            f"bench_floor counts LoRA targets among {list(BERT_TARGETS)}, not {target_modules!r}"
        )
    return Shapes(
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        lora_rank,
        tuple(t for t in BERT_TARGETS if t in set(target_modules)),
        lora_dropout > 0,
        config.attention_probs_dropout_prob > 0,
        config.hidden_dropout_prob > 0,
    )


def model_shapes(base: str, adapter_dir: Path) -> Shapes:
    """The base model's shapes, with the trained adapter's LoRA rank, targets and dropout."""
    from transformers import AutoConfig

    adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
    return bert_shapes(
        AutoConfig.from_pretrained(base),
        adapter["r"],
        adapter["target_modules"],
        adapter["lora_dropout"],
    )


def token_counts(tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    if not texts:
        return np.zeros(0)
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return np.asarray([len(x) for x in ids], dtype=np.float64)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to `threads` inside, and back to what they were after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gemm_rate(shapes: Shapes, threads: int, repeats: int = 5) -> tuple[float, dict[str, float]]:
    """The fastest GFLOP/s of the model's projection shapes on `threads` threads, and each
    shape's best."""
    h, i = shapes.hidden, shapes.intermediate
    rates: dict[str, float] = {}
    with torch_threads(threads), torch.inference_mode(), torch.random.fork_rng():
        for rows in TOKEN_ROWS:
            for n_in, n_out in ((h, h), (h, i), (i, h)):
                x = torch.randn(rows, n_in)
                w = torch.randn(n_out, n_in)
                torch.nn.functional.linear(x, w)  # warm-up
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    torch.nn.functional.linear(x, w)
                    best = min(best, time.perf_counter() - start)
                rates[f"{rows}x{n_in}->{n_out}"] = round(2 * rows * n_in * n_out / best / 1e9, 1)
    return max(rates.values()), rates


def torch_mt19937(state: torch.Tensor) -> tuple[int, np.ndarray]:
    """numpy's MT19937 position and key for torch's CPU generator state (its legacy layout: seed
    u64, left i32, seeded i32, next u64, then 624 state words as u64)."""
    raw = state.numpy().tobytes()
    left = int(np.frombuffer(raw, dtype=np.int32, count=1, offset=8)[0])
    key = np.frombuffer(raw, dtype=np.uint64, count=624, offset=24).astype(np.uint32)
    return 625 - left, key  # torch regenerates when `left` reaches 0, numpy when `pos` hits 624


def mask_cost(p_keep: float = 0.9, shape: tuple[int, ...] = (16, 69, 384)) -> dict:
    """What a dropout mask costs here: torch's `bernoulli_` per element, and whether its mask is
    the MT19937 stream drawn serially, two 32-bit draws an element (as torch does on a CPU that is
    not Intel's; MKL's generator on Intel's), with that stream's own cost in numpy."""
    with torch.random.fork_rng():  # the global generator is left as it was
        return _mask_cost(p_keep, shape)


def _mask_cost(p_keep: float, shape: tuple[int, ...]) -> dict:
    torch.manual_seed(0)
    pos, key = torch_mt19937(torch.get_rng_state())
    stream = np.random.MT19937()
    stream.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
    n = int(np.prod(shape))
    mask = torch.empty(shape).bernoulli_(p_keep)
    draws = stream.random_raw(2 * n).astype(np.uint64)
    bits = ((draws[0::2] << np.uint64(32)) | draws[1::2]) & np.uint64(2**53 - 1)
    replica = (bits.astype(np.float64) * 2.0**-53 < p_keep).astype(np.float32).reshape(shape)

    def best_ns(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(min(times) / n * 1e9, 2)

    serial = bool(np.array_equal(mask.numpy(), replica))  # before the timing redraws `mask`
    with torch_threads(1):
        return {
            "bernoulli_ns_per_element": best_ns(lambda: mask.bernoulli_(p_keep)),
            "mt19937_serial": serial,
            "mt19937_ns_per_element": best_ns(lambda: stream.random_raw(2 * n)),
        }


def pinned() -> bool:
    return all(os.environ.get(k, "").lower() == v.lower() for k, v in AVX2_PINS.items())


def measured_stage_times() -> dict[str, float] | None:
    """The stage times bench_repro measured with the same pins (`after`), or None."""
    if not pinned() or not PINNED_FILE.exists():
        return None
    return json.loads(PINNED_FILE.read_text())["after"]["make_repro"]["stages_s"]


def main() -> None:
    from transformers import AutoConfig, AutoTokenizer

    params = load_section("train", TrainParams)
    labels = load_labels()
    base = resolve_base_model(params.base_model)
    shapes = model_shapes(base, paths.ADAPTER)
    tokenizer = AutoTokenizer.from_pretrained(base)

    train_table = read_processed(paths.TRAIN, "train", labels)
    train_rows, val_rows = split_train_val(
        train_table, params.val_fraction, params.seed, params.max_train_samples
    )
    test = read_processed(paths.TEST, "test", labels)
    # label_issues embeds with its own model, and only for the models that read embeddings.
    issues = load_section("label_issues", LabelIssuesParams)
    embedded = [m for m in issues.models if m.startswith("embedding_")]
    embedder = resolve_base_model(issues.embedding_model)
    embed_shapes = bert_shapes(AutoConfig.from_pretrained(embedder), 0, [], 0.0)
    n_embedded = token_counts(
        AutoTokenizer.from_pretrained(embedder),
        read_table(paths.LABEL_ISSUES)["text"].to_list() if embedded else [],
        EMBED_MAX_LENGTH,
    )
    n_train = token_counts(tokenizer, train_rows["text"].to_list(), params.max_length)
    n_val = token_counts(tokenizer, val_rows["text"].to_list(), params.max_length)
    n_test = token_counts(tokenizer, test["text"].to_list(), params.max_length)

    cores = available_cores()
    masks = mask_cost()
    one_thread, one_thread_shapes = gemm_rate(shapes, 1)
    all_cores, all_cores_shapes = gemm_rate(shapes, cores)
    # train: `cores` data-parallel processes of one thread each; scoring: one process, all cores.
    train_rate, score_rate = one_thread * cores, all_cores
    # (GFLOP, GFLOP/s, mask elements) per stage.
    work = {
        "label_issues": (embed_shapes.forward(n_embedded, lora=False), score_rate, 0.0),
        "train": (
            params.epochs * (shapes.train_step(n_train) + shapes.forward(n_val, lora=True)),
            train_rate,
            params.epochs * shapes.mask_elements(n_train),
        ),
        "evaluate": (
            shapes.forward(n_test, lora=False) + shapes.forward(n_val, lora=False),
            score_rate,
            0.0,
        ),
    }
    measured = measured_stage_times()
    stages = {}
    for stage, (flops, rate, mask_elements) in work.items():
        gemm_s = flops / 1e9 / rate
        # Each data-parallel process draws its own share of the masks, serially, on its core.
        mask_s = mask_elements * masks["bernoulli_ns_per_element"] / 1e9 / cores
        row = {
            "gflop": round(flops / 1e9, 1),
            "gflop_per_s": round(rate, 1),
            "gemm_floor_s": round(gemm_s, 1),
            "mask_elements_millions": round(mask_elements / 1e6, 1),
            "mask_floor_s": round(mask_s, 1),
            "floor_s": round(gemm_s + mask_s, 1),
        }
        if measured is not None and stage in measured:
            row["measured_s"] = measured[stage]
            row["floor_share"] = round(row["floor_s"] / measured[stage], 3)
        stages[stage] = row
    result = {
        "cpu": cpu_name(),
        "pinned": {k: os.environ[k] for k in AVX2_PINS} if pinned() else None,
        "torch": torch.__version__,
        "shapes": shapes.__dict__,
        "texts": {
            "label_issues": len(n_embedded),
            "train": len(n_train),
            "val": len(n_val),
            "test": len(n_test),
        },
        "mean_tokens": {
            "train": round(float(n_train.mean()), 1),
            "test": round(float(n_test.mean()), 1),
        },
        "epochs": params.epochs,
        "gemm_gflop_per_s": {
            "one_thread": one_thread,
            f"{cores}_threads": all_cores,
            "one_thread_by_shape": one_thread_shapes,
            f"{cores}_threads_by_shape": all_cores_shapes,
        },
        "dropout_masks": masks,
        "stages": stages,
        "measured_from": str(PINNED_FILE) if measured is not None else None,
    }
    out = OUT_FILE_AVX2 if pinned() else OUT_FILE
    write_json(result, out)
    print(f"{cpu_name()}; PyTorch {'pinned to AVX2' if pinned() else 'unpinned'}")
    print(f"GEMM rate: {one_thread} GFLOP/s on one thread, {all_cores} on {cores}")
    print(
        f"dropout mask: {masks['bernoulli_ns_per_element']} ns/element; the serial MT19937 "
        f"stream: {masks['mt19937_serial']}, {masks['mt19937_ns_per_element']} ns/element alone"
    )
    print(
        f"{'stage':>14} {'GFLOP':>9} {'GFLOP/s':>8} {'GEMM s':>7} {'masks s':>8} {'floor s':>8} "
        f"{'measured s':>11} {'share':>6}"
    )
    for stage, row in stages.items():
        print(
            f"{stage:>14} {row['gflop']:>9} {row['gflop_per_s']:>8} {row['gemm_floor_s']:>7} "
            f"{row['mask_floor_s']:>8} {row['floor_s']:>8} {row.get('measured_s', '-'):>11} "
            f"{row.get('floor_share', '-'):>6}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
