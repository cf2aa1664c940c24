"""Stage `export`: merge the LoRA adapter into the fp32 base, export ONNX (+ int8), check parity.

Writes `models/onnx/` (model.onnx, model.int8.onnx, tokenizer files, newsclf_onnx.json and the
model card README.md, stages/card.py) — the folder `newsclf predict` and `newsclf serve` read and
the `dvc artifacts` entry hands on — `reports/export.json` (parity, accuracy, sizes, the int8 nodes
kept fp32 and why) and `reports/export_speed.json` (ONNX Runtime texts/s over the parity passes,
tokenization included).

Exporter choice: the TorchScript exporter (`dynamo=False`), for every supported family
(stages/families.py). The torch.export-based default needs the `onnxscript` package (not a
dependency of this project) and offered nothing the families need: each traces, passes the parity
check on mixed-length batches (tests/test_families.py), and gives the graph ONNX Runtime's
transformer optimizer fuses (for BERT-like encoders Attention, SkipLayerNorm, BiasGelu; layer and
RMS norms for the others), which dynamic int8 quantisation then turns into integer kernels. Which
nodes stay fp32 in the int8 model is measured on train texts for the model at hand
(`choose_fp32_nodes`); an int8 model that still misses the parity bound is kept but marked, and
predict defaults to fp32 — only a broken fp32 export fails the stage.

A trace records one path through Python control flow, so the wrapper
below builds the attention mask itself (no data-dependent branch to freeze), and the stage proves
the dynamic axes generalise by checking parity on real texts of many lengths and batch shapes.

For the trace only, attention is computed by `trace_attention`: the same arithmetic as the eager
implementation, written in the op order (MatMul -> Div -> Add mask -> Softmax) that the ORT
optimizer fuses into one Attention op. transformers 5's eager attention scales with a Mul, which the
fusion confuses with the mask's Mul, leaving attention unfused and about a third slower.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import yaml
from tqdm import tqdm

from newsclf.predict import META_FILE, OnnxClassifier, read_meta
from stages import paths
from stages.card import card_context, write_card
from stages.common import (
    StageError,
    available_cores,
    cpu_model,
    get_logger,
    int8_instructions,
    load_labels,
    read_table,
    require_file,
    run_main,
    write_json,
)
from stages.families import Family, family_of
from stages.modeling import load_merged_model, lora_choice, require_adapter, resolve_base_model
from stages.params import load_section
from stages.processed import read_processed
from stages.sections import ExportParams, IngestParams, ParityParams
from stages.train_params import TrainParams

FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
INPUT_NAMES = ["input_ids", "attention_mask"]
TRACE_ATTENTION = "newsclf_trace"
# Calibration texts on which each node's int8 sensitivity is measured (the first ones of the
# length-spread calibration sample: the shortest and the longest alike). 32 ranked the same eight
# most sensitive nodes as 128 on a model that kept eight (docs/export_predict.md), at a quarter
# of the cost.
SENSITIVITY_TEXTS = 32

log = get_logger("export")


class LogitsOnly(torch.nn.Module):
    """(input_ids, attention_mask) -> logits, the graph's whole interface, for the families whose
    attention is traced by `trace_attention` (stages/families.py `attention_in_trace`).

    The additive mask is built here rather than by transformers' mask utilities, whose Python
    branches on the mask's contents would be frozen by the trace at the example's shape.
    token_type_ids are left out: single-text inputs have all zeros, which BERT supplies itself.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask[:, None, None, :].to(torch.float32)
        additive = (1.0 - keep) * torch.finfo(torch.float32).min
        return self.model(input_ids=input_ids, attention_mask=additive).logits


class LogitsFromMask(torch.nn.Module):
    """(input_ids, attention_mask) -> logits, the model building its own masks from the 0/1 mask
    (relative positions, causal and sliding-window masks): the other families. Under a trace
    transformers' mask functions take their general path, never a shortcut for an all-ones mask,
    and the parity check on mixed-length batches shows the graph generalises."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def trace_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention in the op order ORT's Attention fusion matches (inference only)."""
    # Divide by sqrt(head size), a Python number from the module: a constant in the trace.
    divisor = 1.0 / scaling if scaling else math.sqrt(query.shape[-1])
    scores = torch.matmul(query, key.transpose(2, 3)) / divisor
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def export_onnx(
    model: torch.nn.Module,
    example: dict[str, np.ndarray],
    path: Path,
    opset: int,
    family: Family,
) -> None:
    """Trace `model` to ONNX with dynamic batch and sequence axes."""
    from transformers import AttentionInterface

    previous = model.config._attn_implementation
    if family.attention_in_trace:
        AttentionInterface.register(TRACE_ATTENTION, trace_attention)
        model.set_attn_implementation(TRACE_ATTENTION)
        wrapper: torch.nn.Module = LogitsOnly(model).eval()
    else:
        # Eager attention traces to plain ops; SDPA's kernel choice would be frozen at the example.
        model.set_attn_implementation("eager")
        wrapper = LogitsFromMask(model).eval()
    args = tuple(torch.from_numpy(example[name]) for name in INPUT_NAMES)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes["logits"] = {0: "batch"}
    try:
        with torch.inference_mode():
            torch.onnx.export(
                wrapper,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=INPUT_NAMES,
                output_names=["logits"],
                dynamic_axes=axes,
                do_constant_folding=True,
            )
    finally:
        # export() puts the module back in the mode it found it in (train, for a fresh wrapper),
        # and the reference logits must come from the library's own attention.
        wrapper.eval()
        model.set_attn_implementation(previous)


