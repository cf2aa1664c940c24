"""Your own data: a corpus whose classes are not AG News', from params alone, through the pipeline.

3 classes: a header CSV with class names for train, JSON lines with integer ids for test, the text
joined from two columns, each stage's `main()` run in dvc.yaml's order in one fresh process. 2
classes: header CSVs both ways, the stages run in this process. What a class count could break is
in the stages; that dvc.yaml declares `labels` for every stage that reads them is the last test
here, and `dvc plots show` renders the corpus's classes. Nothing in the code changes between them.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from tests.pipeline_fixture import (
    REPO_ROOT,
    commit_all,
    dvc,
    make_project,
    run_all_stages,
    run_stages_in_one_process,
    set_params,
    tiny_pipeline_params,
    tool_env,
)

pytestmark = pytest.mark.e2e

TICKET_WORDS = {
    "Billing": ("invoice", "charged", "refund", "payment", "card", "receipt"),
    "Outage": ("down", "offline", "error", "timeout", "crash", "unreachable"),
    "Account": ("password", "login", "email", "profile", "username", "locked"),
}


def tickets(names: tuple[str, ...], per_class: int, offset: int) -> list[dict]:
    """Rows with a subject and a body drawn from each class's own words; deterministic."""
    rows = []
    for name in names:
        words = TICKET_WORDS[name]
        for i in range(offset, offset + per_class):
            picked = [words[(i + k) % len(words)] for k in range(4)]
            rows.append(
                {
                    "subject": f"Ticket {i} about {picked[0]}",
                    "body": f"The {picked[1]} and the {picked[2]} again, {picked[3]} today",
                    "queue": name,
                    "queue_id": names.index(name),
                }
            )
    return rows


def header_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["subject", "body", "queue"], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def own_corpus_project(root: Path, model_dir: Path, names: tuple[str, ...]) -> Path:
    """The pipeline with `labels: names` and sources in the layouts of a user's own data."""
    project = make_project(root)
    raw = project / "data" / "raw" / "tickets"
    raw.mkdir(parents=True)
    (raw / "train.csv").write_text(header_csv(tickets(names, 12, 0)))
    test_rows = tickets(names, 6, 1000)
    if len(names) == 3:
        test = {"path": "data/raw/tickets/test.jsonl", "text": ["subject", "body"]}
        (raw / "test.jsonl").write_text(
            "".join(
                json.dumps({"subject": r["subject"], "body": r["body"], "y": r["queue_id"]}) + "\n"
                for r in test_rows
            )
        )
        test["label"] = "y"
    else:
        test = {"path": "data/raw/tickets/test.csv", "text": ["subject", "body"], "label": "queue"}
        (raw / "test.csv").write_text(header_csv(test_rows))
    set_params(project, tiny_pipeline_params(model_dir))
    if len(names) == 2:
        # The 3-class run covers QLoRA and the int8 export with other labels; this one keeps to
        # what a class count could break, and costs less.
        set_params(project, {"train.quantization": "none", "export.quantize": False})
    set_params(
        project,
        {
            "labels": list(names),
            "ingest.sources": [
                {
                    "path": "data/raw/tickets/train.csv",
                    "split": "train",
                    "text": ["subject", "body"],
                    "label": "queue",
                },
                {**test, "split": "test"},
            ],
        },
    )
    commit_all(project, "own corpus")
    return project


@pytest.mark.parametrize(
    "names", [("Billing", "Outage", "Account"), ("Outage", "Account")], ids=["3-class", "2-class"]
)
def test_own_corpus_runs_to_report_with_its_class_names(
    tmp_path: Path, tiny_bert_dir: Path, names: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    project = own_corpus_project(tmp_path / "repo", tiny_bert_dir, names)
    if len(names) == 3:
        run_stages_in_one_process(project)  # a fresh process, as `dvc repro` gives each stage
    else:
        monkeypatch.chdir(project)
        run_all_stages()  # in this process
    n = len(names)

    ingest = json.loads((project / "reports" / "ingest.json").read_text())
    assert ingest["rejected"] == 0 and ingest["kept"] == 18 * n
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert list(metrics["per_class"]) == list(names)
    assert metrics["n_test"] == 6 * n
    confusion = pl.read_csv(project / "reports" / "plots" / "confusion.csv")
    assert set(confusion["actual"]) == set(names)
    assert set(confusion["predicted"]) <= set(names)
    roc = pl.read_csv(project / "reports" / "plots" / "roc.csv")
    assert roc["class"].unique(maintain_order=True).to_list() == list(names)
    issues = json.loads((project / "reports" / "label_issues.json").read_text())
    assert list(issues["per_class"]) == list(names)
    meta = json.loads((project / "models" / "onnx" / "newsclf_onnx.json").read_text())
    assert meta["labels"] == list(names)
    page = (project / "reports" / "index.html").read_text()
    assert all(name in page for name in names) and "Sci/Tech" not in page

    predicted = subprocess.run(
        [sys.executable, "-m", "newsclf.cli", "predict", "--json", "the invoice was charged"],
        cwd=project,
        env=tool_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    row = json.loads(predicted.stdout.splitlines()[0])
    assert row["label"] in names and list(row["scores"]) == list(names)

    # `dvc plots show` renders the per-class ROC from one file, whatever the classes are called.
    plots = json.loads(dvc(project, "plots", "show", "--json").stdout)
    roc_data = plots["data"]["roc"][0]["content"]["data"]["values"]
    assert {point["class"] for point in roc_data} == set(names)


def test_every_stage_that_reads_labels_declares_them() -> None:
    # A param read but not declared would let `dvc repro` skip a stage whose output it changes.
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        source = (REPO_ROOT / "stages" / f"{name}.py").read_text()
        reads = "load_labels()" in source
        assert reads == ("labels" in stage.get("params", [])), name
    assert "Sci/Tech" not in (REPO_ROOT / "dvc.yaml").read_text()
