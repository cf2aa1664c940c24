"""`newsclf sweep` through DVC's own queue (`dvc exp run --queue`, `dvc queue start`, `dvc queue
status` and `logs`) on a small project of its own, the tiny pipeline up to `augment`: so this module
need not run on the xdist worker that builds the tiny pipeline (tests/conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.pipeline_fixture import (
    add_synthetic_sources,
    commit_all,
    dvc,
    git,
    make_project,
    set_params,
    tiny_pipeline_params,
    tool_env,
)

pytestmark = pytest.mark.e2e


def ok(result) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def project_to_augment(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    """The tiny pipeline's project and params, `dvc repro augment` run and dvc.lock committed:
    queued experiments up to `train` then run validate_params and train only."""
    project = make_project(tmp_path_factory.mktemp("sweep_queue") / "repo")
    add_synthetic_sources(project, train_per_class=12, test_per_class=5)
    set_params(project, tiny_pipeline_params(tiny_bert_dir))
    ok(dvc(project, "repro", "augment"))
    commit_all(project, "the pipeline up to augment")
    return project


def newsclf(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`newsclf ARGS` in `cwd`, with this interpreter's dvc first on PATH."""
    return subprocess.run(
        [sys.executable, "-m", "newsclf.cli", *args],
        cwd=cwd,
        env=tool_env(),
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_sweep_queues_each_point_and_seed_ranks_on_validation_and_applies_the_winner(
    project_to_augment: Path,
) -> None:
    work = project_to_augment
    sweep = {
        "name": "tiny",
        "stage": "train",
        "seeds": [1, 2],
        "metric": "accuracy",
        "points": [
            {"train.learning_rate": 0.05},
            {"train.learning_rate": 0.0001},
            # Refused by validate_params: recorded, and the sweep goes on (one seed is enough).
            {"train.epochs": -1, "seeds": [1]},
        ],
    }
    (work / "sweeps").mkdir()
    (work / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    git(work, "add", "sweeps")
    git(work, "commit", "-qm", "a sweep")  # queued experiments run what is committed

    out = ok(newsclf(work, "sweep", "run", "sweeps/tiny.yaml"))
    assert "3 point(s), 2 seed(s): 5 experiments up to `train`" in out
    assert out.count("queued tiny-") == 5 and "[5/5]" in out
    journal = json.loads((work / "reports" / "sweeps" / "tiny.json").read_text())
    failed = {name: e for name, e in journal.items() if e["status"] == "failed"}
    assert len(journal) == 5 and len(failed) == 1
    for entry in failed.values():
        assert (
            "[validate_params] ERROR params.yaml: bad value(s) train.epochs=-1" in entry["reason"]
        )

    shown = ok(newsclf(work, "sweep", "show", "sweeps/tiny.yaml"))
    summary = json.loads((work / "reports" / "sweep.json").read_text())
    assert (work / "reports" / "sweep.png").is_file()
    # The ranking is the validation accuracy each experiment's commit holds, mean over seeds.
    refs = git(work, "for-each-ref", "--format=%(refname:lstrip=-1) %(objectname)", "refs/exps")
    commits = dict(line.split() for line in refs.splitlines())
    means = {}
    for entry in summary["points"][:2]:
        values = [
            json.loads(git(work, "show", f"{commits[name]}:reports/train/validation.json"))[
                "accuracy"
            ]
            for name in entry["experiments"].values()
        ]
        assert entry["status"] == "complete" and entry["mean"] == pytest.approx(
            sum(values) / 2, abs=1e-6
        )
        means[entry["point"]["train.learning_rate"]] = entry["mean"]
    assert summary["points"][2]["status"] == "failed" and summary["points"][2]["rank"] is None
    best = max(means, key=lambda lr: (means[lr], lr == 0.05))  # a tie goes to the earlier point
    assert summary["winner"]["point"] == {"train.learning_rate": best}
    assert summary["winner"]["margin_over_runner_up"]["n_rows"] > 0
    assert "winner: learning_rate=" in shown

    applied = ok(newsclf(work, "sweep", "apply", "sweeps/tiny.yaml"))
    assert yaml.safe_load((work / "params.yaml").read_text())["train"]["learning_rate"] == best
    assert "params.yaml" in applied

    # Run again: everything is done or recorded as failed, nothing is queued.
    again = ok(newsclf(work, "sweep", "run", "sweeps/tiny.yaml"))
    assert "5 done, failed or in the queue already, 0 to queue" in again
    assert "nothing to run" in again and "Queued" not in ok(dvc(work, "queue", "status"))
