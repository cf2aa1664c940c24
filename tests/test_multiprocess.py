"""`train` under the real multi-process launcher: 2 processes over gloo on CPU match 1 process.

Runs `python -m stages.train` as dvc.yaml does, with `train.launcher` a torchrun command or `auto`
(2 processes on a 2-core machine), in a scratch project with a tiny dropout-free BERT (dropout masks differ from
process to process, so without it the two runs could not be compared step by step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, make_news_rows
from tests.pipeline_fixture import set_params

pytestmark = pytest.mark.slow

# 80 rows → 16 validation, 64 training: 4 global batches of 16 per epoch, so 2 processes × 8 and
# 1 process × 16 see exactly the same rows in every optimizer step (no padded last batch).
ROWS_PER_CLASS = 20
GLOBAL_BATCH = 16


@pytest.fixture(scope="module")
def dropout_free_bert(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny_bert_no_dropout")
    config = BertConfig.from_pretrained(tiny_bert_dir)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(out)
    return out


def make_train_project(root: Path, base: Path, launcher: str, quantization: str) -> Path:
    """params.yaml (the repo's, fitted to the tiny model) and data/processed/train.parquet."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["train"].update(
        launcher=launcher,
        base_model=str(base),
        val_fraction=0.2,
        epochs=2,
        batch_size=GLOBAL_BATCH,
        learning_rate=0.05,
        max_length=16,
        checkpoint_steps=2,
        torch_threads=1,
        quantization=quantization,
        precision="fp32",
        # Random batches come from accelerate's seeded sampler, the same in both layouts; under
        # DDP, length-grouped batches are drawn from a per-epoch seed (stages/train.py).
        group_by_length=False,
    )
    params["train"]["lora"].update(r=4, alpha=8, dropout=0.0, target_modules=["query", "value"])
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    data = root / "data" / "processed" / "train.parquet"
    data.parent.mkdir(parents=True)
    make_news_rows(ROWS_PER_CLASS).write_parquet(data)
    return root


def start_train(project: Path) -> subprocess.Popen:
    """`python -m stages.train`, as dvc.yaml runs it: `train.launcher` decides the processes."""
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(run: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)


def train_log(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("[train]")]


def log_history(project: Path) -> list[dict]:
    state = project / "models" / "checkpoints" / "checkpoint-8" / "trainer_state.json"
    return json.loads(state.read_text())["log_history"]


def test_two_processes_train_as_one_does_and_resume(dropout_free_bert, tmp_path: Path) -> None:
    """For a full-precision and a 4-bit (QLoRA) base, 1 and 2 processes side by side; with them,
    a 2-process `auto` run whose input is missing. All five start at once: each process has one
    thread, and most of a tiny run is start-up."""
    # torchrun as a launcher command; each of its 2 processes takes half of every step's rows.
    torchrun = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
    projects = {
        (quantization, launcher): make_train_project(
            tmp_path / f"{quantization}-{name}", dropout_free_bert, launcher, quantization
        )
        for quantization in ("none", "4bit")
        for name, launcher in (("one", "python"), ("two", torchrun))
    }
    faulty = make_train_project(tmp_path / "faulty", dropout_free_bert, "auto", "none")
    (faulty / "data" / "processed" / "train.parquet").unlink()
    runs = {key: start_train(project) for key, project in projects.items()}
    faulty_run = start_train(faulty)
    done = {key: finish(run) for key, run in runs.items()}

    # A fault in the ranks reaches the user once, without torchrun's report or traceback: rank 0
    # says it in one line and the launcher ends with exit status 1.
    _, stderr = faulty_run.communicate(timeout=300)
    assert faulty_run.returncode == 1, stderr[-3000:]
    assert [line for line in stderr.splitlines() if "ERROR" in line] == [
        "[train] ERROR data/processed/train.parquet: not found; run `dvc repro` to build the "
        "stages upstream"
    ], stderr[-3000:]
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr
    assert "train.launcher=auto: 2 data-parallel processes" in stderr

    for quantization in ("none", "4bit"):
        one, two = projects[quantization, "python"], projects[quantization, torchrun]
        lines = train_log(done[quantization, torchrun])
        assert any(line.startswith("[train] INFO world size 2:") for line in lines), lines
        assert any(
            "world size 1: one process" in line for line in train_log(done[quantization, "python"])
        )
        # Rank 0 alone writes and reports: one "done", one adapter, one dvclive summary.
        assert sum(" done: " in line for line in lines) == 1, lines
        assert (two / "models" / "adapter" / "adapter_model.safetensors").is_file()
        assert json.loads((two / "reports" / "train" / "metrics.json").read_text())["step"] == 8

        # Same global batch, same rows per step: the same losses, gradient norms and validation.
        keys = ("loss", "grad_norm", "eval_loss", "eval_accuracy")
        reference, distributed = log_history(one), log_history(two)
        assert [e["step"] for e in distributed] == [e["step"] for e in reference]
        for ref, dist in zip(reference, distributed, strict=True):
            for key in keys:
                if key in ref:
                    assert dist[key] == pytest.approx(ref[key], rel=1e-3), (dist["step"], key)
        first_eval, last_eval = (e["eval_loss"] for e in reference if "eval_loss" in e)
        assert last_eval < first_eval - 0.01, "the run must learn, or equal losses prove nothing"

    # A second run with `launcher: auto` on this 2-core machine starts 2 processes itself,
    # resumes from the 2-process checkpoint and keeps the adapter. Once: the launcher and resume
    # do not depend on the base's quantization (QLoRA resume: test_train.py).
    two = projects["none", torchrun]
    adapter = (two / "models" / "adapter" / "adapter_model.safetensors").read_bytes()
    set_params(two, {"train.launcher": "auto"})
    again = train_log(finish(start_train(two)))
    assert any("train.launcher=auto: 2 data-parallel processes" in line for line in again), again
    assert any("resuming from models/checkpoints/checkpoint-8" in line for line in again), again
    assert (two / "models" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_ranks_draw_their_own_dropout_and_share_the_shuffle(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(REPO_ROOT / "tests" / "ddp_dropout_probe.py"), str(tmp_path)]
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["different", "same"]