def optimize_onnx(
    src: Path, dst: Path, family: Family, num_heads: int, hidden_size: int
) -> dict[str, Any]:
    """Fuse the graph (attention, layer norms, GELU) with ONNX Runtime's offline optimizer for the
    family's model type. Returns the optimizer's model type and the fused operators' counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(
        str(src),
        model_type=family.ort_model_type,
        num_heads=num_heads,
        hidden_size=hidden_size,
        opt_level=0,
    )
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    log.info("fused operators (%s optimizer): %s", family.ort_model_type, fused)
    if family.ort_fuses_attention and not fused.get("Attention"):
        log.warning("attention was not fused: the ONNX models will run, but slower")
    optimized.save_model_to_file(str(dst))
    return {"optimizer": family.ort_model_type, "operators": fused}


def _skip_preprocess_hint(record: logging.LogRecord) -> bool:
    """Drop quantize_dynamic's root-logger hint to pre-process the model: it is ORT's symbolic shape
    inference and graph optimisation, which `optimize_onnx` has done; repeated for every trial
    quantisation of the node choice, it would bury the stage's log."""
    return "pre-processing before quantization" not in record.getMessage()


def int8_candidates(path: Path) -> list[str]:
    """Nodes dynamic int8 quantisation applies to: fused Attention and the MatMuls that multiply
    by a weight (never two activations); the pooler and classifier Gemms stay fp32."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {init.name for init in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type in ("Attention", "MatMul") and any(name in weights for name in node.input)
    ]


def quantize_int8(src: Path, dst: Path, keep_fp32: Sequence[str], seven_bit: bool = True) -> None:
    """Dynamic int8 quantisation of the encoder's weights (activations quantised per batch).

    Measured on MiniLM (docs/export_predict.md): per-channel weight scales lift int8/fp32 top-1
    agreement by about 3 points over per-tensor ones at no speed cost. Weights take 7 bits
    (`reduce_range`): a CPU without VNNI multiplies u8 activations by s8 weights with AVX2's
    VPMADDUBSW, whose pairwise sums saturate at 16 bits for 8-bit weights (255 * 127 * 2 > 32767)
    and cannot for 7-bit ones, so VNNI and AVX2 CPUs compute the same integer products
    (`seven_bit=False`, full 8-bit weights, is for bench_int8_settings' comparison). The nodes in
    `keep_fp32` (chosen by `choose_fp32_nodes`) stay fp32.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    candidates = int8_candidates(src)
    unknown = sorted(set(keep_fp32) - set(candidates))
    if unknown:
        raise StageError(f"int8: no quantizable node named {unknown[0]!r} in the ONNX graph")
    # The fused graph holds com.microsoft ops whose outputs ONNX shape inference cannot type;
    # they are all float tensors, which DefaultTensorType tells the quantiser.
    logging.getLogger().addFilter(_skip_preprocess_hint)
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=seven_bit,
        nodes_to_quantize=[name for name in candidates if name not in keep_fp32],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def activation_ranges(
    path: Path, tensors: Sequence[str], ids: Sequence[list[int]], pad_id: int, batch_size: int
) -> dict[str, np.ndarray]:
    """Each named tensor's largest absolute value per channel (its last axis) over the texts."""
    import onnx

    model = onnx.load(str(path))
    for name in tensors:
        model.graph.output.append(
            onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    ranges: dict[str, np.ndarray] = {}
    batches = session_batches(model.SerializeToString(), ids, pad_id, batch_size, outputs=tensors)
    for _, values in batches:
        for name, value in zip(tensors, values, strict=True):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            ranges[name] = np.maximum(ranges[name], peak) if name in ranges else peak
    return ranges


def smooth_for_int8(
    src: Path, dst: Path, ids: Sequence[list[int]], pad_id: int, alpha: float, batch_size: int
) -> dict[str, Any]:
    """Write to `dst` the graph at `src` with its weight MatMuls' activation outliers moved into
    their weights (SmoothQuant, Xiao et al. 2023), the graph int8 quantisation starts from.

    Dynamic int8 quantises each MatMul's input with one scale per batch, set by its largest
    channel; a few channels of a transformer's activations are far larger than the rest, so the
    others keep few levels. Per input channel j, s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)
    (max|X_j| over the calibration texts `ids`); X_j / s_j (an inserted Mul) times s_j * W_j
    computes the same product in fp32, with flatter activations and per-channel-scaled weights
    taking the difference. The fused Attention nodes keep their inputs as they are.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    nodes = list(graph.node)
    # By position (names may repeat or be empty). A weight another node also reads (tied weights)
    # is left alone: rescaling it would change both.
    targets = [
        i
        for i, node in enumerate(nodes)
        if node.op_type == "MatMul"
        and len(node.input) == 2
        and node.input[1] in weights
        and uses[node.input[1]] == 1
    ]
    if not targets:
        shutil.copyfile(src, dst)
        return {"alpha": alpha, "nodes": 0}
    inputs = sorted({nodes[i].input[0] for i in targets})
    ranges = activation_ranges(src, inputs, ids, pad_id, batch_size)
    smoothing: dict[int, onnx.NodeProto] = {}
    for i in targets:
        node = nodes[i]
        weight = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        act = ranges[node.input[0]]
        scale = np.maximum(act, 1e-5) ** alpha / np.maximum(np.abs(weight).max(axis=1), 1e-5) ** (
            1 - alpha
        )
        # A channel the calibration texts never moved keeps its scale: dividing it by a tiny one
        # would let a single non-zero value at inference set the whole batch's int8 range.
        scale = np.where(act > 1e-6, np.maximum(scale, 1e-5), 1.0).astype(np.float32)
        weights[node.input[1]].CopyFrom(
            numpy_helper.from_array(weight * scale[:, None], node.input[1])
        )
        prefix = f"newsclf_smooth_{i}"
        graph.initializer.append(numpy_helper.from_array(1.0 / scale, f"{prefix}/scale"))
        smoothing[i] = onnx.helper.make_node(
            "Mul",
            [node.input[0], f"{prefix}/scale"],
            [f"{prefix}/output"],
            name=f"{prefix}/Mul",
        )
        node.input[0] = f"{prefix}/output"
    # Each Mul goes right before its MatMul: the node list stays topologically sorted.
    ordered = [
        step
        for i, node in enumerate(nodes)
        for step in (smoothing.get(i), node)
        if step is not None
    ]
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save(model, str(dst))
    return {"alpha": alpha, "nodes": len(targets)}


def session_batches(
    model: Path | bytes,
    ids: Sequence[list[int]],
    pad_id: int,
    batch_size: int,
    threads: int | None = None,
    outputs: Sequence[str] | None = None,
) -> Iterator[tuple[list[int], list[np.ndarray]]]:
    """Tokenised texts through an ONNX graph (a file, or serialised bytes), batched by length as
    predict runs it: each batch's row numbers and its outputs (the graph's own, or those named),
    shortest texts first. `threads` caps ORT's intra-op pool."""
    import onnxruntime as ort

    from newsclf.predict import pad_batch, session_options

    session = ort.InferenceSession(
        model if isinstance(model, bytes) else str(model),
        sess_options=session_options(threads),
        providers=["CPUExecutionProvider"],
    )
    names = list(outputs) if outputs is not None else None
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield rows, session.run(names, pad_batch([ids[i] for i in rows], pad_id))


def session_logits(
    path: Path, ids: Sequence[list[int]], pad_id: int, batch_size: int, threads: int | None = None
) -> np.ndarray:
    """Logits of tokenised texts through an ONNX file, batched by length as predict runs it."""
    out: np.ndarray | None = None
    for rows, (logits,) in session_batches(path, ids, pad_id, batch_size, threads):
        if out is None:
            out = np.empty((len(ids), logits.shape[1]), dtype=np.float32)
        out[rows] = logits
    assert out is not None
    return out


@dataclass(frozen=True)
class Trial:
    """A trial int8 graph's top-1 agreement with fp32 on the calibration texts; when `complete`
    is false, scoring stopped once the misses ruled the bound out, and `agreement` is the most
    the graph could have reached on them."""

    agreement: float
    complete: bool


def agreement_trial(
    path: Path,
    ids: Sequence[list[int]],
    reference_top1: np.ndarray,
    pad_id: int,
    batch_size: int,
    min_agreement: float,
) -> Trial:
    """Top-1 agreement of the graph at `path` with `reference_top1`, scored batch by batch and
    stopped as soon as the misses so far put it below `min_agreement` whatever the rest gives:
    pass or miss is decided exactly, on the fewest texts that decide it."""
    misses = 0
    for rows, (logits,) in session_batches(path, ids, pad_id, batch_size):
        misses += int((logits.argmax(1) != reference_top1[rows]).sum())
        if (len(ids) - misses) / len(ids) < min_agreement:
            return Trial((len(ids) - misses) / len(ids), complete=False)
    return Trial((len(ids) - misses) / len(ids), complete=True)


def pick_fp32_nodes(
    candidates: Sequence[str],
    agreement_keeping: Callable[[list[str]], Trial],
    sensitivities_of: Callable[[Sequence[str]], dict[str, float]],
    min_agreement: float,
    max_nodes: int,
) -> tuple[list[str], list[dict[str, Any]], dict[str, float]]:
    """The chooser's rule, on measurements it is given: the nodes kept fp32, each trial's
    agreement in the order tried, and each candidate's sensitivity (measured only when needed).

    If quantising every candidate (`agreement_keeping([])`) reaches `min_agreement`, none is kept.
    Otherwise every candidate's sensitivity is measured and the most sensitive nodes (ties in
    candidate order) are kept fp32: the most allowed first (`max_nodes`, at most all but one: ONNX
    Runtime reads an empty node list as every node), kept if even they miss the bound; if they
    meet it, the fewest that meet it, by bisection on their number (the agreement grows with the
    nodes kept, as a rule: the count found meets the bound and one fewer missed it, when tried). A
    step records `agreement`, or `agreement_at_most` for a trial stopped once it could not reach
    the bound.
    """
    steps: list[dict[str, Any]] = []

    def meets(kept: list[str]) -> bool:
        trial = agreement_keeping(kept)
        key = "agreement" if trial.complete else "agreement_at_most"
        steps.append({"kept_fp32": len(kept), key: round(trial.agreement, 6)})
        return trial.agreement >= min_agreement

    cap = min(max_nodes, len(candidates) - 1)
    if meets([]) or cap < 1:
        return [], steps, {}
    sensitivity = sensitivities_of(candidates)
    ranked = sorted(candidates, key=lambda c: (-sensitivity[c], candidates.index(c)))
    low, high = 1, cap  # the count kept lies in [low, high]; `high` meets the bound or is the cap
    if meets(ranked[:cap]):
        while low < high:
            middle = (low + high) // 2
            if meets(ranked[:middle]):
                high = middle
            else:
                low = middle + 1
    return ranked[:high], steps, sensitivity


def probe_sensitivity(
    fp32_path: Path,
    keep_fp32: list[str],
    probe_ids: Sequence[list[int]],
    reference: np.ndarray,
    pad_id: int,
    batch_size: int,
    out: Path,
) -> float:
    """Mean squared logit error against `reference` of the graph quantised but for `keep_fp32`,
    on one ORT thread: probes run side by side, one per core, with the same result in any
    number of processes."""
    quantize_int8(fp32_path, out, keep_fp32)
    logits = session_logits(out, probe_ids, pad_id, batch_size, threads=1)
    return float(((logits - reference) ** 2).mean())


def measure_sensitivities(
    fp32_path: Path,
    nodes: Sequence[str],
    candidates: Sequence[str],
    probe_ids: Sequence[list[int]],
    reference: np.ndarray,
    pad_id: int,
    batch_size: int,
) -> dict[str, float]:
    """Each node's sensitivity (only it quantised), measured in one process per core: a probe is
    mostly single-threaded quantisation (24 probes: 34 s in two processes against 45 s in one,
    docs/export_predict.md)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = min(available_cores(), len(nodes))
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for i, name in enumerate(nodes):
            # A folder per probe: quantize_dynamic writes its shape-inferred copy beside its input.
            folder = Path(tmp) / f"probe_{i}"
            folder.mkdir()
            (folder / FP32_FILE).symlink_to(fp32_path.resolve())
            keep = [c for c in candidates if c != name]
            jobs.append(
                (
                    folder / FP32_FILE,
                    keep,
                    probe_ids,
                    reference,
                    pad_id,
                    batch_size,
                    folder / INT8_FILE,
                )
            )
        bar = tqdm(total=len(nodes), desc=f"int8 sensitivity ({workers} processes)", unit="node")
        values = []
        with bar:
            if workers == 1:
                for job in jobs:
                    values.append(probe_sensitivity(*job))
                    bar.update()
            else:
                # spawn: a forked child must not inherit the parent's torch OpenMP pool.
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(workers, mp_context=context) as pool:
                    futures = [pool.submit(probe_sensitivity, *job) for job in jobs]
                    for future in futures:
                        future.add_done_callback(lambda _: bar.update())
                    values = [future.result() for future in futures]
    return dict(zip(nodes, values, strict=True))


def choose_fp32_nodes(
    fp32_path: Path,
    int8_path: Path,
    calibration_ids: Sequence[list[int]],
    pad_id: int,
    min_agreement: float,
    max_nodes: int,
    batch_size: int,
    smoothing: float | None = None,
) -> dict[str, Any]:
    """The nodes to leave fp32 in the int8 model, chosen by `pick_fp32_nodes` on calibration texts
    of the model at hand; the int8 model with that choice is left at `int8_path`. With
    `smoothing` (SmoothQuant's alpha) the int8 graphs are quantised from `smooth_for_int8`'s
    rewrite of the fp32 graph, whose activation ranges come from the same texts. Agreement is
    top-1 agreement with fp32 on all calibration texts (a trial that cannot reach
    `min_agreement` stops early: `agreement_trial`); a node's sensitivity is the mean squared
    logit error when only it is quantised, on the first SENSITIVITY_TEXTS of them. Returns the
    choice with its measurements (for export.json)."""
    reference = session_logits(fp32_path, calibration_ids, pad_id, batch_size)
    candidates = int8_candidates(fp32_path)
    probe = calibration_ids[:SENSITIVITY_TEXTS]
    with tempfile.TemporaryDirectory() as tmp:
        source, smoothed = fp32_path, None
        if smoothing is not None:
            source = Path(tmp) / FP32_FILE
            smoothed = smooth_for_int8(
                fp32_path, source, calibration_ids, pad_id, smoothing, batch_size
            )

        def agreement_keeping(keep: list[str]) -> Trial:
            quantize_int8(source, int8_path, keep)
            return agreement_trial(
                int8_path, calibration_ids, reference.argmax(1), pad_id, batch_size, min_agreement
            )

        def sensitivities_of(nodes: Sequence[str]) -> dict[str, float]:
            return measure_sensitivities(
                source, nodes, candidates, probe, reference[: len(probe)], pad_id, batch_size
            )

        keep, steps, sensitivity = pick_fp32_nodes(
            candidates, agreement_keeping, sensitivities_of, min_agreement, max_nodes
        )
        # int8_path holds the last trial's graph: a prefix of the same ranking, so its count says
        # whether it is the one chosen (the bisection may have tried another count last).
        if steps[-1]["kept_fp32"] != len(keep):
            quantize_int8(source, int8_path, keep)
    log.info(
        "int8: %d of %d nodes kept fp32 %s; calibration agreement %s",
        len(keep),
        len(candidates),
        keep,
        [f"{s['agreement']}" if "agreement" in s else f"<={s['agreement_at_most']}" for s in steps],
    )
    return {
        "n_calibration_texts": len(calibration_ids),
        "weights": "int8 per output channel, 7-bit range (no AVX2 saturation)",
        "smoothing": smoothed,
        "candidates": len(candidates),
        "kept_fp32": keep,
        "steps": steps,
        # Four significant digits: the values span orders of magnitude from model to model.
        "sensitivity": {k: float(f"{v:.4g}") for k, v in sensitivity.items()},
    }


def spread_by_length(lengths: Sequence[int], n: int) -> list[int]:
    """Indices of `n` rows spread evenly over the length range, shortest and longest included.

    Returned alternating short and long (shortest, longest, 2nd shortest, ...), so that every
    batch taken in this order mixes lengths and the padded positions of the exported mask are
    exercised.
    """
    if not lengths:
        raise StageError("parity check: no test texts")
    by_length = sorted(range(len(lengths)), key=lambda i: lengths[i])
    picks = np.unique(np.linspace(0, len(by_length) - 1, num=min(n, len(by_length))).round())
    spread = [by_length[int(i)] for i in picks]
    rank = np.arange(len(spread))
    half = (len(spread) + 1) // 2
    order = np.empty_like(rank)
    order[0::2], order[1::2] = rank[:half], rank[half:][::-1]
    return [spread[i] for i in order]


def parity_texts(texts: list[str], n: int) -> list[str]:
    """`n` texts spread over the length range, in `spread_by_length`'s mixed order."""
    return [texts[i] for i in spread_by_length([len(text) for text in texts], n)]


def fp32_parity(reference: np.ndarray, fp32: np.ndarray, max_abs_diff: float) -> float:
    """The largest logit difference between the fp32 graph and PyTorch, row for row; more than
    `max_abs_diff` raises StageError: the graph is wrong (int8, lossy, is judged by
    `int8_parity` and never fails the stage)."""
    diff = float(np.abs(reference - fp32).max())
    if diff > max_abs_diff:
        raise StageError(
            f"parity: ONNX fp32 logits differ from PyTorch by {diff:.3g}"
            f" > export.parity.max_abs_logit_diff={max_abs_diff}"
        )
    return diff


def int8_parity(reference: np.ndarray, int8: np.ndarray, min_agreement: float) -> dict[str, Any]:
    """The int8 graph's top-1 agreement with PyTorch, its largest logit difference, and whether
    the agreement meets `min_agreement`."""
    agreement = float((reference.argmax(1) == int8.argmax(1)).mean())
    return {
        "int8_top1_agreement": agreement,
        "int8_max_abs_logit_diff": float(np.abs(reference - int8).max()),
        "int8_meets_bound": agreement >= min_agreement,
    }


def onnx_logits(
    classifier: OnnxClassifier, texts: list[str], batch_size: int, desc: str, by_length: bool = True
) -> np.ndarray:
    """Logits of `texts` through the same tokenizer and session code as `newsclf predict`."""
    ids = classifier.encode(texts).ids
    with tqdm(total=len(ids), desc=desc, unit="text") as bar:
        return classifier.logits(ids, batch_size, on_batch=bar.update, by_length=by_length)


@dataclass(frozen=True)
class Int8Plan:
    """How the int8 model is made: calibration texts (train rows, never test) and its bounds."""

    calibration_texts: list[str]
    min_agreement: float
    max_fp32_nodes: int
    batch_size: int
    smoothing: float | None = None  # SmoothQuant's alpha (`smooth_for_int8`), or none


def onnx_meta(
    tokenizer: Any, max_length: int, models: dict[str, str], label_names: Sequence[str]
) -> dict[str, Any]:
    """The content of `newsclf_onnx.json`: what `newsclf predict` needs to run the folder. The
    export adds `int8_parity` once it is measured (predict defaults to fp32 when it missed)."""
    return {
        "labels": list(label_names),
        "max_length": max_length,
        "pad_id": tokenizer.pad_token_id,
        "inputs": INPUT_NAMES,
        "models": models,
    }


@dataclass
class Built:
    """The ONNX graphs and tokenizer written to a folder, before the parity check."""

    model: torch.nn.Module  # the merged PyTorch model the graphs were made from
    tokenizer: Any
    meta: dict[str, Any]  # newsclf_onnx.json-to-be
    int8_choice: dict[str, Any] | None  # the fp32 nodes kept in the int8 graph, and why
    fusions: dict[str, Any]  # ONNX Runtime's optimizer type and the operators it fused


def build_onnx(
    adapter_dir: Path,
    base_model: str,
    label_names: tuple[str, ...],
    out_dir: Path,
    opset: int,
    max_length: int,
    int8: Int8Plan | None,
) -> Built:
    """Merge the adapter, write the fused fp32 graph, the tokenizer and (with `int8`) the int8
    graph whose fp32 nodes are chosen on the plan's calibration texts."""
    from transformers import AutoTokenizer

    require_adapter(adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if not tokenizer.is_fast:
        raise StageError(f"{adapter_dir}: needs a fast tokenizer (tokenizer.json) for predict")
    model = load_merged_model(adapter_dir, base_model, label_names, tokenizer.pad_token_id)
    family = family_of(model.config.model_type, base_model)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    # Two texts of different lengths, so the traced example has real padding in its mask.
    example = tokenizer(
        ["An example headline.", "A second, somewhat longer example sentence for the trace."],
        padding=True,
        return_tensors="np",
    )
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        export_onnx(
            model, {k: example[k].astype(np.int64) for k in INPUT_NAMES}, raw, opset, family
        )
        fusions = optimize_onnx(
            raw,
            out_dir / FP32_FILE,
            family,
            model.config.num_attention_heads,
            model.config.hidden_size,
        )
    tokenizer.save_pretrained(str(out_dir))
    meta = onnx_meta(tokenizer, max_length, {"fp32": FP32_FILE}, label_names)
    choice = None
    if int8 is not None:
        # Calibration texts are tokenised as predict tokenises them (truncation included).
        encoder = OnnxClassifier(out_dir, precision="fp32", meta=meta)
        choice = choose_fp32_nodes(
            out_dir / FP32_FILE,
            out_dir / INT8_FILE,
            encoder.encode(int8.calibration_texts).ids,
            tokenizer.pad_token_id,
            int8.min_agreement,
            int8.max_fp32_nodes,
            int8.batch_size,
            int8.smoothing,
        )
        meta["models"]["int8"] = INT8_FILE
    return Built(model, tokenizer, meta, choice, fusions)


@dataclass
class Exported:
    """An exported folder whose fp32 graph passed parity: its parity figures, the int8 graph's
    logits of every text (None without int8), and each graph's timed pass (tokenization
    included) as (texts, seconds)."""

    built: Built
    parity: dict[str, Any]
    int8_logits: np.ndarray | None
    timed: dict[str, tuple[int, float]]  # "fp32" (the parity texts by length), "int8" (all)


def timed_logits(
    classifier: OnnxClassifier, texts: list[str], batch_size: int, desc: str
) -> tuple[np.ndarray, float]:
    """`onnx_logits` batched by length, and the seconds it took."""
    start = time.perf_counter()
    logits = onnx_logits(classifier, texts, batch_size, desc)
    return logits, time.perf_counter() - start


def export_folder(
    adapter_dir: Path,
    base_model: str,
    label_names: tuple[str, ...],
    out_dir: Path,
    opset: int,
    max_length: int,
    int8: Int8Plan | None,
    texts: list[str],
    reference: np.ndarray,
    parity: ParityParams,
    batch_size: int,
) -> Exported:
    """Build the graphs and check them against `reference`, the merged PyTorch model's logits of
    `texts`: the fp32 graph on `parity.n_texts` of them spread over the length range, scored
    batched by length (as predict runs them) and again in mixed-length batches (the padded
    positions of its mask); the int8 graph on every text, batched by length. Writes
    `newsclf_onnx.json`, marking an int8 graph that missed its bound (`run` completes it with the
    base model and test accuracy). A broken fp32 graph raises StageError before the folder is
    usable."""
    if reference.shape != (len(texts), len(label_names)):
        raise StageError(
            f"parity: {reference.shape[0]} reference logits of width {reference.shape[1]} for "
            f"{len(texts)} texts and {len(label_names)} labels"
        )
    built = build_onnx(adapter_dir, base_model, label_names, out_dir, opset, max_length, int8)
    meta = built.meta
    classifiers = {name: OnnxClassifier(out_dir, name, meta=meta) for name in meta["models"]}
    sample = spread_by_length([len(text) for text in texts], parity.n_texts)
    sample_texts = [texts[i] for i in sample]
    # Mixed lengths first: it also warms the session, so the timed pass measures steady scoring.
    mixed = onnx_logits(
        classifiers["fp32"], sample_texts, batch_size, "parity fp32, mixed lengths", by_length=False
    )
    mixed_diff = fp32_parity(reference[sample], mixed, parity.max_abs_logit_diff)
    fp32, fp32_seconds = timed_logits(classifiers["fp32"], sample_texts, batch_size, "parity fp32")
    checked: dict[str, Any] = {
        # The headline figure covers both passes.
        "fp32_max_abs_logit_diff": max(
            fp32_parity(reference[sample], fp32, parity.max_abs_logit_diff), mixed_diff
        ),
        "fp32_mixed_length_max_abs_logit_diff": mixed_diff,
    }
    log.info("fp32 parity passed on %d test texts: %s", len(sample), checked)
    timed = {"fp32": (len(sample), fp32_seconds)}
    int8_logits = None
    if "int8" in classifiers:
        int8_logits, int8_seconds = timed_logits(
            classifiers["int8"], texts, batch_size, "test int8"
        )
        timed["int8"] = (len(texts), int8_seconds)
        checked |= int8_parity(reference, int8_logits, parity.min_int8_agreement)
        # The agreement is this CPU's int8 kernels' (a CPU without VNNI computes others).
        checked["int8_measured_on"] = {"cpu": cpu_model(), "int8_instructions": int8_instructions()}
        meta["int8_parity"] = {
            "top1_agreement": round(checked["int8_top1_agreement"], 6),
            "min_agreement": parity.min_int8_agreement,
            "meets_bound": bool(checked["int8_meets_bound"]),
            "measured_on": checked["int8_measured_on"],
        }
        if not checked["int8_meets_bound"]:
            log.warning(
                "int8 top-1 agreement with PyTorch %.4f < export.parity.min_int8_agreement=%s: "
                "model.int8.onnx is kept but marked as missing the bound; `newsclf predict` "
                "defaults to fp32",
                checked["int8_top1_agreement"],
                parity.min_int8_agreement,
            )
    write_json(meta, out_dir / META_FILE)
    counts = {"n_texts": len(sample)} | ({"n_int8_texts": len(texts)} if "int8" in timed else {})
    return Exported(built, counts | checked, int8_logits, timed)


def file_mb(path: Path) -> float:
    return round(path.stat().st_size / 2**20, 2)


def calibration_texts(train: pl.DataFrame, n: int) -> list[str]:
    """`n` genuine train texts spread over the length range: int8 choices never see test rows."""
    if "op" in train.columns:
        train = train.filter(pl.col("op") == "original")
    return parity_texts(train["text"].to_list(), n)


def int8_plan(train: pl.DataFrame | None, params: ExportParams) -> Int8Plan | None:
    """How to make the int8 graph, or None when `export.quantize` is off."""
    if not params.quantize:
        return None
    if train is None:
        raise StageError("export.quantize: the int8 model needs train rows to calibrate on")
    return Int8Plan(
        calibration_texts(train, params.int8_calibration_texts),
        params.parity.min_int8_agreement,
        params.int8_max_fp32_nodes,
        params.batch_size,
        params.int8_smoothing,
    )


def accuracy_and_speed(
    exported: Exported, reference: np.ndarray, labels: np.ndarray, batch_size: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Test accuracy per graph — fp32: the merged model's, from the PyTorch logits its graph
    reproduces (parity); int8: the int8 graph's own — and each graph's texts/s over its timed
    pass (tokenization included)."""
    accuracy: dict[str, Any] = {
        "n_texts": len(labels),
        "fp32": round(float((reference.argmax(1) == labels).mean()), 6),
    }
    speed: dict[str, Any] = {"batch_size": batch_size}
    for name, (n_texts, seconds) in exported.timed.items():
        speed[f"{name}_texts_per_s"] = round(n_texts / seconds, 1)
        speed[f"{name}_n_texts"] = n_texts
    if exported.int8_logits is not None:
        accuracy["int8"] = round(float((exported.int8_logits.argmax(1) == labels).mean()), 6)
        accuracy["int8_drop_pt"] = round(100 * (accuracy["fp32"] - accuracy["int8"]), 4)
    return accuracy, speed


def read_reference(path: Path, test: pl.DataFrame) -> np.ndarray:
    """`evaluate`'s PyTorch logits of the test rows, in the test table's order; rows that are not
    the test table's (a stale file) are an error naming both files."""
    table = read_table(path)
    if table["id"].to_list() != test["id"].to_list():
        raise StageError(
            f"{path}: its rows are not those of {paths.TEST} in order; run `dvc repro evaluate`"
        )
    return np.asarray(table["logits"].to_list(), dtype=np.float32)


def run(
    test: pl.DataFrame,
    reference: np.ndarray,
    train: pl.DataFrame | None,
    params: ExportParams,
    label_names: tuple[str, ...],
    base_model: str,
    max_length: int,
    adapter_dir: Path = paths.ADAPTER,
    out_dir: Path = paths.ONNX,
    base_model_name: str | None = None,
    calibration: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Export the adapter in `adapter_dir` merged into its fp32 base to `out_dir` (ONNX fp32, and
    int8 calibrated on `train` when `params.quantize`), check parity against `reference` (the
    merged PyTorch model's logits of the `test` rows) and score accuracy on `test`: the fp32
    model's from `reference`, the int8 graph's from its parity pass. `base_model_name` is the
    base as `train.base_model` names it (default: `base_model`), which the folder's metadata
    records. `calibration`: evaluate's temperature (reports/calibration.json), which the folder
    carries so that predict and serve return calibrated scores (none: scores stay raw softmax).
    Returns the export report and the speed report (timings, kept apart: they vary per run)."""
    if test.is_empty():
        raise StageError(f"{paths.TEST}: no rows")
    exported = export_folder(
        adapter_dir,
        base_model,
        label_names,
        out_dir,
        params.opset,
        max_length,
        int8_plan(train, params),
        test["text"].to_list(),
        reference,
        params.parity,
        params.batch_size,
    )
    accuracy, speed = accuracy_and_speed(
        exported, reference, test["label"].to_numpy(), params.batch_size
    )
    meta = exported.built.meta
    meta["base_model"] = base_model_name or base_model
    if calibration is not None:
        meta["calibration"] = {
            key: calibration[key]
            for key in ("temperature", "fitted", "held_out_rows", "method", "confidence_reference")
        }
    meta["test_accuracy"] = {name: accuracy[name] for name in meta["models"]} | {
        "n_texts": accuracy["n_texts"]
    }
    write_json(meta, out_dir / META_FILE)
    sizes = {name: file_mb(out_dir / file) for name, file in meta["models"].items()}
    report: dict[str, Any] = {
        "opset": params.opset,
        "exporter": "torchscript",
        "fusions": exported.built.fusions,
        "max_length": max_length,
        "parity": {
            k: round(v, 8) if isinstance(v, float) else v for k, v in exported.parity.items()
        },
        "accuracy": accuracy,
        "size_mb": sizes,
    }
    if exported.built.int8_choice is not None:
        report["int8"] = exported.built.int8_choice
    return report, speed


def run_reports() -> dict[str, dict]:
    """The upstream reports the model card quotes, as they are on disk."""
    files = {
        "ingest": paths.INGEST_REPORT,
        "clean": paths.CLEAN_REPORT,
        "label_issues": paths.LABEL_ISSUES_REPORT,
        "augment": paths.AUGMENT_REPORT,
        "metrics": paths.METRICS,
        "train": paths.TRAIN_METRICS,
    }
    reports = {name: json.loads(require_file(path).read_text()) for name, path in files.items()}
    reports["resolved"] = yaml.safe_load(require_file(paths.TRAIN_RESOLVED).read_text())
    return reports


def main() -> None:
    from transformers.utils import logging as hf_logging

    # transformers reports the base's classifier as "newly initialized"; it is replaced by the
    # adapter's trained head, which load_merged_model verifies, so the report would only mislead.
    hf_logging.set_verbosity_error()
    params = load_section("export", ExportParams)
    train_params = load_section("train", TrainParams)
    label_names = load_labels()
    log.info("labels %s; params %s", list(label_names), params)
    test = read_processed(paths.TEST, "test", label_names)
    reference = read_reference(paths.TEST_LOGITS, test)
    train = read_processed(paths.TRAIN, "train", label_names) if params.quantize else None
    base_path = resolve_base_model(train_params.base_model)
    calibration = json.loads(require_file(paths.CALIBRATION).read_text())
    report, speed = run(
        test,
        reference,
        train,
        params,
        label_names,
        base_path,
        train_params.max_length,
        base_model_name=train_params.base_model,
        calibration=calibration,
    )
    write_json(report, paths.EXPORT_REPORT)
    write_json(speed, paths.EXPORT_SPEED)
    card = write_card(
        card_context(
            run_reports(),
            report,
            train_params,
            lora_choice(base_path, train_params.base_model, train_params.lora),
            label_names,
            load_section("ingest", IngestParams).sources,
            read_meta(paths.ONNX)["models"],
            params.parity.min_int8_agreement,
            calibration,
        ),
        paths.ONNX,
    )
    log.info("model card in %s", card)
    log.info("accuracy %s, sizes (MB) %s, speed %s", report["accuracy"], report["size_mb"], speed)


if __name__ == "__main__":
    run_main(main, "export")
