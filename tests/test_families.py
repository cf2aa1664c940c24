"""Every supported base-model family through train (LoRA, `auto` modules), merge, ONNX export with
parity, int8 and `newsclf predict`: tiny random models built from their configs (bench/tiny_models.py),
tokenizers trained offline, nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.common import StageError
from stages.families import FAMILIES
from tests.conftest import EXPORT_TEXTS, make_news_rows, tiny_train_params
from tests.pipeline_fixture import AG_NEWS_LABELS

MAX_LENGTH = 24


@pytest.fixture(scope="session")
def family_base(tmp_path_factory: pytest.TempPathFactory):
    """`family_base(model_type)` → a folder with a 2-layer, 64-wide random base of that type."""
    from bench.tiny_models import build

    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = build(model_type, tmp_path_factory.mktemp(model_type) / "base")
        return made[model_type]

    return get


def train_tiny(base: Path, root: Path, quantization: str = "none", precision: str = "fp32"):
    """The train stage's core on 16 rows: 3 LoRA steps with `auto` target and saved modules."""
    from dataclasses import replace

    from stages.processed import split_train_val
    from stages.train import train_model

    params = tiny_train_params(base, quantization=quantization, precision=precision)
    params = replace(
        params,
        epochs=1,
        batch_size=4,
        max_length=MAX_LENGTH,
        checkpoint_steps=100,
        lora=replace(params.lora, target_modules="auto", modules_to_save="auto"),
    )
    rows = make_news_rows(4)
    root.mkdir(parents=True, exist_ok=True)
    rows.write_parquet(root / "train.parquet")
    train_rows, val_rows = split_train_val(rows, params.val_fraction, params.seed)
    result = train_model(
        train_rows,
        val_rows,
        params,
        AG_NEWS_LABELS,
        data_path=root / "train.parquet",
        checkpoint_dir=root / "checkpoints",
        adapter_dir=root / "adapter",
        live_dir=None,
    )
    return root / "adapter", result


def export_tiny(adapter: Path, base: Path, out: Path):
    from stages.evaluate import merged_logits
    from stages.export import Int8Plan, ParityParams, export_folder

    texts = list(EXPORT_TEXTS)
    return export_folder(
        adapter,
        str(base),
        AG_NEWS_LABELS,
        out,
        17,
        MAX_LENGTH,
        Int8Plan(texts * 2, min_agreement=0.0, max_fp32_nodes=1, batch_size=4, smoothing=0.8),
        texts,
        merged_logits(adapter, str(base), AG_NEWS_LABELS, texts, MAX_LENGTH, 4),
        ParityParams(n_texts=len(texts), max_abs_logit_diff=1e-4, min_int8_agreement=0.0),
        batch_size=4,
    )


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_trains_exports_and_predicts(
    model_type: str, family_base, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from newsclf.cli import main
    from newsclf.predict import OnnxClassifier
    from stages.families import resolve_lora

    base = family_base(model_type)
    family = FAMILIES[model_type]
    adapter, result = train_tiny(base, tmp_path)
    assert result.global_step > 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    choice = resolve_lora(model_type, family, "auto", "auto")
    assert set(choice.target_modules) <= set(config["target_modules"]) | {"all-linear"}
    assert family.head in config["modules_to_save"]
    assert set(family.modules_to_save) <= set(config["modules_to_save"])

    exported = export_tiny(adapter, base, tmp_path / "onnx")
    assert exported.parity["fp32_max_abs_logit_diff"] <= 1e-4
    fused = exported.built.fusions["operators"]
    assert fused, "ONNX Runtime's optimizer fused nothing"
    assert bool(fused.get("Attention")) == family.ort_fuses_attention
    classifier = OnnxClassifier(tmp_path / "onnx", precision="fp32")
    texts = list(EXPORT_TEXTS)
    ids = classifier.encode(texts).ids
    batched = classifier.logits(ids, batch_size=len(ids), by_length=False)
    alone = np.concatenate([classifier.logits([seq], batch_size=1) for seq in ids])
    # A batch of mixed lengths scores each text as it scores alone.
    np.testing.assert_allclose(batched, alone, atol=1e-4)
    # predict's tokenization (truncation included) is the transformers tokenizer's.
    tokenizer = exported.built.tokenizer
    assert ids == tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    int8 = OnnxClassifier(tmp_path / "onnx", precision="int8")
    assert int8.logits(ids).shape == (len(texts), len(AG_NEWS_LABELS))
    # `newsclf predict` on the folder: the fp32 graph's labels, in the texts' order.
    capsys.readouterr()  # what training and export printed
    assert (
        main(
            ["predict", "--model", str(tmp_path / "onnx"), "--precision", "fp32", "--json", *texts]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["label"] for row in rows] == [p.label for p in classifier.predictions(batched)]


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_a_kbit_base_keeps_the_head_and_saved_modules_unquantized(
    model_type: str, quantization: str, family_base
) -> None:
    import bitsandbytes as bnb
    from transformers import AutoTokenizer

    from stages.modeling import load_base_model, prepare_tokenizer
    from tests.conftest import machine_precision

    base = family_base(model_type)
    family = FAMILIES[model_type]
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(base), str(base))
    model = load_base_model(
        str(base),
        AG_NEWS_LABELS,
        quantization,
        machine_precision(),
        family.modules_to_save,
        pad_token_id=tokenizer.pad_token_id,
    )
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    names = [name for name, _ in model.named_modules()]
    roots = [n for n in names for m in family.modules_to_save if n == m or n.endswith(f".{m}")]
    assert family.head in roots
    in_full = [
        name
        for name, module in model.named_modules()
        if any(name == r or name.startswith(f"{r}.") for r in roots)
    ]
    assert in_full and not [n for n in in_full if isinstance(model.get_submodule(n), quantized)]
    assert any(isinstance(m, quantized) for m in model.modules())


@pytest.mark.parametrize("model_type", ["roberta", "qwen2", "deberta-v2"])
def test_qlora_trains_an_encoder_a_decoder_and_deberta(
    model_type: str, family_base, tmp_path: Path
) -> None:
    """QLoRA on this CPU with `precision: auto`, for an encoder besides BERT, a decoder, and
    DeBERTa, which `auto` trains in fp32 on a k-bit base (`Family.bf16_on_kbit`)."""
    from dataclasses import replace

    import torch
    from transformers import AutoTokenizer

    from stages.modeling import prepare_tokenizer
    from stages.train import build_peft_model
    from tests.conftest import machine_precision

    base = family_base(model_type)
    precision = machine_precision() if FAMILIES[model_type].bf16_on_kbit else "fp32"
    _, result = train_tiny(base, tmp_path, "4bit", "auto")
    assert (result.quantization, result.precision) == ("4bit", precision)
    assert result.global_step > 0
    # QLoRA's recipe: the frozen input embedding in the compute dtype.
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(base), str(base))
    params = tiny_train_params(base)
    peft_model = build_peft_model(
        str(base),
        replace(params, lora=replace(params.lora, target_modules="auto", modules_to_save="auto")),
        "4bit",
        precision,
        AG_NEWS_LABELS,
        pad_token_id=tokenizer.pad_token_id,
    )
    expected = torch.bfloat16 if precision == "bf16" else torch.float32
    assert peft_model.get_input_embeddings().weight.dtype == expected


