"""train: fine-tune the base model to classify texts into the `labels` classes with LoRA or QLoRA.

Reads `data/processed/train.parquet`, holds out a stratified, seeded validation slice of its genuine
rows (augmented copies of those rows are dropped from training, so nothing leaks), and trains a PEFT
LoRA adapter with the transformers `Trainer`. Checkpoints live in `models/checkpoints/` (declared
`persist: true`) beside a fingerprint of the params and data: a rerun resumes from the last
checkpoint only when the fingerprint matches. The best epoch's adapter (by validation loss) and the
tokenizer go to `models/adapter/`; dvclive writes step loss, learning rate and per-epoch
validation metrics to `reports/train/`.

`train.quantization` loads the base in 4-bit NF4 (QLoRA) or 8-bit through bitsandbytes, on CUDA
and on CPU alike; `train.precision` trains in bf16 mixed precision where the device computes bf16
natively. What `auto` resolves to on this machine is logged (stages/modeling.py).

Several processes: `train.launcher` (`auto` by default: one process per core or GPU, see
`launch_plan`; or a command such as `torchrun --standalone --nproc_per_node N` or `accelerate
launch --multi_gpu --num_processes N`) makes `python -m stages.train` start N data-parallel
processes of this module, on GPUs (NCCL) or CPUs (gloo). Every rank reads and splits the data the
same way, the Trainer shards each step's `train.batch_size` rows among them, and rank 0 alone
writes files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch
import yaml

from stages import launch, paths
from stages.base_model import base_model_problem
from stages.common import (
    RANK_STAGE_ERROR,
    StageError,
    available_cores,
    cpu_model,
    get_logger,
    load_labels,
    run_main,
    write_json,
)
from stages.families import LoraChoice, resolve_lora
from stages.modeling import (
    KBIT,
    base_family,
    embeddings_in_compute_dtype,
    load_base_model,
    lora_choice,
    native_bf16,
    prepare_tokenizer,
    resolve_base_model,
    resolve_quantization,
    training_precision,
)
from stages.params import load_section
from stages.processed import read_processed, scored_labels, split_train_val
from stages.train_params import TrainParams

if TYPE_CHECKING:
    from transformers import TrainingArguments

FINGERPRINT_NAME = "fingerprint.json"
# Validation metric that picks the epoch kept. Loss, not accuracy: on a few hundred validation rows
# accuracy moves in steps of ~0.3 pt and ties between epochs, and the Trainer keeps the earlier one.
SELECT_BY = "loss"
# Checkpoints kept: the best epoch's (load_best_model_at_end needs it) and the latest, to resume.
SAVE_TOTAL_LIMIT = 2

# Training loss is logged as the mean over this many steps (and at every checkpoint).
LOGGING_STEPS = 10
log = get_logger("train")


def build_peft_model(
    base_path: str,
    params: TrainParams,
    quantization: str,
    precision: str,
    label_names: tuple[str, ...],
    lora: LoraChoice | None = None,
    pad_token_id: int | None = None,
):
    """Base model wrapped with a fresh LoRA adapter (prepared for k-bit training when quantized).
    `lora`: what `train.lora` resolved to for this base (resolved here when not given);
    `pad_token_id`: the tokenizer's, which a decoder base needs."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    if lora is None:
        lora = lora_choice(base_path, params.base_model, params.lora)

    model = load_base_model(
        base_path, label_names, quantization, precision, lora.modules_to_save, True, pad_token_id
    )
    if params.finetune == "full":
        # Every weight trains; no adapter (train_params refuses a quantized base here).
        model.accepts_loss_kwargs = False
        if params.activation_checkpointing:
            model.activation_checkpointing_enable()
        return model
    # One label per row: a per-process mean loss, averaged by DDP, is the global batch's mean. The
    # Trainer would take a `forward(**kwargs)` for a loss summed over the global batch and scale it
    # by the world size.
    model.accepts_loss_kwargs = False
    if quantization in KBIT:
        # Checkpointing is its own param (below), for a full-precision base as for a quantized one.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        embeddings_in_compute_dtype(model, precision)
    if params.activation_checkpointing:
        # Keep each layer's input only and recompute the rest in the backward pass: on a large base
        # the activations, not the weights, fill the memory (bench_quant.py, BERT-large-sized).
        model.activation_checkpointing_enable()
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=lora.peft_targets,
        modules_to_save=list(lora.modules_to_save),
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise StageError(f"train.lora: {err}") from err


