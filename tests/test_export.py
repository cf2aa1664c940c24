"""The export stage on a tiny random BERT with a perturbed LoRA adapter: ONNX round trip and parity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from newsclf.predict import META_FILE, OnnxClassifier
from stages.common import LABEL_NAMES, StageError
from stages.export import (
    FP32_FILE,
    INT8_FILE,
    build_export,
    check_parity,
    load_merged_model,
    onnx_logits,
    parity_texts,
    quantize_int8,
    torch_logits,
)
from tests.lora_fixture import make_adapter

MAX_LENGTH = 32
KEEP_FP32 = ["/model/bert/encoder/layer.0/output/dense/MatMul"]
TEXTS = [
    "Short.",
    "Stocks rallied on Wall Street after the central bank kept rates unchanged.",
    "The home side won the final in extra time after a goal from the substitute striker.",
    "A long dispatch " + "about spacecraft, markets, elections and football " * 12,
    "NASA probe",
    "Oil prices fell sharply as supply worries eased across the region this week.",
]


@pytest.fixture(scope="module")
def adapter_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_bert_dir, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def exported(adapter_dir: Path, tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    model, tokenizer = build_export(
        adapter_dir, str(tiny_bert_dir), out, 17, True, MAX_LENGTH, KEEP_FP32
    )
    return out, model, tokenizer


def test_merge_changes_the_base_weights(adapter_dir: Path, tiny_bert_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).state_dict()
    merged = load_merged_model(adapter_dir, str(tiny_bert_dir)).state_dict()
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
    reference = torch_logits(model, tokenizer, TEXTS, MAX_LENGTH, batch_size=4)
    fp32 = onnx_logits(OnnxClassifier(out, "fp32"), TEXTS, 4, "fp32")
    int8 = onnx_logits(OnnxClassifier(out, "int8"), TEXTS, 4, "int8")
    assert reference.shape == fp32.shape == int8.shape == (len(TEXTS), len(LABEL_NAMES))
    # The random LoRA and head make logits far from zero, so a wrong graph cannot pass by chance.
    assert np.abs(reference).max() > 0.1
    result = check_parity(reference, fp32, int8, max_abs_diff=1e-4, min_agreement=0.0)
    assert result["fp32_max_abs_logit_diff"] <= 1e-4
    assert 0.0 <= result["int8_top1_agreement"] <= 1.0


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
    """Logits of another adapter's export do not pass as this model's."""
    other = make_adapter(tiny_bert_dir, tmp_path / "other", seed=1)
    model, tokenizer = build_export(other, str(tiny_bert_dir), tmp_path / "onnx", 17, False, 32, [])
    wrong = onnx_logits(OnnxClassifier(tmp_path / "onnx", "fp32"), TEXTS, 4, "other")
    reference = torch_logits(
        load_merged_model(adapter_dir, str(tiny_bert_dir)), tokenizer, TEXTS, MAX_LENGTH, 4
    )
    with pytest.raises(StageError, match="max_abs_logit_diff"):
        check_parity(reference, wrong, None, max_abs_diff=1e-4, min_agreement=0.995)


def test_int8_agreement_below_bound_fails() -> None:
    reference = np.eye(4, dtype=np.float32)
    flipped = reference[:, ::-1].copy()
    with pytest.raises(StageError, match="min_int8_agreement"):
        check_parity(reference, reference, flipped, max_abs_diff=1e-4, min_agreement=0.995)


def test_missing_adapter_is_a_stage_error(tmp_path: Path, tiny_bert_dir: Path) -> None:
    with pytest.raises(StageError, match="adapter_config.json"):
        load_merged_model(tmp_path, str(tiny_bert_dir))


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
        load_merged_model(headless, str(tiny_bert_dir))


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


def test_int8_keeps_named_nodes_in_fp32(exported, tmp_path: Path) -> None:
    import onnx

    out, _, _ = exported
    int8 = onnx.load(str(out / INT8_FILE)).graph
    by_name = {node.name: node.op_type for node in int8.node}
    assert by_name[KEEP_FP32[0]] == "MatMul"  # left as a float MatMul
    quantized = [op for op in by_name.values() if op in ("MatMulInteger", "QAttention")]
    assert "QAttention" in quantized and "MatMulInteger" in quantized
    with pytest.raises(StageError, match="no node named 'nope'"):
        quantize_int8(out / FP32_FILE, tmp_path / "q.onnx", ["nope"])
