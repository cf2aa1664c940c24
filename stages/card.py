"""The exported model's card: `models/onnx/README.md` in Hugging Face's layout (YAML metadata with
`model-index`, then sections), rendered from a Jinja2 template by huggingface_hub's `ModelCard`.

`card_context` is pure: it takes the run's own reports and params as they are on disk and returns
what the template shows, so that every figure in the card is one of the run's (tests check the
card against the files). The export stage calls `write_card` once its own report is known.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from stages.families import LoraChoice
from stages.train_params import TrainParams

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md.j2"
CARD_NAME = "README.md"  # in the exported folder, where Hugging Face and `dvc artifacts` look


def dataset_name(sources: list[dict]) -> str:
    """The name a card gives the training corpus: the folder(s) its raw sources sit in."""
    return ", ".join(dict.fromkeys(Path(source["path"]).parent.name for source in sources))


def flat(params: dict, prefix: str = "") -> dict[str, str]:
    """`{"lora": {"r": 8}}` -> `{"lora.r": "8"}`: dotted keys, values spelled as YAML spells them
    (`true`, `null`, `[query, value]`), as in params.yaml."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            value = list(value) if isinstance(value, tuple) else value
            spelled = yaml.safe_dump(value, default_flow_style=True, width=1000)
            out[f"{prefix}{key}"] = spelled.strip().removesuffix("...").strip()
    return out


def card_context(
    reports: dict[str, dict],
    export_report: dict,
    train_params: TrainParams,
    lora: LoraChoice,
    labels: tuple[str, ...],
    sources: list[dict],
    models: dict[str, str],
    int8_bound: float,
    calibration: dict[str, Any],
) -> dict[str, Any]:
    """What the card shows. `reports`: the JSON of ingest, clean, label_issues, augment, metrics
    and train (dvclive's metrics.json), and `resolved` (what train's `auto` params became)."""
    ingest, clean = reports["ingest"], reports["clean"]
    augment, metrics = reports["augment"], reports["metrics"]
    return {
        "name": f"{dataset_name(sources)} classifier on {train_params.base_model}",
        "base_model": train_params.base_model,
        "dataset": dataset_name(sources),
        "labels": list(labels),
        "files": models,
        "train": asdict(train_params),
        # What `train.lora` resolved to for the base (its `auto` values spelled out).
        "lora": {"targets": lora.peft_targets, "saved": list(lora.modules_to_save)},
        "train_params": flat(asdict(train_params)),
        "resolved": flat(reports["resolved"]),
        "steps": reports["train"]["step"],
        "data": {
            "rows_in": ingest["rows_in"],
            "kept": ingest["kept"],
            "rejected": ingest["rejected"],
            "sources": ingest["sources"],
            "clean": clean,
            "label_issues": reports["label_issues"],
            "augment": augment,
            "train_rows": augment["train_rows_out"],
            "test_rows": augment["test_rows"],
        },
        "evaluation": metrics,
        "export": export_report | {"int8_bound": int8_bound},
        "calibration": calibration,
    }


def card_data(context: dict[str, Any]) -> ModelCardData:
    """The card's YAML metadata: base model, dataset, metrics and a `model-index` entry per metric."""
    metrics = context["evaluation"]
    results = [
        EvalResult(
            task_type="text-classification",
            dataset_type=context["dataset"],
            dataset_name=context["dataset"],
            dataset_split="test",
            metric_type=metric,
            metric_name=name,
            metric_value=metrics[key],
        )
        for metric, name, key in (
            ("accuracy", "Accuracy", "accuracy"),
            ("f1", "Macro F1", "macro_f1"),
        )
    ]
    return ModelCardData(
        base_model=context["base_model"],
        datasets=[context["dataset"]],
        metrics=["accuracy", "f1"],
        eval_results=results,
        model_name=context["name"],
        pipeline_tag="text-classification",
        library_name="onnx",
        tags=["text-classification", "onnx", "lora", "dvc", "newsclf"],
    )


def render_card(context: dict[str, Any]) -> str:
    return str(ModelCard.from_template(card_data(context), template_path=str(TEMPLATE), **context))


def write_card(context: dict[str, Any], folder: Path) -> Path:
    path = folder / CARD_NAME
    path.write_text(render_card(context) + "\n", encoding="utf-8")
    return path