def tokenize_rows(tokenizer, df: pl.DataFrame, max_length: int, sort_by_length: bool = False):
    """A `datasets.Dataset` of input ids, labels and lengths (padding happens per batch)."""
    from datasets import Dataset

    enc = tokenizer(df["text"].to_list(), truncation=True, max_length=max_length)
    lengths = [len(ids) for ids in enc["input_ids"]]
    data = {
        "row": list(range(df.height)),  # the row's place in `df`, kept through the sort below
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": df["label"].to_list(),
        "length": lengths,
    }
    ds = Dataset.from_dict(data)
    if sort_by_length:
        # Sequential evaluation then pads each batch only to its own longest row.
        ds = ds.select(np.argsort(lengths, kind="stable"))
    return ds


def fingerprint(
    params: TrainParams,
    data_path: Path,
    base_path: str,
    world_size: int,
    resolved: dict[str, str],
    label_names: tuple[str, ...],
) -> str:
    """Hash of everything that makes a checkpoint reusable: params, what their `auto` values
    resolved to on this machine, the class names its head learns, data bytes, base model,
    processes and the selection metric (a checkpoint's trainer state holds the best value of it)."""
    digest = hashlib.sha256()
    digest.update(f"select_by={SELECT_BY}".encode())
    digest.update(json.dumps(list(label_names)).encode())
    digest.update(json.dumps(resolved, sort_keys=True).encode())
    # The launcher is not hashed: the world size it gives is, whichever launcher gave it.
    hashed = asdict(params)
    del hashed["launcher"]
    digest.update(json.dumps(hashed, sort_keys=True).encode())
    digest.update(hashlib.sha256(data_path.read_bytes()).digest())
    base = Path(base_path)
    if base.is_dir():
        # Names and sizes identify a packaged model release without hashing hundreds of MB.
        for f in sorted(p for p in base.rglob("*") if p.is_file()):
            digest.update(f"{f.relative_to(base)}:{f.stat().st_size}".encode())
    else:
        digest.update(base_path.encode())
    digest.update(f"world_size={world_size}".encode())
    return digest.hexdigest()


def describe_world(world_size: int) -> str:
    """The run's processes in words, e.g. "world size 2: 2 data-parallel processes (gloo) ..."."""
    if world_size == 1:
        return "world size 1: one process"
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "?"
    return (
        f"world size {world_size}: {world_size} data-parallel processes ({backend}); rank 0 "
        "writes checkpoints, dvclive files and the adapter"
    )


def prepare_checkpoints(checkpoint_dir: Path, fp: str, world_size: int) -> Path | None:
    """The checkpoint to resume from, or None after clearing checkpoints of another run.

    A checkpoint made by another number of processes is not resumed: its data order and its
    per-process RNG states belong to that world size.
    """
    from transformers.trainer_utils import get_last_checkpoint

    fp_file = checkpoint_dir / FINGERPRINT_NAME
    old = json.loads(fp_file.read_text()) if fp_file.exists() else {}
    last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    if old.get("fingerprint") == fp and last is not None:
        log.info("resuming from %s (params, data and world size unchanged)", last)
        return Path(last)
    if last is not None and old.get("world_size", world_size) != world_size:
        log.info(
            "checkpoints in %s were made with world size %d, this run has world size %d: "
            "starting fresh",
            checkpoint_dir,
            old["world_size"],
            world_size,
        )
    elif last is not None:
        log.info("checkpoints in %s are from other params or data: starting fresh", checkpoint_dir)
    else:
        log.info("no checkpoint in %s: starting fresh", checkpoint_dir)
    if checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True)
    fp_file.write_text(json.dumps({"fingerprint": fp, "world_size": world_size}) + "\n")
    return None


