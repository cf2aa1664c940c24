"""The `train:` section of params.yaml: read by train, and by evaluate and export, which load the
model it trained (base model, max length, precision, quantization) and its training rows.

A module of its own so that evaluate's and export's dvc.yaml deps are what they read, not
stages/train.py: a change to a training callback reruns train only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stages.params import check_values
from stages.sections import PRECISION_MODES, QUANTIZATION_MODES

# transformers' learning-rate schedules that take no extra arguments.
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# lora: a LoRA adapter on the frozen base (QLoRA with quantization); full: every weight trains.
FINETUNE_MODES = ("lora", "full")


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float
    # `auto` (stages/families.py: the project's table, else PEFT's mapping), `all-linear`, or a list.
    target_modules: Literal["auto", "all-linear"] | tuple[str, ...]
    # Trained in full beside the adapter: `auto` (the family's head and pooling) or a list (the
    # head is added to it).
    modules_to_save: Literal["auto"] | tuple[str, ...]

    def __post_init__(self) -> None:
        check_values(
            self,
            {
                "r": (self.r > 0, "> 0"),
                "alpha": (self.alpha > 0, "> 0"),
                "dropout": (0 <= self.dropout < 1, "in [0, 1)"),
                "target_modules": (len(self.target_modules) > 0, "a non-empty list"),
            },
        )


@dataclass(frozen=True)
class TrainParams:
    """The `train:` section of params.yaml (no defaults here: params.yaml has them)."""

    # What runs the training: `auto` (stages/train.py `launch_plan`), `python` (this process) or a
    # multi-process launcher command such as `torchrun --standalone --nproc_per_node 2`.
    launcher: str
    base_model: str
    finetune: Literal[FINETUNE_MODES]
    max_train_samples: int | None
    val_fraction: float
    epochs: float
    batch_size: int
    learning_rate: float
    lr_scheduler: Literal[LR_SCHEDULERS]
    warmup_ratio: float
    weight_decay: float
    max_length: int
    group_by_length: bool
    torch_threads: int | None
    checkpoint_steps: int
    quantization: Literal[QUANTIZATION_MODES]
    precision: Literal[PRECISION_MODES]
    activation_checkpointing: bool
    seed: int
    lora: LoraParams

    def __post_init__(self) -> None:
        check_values(
            self,
            {
                "launcher": (self.launcher.strip() != "", "a command"),
                "epochs": (self.epochs > 0, "> 0"),
                "batch_size": (self.batch_size > 0, "> 0 (rows per optimizer step, all processes)"),
                "learning_rate": (self.learning_rate > 0, "> 0"),
                "warmup_ratio": (0 <= self.warmup_ratio < 1, "in [0, 1)"),
                "weight_decay": (self.weight_decay >= 0, ">= 0"),
                "max_length": (self.max_length >= 8, ">= 8"),
                "val_fraction": (0 < self.val_fraction < 0.5, "in (0, 0.5)"),
                "max_train_samples": (
                    self.max_train_samples is None or self.max_train_samples > 0,
                    "null or > 0",
                ),
                "torch_threads": (
                    self.torch_threads is None or self.torch_threads > 0,
                    "null or > 0",
                ),
                "checkpoint_steps": (self.checkpoint_steps > 0, "> 0"),
                "finetune": (
                    self.finetune == "lora" or self.quantization in ("auto", "none"),
                    "lora with quantization 4bit/8bit (a quantized base trains through an "
                    "adapter only; full fine-tuning needs quantization none)",
                ),
            },
        )
