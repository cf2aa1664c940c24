"""End to end: the real `dvc repro` in a temporary copy of the repository, on a fixture it writes.

The whole pipeline runs once per session (`tiny_pipeline`); each test here checks it or a clone.
The data stages alone are in test_e2e_data.py. That only a changed param's stages rerun
is checked by the experiments test (test_workflows.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from tests.pipeline_fixture import REPRO_LOG, dvc, stages_run

pytestmark = pytest.mark.e2e  # on the worker that builds the tiny pipeline (tests/conftest.py)


def test_dvc_repro_whole_pipeline_with_tiny_model(tiny_pipeline: Path) -> None:
    project = tiny_pipeline  # the whole pipeline has run there (conftest.py)
    # From scratch, `dvc repro` ran every stage of dvc.yaml.
    ran = stages_run((project.parent / REPRO_LOG).read_text())
    assert (
        ran
        == set(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
        == {
            "validate_params",
            "ingest",
            "clean",
            "tokenize",
            "label_issues",
            "augment",
            "train",
            "evaluate",
            "export",
            "report",
        }
    )
    interim, processed = project / "data" / "interim", project / "data" / "processed"
    clean = pl.read_parquet(interim / "clean.parquet")
    issues = pl.read_parquet(interim / "label_issues.parquet")
    assert sorted(issues["id"]) == sorted(clean.filter(pl.col("split") == "train")["id"])
    assert (project / "reports" / "label_issues.md").exists()
    train = pl.read_parquet(processed / "train.parquet")
    test = pl.read_parquet(processed / "test.parquet")
    # Every test row goes through untouched: none added, removed or changed.
    assert test["text"].to_list() == clean.filter(pl.col("split") == "test")["text"].to_list()
    assert test.height == 2 + 4 * 5
    augment = json.loads((project / "reports" / "augment.json").read_text())
    assert train.height == augment["train_rows_out"]
    assert (project / "models" / "adapter" / "adapter_model.safetensors").exists()
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    # The score agrees with the confusion table written beside it, row for row.
    confusion = pl.read_csv(project / "reports" / "plots" / "confusion.csv")
    assert confusion.height == metrics["n_test"] == test.height
    hits = (confusion["actual"] == confusion["predicted"]).sum()
    assert metrics["accuracy"] == pytest.approx(hits / test.height, abs=1e-6)
    # The synthetic topics are separable by their words: the TF-IDF baseline beats chance by far.
    assert metrics["baseline_accuracy"] >= 0.75
    assert (project / "models" / "onnx" / "model.onnx").exists()
    export = json.loads((project / "reports" / "export.json").read_text())
    assert export["parity"]["fp32_max_abs_logit_diff"] <= 1e-4
    check_model_card(project)
    page = (project / "reports" / "index.html").read_text()
    assert f"{100 * metrics['accuracy']:.2f}%" in page
    assert dvc(project, "status").stdout.strip() == "Data and pipelines are up to date."


def check_model_card(project: Path) -> None:
    """The card in the exported folder quotes the run's own files, figure for figure."""
    text = (project / "models" / "onnx" / "README.md").read_text()
    front, body = text.removeprefix("---\n").split("\n---\n", 1)
    meta = yaml.safe_load(front)
    reports = project / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    ingest = json.loads((reports / "ingest.json").read_text())
    export = json.loads((reports / "export.json").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert meta["base_model"] == params["train"]["base_model"]
    assert meta["pipeline_tag"] == "text-classification"
    (entry,) = meta["model-index"]
    scores = {m["type"]: m["value"] for r in entry["results"] for m in r["metrics"]}
    assert scores == {"accuracy": metrics["accuracy"], "f1": metrics["macro_f1"]}
    assert {r["dataset"]["split"] for r in entry["results"]} == {"test"}
    for figure in (
        f"| accuracy | {metrics['accuracy']} |",
        f"| macro-F1 | {metrics['macro_f1']} |",
        f"| baseline accuracy (TF-IDF + logistic regression) | {metrics['baseline_accuracy']} |",
        f"{ingest['rows_in']} rows in, {ingest['kept']} kept, {ingest['rejected']} rejected",
        f"on {export['parity']['n_texts']} test texts spread over the length\n"
        "range, batched by length and in mixed-length batches: largest logit difference "
        f"{export['parity']['fp32_max_abs_logit_diff']}",
        f"Test accuracy of the fp32 graph: {metrics['accuracy']} (the merged PyTorch model's",
        f"Test accuracy of the int8 graph: {export['accuracy']['int8']} (its own, on the "
        f"{metrics['n_test']} test rows)",
        f"`train.seed` | `{params['train']['seed']}`",
        f"`train.lora.r` | `{params['train']['lora']['r']}`",
    ):
        assert figure in body, figure
    # The temperature evaluate fitted travels in the folder, and the card quotes the calibration.
    calibration = json.loads((reports / "calibration.json").read_text())
    folder_meta = json.loads((project / "models" / "onnx" / "newsclf_onnx.json").read_text())
    assert folder_meta["calibration"]["temperature"] == calibration["temperature"]
    assert folder_meta["calibration"]["confidence_reference"]["n"] == metrics["n_test"]
    assert (
        f"expected calibration error {metrics['calibration']['ece_before']:.4f} before, "
        f"{metrics['calibration']['ece_after']:.4f} after" in body
    )
    for label, scores in metrics["per_class"].items():
        assert f"| {label} | {scores['precision']} | {scores['recall']} | {scores['f1']} |" in body
    for source in ingest["sources"]:
        assert f"| `{source['path']}` | {source['split']} | {source['rows_in']} |" in body
    measured_on = export["parity"]["int8_measured_on"]
    assert (
        f"Measured on {measured_on['cpu']}\n  (int8 instructions: {measured_on['int8_instructions']})"
        in body
    )
    resolved = yaml.safe_load((reports / "train" / "resolved.yaml").read_text())
    assert f"| precision (as resolved) | `{resolved['precision']}` |" in body
