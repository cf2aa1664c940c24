"""A temporary git + DVC copy of this repository's pipeline over a small raw-data fixture.

Used by the tests that drive real `dvc` commands (end to end, remotes, run-cache).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import yaml

from newsclf.preset import load_preset

REPO_ROOT = Path(__file__).resolve().parents[1]
# What a stage may import or read from the repository (beyond the data it is given).
PIPELINE_PATHS = (
    "stages",
    "metrics",
    "newsclf",
    "presets",
    "data/reviews",
    "dvc.yaml",
    "params.yaml",
)

TRAIN_CSV = (
    '"3","Wall St. Bears Claw Back","Reuters - Short-sellers, Wall Street\'s dwindling\\band of '
    'ultra-cynics, are seeing green again."\n'
    '"3","Wall St. Bears Claw Back","Reuters - Short-sellers, Wall Street\'s dwindling\\band of '
    'ultra-cynics, are seeing green again."\n'
    '"4","New chip unveiled","Intel #36;2 billion plan &lt;b&gt;for&lt;/b&gt; faster chips."\n'
    '"9","Bad label","This row has a label out of range."\n'
    '"2","Team wins cup","The home side won the final at http://sports.example.com today."\n'
)
TEST_CSV = (
    '"1","Talks resume","Negotiators met on Monday in Geneva to resume talks."\n'
    '"2","Cup final tonight","Fans gather for the final match of the season."\n'
)
# The class names of AG News, as params.yaml gives them (the tests' own copy: a test of the AG News
# layout must not change when a user sets other labels).
AG_NEWS_LABELS: tuple[str, ...] = ("World", "Sports", "Business", "Sci/Tech")
# Class-specific words, so that even a tiny model can learn something from a few dozen rows.
TOPIC_WORDS = (
    ("election", "minister", "parliament", "treaty", "embassy", "rebels"),
    ("match", "goal", "season", "coach", "league", "striker"),
    ("shares", "profit", "market", "bank", "earnings", "investors"),
    ("software", "chip", "internet", "space", "computer", "researchers"),
)
GIT_ENV = {
    "GIT_AUTHOR_NAME": "newsclf tests",
    "GIT_AUTHOR_EMAIL": "tests@newsclf.invalid",
    "GIT_COMMITTER_NAME": "newsclf tests",
    "GIT_COMMITTER_EMAIL": "tests@newsclf.invalid",
}


def tool_env() -> dict[str, str]:
    """This interpreter's bin folder first on PATH, so `python` in dvc.yaml is the test's Python."""
    return dict(
        os.environ, **GIT_ENV, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    )


def dvc(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`dvc ARGS` in `cwd` with this interpreter; `env`: variables to set for it."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        env=tool_env() | (env or {}),
        capture_output=True,
        text=True,
        check=False,
    )


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, env=tool_env(), capture_output=True, text=True, check=True
    ).stdout


def make_project(root: Path) -> Path:
    """Copy the pipeline into `root`, write the raw fixture, point `ingest.sources` at it, git+dvc init."""
    root.mkdir(parents=True)
    for name in PIPELINE_PATHS:
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, root / name)
    raw = root / "data" / "raw" / "fixture"
    raw.mkdir(parents=True)
    (raw / "train.csv").write_text(TRAIN_CSV)
    (raw / "test.csv").write_text(TEST_CSV)
    # A World row: with it, every class has a train row (ingest requires that). Under 40 chars, so
    # that raising clean.min_chars by 20 removes it (the run-cache test relies on that).
    pl.DataFrame({"text": ["Leaders meet for peace talks"], "label": [0]}).write_parquet(
        raw / "extra.parquet"
    )
    set_params(
        root,
        {
            "ingest.sources": [
                {"path": "data/raw/fixture/train.csv", "split": "train"},
                {"path": "data/raw/fixture/extra.parquet", "split": "train"},
                {"path": "data/raw/fixture/test.csv", "split": "test"},
            ],
            "tokenize.n_process": 1,
            # one train row of five is a deliberate fault (label 9)
            "ingest.max_rejected_share": 0.5,
        },
    )
    git(root, "init", "-q", "-b", "main")
    assert dvc(root, "init", "-q").returncode == 0
    # The custom plot templates dvc.yaml names (`dvc init` makes an empty .dvc/).
    shutil.copytree(REPO_ROOT / ".dvc" / "plots", root / ".dvc" / "plots")
    commit_all(root, "pipeline and raw fixture")
    return root


def commit_all(root: Path, message: str) -> None:
    git(root, "add", "-A")
    git(root, "commit", "-qm", message)


def synthetic_rows(per_class: int, offset: int = 0) -> list[dict]:
    """HF-layout rows (`text`, `label` 0-3) built from each class's words; deterministic."""
    rows = []
    for label, words in enumerate(TOPIC_WORDS):
        for i in range(offset, offset + per_class):
            picked = [words[(i + k) % len(words)] for k in range(4)]
            rows.append(
                {
                    "text": f"Report {i}: the {picked[0]} and the {picked[1]} news, {picked[2]} "
                    f"{picked[3]} today",
                    "label": label,
                }
            )
    return rows


