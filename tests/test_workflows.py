"""The DVC workflows users drive, each with real `dvc` commands on clones of the tiny pipeline.

Experiments (`exp run -S`, `exp show`; `--queue` and `queue start` run in test_sweep_queue.py),
metrics and plots diffs across branches on a clone that never pulled, the local run-cache, and
determinism of a run from scratch.
The remote workflows (push, pull, `repro --pull`) are in test_remote.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench.tiny_models import build as build_tiny_base
from newsclf.preset import load_preset, set_param_args
from tests.pipeline_fixture import (
    clone,
    dvc,
    file_hashes,
    git,
    run_stages_in_one_process,
    set_params,
    stages_run,
)

pytestmark = pytest.mark.e2e  # on the worker that builds the tiny pipeline (tests/conftest.py)

# Everything a run writes that must not depend on when or where it ran (timings are apart:
# reports/export_speed.json, and reports/index.html which shows them).
REPRODUCIBLE = (
    "data/interim",
    "data/processed",
    "models/adapter",
    "reports/train",
    "reports/plots",
)
REPRODUCIBLE_FILES = (
    "reports/ingest.json",
    "reports/clean.json",
    "reports/tokens.json",
    "reports/label_issues.json",
    "reports/label_issues.md",
    "reports/augment.json",
    "reports/metrics.json",
    "reports/errors.csv",
    "reports/export.json",
)


def ok(result) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def reproducible_hashes(root: Path) -> dict[str, str]:
    hashes = file_hashes(root, *REPRODUCIBLE)
    hashes.update(
        {name: v for name, v in file_hashes(root, "reports").items() if name in REPRODUCIBLE_FILES}
    )
    assert len(hashes) > len(REPRODUCIBLE_FILES)  # the folders were there
    return hashes


def test_two_runs_from_scratch_are_identical(tmp_path: Path, tiny_pipeline: Path) -> None:
    # The tiny pipeline's `dvc repro` ran every stage (tests/test_e2e.py); a clone with no outputs
    # runs every stage again, in one fresh process, and writes the same bytes.
    fresh = clone(tiny_pipeline, tmp_path / "fresh", with_outputs=False)
    for out in ("data/processed/train.parquet", "models/adapter"):
        assert not (fresh / out).exists()
    run_stages_in_one_process(fresh)
    assert reproducible_hashes(fresh) == reproducible_hashes(tiny_pipeline)


def exp_records(root: Path) -> dict[str, dict]:
    """The experiments `dvc exp show --json` lists, as {name: {"params": ..., "metrics": ...}}."""
    records = {}
    for commit in json.loads(ok(dvc(root, "exp", "show", "--json"))):
        for exp in commit["experiments"] or []:
            for rev in exp["revs"]:
                records[rev["name"]] = {
                    "params": rev["data"]["params"]["params.yaml"]["data"],
                    "metrics": rev["data"]["metrics"]["reports/metrics.json"]["data"],
                }
    return records


def test_experiments_queue_and_branch_diffs(tmp_path: Path, tiny_pipeline: Path) -> None:
    work = clone(tiny_pipeline, tmp_path / "work", with_outputs=True)

    # `dvc exp run $(newsclf preset fast) -S ...`, as the README has it. The tiny pipeline already
    # runs the preset's label_issues and train.max_train_samples values, so label_issues and the
    # stages before it stay; only the stages that read a changed param run. (The multi-process
    # launcher `train.launcher` reaches the same command: test_multiprocess.py runs it.)
    # The experiment also swaps the base for a decoder (README, "Choosing a base model"): a tiny
    # random Qwen2 folder, trained, evaluated, exported and reported like the BERT of main.
    preset = load_preset("fast", work / "presets", work / "params.yaml")
    decoder = build_tiny_base("qwen2", tmp_path / "tiny-qwen2")
    overrides = ["-S", "train.lora.r=4", "-S", "train.learning_rate=0.01"]
    overrides += ["-S", f"train.base_model={decoder}"]
    out = ok(dvc(work, "exp", "run", "-n", "r4", *set_param_args(preset), *overrides))
    assert stages_run(out) == {"validate_params", "train", "evaluate", "export", "report"}
    adapter = json.loads((work / "models" / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["q_proj", "v_proj"]  # `auto` for qwen2
    card = (work / "models" / "onnx" / "README.md").read_text()
    assert "on `q_proj`, `v_proj`; trained in full: `score` |" in card
    assert json.loads((work / "models" / "onnx" / "newsclf_onnx.json").read_text())[
        "base_model"
    ] == str(decoder)
    export = json.loads((work / "reports" / "export.json").read_text())
    assert export["fusions"]["optimizer"] == "qwen3"  # ONNX Runtime's Llama-style decoder fusions

    records = exp_records(work)
    main_metrics = json.loads((tiny_pipeline / "reports" / "metrics.json").read_text())
    assert records["r4"]["params"]["train"]["lora"]["r"] == 4
    assert records["r4"]["params"]["train"]["learning_rate"] == 0.01
    assert records["r4"]["metrics"].keys() == main_metrics.keys()

    # An experiment becomes a branch; a fresh clone diffs it against main without any pull.
    ok(dvc(work, "exp", "branch", "r4", "lora-r4"))
    fresh = tmp_path / "fresh"
    git(tmp_path, "clone", "-q", str(work), str(fresh))
    assert not list(fresh.glob("data/*/*.parquet")) and not (fresh / ".dvc" / "cache").exists()
    branch = json.loads(git(fresh, "show", "origin/lora-r4:reports/metrics.json"))
    main = json.loads(git(fresh, "show", "main:reports/metrics.json"))

    diff = json.loads(
        ok(dvc(fresh, "metrics", "diff", "--all", "--json", "main", "origin/lora-r4"))
    )
    accuracy = diff["reports/metrics.json"]["accuracy"]
    assert (accuracy["old"], accuracy["new"]) == (main["accuracy"], branch["accuracy"])
    assert "macro_f1" in diff["reports/metrics.json"]
    params = json.loads(ok(dvc(fresh, "params", "diff", "--json", "main", "origin/lora-r4")))
    main_r = yaml.safe_load(git(fresh, "show", "main:params.yaml"))["train"]["lora"]["r"]
    assert params["params.yaml"]["train.lora.r"] == {"old": main_r, "new": 4, "diff": 4 - main_r}

    plots = json.loads(ok(dvc(fresh, "plots", "diff", "--json", "main", "origin/lora-r4")))
    for plot in ("confusion", "roc", "reports/train/plots/metrics/train/loss.tsv"):
        revisions = {rev for entry in plots["data"][plot] for rev in entry["revisions"]}
        assert revisions == {"main", "origin/lora-r4"}, plot
    rendered = tmp_path / "plots"
    ok(dvc(fresh, "plots", "diff", "main", "origin/lora-r4", "-o", str(rendered)))
    assert (rendered / "index.html").exists()


def test_a_refused_param_stops_before_any_stage_runs_or_output_is_removed(
    tmp_path: Path, tiny_pipeline: Path
) -> None:
    work = clone(tiny_pipeline, tmp_path / "work", with_outputs=True)
    outputs = ("models/adapter", "reports/train", "data/processed")
    before = file_hashes(work, *outputs)

    refused = dvc(work, "exp", "run", "-S", "train.epochs=abc")
    assert refused.returncode != 0
    assert "params.yaml train.epochs: expected float, got str 'abc'" in refused.stderr
    assert stages_run(refused.stdout) == {"validate_params"}
    assert file_hashes(work, *outputs) == before

    # A typo'd key beside up-to-date stages, and an unknown section: both named, nothing runs.
    git(work, "checkout", "params.yaml")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["train"]["lr"] = 0.01
    params["trian"] = {"epochs": 1}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    refused = dvc(work, "repro")
    assert refused.returncode != 0
    assert "params.yaml: unknown section(s) ['trian']" in refused.stderr
    assert "params.yaml: unknown key(s) train.lr" in refused.stderr
    assert stages_run(refused.stdout) == {"validate_params"}
    assert file_hashes(work, *outputs) == before


def test_local_run_cache_restores_a_stage(tmp_path: Path, tiny_pipeline: Path) -> None:
    work = clone(tiny_pipeline, tmp_path / "work", with_outputs=True)
    before = file_hashes(work, "data/interim")
    min_chars = yaml.safe_load((work / "params.yaml").read_text())["clean"]["min_chars"]
    set_params(work, {"clean.min_chars": min_chars + 20})
    assert stages_run(ok(dvc(work, "repro", "clean"))) == {"validate_params", "clean"}
    assert file_hashes(work, "data/interim") != before

    # Back to a value that has run before: restored from the run-cache, not recomputed.
    set_params(work, {"clean.min_chars": min_chars})
    out = ok(dvc(work, "repro", "clean"))
    assert "Stage 'clean' is cached - skipping run, checking out outputs" in out
    # validate_params checks params every time they change: its output is in git, not cached.
    assert stages_run(out) == {"validate_params"}
    assert file_hashes(work, "data/interim") == before


@pytest.mark.browser
def test_decisions_made_in_the_browser_change_the_next_training_table(
    tmp_path: Path, tiny_pipeline: Path
) -> None:
    """`newsclf review` on the tiny pipeline's suspects: in Chromium one row is relabelled by its
    class key, one dropped, one kept; after a reload the page shows them; `dvc status` sees the
    reviews file changed, and `dvc repro augment` trains on the changed table."""
    import polars as pl

    from newsclf import review
    from stages.reviews import read_reviews
    from tests.pipeline_fixture import AG_NEWS_LABELS as LABELS
    from tests.test_review import browser_or_skip, serving

    sync_playwright, chromium = browser_or_skip()
    work = clone(tiny_pipeline, tmp_path / "work", with_outputs=True, upto="augment")
    reviews_file = work / "data" / "reviews" / "labels.csv"
    review_set = review.load_review_set(
        work / "data" / "interim" / "label_issues.parquet", LABELS, all_ranked=3
    )
    app = review.create_app(review_set, reviews_file, "tester", ["127.0.0.1"])
    with serving(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page()
            page.goto(url)
            page.locator(".item.current").wait_for()
            order = page.locator(".item").evaluate_all("(items) => items.map(i => i.dataset.id)")
            first, second, third = order[:3]
            given = dict(
                pl.read_parquet(work / "data" / "interim" / "label_issues.parquet")
                .select("id", "label")
                .iter_rows()
            )
            new_label = LABELS[(given[first] + 1) % len(LABELS)]
            page.keyboard.press(review.class_keys(LABELS)[new_label])
            page.locator(f'.item.current[data-id="{second}"]').wait_for()
            page.keyboard.press("d")
            page.locator(f'.item.current[data-id="{third}"]').wait_for()
            page.keyboard.press("k")
            page.locator("#progress").filter(has_text="3 of").wait_for()
            page.reload()
            page.locator(".item .badge.drop").wait_for()
            badges = page.locator(".item .badge").all_inner_texts()[:3]
            assert badges == [f"relabel → {new_label}", "drop", "keep"]
        finally:
            browser.close()
    decided = read_reviews(reviews_file, LABELS)
    assert {k: r.decision for k, r in decided.items()} == {
        first: "relabel",
        second: "drop",
        third: "keep",
    }
    assert "data/reviews/labels.csv" in dvc(work, "status").stdout
    result = dvc(work, "repro", "augment")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "augment" in stages_run(result.stdout) and "label_issues" not in stages_run(
        result.stdout
    )
    train = dict(
        pl.read_parquet(work / "data" / "processed" / "train.parquet")
        .filter(pl.col("op") == "original")
        .select("id", "label")
        .iter_rows()
    )
    assert train[first] == LABELS.index(new_label)
    assert second not in train
    assert train[third] == given[third]
    augment = json.loads((work / "reports" / "augment.json").read_text())
    assert augment["reviews"]["applied"] == 3 and augment["reviews"]["stale"]["count"] == 0
