"""The export stage on a tiny random BERT with a perturbed LoRA adapter: ONNX round trip and parity."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from newsclf.predict import META_FILE, OnnxClassifier
from stages.common import StageError, int8_instructions
from stages.evaluate import merged_logits, predict_logits
from stages.export import (
    FP32_FILE,
    INT8_FILE,
    Int8Plan,
    ParityParams,
    Trial,
    agreement_trial,
    export_folder,
    fp32_parity,
    int8_candidates,
    int8_parity,
    measure_sensitivities,
    onnx_logits,
    parity_texts,
    pick_fp32_nodes,
    quantize_int8,
    read_reference,
    session_logits,
    smooth_for_int8,
)
from stages.modeling import load_merged_model
from tests.conftest import EXPORT_MAX_LENGTH as MAX_LENGTH
from tests.conftest import EXPORT_TEXTS
from tests.lora_fixture import make_adapter
from tests.pipeline_fixture import AG_NEWS_LABELS as LABEL_NAMES

TEXTS = list(EXPORT_TEXTS)


@pytest.fixture(scope="module")
def adapter_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_bert_dir, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def exported(tiny_onnx):
    out, result = tiny_onnx
    assert result.built.int8_choice is not None and result.built.int8_choice["kept_fp32"] == []
    return out, result.built.model, result.built.tokenizer


def export_to(
    adapter: Path,
    base: Path,
    out: Path,
    int8: Int8Plan | None,
    texts: list[str],
    reference: np.ndarray | None = None,
):
    """export_folder with the tiny settings, checked on `texts` against `reference` (default: the
    adapter's own merged logits, as evaluate writes them); int8 bound 0.995."""
    if reference is None:
        reference = merged_logits(adapter, str(base), LABEL_NAMES, texts, MAX_LENGTH, 8)
    parity = ParityParams(n_texts=len(texts), max_abs_logit_diff=1e-4, min_int8_agreement=0.995)
    return export_folder(
        adapter,
        str(base),
        LABEL_NAMES,
        out,
        17,
        MAX_LENGTH,
        int8,
        texts,
        reference,
        parity,
        batch_size=8,
    )


def test_merge_changes_the_base_weights(adapter_dir: Path, tiny_bert_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).state_dict()
    merged = load_merged_model(adapter_dir, str(tiny_bert_dir), LABEL_NAMES).state_dict()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(base[name], merged[name])  # LoRA delta merged in
    key = "bert.encoder.layer.0.attention.self.key.weight"
    assert torch.equal(base[key], merged[key])  # untargeted module untouched
    assert not any("lora" in k for k in merged)


def test_export_folder_is_self_contained(exported) -> None:
    out, _, _ = exported
    meta = json.loads((out / META_FILE).read_text())
    assert meta["labels"] == list(LABEL_NAMES)
    assert meta["max_length"] == MAX_LENGTH
    assert meta["models"] == {"fp32": FP32_FILE, "int8": INT8_FILE}
    for name in (FP32_FILE, INT8_FILE, "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert (out / INT8_FILE).stat().st_size < (out / FP32_FILE).stat().st_size


def test_onnx_round_trip_matches_pytorch(exported) -> None:
    out, model, tokenizer = exported
    reference = predict_logits(model, tokenizer, TEXTS, MAX_LENGTH, batch_size=4)
    fp32 = onnx_logits(OnnxClassifier(out, "fp32"), TEXTS, 4, "fp32")
    int8 = onnx_logits(OnnxClassifier(out, "int8"), TEXTS, 4, "int8")
    assert reference.shape == fp32.shape == int8.shape == (len(TEXTS), len(LABEL_NAMES))
    # The random LoRA and head make logits far from zero, so a wrong graph cannot pass by chance.
    assert np.abs(reference).max() > 0.1
    assert fp32_parity(reference, fp32, max_abs_diff=1e-4) <= 1e-4
    assert 0.0 <= int8_parity(reference, int8, min_agreement=0.0)["int8_top1_agreement"] <= 1.0


def test_dynamic_axes_batch_and_sequence(exported) -> None:
    """One text alone and inside batches of other lengths gives the same logits."""
    out, _, _ = exported
    classifier = OnnxClassifier(out, "fp32")
    ids = classifier.encode(TEXTS).ids
    alone = np.concatenate([classifier.logits([seq]) for seq in ids])
    batched = classifier.logits(ids, batch_size=len(ids))
    np.testing.assert_allclose(alone, batched, atol=1e-5)


def test_predict_tokenizer_matches_transformers_truncation(exported) -> None:
    out, _, tokenizer = exported
    encoded = OnnxClassifier(out, "fp32").encode(TEXTS)
    expected = tokenizer(TEXTS, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    assert encoded.ids == expected
    assert encoded.truncated == [len(tokenizer(t)["input_ids"]) > MAX_LENGTH for t in TEXTS]
    assert any(encoded.truncated)


def test_parity_failure_fails_the_stage(adapter_dir: Path, tiny_bert_dir: Path, tmp_path: Path):
    """Another adapter's export does not pass as this model's, and a reference of the wrong
    shape is refused."""
    other = make_adapter(tiny_bert_dir, tmp_path / "other", seed=1)
    reference = merged_logits(adapter_dir, str(tiny_bert_dir), LABEL_NAMES, TEXTS, MAX_LENGTH, 4)
    with pytest.raises(StageError, match="max_abs_logit_diff"):
        export_to(other, tiny_bert_dir, tmp_path / "onnx", None, TEXTS, reference)
    with pytest.raises(StageError, match="reference logits"):
        export_to(adapter_dir, tiny_bert_dir, tmp_path / "onnx", None, TEXTS, reference[:-1])


def test_mixed_length_batches_are_checked(adapter_dir: Path, tiny_bert_dir: Path, tmp_path: Path):
    """Besides the by-length passes, the fp32 graph scores the texts in mixed-length batches (the
    padded positions of its mask), checked against the same reference."""
    exported = export_to(adapter_dir, tiny_bert_dir, tmp_path / "onnx", None, TEXTS)
    assert exported.parity["n_texts"] == len(TEXTS)
    assert exported.parity["fp32_mixed_length_max_abs_logit_diff"] <= 1e-4
    assert exported.int8_logits is None and set(exported.timed) == {"fp32"}


@pytest.mark.kernels
def test_fp32_is_checked_on_the_parity_texts_and_int8_on_every_text(
    adapter_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """The fp32 graph is compared with PyTorch on `parity.n_texts` texts spread over the length
    range; the int8 graph scores every text, and the accuracies come from those logits."""
    from stages.export import accuracy_and_speed

    texts = varied_texts(30)
    reference = merged_logits(adapter_dir, str(tiny_bert_dir), LABEL_NAMES, texts, MAX_LENGTH, 8)
    parity = ParityParams(n_texts=10, max_abs_logit_diff=1e-4, min_int8_agreement=0.0)
    plan = Int8Plan(texts, min_agreement=0.0, max_fp32_nodes=4, batch_size=8)
    exported = export_folder(
        adapter_dir, str(tiny_bert_dir), LABEL_NAMES, tmp_path / "onnx", 17, MAX_LENGTH, plan,
        texts, reference, parity, batch_size=8,
    )  # fmt: skip
    assert exported.parity["n_texts"] == 10 and exported.parity["n_int8_texts"] == 30
    assert {name: n for name, (n, _) in exported.timed.items()} == {"fp32": 10, "int8": 30}
    int8 = session_logits(tmp_path / "onnx" / INT8_FILE, OnnxClassifier(tmp_path / "onnx", "fp32").encode(texts).ids, 0, 8)  # fmt: skip
    np.testing.assert_allclose(exported.int8_logits, int8, atol=1e-6)
    labels = np.arange(len(texts)) % len(LABEL_NAMES)
    accuracy, speed = accuracy_and_speed(exported, reference, labels, 8)
    assert accuracy["fp32"] == round(float((reference.argmax(1) == labels).mean()), 6)
    assert accuracy["int8"] == round(float((int8.argmax(1) == labels).mean()), 6)
    assert accuracy["int8_drop_pt"] == round(100 * (accuracy["fp32"] - accuracy["int8"]), 4)
    assert speed["fp32_n_texts"] == 10 and speed["int8_n_texts"] == 30
    # A reference that is wrong on the parity texts fails the fp32 check.
    wrong = reference.copy()
    wrong[:, 0] += 1.0
    with pytest.raises(StageError, match="max_abs_logit_diff"):
        export_folder(
            adapter_dir, str(tiny_bert_dir), LABEL_NAMES, tmp_path / "onnx2", 17, MAX_LENGTH,
            None, texts, wrong, parity, batch_size=8,
        )  # fmt: skip


@pytest.mark.kernels
def test_evaluate_scores_with_onednn_linears_as_the_dense_model_does(
    adapter_dir: Path, tiny_bert_dir: Path
) -> None:
    """evaluate's merged model runs its linear layers on oneDNN: the same logits as the plain
    model, every plain nn.Linear swapped, and a subclass (as bitsandbytes' layers are) kept."""
    from torch.utils.mkldnn import MkldnnLinear

    from stages.evaluate import load_classifier
    from stages.modeling import linears_on_onednn

    model, tokenizer = load_classifier(adapter_dir, str(tiny_bert_dir), LABEL_NAMES)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert any(isinstance(m, MkldnnLinear) for m in model.modules())
    dense = load_merged_model(adapter_dir, str(tiny_bert_dir), LABEL_NAMES)
    texts = varied_texts(20)
    np.testing.assert_allclose(
        predict_logits(model, tokenizer, texts, MAX_LENGTH, 4),
        predict_logits(dense, tokenizer, texts, MAX_LENGTH, 4),
        atol=1e-5,
    )

    class Quantized(torch.nn.Linear):
        pass

    holder = torch.nn.Sequential(Quantized(4, 4), torch.nn.Linear(4, 4))
    linears_on_onednn(holder)
    assert type(holder[0]) is Quantized and isinstance(holder[1], MkldnnLinear)


def test_stale_reference_names_both_files(tmp_path: Path) -> None:
    import polars as pl

    test = pl.DataFrame({"id": ["a", "b"], "text": ["x", "y"]})
    stale = tmp_path / "test_logits.parquet"
    pl.DataFrame({"id": ["b", "a"], "logits": np.eye(2, dtype=np.float32)}).write_parquet(stale)
    with pytest.raises(StageError, match="test_logits.parquet: its rows are not those of"):
        read_reference(stale, test)
    pl.DataFrame({"id": ["a", "b"], "logits": np.eye(2, dtype=np.float32)}).write_parquet(stale)
    np.testing.assert_array_equal(read_reference(stale, test), np.eye(2, dtype=np.float32))


def test_int8_agreement_below_bound_is_reported_not_fatal() -> None:
    reference = np.eye(4, dtype=np.float32)
    flipped = reference[:, ::-1].copy()
    result = int8_parity(reference, flipped, min_agreement=0.995)
    assert result["int8_top1_agreement"] == 0.0 and result["int8_meets_bound"] is False
    ok = int8_parity(reference, reference, min_agreement=0.995)
    assert ok["int8_meets_bound"] is True


def test_missing_adapter_is_a_stage_error(tmp_path: Path, tiny_bert_dir: Path) -> None:
    with pytest.raises(StageError, match="adapter_config.json"):
        load_merged_model(tmp_path, str(tiny_bert_dir), LABEL_NAMES)


def test_adapter_without_head_weights_is_refused(
    adapter_dir: Path, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "adapter_config.json").write_bytes(
        (adapter_dir / "adapter_config.json").read_bytes()
    )
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    lora_only = {k: v for k, v in weights.items() if "lora_" in k}
    save_file(lora_only, str(headless / "adapter_model.safetensors"))
    with pytest.raises(StageError, match="no classification-head weights"):
        load_merged_model(headless, str(tiny_bert_dir), LABEL_NAMES)


def test_parity_texts_span_the_length_range() -> None:
    texts = [f"text {'x' * n}" for n in range(100)]
    picked = parity_texts(texts, 10)
    assert len(picked) == len(set(picked)) == 10
    assert picked[0] == min(texts, key=len) and picked[1] == max(texts, key=len)
    lengths = [len(t) for t in picked]
    assert all(a < b for a, b in zip(lengths[::2], lengths[1::2], strict=True))  # short, long, ...
    assert sorted(parity_texts(texts[:3], 10)) == sorted(texts[:3])
    with pytest.raises(StageError):
        parity_texts([], 5)


@pytest.mark.kernels
def test_int8_keeps_named_nodes_in_fp32(exported, tmp_path: Path) -> None:
    import onnx

    out, _, _ = exported
    keep = "/model/bert/encoder/layer.0/output/dense/MatMul"
    assert keep in int8_candidates(out / FP32_FILE)
    quantize_int8(out / FP32_FILE, tmp_path / "q.onnx", [keep])
    by_name = {node.name: node.op_type for node in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert by_name[keep] == "MatMul"  # left as a float MatMul
    quantized = [op for op in by_name.values() if op in ("MatMulInteger", "QAttention")]
    assert "QAttention" in quantized and "MatMulInteger" in quantized
    with pytest.raises(StageError, match="no quantizable node named 'nope'"):
        quantize_int8(out / FP32_FILE, tmp_path / "q.onnx", ["nope"])


def near_tie_adapter(base_dir: Path, out: Path, texts: list[str]) -> Path:
    """An adapter whose head puts classes 0 and 1 within a hair of each other on `texts`.

    Rows 0 and 1 of the head differ by 1e-2 of a random direction, and the bias centres their
    gap on the texts' median: half the texts sit just either side of the boundary, where int8's
    rounding of the encoder flips some top-1 picks. The model provokes an int8 parity miss.
    """
    adapter = make_adapter(base_dir, out)
    weights_file = adapter / "adapter_model.safetensors"
    weights = load_file(str(weights_file))
    head_w = weights["base_model.model.classifier.weight"]
    head_b = weights["base_model.model.classifier.bias"]
    generator = torch.Generator().manual_seed(1)
    head_w[1] = head_w[0] + 1e-2 * torch.randn(head_w.shape[1], generator=generator)
    head_b[:] = torch.tensor([0.0, 0.0, -100.0, -100.0])
    save_file(weights, str(weights_file))
    logits = merged_logits(adapter, str(base_dir), LABEL_NAMES, texts, 32, 8)
    head_b[1] = -float(np.median(logits[:, 1] - logits[:, 0]))
    save_file(weights, str(weights_file))
    return adapter


def varied_texts(n: int) -> list[str]:
    return [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(n)]


@pytest.fixture(scope="module")
def outlier_base(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with one outlier activation channel (200) into layer 1's attention, which
    ignores that channel: fp32 is unaffected, but dynamic int8's per-tensor activation scale is set
    by the outlier, so layer 1's fused Attention loses its other inputs to rounding — the outlier
    pattern that makes real BERTs' nodes int8-sensitive, made strong."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.LayerNorm.bias[0] = 200.0
        attention = model.bert.encoder.layer[1].attention.self
        for linear in (attention.query, attention.key, attention.value):
            linear.weight[:, 0] = 0.0
    out = tmp_path_factory.mktemp("outlier_base")
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(out)
    return out


def test_pick_fp32_nodes_keeps_the_most_sensitive_until_the_bound() -> None:
    """The chooser's rule on agreement figures it is given (no ONNX Runtime: the same on every CPU)."""
    candidates = ["a", "b", "c", "d", "e"]
    sensitivity = {"a": 0.1, "b": 0.5, "c": 0.5, "d": 0.0, "e": 0.3}
    measured: list[str] = []

    def agreement_keeping(keep: list[str]) -> Trial:
        # Each kept node adds 0.02 to the agreement of quantising all; a trial below 0.97 was
        # stopped early (its figure is then the most it could reach).
        agreement = 0.95 + 0.02 * len(keep)
        return Trial(agreement, complete=agreement >= 0.97)

    def sensitivities_of(nodes: list[str]) -> dict[str, float]:
        measured.extend(nodes)
        return {name: sensitivity[name] for name in nodes}

    keep, steps, found = pick_fp32_nodes(candidates, agreement_keeping, sensitivities_of, 0.99, 8)
    assert keep == ["b", "c"]  # most sensitive first; the tie in candidate order
    # The cap (all but one of 5) first, then bisection down to the fewest that meet the bound.
    assert steps == [
        {"kept_fp32": 0, "agreement_at_most": 0.95},
        {"kept_fp32": 4, "agreement": 1.03},
        {"kept_fp32": 2, "agreement": 0.99},
        {"kept_fp32": 1, "agreement": 0.97},
    ]
    assert found == sensitivity and measured == candidates
    # Capped: the cap misses the bound, so it is kept after that one trial.
    keep, steps, _ = pick_fp32_nodes(candidates, agreement_keeping, sensitivities_of, 0.995, 2)
    assert keep == ["b", "c"] and steps[1:] == [{"kept_fp32": 2, "agreement": 0.99}]
    # Never every candidate: ONNX Runtime would read the empty node list as all of them.
    keep, _, _ = pick_fp32_nodes(
        candidates, lambda keep: Trial(0.5, complete=True), sensitivities_of, 0.99, 8
    )
    assert len(keep) == len(candidates) - 1
    # Met with every node quantised, or no node allowed: nothing measured, nothing kept.
    for bound, cap in ((0.95, 8), (0.99, 0)):
        measured.clear()
        keep, steps, found = pick_fp32_nodes(
            candidates, agreement_keeping, sensitivities_of, bound, cap
        )
        assert (keep, found, measured) == ([], {}, []) and len(steps) == 1


@pytest.mark.kernels
def test_agreement_trial_stops_once_the_bound_is_out_of_reach(exported, tmp_path: Path) -> None:
    """A trial decides pass or miss exactly as the full count does, scoring fewer texts when the
    misses rule the bound out; the figure it gives then bounds the full agreement from above."""
    out, _, _ = exported
    classifier = OnnxClassifier(out, "fp32")
    ids = classifier.encode(varied_texts(40)).ids
    logits = session_logits(out / INT8_FILE, ids, 0, 4)
    top1 = logits.argmax(1)
    wrong = top1.copy()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    wrong[order[:3]] = (wrong[order[:3]] + 1) % len(LABEL_NAMES)  # 3 misses in the first batch
    assert agreement_trial(out / INT8_FILE, ids, top1, 0, 4, 0.995) == Trial(1.0, complete=True)
    stopped = agreement_trial(out / INT8_FILE, ids, wrong, 0, 4, 0.99)
    assert stopped == Trial(37 / 40, complete=False)
    # At a bound 3 misses still meet, every text is scored and the figure is exact.
    assert agreement_trial(out / INT8_FILE, ids, wrong, 0, 4, 0.9) == Trial(37 / 40, complete=True)


def encoder_layer_of(graph, name: str) -> int | None:
    """The encoder layer a node of the exported graph computes: from its own name
    (`/.../layer.N/...`), or for a node ORT fused and renamed (`Attention_1`) from the first
    named node its outputs flow into."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    by_name = {node.name: node for node in graph.node}
    queue, seen = [by_name[name]], set()
    while queue:
        node = queue.pop(0)
        if found := re.search(r"/layer\.(\d+)/", node.name):
            return int(found.group(1))
        for tensor in node.output:
            for after in consumers.get(tensor, []):
                if after.name not in seen:
                    seen.add(after.name)
                    queue.append(after)
    return None


@pytest.mark.kernels
def test_int8_nodes_are_chosen_by_sensitivity_on_the_outlier_model(
    outlier_base: Path, tmp_path: Path
) -> None:
    """The chooser on real int8 graphs. Every figure depends on the CPU's int8 kernels, so only
    what holds on any CPU is asserted: the outlier's node is found first, and the rule was kept."""
    texts = varied_texts(120)
    adapter = near_tie_adapter(outlier_base, tmp_path / "adapter", texts)
    # Smoothed as the stage smooths (its MatMuls; the outlier feeds an Attention node).
    plan = Int8Plan(texts, min_agreement=0.995, max_fp32_nodes=8, batch_size=8, smoothing=0.8)
    chosen = export_to(adapter, outlier_base, tmp_path / "onnx", plan, texts).built.int8_choice
    kept, steps, sensitivity = chosen["kept_fp32"], chosen["steps"], chosen["sensitivity"]
    assert "agreement" not in steps[0]  # the near tie: quantising every node misses ...
    assert steps[0]["agreement_at_most"] < 0.995  # ... and that trial stopped once it was clear
    assert set(sensitivity) == set(int8_candidates(tmp_path / "onnx" / FP32_FILE))
    # The outlier's layer holds the first node kept; which of its nodes (the fused Attention or
    # the attention output's MatMul) an int8 kernel hurts most depends on the CPU's instructions.
    graph = onnx.load(str(tmp_path / "onnx" / FP32_FILE)).graph
    assert encoder_layer_of(graph, kept[0]) == 1, kept
    ranked = sorted(sensitivity, key=lambda n: -sensitivity[n])
    assert min(sensitivity[n] for n in kept) >= sensitivity[ranked[len(kept)]]
    figures = {s["kept_fp32"]: s.get("agreement", s.get("agreement_at_most")) for s in steps}
    cap = min(8, len(sensitivity) - 1)
    assert steps[1]["kept_fp32"] == cap  # the cap is tried first, and kept if it misses
    # What is kept meets the bound, and one node fewer (when tried) missed it.
    assert figures[len(kept)] >= 0.995 or len(kept) == cap
    assert figures.get(len(kept) - 1, 0.0) < 0.995
    # The int8 graph written is the chosen one, whichever count was tried last.
    ops = {n.name: n.op_type for n in onnx.load(str(tmp_path / "onnx" / INT8_FILE)).graph.node}
    assert all(ops.get(name) in ("MatMul", "Attention") for name in kept)
    assert not any(ops.get(name) in ("MatMul", "Attention") for name in ranked[len(kept) :])


@pytest.mark.kernels
def test_stage_ships_fp32_when_int8_misses_the_bound(
    outlier_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The whole stage on the outlier model with no node allowed fp32: int8 misses, the stage
    passes, and predict defaults to fp32 and says why."""
    import polars as pl
    import yaml

    from newsclf.cli import main as cli
    from stages import export as export_stage
    from stages.params import parse_section
    from tests.conftest import REPO_ROOT

    texts = varied_texts(200)
    adapter = near_tie_adapter(outlier_base, tmp_path / "models" / "adapter", texts)
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["export"]
    raw |= {"int8_calibration_texts": 50, "int8_max_fp32_nodes": 0}
    raw["parity"] |= {"n_texts": 200}
    params = parse_section(raw, export_stage.ExportParams, "export")
    rows = pl.DataFrame(
        {
            "id": [f"r{i}" for i in range(len(texts))],
            "split": "test",
            "label": [i % 4 for i in range(len(texts))],
            "text": texts,
        }
    )
    train = rows.with_columns(split=pl.lit("train"), id="t" + pl.col("id"))
    monkeypatch.chdir(tmp_path)

    reference = merged_logits(adapter, str(outlier_base), LABEL_NAMES, texts, MAX_LENGTH, 8)
    report, speed = export_stage.run(
        rows,
        reference,
        train,
        params,
        LABEL_NAMES,
        str(outlier_base),
        MAX_LENGTH,
        adapter_dir=adapter,
    )
    assert report["parity"]["int8_meets_bound"] is False
    assert report["int8"]["kept_fp32"] == [] and report["int8"]["n_calibration_texts"] == 50
    assert speed["fp32_texts_per_s"] > 0 and speed["int8_texts_per_s"] > 0
    meta = json.loads(Path("models/onnx", META_FILE).read_text())
    assert meta["int8_parity"]["meets_bound"] is False
    # Where the agreement was measured: it depends on the CPU's int8 instructions.
    assert meta["int8_parity"]["measured_on"] == report["parity"]["int8_measured_on"]
    assert meta["int8_parity"]["measured_on"]["int8_instructions"] == int8_instructions()
    assert (Path("models/onnx") / INT8_FILE).is_file()

    auto = OnnxClassifier("models/onnx")
    assert auto.precision == "fp32" and "below its bound" in auto.notice
    assert OnnxClassifier("models/onnx", "int8").precision == "int8"
    assert cli(["predict", "--json", "Stocks rally today"]) == 0
    assert "using the fp32 model" in capsys.readouterr().err


def test_sensitivities_are_the_same_in_one_process_or_two(
    exported, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probes run one per core, each on one ORT thread: their figures do not depend on how
    many processes measured them."""
    from stages import export as export_stage

    out, _, _ = exported
    fp32 = out / FP32_FILE
    candidates = int8_candidates(fp32)
    ids = OnnxClassifier(out, "fp32").encode(varied_texts(16)).ids
    reference = session_logits(fp32, ids, 0, 8)
    found = {}
    for cores in (1, 2):
        monkeypatch.setattr(export_stage, "available_cores", lambda cores=cores: cores)
        found[cores] = measure_sensitivities(fp32, candidates[:3], candidates, ids, reference, 0, 8)
    assert list(found[1]) == candidates[:3]
    assert found[1] == found[2] and all(value > 0 for value in found[1].values())


@pytest.mark.parametrize(
    ("flags", "found"),
    [
        ("fpu avx2 avx512f avx512bw avx512_vnni avx512_bf16", "AVX512-VNNI"),
        ("fpu avx2 avx512f avx512bw", "AVX512BW, no VNNI"),
        ("fpu sse4_2 avx avx2 fma", "AVX2, no VNNI"),
        ("fpu avx2 avx_vnni", "AVX-VNNI"),
        ("fpu sse4_2", "no AVX2"),
    ],
)
def test_int8_instructions_are_read_from_the_cpu_flags(tmp_path: Path, flags: str, found: str):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    assert int8_instructions(cpuinfo) == found
    assert int8_instructions(tmp_path / "none").startswith("unknown")


@pytest.mark.kernels
def test_smoothing_keeps_fp32_and_tames_an_activation_outlier(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """SmoothQuant's rewrite computes the same fp32 logits, one Mul before each weight MatMul,
    and moves an outlier channel of a MatMul's input into its weights: the int8 graph made from
    it errs far less than the one made from the plain graph. The outlier (200, into layer 0's
    FFN output, which ignores it) sets the per-batch int8 scale of that MatMul's input alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.bias[0] = 200.0
        model.bert.encoder.layer[0].output.dense.weight[:, 0] = 0.0
    base = tmp_path / "ffn_outlier_base"
    model.save_pretrained(base, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(base)
    texts = varied_texts(64)
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "onnx"
    export_to(adapter, base, out, None, texts)
    ids = OnnxClassifier(out, "fp32").encode(texts).ids
    smoothed = tmp_path / "smoothed.onnx"
    done = smooth_for_int8(out / FP32_FILE, smoothed, ids, 0, 0.8, 8)
    graph = onnx.load(str(smoothed)).graph
    matmuls = [
        n for n in graph.node if n.op_type == "MatMul" and n.name in int8_candidates(smoothed)
    ]
    assert done == {"alpha": 0.8, "nodes": len(matmuls)} and matmuls
    producers = {output: node for node in graph.node for output in node.output}
    assert all(producers[n.input[0]].op_type == "Mul" for n in matmuls)
    assert int8_candidates(smoothed) == int8_candidates(out / FP32_FILE)
    fp32 = session_logits(out / FP32_FILE, ids, 0, 8)
    assert np.abs(session_logits(smoothed, ids, 0, 8) - fp32).max() < 1e-4
    errors = {}
    for name, source in (("plain", out / FP32_FILE), ("smoothed", smoothed)):
        quantize_int8(source, tmp_path / f"{name}.int8.onnx", [])
        int8 = session_logits(tmp_path / f"{name}.int8.onnx", ids, 0, 8)
        errors[name] = float(((int8 - fp32) ** 2).mean())
    assert errors["smoothed"] < errors["plain"] / 4, errors