def logits_only(outputs: Any, labels: Any) -> Any:
    """The logits of a model's evaluation outputs: T5 also returns its encoder states, which the
    Trainer would otherwise gather for every validation row."""
    return outputs[0] if isinstance(outputs, tuple) else outputs


def validation_metrics(eval_pred, n_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over all `n_labels` classes (one missing from the slice counts 0)."""
    from sklearn.metrics import f1_score

    logits, labels = eval_pred
    preds = np.asarray(logits).argmax(axis=-1)
    return {
        "accuracy": float((preds == labels).mean()),
        "macro_f1": float(f1_score(labels, preds, average="macro", labels=range(n_labels))),
    }


def save_adapter(model, tokenizer, adapter_dir: Path, base_model: str) -> None:
    """Adapter weights (safetensors), its config and the tokenizer, portable across machines; for
    `train.finetune: full`, the whole model (config.json + model.safetensors) in their place."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(adapter_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(adapter_dir))
    if not hasattr(model, "peft_config"):
        return
    # Record the base as the user named it (`train.base_model`), not this machine's resolved path.
    # Patched after saving: PEFT looks the base name up on the hub while saving, and there is no
    # network here.
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    resolved = config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = base_model
    # PEFT's model card names the resolved path too, which would make the adapter's hash depend
    # on where the checkout lives.
    card = adapter_dir / "README.md"
    if resolved and card.is_file():
        card.write_text(card.read_text().replace(resolved, base_model))
    # PEFT keeps module names in sets and writes them in hash order, which changes from process to
    # process: sorted, the file is the same on every run.
    for key in ("target_modules", "modules_to_save"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@dataclass
class TrainResult:
    best_val_loss: float | None
    best_val_accuracy: float | None
    best_checkpoint: str | None
    global_step: int
    resumed_from: str | None
    quantization: str
    precision: str
    world_size: int
    # False on ranks other than 0 under torchrun/accelerate: they wrote nothing.
    is_main_process: bool
    n_train: int
    n_val: int
    train_seconds: float
    log_history: list[dict[str, Any]]
    # The kept model's predicted class per validation row, in the order of the rows passed in.
    val_predicted: list[int]


def per_process_batch(batch_size: int) -> int:
    """`train.batch_size` is the rows of one optimizer step over all processes: each of the
    launcher's WORLD_SIZE processes takes its share, so a run means the same on any machine."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if batch_size % world:
        raise StageError(
            f"params.yaml train.batch_size={batch_size}: not divisible by the {world} processes "
            "the launcher started (each takes an equal share of every step)"
        )
    return batch_size // world


def training_arguments(
    params: TrainParams, checkpoint_dir: Path, precision: str, cuda: bool
) -> TrainingArguments:
    """The Trainer's arguments for these params: per-epoch evaluation and checkpoints, the best
    epoch kept by SELECT_BY, logging every LOGGING_STEPS steps, seeded data order."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        num_train_epochs=float(params.epochs),
        per_device_train_batch_size=per_process_batch(params.batch_size),
        # No gradients at evaluation: twice the rows fit in the same memory.
        per_device_eval_batch_size=2 * per_process_batch(params.batch_size),
        learning_rate=params.learning_rate,
        lr_scheduler_type=params.lr_scheduler,
        # transformers 5 reads a warmup_steps below 1 as a share of all steps.
        warmup_steps=params.warmup_ratio,
        weight_decay=params.weight_decay,
        train_sampling_strategy="group_by_length" if params.group_by_length else "random",
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=SAVE_TOTAL_LIMIT,
        load_best_model_at_end=True,
        metric_for_best_model=SELECT_BY,
        greater_is_better=SELECT_BY != "loss",
        logging_strategy="steps",
        logging_steps=LOGGING_STEPS,
        logging_first_step=True,
        seed=params.seed,
        data_seed=params.seed,
        # Mixed precision for the trainable path: autocast to bf16 (on CPU too), fp32 master weights.
        bf16=precision == "bf16",
        use_cpu=not cuda,
        report_to="none",
        dataloader_num_workers=0,
        # Under DDP: every trainable parameter (adapter, head, modules_to_save) takes part in each
        # forward, so DDP need not search the graph for unused ones at every step.
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def is_rank_zero(args: TrainingArguments) -> bool:
    """Whether this process writes files and logs the run: the only one, or rank 0 under DDP."""
    return args.should_save


def resume_point(args: TrainingArguments, checkpoint_dir: Path, fp: str) -> Path | None:
    """The checkpoint to resume from, if any: rank 0 decides (and clears stale checkpoints) before
    the other ranks look."""
    with args.main_process_first(desc="checkpoint fingerprint"):
        if is_rank_zero(args):
            return prepare_checkpoints(checkpoint_dir, fp, args.world_size)
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(str(checkpoint_dir))
        return Path(last) if last else None


def open_live(live_dir: Path, resume: Path | None):
    """dvclive, not appended to: rebuilt from the checkpoint's log history, so a resumed run's
    plots hold each step once, with the values an uninterrupted run logs (see LogAtEverySave)."""
    from dvclive import Live

    from stages.train_callbacks import log_to_live

    live = Live(dir=str(live_dir), resume=False, save_dvc_exp=False, dvcyaml=None)
    if resume is not None:
        state = json.loads((resume / "trainer_state.json").read_text())
        for entry in state["log_history"]:
            log_to_live(live, entry, entry["step"])
    return live


@dataclass(frozen=True)
class RunSetup:
    """What a run resolved before training: `auto` params on this machine, where the base is,
    the Trainer's arguments, the tokenizer and the checkpoint to resume from."""

    quantization: str
    precision: str
    base_path: str
    lora: LoraChoice
    args: Any  # TrainingArguments
    tokenizer: Any
    resume: Path | None

    @property
    def rank_zero(self) -> bool:
        return is_rank_zero(self.args)


def set_up(
    params: TrainParams,
    label_names: tuple[str, ...],
    data_path: Path,
    checkpoint_dir: Path,
) -> RunSetup:
    """Resolve the params on this machine and find the checkpoint to resume from."""
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    base_path = resolve_base_model(params.base_model)
    # The base's family first: an unsupported one stops here, before any model is loaded.
    model_type, family = base_family(base_path, params.base_model)
    lora = resolve_lora(model_type, family, params.lora.target_modules, params.lora.modules_to_save)
    # Full fine-tuning trains every weight of a full-precision base: `auto` means none there.
    quantization = (
        "none" if params.finetune == "full" else resolve_quantization(params.quantization, cuda)
    )
    precision = training_precision(params.precision, quantization, family, model_type, cuda)
    args = training_arguments(params, checkpoint_dir, precision, cuda)
    if is_rank_zero(args):
        log.info("labels %s; params %s", list(label_names), asdict(params))
        log.info("%s", describe_world(args.world_size))
        log.info("base model: %s (%s, %s)", params.base_model, model_type, family.kind)
        if params.finetune == "full":
            log.info("train.finetune=full: every weight of the base trains (train.lora unused)")
        log.info(
            "train.lora.target_modules=%s: %s, from %s",
            params.lora.target_modules,
            lora.peft_targets,
            lora.targets_from,
        )
        log.info(
            "train.lora.modules_to_save=%s: %s, from %s",
            params.lora.modules_to_save,
            list(lora.modules_to_save),
            lora.saved_from,
        )
    resolved = {"quantization": quantization, "precision": precision}
    fp = fingerprint(params, data_path, base_path, args.world_size, resolved, label_names)
    return RunSetup(
        quantization=quantization,
        precision=precision,
        base_path=base_path,
        lora=lora,
        args=args,
        tokenizer=prepare_tokenizer(AutoTokenizer.from_pretrained(base_path), params.base_model),
        resume=resume_point(args, checkpoint_dir, fp),
    )


def make_trainer(
    setup: RunSetup,
    train_df: pl.DataFrame,
    val_df: pl.DataFrame,
    params: TrainParams,
    label_names: tuple[str, ...],
    live,
    extra_callbacks: Sequence[Any],
):
    """The Trainer over a fresh LoRA model (seeded) and the tokenized rows."""
    from transformers import DataCollatorWithPadding, Trainer

    from stages.train_callbacks import callbacks

    tokenizer = setup.tokenizer
    train_ds = tokenize_rows(tokenizer, train_df, params.max_length)
    val_ds = tokenize_rows(tokenizer, val_df, params.max_length, sort_by_length=True)
    torch.manual_seed(params.seed)
    model = build_peft_model(
        setup.base_path,
        params,
        setup.quantization,
        setup.precision,
        label_names,
        setup.lora,
        tokenizer.pad_token_id,
    )
    if setup.rank_zero:
        if hasattr(model, "get_nb_trainable_parameters"):  # PEFT's: counts 4-bit weights right
            trainable, total = model.get_nb_trainable_parameters()
        else:  # train.finetune: full
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in model.parameters())
        log.info(
            "%d train rows, %d validation rows; %s trainable of %s parameters (%.2f%%)",
            len(train_ds),
            len(val_ds),
            f"{trainable:,}",
            f"{total:,}",
            100 * trainable / total,
        )
    return Trainer(
        model=model,
        args=setup.args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=partial(validation_metrics, n_labels=len(label_names)),
        preprocess_logits_for_metrics=logits_only,
        callbacks=[*callbacks(live, params.checkpoint_steps), *extra_callbacks],
    )


def predict_validation(trainer) -> list[int]:
    """The kept (best-epoch) model's predicted class for each validation row, in the rows' order,
    computed by this process alone over the length-sorted rows (under DDP the Trainer's gathered
    predictions do not come back in row order), in the precision the Trainer evaluates in."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    dataset = trainer.eval_dataset
    rows = np.asarray(dataset["row"])
    loader = DataLoader(
        dataset.remove_columns(
            [c for c in ("row", "length", "labels") if c in dataset.column_names]
        ),
        batch_size=trainer.args.per_device_eval_batch_size,
        collate_fn=DataCollatorWithPadding(trainer.processing_class),
    )
    model = trainer.model.eval()
    device = next(model.parameters()).device
    predicted = np.empty(len(dataset), dtype=np.int64)
    done = 0
    with torch.no_grad(), trainer.autocast_smart_context_manager():
        for batch in loader:
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            n = logits.shape[0]
            predicted[rows[done : done + n]] = logits.argmax(dim=-1).cpu().numpy()
            done += n
    return predicted.tolist()


def train_result(trainer, output, setup: RunSetup) -> TrainResult:
    """What the run did, from the Trainer's state (the best epoch's validation scores included)."""
    state = trainer.state
    best_eval = next(
        (
            entry
            for entry in state.log_history
            if "eval_accuracy" in entry and entry["step"] == state.best_global_step
        ),
        {},
    )
    return TrainResult(
        best_val_loss=state.best_metric,
        best_val_accuracy=best_eval.get("eval_accuracy"),
        best_checkpoint=state.best_model_checkpoint,
        global_step=state.global_step,
        resumed_from=setup.resume.name if setup.resume else None,
        quantization=setup.quantization,
        precision=setup.precision,
        world_size=setup.args.world_size,
        is_main_process=setup.rank_zero,
        n_train=len(trainer.train_dataset),
        n_val=len(trainer.eval_dataset),
        train_seconds=float(output.metrics.get("train_runtime", math.nan)),
        log_history=list(state.log_history),
        val_predicted=predict_validation(trainer) if setup.rank_zero else [],
    )


def write_resolved(setup: RunSetup, path: Path) -> None:
    """What the run's `auto` params became on this machine, and the device and libraries it ran
    on: a params file beside dvclive's metrics (`dvc exp show` and `dvc params diff` show it), so
    that a figure that moved between machines says why."""
    import peft
    import transformers

    cuda = torch.cuda.is_available()
    resolved = {
        "precision": setup.precision,
        "quantization": setup.quantization,
        "launcher": launcher_name(),
        "world_size": setup.args.world_size,
        "per_process_batch": setup.args.per_device_train_batch_size,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if cuda else "cpu",
        "processor": torch.cuda.get_device_name() if cuda else cpu_model(),
        "bf16_support": native_bf16(cuda)[1],
        "versions": {
            "torch": str(torch.__version__),
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    path.write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")


def train_model(
    train_df: pl.DataFrame,
    val_df: pl.DataFrame,
    params: TrainParams,
    label_names: tuple[str, ...],
    *,
    data_path: Path,
    checkpoint_dir: Path = paths.CHECKPOINTS,
    adapter_dir: Path = paths.ADAPTER,
    live_dir: Path | None = paths.TRAIN_LIVE,
    extra_callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train (or resume) the adapter and save the best one with its tokenizer to `adapter_dir`:
    set up, fit, save."""
    setup = set_up(params, label_names, data_path, checkpoint_dir)
    live = open_live(live_dir, setup.resume) if live_dir is not None and setup.rank_zero else None
    if live is not None:
        write_resolved(setup, live_dir / paths.TRAIN_RESOLVED.name)
    trainer = make_trainer(setup, train_df, val_df, params, label_names, live, extra_callbacks)
    output = trainer.train(resume_from_checkpoint=str(setup.resume) if setup.resume else None)
    if setup.rank_zero:
        save_adapter(trainer.model, setup.tokenizer, adapter_dir, params.base_model)
    if live is not None:
        live.end()
    return train_result(trainer, output, setup)