def add_synthetic_sources(root: Path, train_per_class: int, test_per_class: int) -> None:
    """Write synthetic train/test JSONL sources (large enough for K folds) and list them."""
    raw = root / "data" / "raw" / "fixture"
    for name, rows in (
        ("synthetic_train.jsonl", synthetic_rows(train_per_class)),
        ("synthetic_test.jsonl", synthetic_rows(test_per_class, offset=1000)),
    ):
        (raw / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = yaml.safe_load((root / "params.yaml").read_text())
    sources = params["ingest"]["sources"]
    sources.insert(-1, {"path": "data/raw/fixture/synthetic_train.jsonl", "split": "train"})
    sources.append({"path": "data/raw/fixture/synthetic_test.jsonl", "split": "test"})
    set_params(root, {"ingest.sources": sources})
    commit_all(root, "synthetic sources")


def set_params(root: Path, values: dict[str, object]) -> None:
    """Set dotted keys in `root/params.yaml`."""
    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in values.items():
        *parents, key = dotted.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def file_hashes(root: Path, *folders: str) -> dict[str, str]:
    """md5 of every file under `folders` of `root`, by path relative to `root`."""
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for folder in folders
        for p in sorted((root / folder).rglob("*"))
        if p.is_file()
    }


def tiny_pipeline_params(model_dir: Path) -> dict[str, object]:
    """The `fast` preset (presets/fast.yaml) plus what fits it to the tiny model and fixture data."""
    preset = load_preset("fast", REPO_ROOT / "presets", REPO_ROOT / "params.yaml")
    return {
        **preset,
        "label_issues.folds": 3,
        "augment.synonym_model": str(model_dir),
        "train.base_model": str(model_dir),
        "train.epochs": 1,
        "train.batch_size": 8,
        # One process: a launcher's start-up would cost more than the tiny run it splits
        # (test_multiprocess.py runs `auto`).
        "train.launcher": "python",
        "train.max_length": 32,
        "train.val_fraction": 0.2,
        # QLoRA end to end: a 4-bit base in train, its adapter merged into fp32 by evaluate and
        # export (whose fp32 parity bound still holds).
        "train.quantization": "4bit",
        "export.parity.n_texts": 16,
        # A random tiny model's logits sit close together, so int8 rounding flips some top-1 picks;
        # the parity bound itself is tested in test_export.py.
        "export.parity.min_int8_agreement": 0.0,
    }


def build_tiny_pipeline(root: Path, model_dir: Path) -> Path:
    """`make_project` + synthetic sources + tiny params, then a full `dvc repro`, committed; what
    `dvc repro` printed is kept beside the project (REPRO_LOG), for the tests of what it ran."""
    project = make_project(root)
    add_synthetic_sources(project, train_per_class=12, test_per_class=5)
    set_params(project, tiny_pipeline_params(model_dir))
    result = dvc(project, "repro")
    assert result.returncode == 0, result.stdout + result.stderr
    (project.parent / REPRO_LOG).write_text(result.stdout)
    commit_all(project, "pipeline run")
    return project


REPRO_LOG = "repro_stdout.txt"  # beside a built tiny pipeline: its `dvc repro` output


def run_all_stages() -> None:
    """Every stage's `main()` in dvc.yaml's order, as `dvc repro` runs them from scratch, from the
    current directory (a project's root)."""
    for name in yaml.safe_load(Path("dvc.yaml").read_text())["stages"]:
        importlib.import_module(f"stages.{name}").main()


def run_stages_in_one_process(project: Path) -> None:
    """What `dvc repro` computes from scratch, in one fresh Python process from the project's
    root: each stage's `main()` in dvc.yaml's order, the modules imported once instead of once per
    stage (about 20 s less on the tiny pipeline). DVC's own part, running the stages as dvc.yaml
    wires them, is what the tiny pipeline's `dvc repro` and the workflow tests exercise."""
    # `stages` from the project (the current directory comes first), `tests` from this checkout.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from tests.pipeline_fixture import run_all_stages; run_all_stages()",
        ],
        cwd=project,
        env=tool_env() | {"PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]


def clone(src: Path, dest: Path, with_outputs: bool, upto: str | None = None) -> Path:
    """A git clone of `src`; `with_outputs` gives it a copy of src's DVC cache (run-cache included)
    and checks the outputs out (of stage `upto` and those before it, if given). A copy, not a
    shared cache: what a test runs in its clone never reaches `src`'s cache or run-cache, so no
    test can restore another test's run."""
    git(src.parent, "clone", "-q", str(src), str(dest))
    if with_outputs:
        shutil.copytree(src / ".dvc" / "cache", dest / ".dvc" / "cache")
        result = dvc(dest, "checkout", *(("--with-deps", upto) if upto else ()))
        assert result.returncode == 0, result.stdout + result.stderr
    return dest


def build_tokenized_project(root: Path) -> Path:
    """`make_project` + `dvc repro tokenize` from scratch, committed: the data stages on the raw
    fixture, for the tests of those stages under dvc and of remotes."""
    project = make_project(root)
    result = dvc(project, "repro", "tokenize")
    assert result.returncode == 0, result.stdout + result.stderr
    commit_all(project, "data stages run")
    return project


def stages_run(output: str) -> set[str]:
    """Names of the stages a `dvc repro` / `dvc exp run` output says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}
