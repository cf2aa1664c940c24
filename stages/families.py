"""The base-model families the pipeline supports, and what each needs from train and export.

`train.base_model` may be any model whose config's `model_type` is a key of FAMILIES; anything else
stops train at its start naming the param, the type and this list (`family_of`), before PEFT,
bitsandbytes or the ONNX exporter could fail deep inside. Per family:

- `head`: the classification head's module (encoders `classifier`, decoders `score`, T5
  `classification_head`), trained in full and never quantized.
- `modules_to_save`: what `train.lora.modules_to_save: auto` trains in full beside the adapter:
  the head plus what the family's classifier adds fresh on top of the pretrained body (BERT's and
  DeBERTa's `pooler`, DistilBERT's `pre_classifier`, ModernBERT's `head`).
- `target_modules`: what `train.lora.target_modules: auto` adapts where the project has its own
  choice; None takes PEFT's per-architecture mapping. BERT's list is the one measured for MiniLM
  (docs/train_evaluate.md); DistilBERT, ModernBERT and MPNet have no PEFT entry.
- `kind`: encoder, decoder (classifies from the last non-pad token; needs a pad token) or
  encoder-decoder (T5: classifies from the encoder-decoder state at the final `</s>`).
- `ort_model_type`: the model type of ONNX Runtime's transformer optimizer whose fusions apply to
  the family's graph (layer norms and GELU for all; attention for the BERT-like encoders), each
  checked by the export's parity bound on a tiny model of the family (tests/test_families.py).
- `attention_in_trace`: the export traces attention in the op order ORT's Attention fusion
  matches (stages/export.py `trace_attention`), with the additive mask built outside the model;
  the others are traced as the library computes them, from the 0/1 mask.

A module without torch imports (PEFT is imported only to read its mapping): the model card and the
docs test read the table without loading a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stages.common import StageError


@dataclass(frozen=True)
class Family:
    kind: Literal["encoder", "decoder", "encoder-decoder"]
    head: str
    modules_to_save: tuple[str, ...]
    target_modules: tuple[str, ...] | None = None
    ort_model_type: str = "bert"
    attention_in_trace: bool = False
    # ONNX Runtime fuses the family's attention into one Attention op (export warns when it did not).
    ort_fuses_attention: bool = False
    # Trains under bf16 autocast on a 4-/8-bit base. DeBERTa-v2 does not: its attention fills
    # bf16 scores with fp32's minimum (the k-bit layers return fp32) and overflows.
    bf16_on_kbit: bool = True


_BERT_LIKE = Family(
    "encoder", "classifier", ("classifier",), attention_in_trace=True, ort_fuses_attention=True
)
# ORT's `qwen3` optimizer fuses the RMSNorm layers every Llama-style decoder has; its attention
# stays as traced.
_LLAMA_LIKE = Family("decoder", "score", ("score",), ort_model_type="qwen3")

FAMILIES: dict[str, Family] = {
    "bert": Family(
        "encoder",
        "classifier",
        ("classifier", "pooler"),
        target_modules=("query", "key", "value", "dense"),
        attention_in_trace=True,
        ort_fuses_attention=True,
    ),
    "distilbert": Family(
        "encoder",
        "classifier",
        ("classifier", "pre_classifier"),
        target_modules=("q_lin", "v_lin"),
        ort_fuses_attention=True,
    ),
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": Family("encoder", "classifier", ("classifier", "pooler"), bf16_on_kbit=False),
    "modernbert": Family("encoder", "classifier", ("classifier", "head"), target_modules=("Wqkv",)),
    "mpnet": Family("encoder", "classifier", ("classifier",), target_modules=("q", "v")),
    "gpt2": Family("decoder", "score", ("score",), ort_model_type="gpt2"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "t5": Family(
        "encoder-decoder", "classification_head", ("classification_head",), ort_model_type="t5"
    ),
}


def supported() -> str:
    return ", ".join(FAMILIES)


def family_of(model_type: str | None, base_model: str) -> Family:
    """The family of a base whose config says `model_type`; a StageError naming the param, the
    type and the supported list for any other."""
    if model_type not in FAMILIES:
        raise StageError(
            f"train.base_model={base_model!r}: model type {model_type!r} is not supported; "
            f"supported types: {supported()}"
        )
    return FAMILIES[model_type]


def peft_target_modules(model_type: str) -> tuple[str, ...] | None:
    """PEFT's own LoRA target modules for the type, if it has them."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    found = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    return tuple(found) if found else None


@dataclass(frozen=True)
class LoraChoice:
    """What `train.lora.target_modules`/`modules_to_save` mean for the base at hand, and where
    each came from (for the stage's log)."""

    target_modules: tuple[str, ...] | str  # a list, or PEFT's "all-linear"
    modules_to_save: tuple[str, ...]
    targets_from: str
    saved_from: str

    @property
    def peft_targets(self) -> list[str] | str:
        """`target_modules` as LoraConfig takes it: a list, or the string `all-linear`."""
        if isinstance(self.target_modules, str):
            return self.target_modules
        return list(self.target_modules)


def resolve_lora(
    model_type: str,
    family: Family,
    target_modules: tuple[str, ...] | str,
    modules_to_save: tuple[str, ...] | str,
) -> LoraChoice:
    """`auto` → the project's table, then PEFT's mapping (targets) / the family's modules (saved);
    `all-linear` and explicit lists pass through. The head is always trained in full."""
    if target_modules == "auto":
        if family.target_modules is not None:
            targets, targets_from = family.target_modules, f"the project's table for {model_type}"
        else:
            targets = peft_target_modules(model_type) or ()
            targets_from = f"PEFT's mapping for {model_type}"
        if not targets:
            raise StageError(
                f"train.lora.target_modules=auto: no default for model type {model_type!r}; "
                "name the modules or use all-linear"
            )
    else:
        targets, targets_from = target_modules, "params.yaml"
    if modules_to_save == "auto":
        saved, saved_from = family.modules_to_save, f"the {model_type} family's head and pooling"
    else:
        saved, saved_from = modules_to_save, "params.yaml"
        if family.head not in saved:
            saved = (family.head, *saved)
    return LoraChoice(targets, tuple(saved), targets_from, saved_from)