def validation_scores(
    val_df: pl.DataFrame, predicted: Sequence[int], label_names: tuple[str, ...]
) -> tuple[dict[str, Any], pl.DataFrame]:
    """The kept model's scores on the validation rows, against the labels as given (before
    `label_issues.action` changed any: the test split is scored against given labels too) or as a
    person reviewed them (`processed.scored_labels`), and the per-row table `newsclf sweep` pairs
    recipes on (`scored_label`: the label scored against; `label`: the one trained with)."""
    from sklearn.metrics import f1_score

    rows = val_df.select(
        "id", scored_label=scored_labels(val_df), label="label", predicted=pl.Series(predicted)
    ).sort("id")
    truth, pred = rows["scored_label"].to_numpy(), rows["predicted"].to_numpy()
    scores = {
        "accuracy": round(float((truth == pred).mean()), 6),
        "macro_f1": round(
            float(f1_score(truth, pred, average="macro", labels=range(len(label_names)))), 6
        ),
        "n_val": rows.height,
        # Held-out rows that train with another label than the one ingested (by
        # label_issues.action or a person).
        "relabelled_val_rows": (
            int((val_df["given_label"] != val_df["label"]).sum())
            if "given_label" in val_df.columns
            else 0
        ),
    }
    return scores, rows


def write_table_csv(df: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_csv(path)


@dataclass(frozen=True)
class LaunchPlan:
    """How `train.launcher` starts the training: `command` (then `-m stages.train` is appended and
    each process it starts trains), or None to train in this process; `said` for the log."""

    command: list[str] | None
    said: str


def data_parallel_processes(batch_size: int, devices: int) -> int:
    """The most processes, at most one per device, that divide `batch_size` evenly."""
    return max(k for k in range(1, devices + 1) if batch_size % k == 0)


def launch_plan(launcher: str, batch_size: int, cores: int, gpus: int) -> LaunchPlan:
    """`auto`: one data-parallel process per GPU, or per core on a CPU (one thread each: 1.96x
    faster than one process of two threads at equal accuracy on 2 cores, bench_multiprocess), as
    many as divide `batch_size` (the global batch, kept whatever the machine); one process when
    that is one. `python`: this process. Anything else: that launcher command."""
    if launcher == "python":
        return LaunchPlan(None, "one process")
    if launcher != "auto":
        return LaunchPlan(shlex.split(launcher), f"launcher `{launcher}`")
    devices, what = (gpus, "GPU") if gpus else (cores, "core")
    n = data_parallel_processes(batch_size, devices)
    if n == 1:
        return LaunchPlan(None, f"one process ({devices} {what}(s))")
    command = [sys.executable, "-m", launch.__name__, "--standalone"]  # torchrun (stages/launch.py)
    return LaunchPlan(
        [*command, f"--nproc_per_node={n}"],
        f"{n} data-parallel processes through torchrun, one per {what}"
        + ("" if gpus else ", one thread each")
        + f" ({devices} {what}s; {n} divides train.batch_size={batch_size})",
    )


def launched() -> bool:
    """Whether this process was started by a launcher (torchrun and accelerate set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def launcher_name() -> str:
    """What started this process, for resolved.yaml: torch's elastic launcher (torchrun, and
    accelerate's multi-process launch through it) sets TORCHELASTIC_RUN_ID."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    return "a launcher" if launched() else "python"


def main() -> None:
    params = load_section("train", TrainParams)
    if not launched():
        # Checked here once, before any process starts (each would fail alike, inside torchrun).
        if problem := base_model_problem(params.base_model, params.lora):
            raise StageError(problem)
        plan = launch_plan(
            params.launcher, params.batch_size, available_cores(), torch.cuda.device_count()
        )
        log.info("train.launcher=%s: %s", params.launcher, plan.said)
        if plan.command is not None:
            # The processes it starts run this module again, as launched ranks.
            done = subprocess.run([*plan.command, "-m", "stages.train"], check=False)
            if done.returncode == RANK_STAGE_ERROR and launch.__name__ in plan.command:
                # stages/launch.py has said what was wrong, once
                sys.exit(1)
            if done.returncode != 0:
                raise StageError(f"train: {shlex.join(plan.command)} exited {done.returncode}")
            return
    label_names = load_labels()
    if params.torch_threads is not None:
        torch.set_num_threads(params.torch_threads)
    df = read_processed(paths.TRAIN, "train", label_names)
    train_df, val_df = split_train_val(
        df, params.val_fraction, params.seed, params.max_train_samples
    )
    result = train_model(train_df, val_df, params, label_names, data_path=paths.TRAIN)
    if not result.is_main_process:
        return
    validation, predictions = validation_scores(val_df, result.val_predicted, label_names)
    write_table_csv(predictions, paths.VAL_PREDICTIONS)
    write_json(validation, paths.VALIDATION)
    log.info(
        "validation (%d held-out train rows, given or reviewed labels): accuracy %.4f, "
        "macro-F1 %.4f",
        validation["n_val"],
        validation["accuracy"],
        validation["macro_f1"],
    )
    log.info(
        "done: %d steps in %.0f s, best validation loss %.4f (accuracy %.4f) at %s; adapter in %s",
        result.global_step,
        result.train_seconds,
        result.best_val_loss if result.best_val_loss is not None else math.nan,
        result.best_val_accuracy if result.best_val_accuracy is not None else math.nan,
        result.best_checkpoint,
        paths.ADAPTER,
    )


if __name__ == "__main__":
    run_main(main, "train")
