"""The classifier as train, evaluate and export load it: where the base is, device, precision,
quantization, merge.

One place finds a base model from its param (the packaged MiniLM, a folder or a hub id), decides
what `train.quantization` and `train.precision` mean on the machine at hand (and says it in one
log line each), which modules stay out of quantization, how a base is loaded
(plain, or 4-/8-bit through bitsandbytes on CUDA and CPU alike), and how a trained adapter is
loaded back: on the base it was trained on, or merged into a fresh fp32 base (what export ships).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from stages.base_model import PACKAGED_BASE_MODEL, resolve_base_model  # noqa: F401 (re-exported)
from stages.common import StageError, get_logger
from stages.families import Family, LoraChoice, family_of, resolve_lora
from stages.sections import PRECISION_MODES, QUANTIZATION_MODES

KBIT = ("4bit", "8bit")
# What `quantization: auto` means per device. On CPU, measured (bench/bench_quant.py,
# docs/train_evaluate.md): QLoRA trained no faster than bf16 LoRA, and its shipped (merged) model
# scored 0.04 pt lower on average; MiniLM's 86 MB of weights are too few for 4 bits to matter.
AUTO_ON_CUDA = "4bit"
AUTO_ON_CPU = "none"

log = get_logger("model")


def native_bf16(cuda: bool) -> tuple[bool, str]:
    """Whether this device computes bf16 natively, and what was found, in words.

    On a CPU, bf16 autocast pays only with AVX512-BF16 or AMX instructions; elsewhere each bf16
    op is emulated and slower than fp32, so it is detected, never assumed.
    """
    if cuda:
        name = torch.cuda.get_device_name()
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"CUDA GPU {name} {'with' if ok else 'without'} native bf16"
    found = [
        flag
        for flag, present in (
            ("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
            ("AMX", torch.cpu._is_amx_tile_supported()),
        )
        if present
    ]
    # ATEN_CPU_CAPABILITY=avx2 / ONEDNN_MAX_CPU_ISA=AVX2 (make test-portable, bench_repro
    # --pin-avx2) keep PyTorch's own kernels or oneDNN's (its bf16 matmuls) off AVX-512, where bf16
    # would be emulated as on a CPU without the flags.
    capability = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    if found and capability != "AVX512":
        return False, f"CPU with {' and '.join(found)}, PyTorch kernels pinned to {capability}"
    if found and not onednn.startswith(("ALL", "AVX512", "AMX")):
        return False, f"CPU with {' and '.join(found)}, oneDNN pinned to {onednn}"
    if found:
        return True, f"CPU with {' and '.join(found)}"
    return False, "CPU without AVX512-BF16 or AMX"


def resolve_precision(mode: str, cuda: bool, key: str = "train.precision") -> str:
    """`auto` → bf16 where the device computes it natively, fp32 elsewhere; said in one line.

    An explicit `bf16` on a device without native bf16 is an error rather than a silent slowdown.
    `key` is the param's name, for the messages.
    """
    if mode not in PRECISION_MODES:
        raise StageError(f"{key}={mode!r}: expected one of {PRECISION_MODES}")
    supported, device = native_bf16(cuda)
    if mode == "auto":
        chosen = "bf16" if supported else "fp32"
        log.info("%s=auto: %s, computing in %s", key, device, chosen)
        return chosen
    if mode == "bf16" and not supported:
        raise StageError(
            f"{key}='bf16': this {device}, where bf16 runs emulated and slower than "
            f"fp32; set {key} to `auto` or `fp32`"
        )
    return mode


def training_precision(
    mode: str, quantization: str, family: Family, model_type: str, cuda: bool
) -> str:
    """`train.precision` for this base and quantization: `resolve_precision`, but fp32 for a
    family that cannot train under bf16 autocast on a k-bit base (`Family.bf16_on_kbit`); `auto`
    says so, an explicit `bf16` is an error naming why."""
    precision = resolve_precision(mode, cuda)
    if precision == "bf16" and quantization in KBIT and not family.bf16_on_kbit:
        why = f"{model_type}'s attention overflows under bf16 autocast on a {quantization} base"
        if mode == "bf16":
            raise StageError(
                f"train.precision='bf16' with train.quantization={quantization}: {why}"
            )
        log.info("train.precision=auto: fp32, as %s", why)
        return "fp32"
    return precision


def resolve_quantization(mode: str, cuda: bool) -> str:
    """`auto` → QLoRA (4-bit) with CUDA, `AUTO_ON_CPU` without; said in one line."""
    if mode not in QUANTIZATION_MODES:
        raise StageError(f"train.quantization={mode!r}: expected one of {QUANTIZATION_MODES}")
    if mode == "auto":
        mode = AUTO_ON_CUDA if cuda else AUTO_ON_CPU
        where = "CUDA GPU" if cuda else "CPU (no CUDA)"
        what = {"none": "plain LoRA on a full-precision base", "4bit": "QLoRA, 4-bit NF4 base"}
        log.info("quantization=auto: %s, %s", where, what[mode])
    if mode in KBIT and importlib.util.find_spec("bitsandbytes") is None:
        raise StageError(f"train.quantization={mode!r} needs bitsandbytes: pip install -e .")
    return mode


def compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _matches(name: str, key: str) -> bool:
    """PEFT's rule for `modules_to_save` keys: the module's name, or its last dotted parts."""
    return name == key or name.endswith(f".{key}")


def unquantized_linears(
    model: torch.nn.Module, keep: Iterable[str], strict: bool = True
) -> list[str]:
    """Full names of every Linear inside the modules named by `keep` (PEFT's matching).

    bitsandbytes must leave these in full precision, as they are trained in full. transformers
    matches its skip list from the start of a module's full name or as a suffix, so `pooler`
    does not cover `bert.pooler.dense`; full names, taken from the model itself, cover exactly
    what PEFT will train. With `strict`, a key that names no module is an error naming it
    (PEFT itself passes over such keys: it saves `score` too, the head's name in other models).
    """
    names = [name for name, _ in model.named_modules()]
    kept: set[str] = set()
    for key in keep:
        roots = [name for name in names if _matches(name, key)]
        if not roots and strict:
            raise StageError(f"train.lora.modules_to_save: no module {key!r} in the base model")
        for name, module in model.named_modules():
            inside = any(name == root or name.startswith(f"{root}.") for root in roots)
            if inside and isinstance(module, torch.nn.Linear):
                kept.add(name)
    return sorted(kept)


def label_kwargs(label_names: Sequence[str]) -> dict[str, Any]:
    """The model config's classes: a head of len(label_names) outputs, named in id order."""
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


def base_family(base_path: str, base_model: str) -> tuple[str, Family]:
    """The base's model type and family, from its config alone; a StageError naming
    `train.base_model` when it cannot be read or its type is not supported."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(base_path).model_type
    except (OSError, ValueError) as err:
        raise StageError(f"train.base_model={base_model!r}: cannot load its config: {err}") from err
    return model_type, family_of(model_type, base_model)


def lora_choice(base_path: str, base_model: str, lora: Any) -> LoraChoice:
    """What `train.lora.target_modules`/`modules_to_save` (`lora`: the `train.lora` section) mean
    for the base at `base_path`."""
    model_type, family = base_family(base_path, base_model)
    return resolve_lora(model_type, family, lora.target_modules, lora.modules_to_save)


def base_config(base_path: str, label_names: Sequence[str], pad_token_id: int | None):
    """The base's config with a head for `label_names`; a decoder's `pad_token_id` set to the
    tokenizer's (its classifier pools the last token that is not padding, found by that id)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_path, **label_kwargs(label_names))
    family = family_of(config.model_type, base_path)
    if family.kind == "decoder":
        if pad_token_id is None:
            raise StageError(f"{base_path}: a decoder needs the tokenizer's pad token id")
        config.pad_token_id = pad_token_id
    return config, family


def prepare_tokenizer(tokenizer: Any, base_model: str) -> Any:
    """The tokenizer as every stage uses it: fast, with a pad token (EOS where the base has none,
    as decoders ship), padding on the right (a text then keeps its positions in any batch, and a
    decoder's last real token is found the same way in training, evaluation, ONNX and predict)."""
    if not tokenizer.is_fast:
        raise StageError(
            f"train.base_model={base_model!r}: needs a fast tokenizer (tokenizer.json)"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise StageError(
                f"train.base_model={base_model!r}: its tokenizer has neither a pad nor an EOS token"
            )
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token: padding with EOS %r", tokenizer.eos_token)
    if tokenizer.padding_side != "right":
        tokenizer.padding_side = "right"
    return tokenizer


def quantization_kwargs(
    config: Any,
    family: Family,
    quantization: str,
    precision: str,
    modules_to_save: Sequence[str],
    strict: bool = True,
) -> dict[str, Any]:
    """`from_pretrained` arguments for a 4-/8-bit base of this config: NF4 + double quantization,
    compute in the training precision, the head and trained-in-full modules kept out, one copy
    per process's device."""
    from accelerate import PartialState
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    # The architecture without weights (meta device) tells the modules' full names.
    with torch.device("meta"):
        skeleton = AutoModelForSequenceClassification.from_config(config)
    skip = unquantized_linears(skeleton, [family.head, *modules_to_save], strict)
    if quantization == "4bit":
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(precision),
            llm_int8_skip_modules=skip,
        )
    else:
        qconfig = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    state = PartialState()
    # Each process (torchrun / accelerate launch) holds its own quantized copy on its own device.
    device = state.local_process_index if torch.cuda.is_available() else "cpu"
    return {"quantization_config": qconfig, "device_map": {"": device}}


def keep_4bit_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    On a CPU with AVX512-BF16, a Linear4bit run in eval mode without gradients rewrites its weight
    into another layout whose matmul has no backward: training after an evaluation then fails
    (or, after a checkpoint save unpacks it again, works by accident). Kept in the one layout,
    training and scoring "as trained" run the same kernels.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def load_base_model(
    base_path: str,
    label_names: Sequence[str],
    quantization: str = "none",
    precision: str = "fp32",
    modules_to_save: Sequence[str] = (),
    strict: bool = True,
    pad_token_id: int | None = None,
) -> torch.nn.Module:
    """The base sequence classifier, 4-/8-bit quantized through bitsandbytes when asked.
    `pad_token_id`: the tokenizer's, which a decoder's config takes (`base_config`)."""
    from transformers import AutoModelForSequenceClassification

    try:
        config, family = base_config(base_path, label_names, pad_token_id)
    except OSError as err:
        raise StageError(f"train.base_model: cannot load {base_path!r}: {err}") from err
    kwargs: dict[str, Any] = {"config": config}
    if quantization == "8bit":
        # bitsandbytes logs "inputs will be cast ... to float16" on every forward of every 8-bit
        # layer: the cast is how its int8 kernels work, and the line would flood the stage's log.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    if quantization in KBIT:
        kwargs |= quantization_kwargs(
            config, family, quantization, precision, modules_to_save, strict
        )
    else:
        kwargs["dtype"] = torch.float32
    try:
        # A base that ships a classification head for another number of classes gets a fresh one
        # for `label_names`: the head is always trained in full (in modules_to_save), and
        # evaluate/export check that the adapter's trained head is what they load.
        model = AutoModelForSequenceClassification.from_pretrained(
            base_path, ignore_mismatched_sizes=True, **kwargs
        )
    except OSError as err:
        raise StageError(f"train.base_model: cannot load {base_path!r}: {err}") from err
    if quantization in KBIT:
        release_checkpoint_map(model)
    return keep_4bit_layout(model) if quantization == "4bit" else model


def embeddings_in_compute_dtype(model: torch.nn.Module, precision: str) -> None:
    """QLoRA's recipe for a k-bit base trained in bf16: the frozen input embedding, the largest
    weight bitsandbytes leaves unquantized (545 MB in fp32 for a 151,936-token vocabulary), held in
    bf16 like the compute; PEFT's k-bit preparation would keep it in fp32."""
    if precision == "bf16":
        model.get_input_embeddings().to(torch.bfloat16)


def release_checkpoint_map(model: torch.nn.Module) -> None:
    """Give the weights bitsandbytes left unquantized memory of their own.

    From a memory-mapped safetensors file those tensors are views of the file, and while one lives
    the whole mapping stays resident, with every page the loader read to quantize the rest: a 4-bit
    model then holds its fp32 checkpoint in memory beside the quantized weights it uses (measured on
    an 8-layer 1024-wide BERT: 0.5 GB of file pages during training, 0.0 after this copy).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        for tensor in tensors:
            if not isinstance(tensor, bnb.nn.Params4bit | bnb.nn.Int8Params):
                tensor.data = tensor.data.clone()


def is_full_model(adapter_dir: Path) -> bool:
    """Whether train wrote a fully fine-tuned model (`train.finetune: full`: config.json +
    model.safetensors) rather than a LoRA adapter into `adapter_dir`."""
    return (adapter_dir / "config.json").is_file() and (adapter_dir / "model.safetensors").is_file()


def require_adapter(adapter_dir: Path) -> Path:
    """The trained weights' file: the adapter's, or the fully fine-tuned model's."""
    if is_full_model(adapter_dir):
        return adapter_dir / "model.safetensors"
    weights = adapter_dir / "adapter_model.safetensors"
    if not (adapter_dir / "adapter_config.json").is_file() or not weights.is_file():
        raise StageError(
            f"{adapter_dir}: no adapter_config.json + adapter_model.safetensors (nor config.json "
            "+ model.safetensors of a fully fine-tuned model); run train first"
        )
    return weights


def load_full_model(adapter_dir: Path, label_names: Sequence[str]) -> torch.nn.Module:
    """The fully fine-tuned model in fp32, eval mode, checked to classify into `label_names`."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(adapter_dir), dtype=torch.float32
    )
    trained = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if trained != list(label_names):
        raise StageError(f"{adapter_dir}: trained for classes {trained}, labels are {label_names}")
    return model.eval()


def load_as_trained(
    adapter_dir: Path,
    base_path: str,
    label_names: Sequence[str],
    quantization: str,
    precision: str,
    pad_token_id: int | None = None,
) -> torch.nn.Module:
    """The adapter on the base it was trained on (quantized for QLoRA), unmerged, in eval mode;
    a fully fine-tuned model as it is."""
    from peft import PeftConfig, PeftModel

    require_adapter(adapter_dir)
    if is_full_model(adapter_dir):
        return load_full_model(adapter_dir, label_names)
    # The modules the adapter trained in full must load unquantized, as they were in training.
    trained_in_full = PeftConfig.from_pretrained(str(adapter_dir)).modules_to_save or []
    base = load_base_model(
        base_path, label_names, quantization, precision, trained_in_full, False, pad_token_id
    )
    if quantization in KBIT:
        embeddings_in_compute_dtype(base, precision)  # as trained (stages/train.py)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (KeyError, ValueError, RuntimeError) as err:
        raise StageError(f"{adapter_dir}: adapter does not fit {base_path}: {err}") from err
    return model.eval()


def linears_on_onednn(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (fp32, eval, on the CPU) with each plain `nn.Linear` computed by oneDNN instead of
    the BLAS behind `addmm`: the same fp32 arithmetic in another summation order, and on AMD CPUs,
    where PyTorch's MKL takes a slower path, about twice the speed (docs/train_evaluate.md).
    Subclasses of `nn.Linear` (bitsandbytes' quantized layers among them) are left as they are."""
    from torch.utils.mkldnn import MkldnnLinear

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is torch.nn.Linear:
                setattr(parent, name, MkldnnLinear(child, torch.float32))
    return model


def load_merged_model(
    adapter_dir: Path, base_path: str, label_names: Sequence[str], pad_token_id: int | None = None
) -> torch.nn.Module:
    """A fresh fp32 base with the adapter merged in, in eval mode: the model export ships.

    Always fp32, whatever the training used: merging into a 4-bit base would round the merged
    weights, so a QLoRA adapter is merged into the full-precision weights it approximates.
    """
    from peft import PeftModel
    from safetensors import safe_open

    weights_file = require_adapter(adapter_dir)
    if is_full_model(adapter_dir):
        return load_full_model(adapter_dir, label_names)  # nothing to merge
    # The classification head is trained in full and saved in the adapter; without it the
    # "merged" model would carry the randomly initialised head of the base.
    with safe_open(str(weights_file), framework="pt") as weights:
        head = {k: weights.get_tensor(k) for k in weights.keys() if "lora_" not in k}  # noqa: SIM118
    if not head:
        raise StageError(f"{weights_file}: holds no classification-head weights")
    base = load_base_model(base_path, label_names, pad_token_id=pad_token_id)
    try:
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    except (KeyError, ValueError, RuntimeError) as err:
        raise StageError(f"{adapter_dir}: adapter does not fit {base_path}: {err}") from err
    merged.eval()
    state = merged.state_dict()
    for key, tensor in head.items():
        name = key.removeprefix("base_model.model.")
        if name not in state or not torch.equal(state[name], tensor):
            raise StageError(f"{weights_file}: head weight {key} did not load into the model")
    return merged