def test_an_explicit_bf16_on_a_kbit_deberta_is_refused_naming_why() -> None:
    from stages.modeling import training_precision

    with pytest.raises(StageError, match="train.precision='bf16'"):
        training_precision("bf16", "4bit", FAMILIES["deberta-v2"], "deberta-v2", cuda=False)
    assert training_precision("auto", "4bit", FAMILIES["deberta-v2"], "deberta-v2", False) == "fp32"
    assert training_precision("fp32", "8bit", FAMILIES["deberta-v2"], "deberta-v2", False) == "fp32"


def test_an_unsupported_model_type_stops_train_naming_it(tmp_path: Path) -> None:
    from transformers import AutoConfig

    base = tmp_path / "bloom"
    AutoConfig.for_model("bloom", n_layer=1, hidden_size=8, n_head=2).save_pretrained(base)
    with pytest.raises(StageError) as err:
        train_tiny(base, tmp_path)
    message = str(err.value)
    assert "train.base_model" in message and "'bloom'" in message
    assert "qwen2" in message and "modernbert" in message


def test_all_linear_and_explicit_lists_pass_through(family_base) -> None:
    """`all-linear` goes to PEFT as it is (every Linear but the head); an explicit
    `modules_to_save` list gets the family's head added."""
    from dataclasses import replace

    from stages.families import resolve_lora
    from stages.train import build_peft_model

    choice = resolve_lora("qwen2", FAMILIES["qwen2"], "all-linear", ("norm",))
    assert choice.peft_targets == "all-linear"
    assert choice.modules_to_save == ("score", "norm")
    base = family_base("distilbert")
    params = tiny_train_params(base)
    lora = replace(params.lora, target_modules="all-linear", modules_to_save="auto")
    params = replace(params, lora=lora)
    model = build_peft_model(str(base), params, "none", "fp32", AG_NEWS_LABELS)
    adapted = {name.split(".")[-2] for name, _ in model.named_modules() if name.endswith("lora_A")}
    assert {"q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"} <= adapted
