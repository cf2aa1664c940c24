"""`newsclf sweep`: the sweep file, the selection on held-out rows and its interval, `apply`.

The run through DVC's queue, on a small project, is in test_sweep_queue.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from newsclf import sweep as sw
from tests.pipeline_fixture import REPO_ROOT


def write_sweep(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def load(tmp_path: Path, body: dict) -> sw.Sweep:
    return sw.load_sweep(write_sweep(tmp_path, body), REPO_ROOT / "params.yaml")


def test_points_are_the_grid_times_the_explicit_points_with_ranges(tmp_path):
    sweep = load(
        tmp_path,
        {
            "seeds": [1, 2],
            "points": [{}, {"train.finetune": "full"}],
            "grid": {
                "train.learning_rate": {"low": 1e-4, "high": 1e-2, "num": 3, "scale": "log"},
                "train.lora.r": {"start": 4, "stop": 12, "step": 4},
            },
        },
    )
    assert sweep.name == "s" and sweep.stage == "train" and sweep.metric == "accuracy"
    assert len(sweep.points) == 2 * 3 * 3
    assert sweep.points[0] == {"train.learning_rate": 0.0001, "train.lora.r": 4}
    assert {p["train.learning_rate"] for p in sweep.points} == {0.0001, 0.001, 0.01}
    assert {p["train.lora.r"] for p in sweep.points} == {4, 8, 12}
    assert sweep.varied == ["train.learning_rate", "train.lora.r", "train.finetune"]
    plan = sw.planned(sweep)
    names = [name for _, _, name in plan]
    assert len(set(names)) == len(names) == 36
    # Every point's first seed runs before any second seed; a name is stable and says its seed.
    assert [seed for _, seed, _ in plan[:18]] == [1] * 18
    assert names[0] == sweep.experiment(sweep.points[0], 1) and names[0].endswith("-s1")
    again = load(tmp_path, {"seeds": [1], "points": [sweep.points[0]]})
    assert again.experiment(again.points[0], 1) == names[0]


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"metric": "test_accuracy"}, "never the test split"),
        ({"stage": "augment"}, "stage 'augment'"),
        ({"grid": {"train.lr": [1, 2]}}, "`train.lr` is not a key of"),
        ({"points": [{"train.seed": 3}]}, "`train.seed` comes from `seeds`"),
        ({"seeds": [1, 1]}, "repeats a seed"),
        ({"grid": {"train.lora.r": []}}, "grid.train.lora.r: an empty list"),
        ({"grid": {"train.lora.r": [4, 8]}, "budget": {"max_experiments": 1}}, "2 experiments"),
        ({"seeds": [1], "points": [{"seeds": [2]}]}, "points[0].seeds: a non-empty subset"),
        ({"set": {"train.epochs": 1}, "grid": {"train.epochs": [1, 2]}}, "both in `set`"),
        ({"grid": {"train.launcher": ["torchrun --nproc_per_node 2"]}}, "blanks or quotes"),
        ({"typo": 1}, "unknown key(s) ['typo']"),
    ],
)
def test_a_bad_sweep_file_is_refused_naming_what_is_wrong(tmp_path, body, said):
    with pytest.raises(sw.SweepError, match=None) as err:
        load(tmp_path, body)
    assert said in str(err.value) and "s.yaml" in str(err.value)


def rows_for(correct: list[bool], seed: int = 1) -> dict:
    """Held-out rows of one seed: given label 0, predicted 0 where `correct`."""
    return {(seed, f"r{i}"): (0, 0 if ok else 1) for i, ok in enumerate(correct)}


def test_the_margin_interval_says_when_two_points_do_not_differ():
    winner = sw.PointResult({}, {1: "a"}, {1: 0.9}, rows=rows_for([True] * 90 + [False] * 10))
    same = sw.PointResult({}, {1: "b"}, {1: 0.9}, rows=rows_for([True] * 90 + [False] * 10))
    worse = sw.PointResult({}, {1: "c"}, {1: 0.6}, rows=rows_for([True] * 60 + [False] * 40))
    tie = sw.paired_interval("accuracy", winner, same, 4)
    assert tie["margin"] == 0 and tie["low"] == tie["high"] == 0 and not tie["significant"]
    clear = sw.paired_interval("accuracy", winner, worse, 4)
    assert clear["n_rows"] == 100 and clear["margin"] == pytest.approx(0.3)
    assert 0 < clear["low"] < 0.3 < clear["high"] and clear["significant"]
    # One row apart out of 100: inside the noise.
    close = sw.PointResult({}, {1: "d"}, {1: 0.89}, rows=rows_for([True] * 89 + [False] * 11))
    near = sw.paired_interval("accuracy", winner, close, 4)
    assert near["low"] <= 0 <= near["high"] and not near["significant"]
    assert sw.paired_interval("macro_f1", winner, worse, 4)["significant"]
    # One-sided where a direction is asked: a clear loss is no significant win.
    backwards = sw.paired_interval("accuracy", worse, winner, 4, better="max")
    assert backwards["high"] < 0 and not backwards["significant"]
    assert sw.paired_interval("accuracy", worse, winner, 4, better="min")["significant"]


class FakeRepo:
    """Experiment commits whose validation files favour one point and test metrics the other;
    records every file selection asks for."""

    def __init__(self, sweep: sw.Sweep, accuracy: dict[str, float]) -> None:
        self.commits = {}
        self.files = {}
        self.asked: set[str] = set()
        for point, _seed, name in sw.planned(sweep):
            value = accuracy[json.dumps(point, sort_keys=True)]
            n_right = round(100 * value)
            self.commits[name] = f"sha-{name}"
            # Experiments run before reviewed labels named the truth column given_label.
            truth = "given_label" if len(self.commits) % 2 else "scored_label"
            predictions = f"id,{truth},label,predicted\n" + "".join(
                f"r{i},0,0,{0 if i < n_right else 1}\n" for i in range(100)
            )
            self.files[(f"sha-{name}", sw.VALIDATION_FILE)] = json.dumps(
                {"accuracy": value, "macro_f1": value}
            )
            self.files[(f"sha-{name}", sw.PREDICTIONS_FILE)] = predictions
            # The test split says the opposite: selection must not look.
            self.files[(f"sha-{name}", "reports/metrics.json")] = json.dumps(
                {"accuracy": 1 - value}
            )

    def read(self, commit: str, path: str) -> str:
        self.asked.add(path)
        return self.files[(commit, path)]


def test_selection_reads_validation_files_only_and_ranks_by_them(tmp_path, monkeypatch):
    sweep = load(tmp_path, {"seeds": [1, 2], "grid": {"train.lora.r": [4, 8, 16]}})
    accuracy = {
        json.dumps({"train.lora.r": 4}): 0.70,
        json.dumps({"train.lora.r": 8}): 0.95,
        json.dumps({"train.lora.r": 16}): 0.80,
    }
    repo = FakeRepo(sweep, accuracy)
    monkeypatch.chdir(tmp_path)  # no journal here
    results = sw.collect(sweep, read=repo.read, experiments=repo.commits)
    assert repo.asked == {sw.VALIDATION_FILE, sw.PREDICTIONS_FILE}
    summary = sw.summarize(sweep, results, 4)
    assert summary["winner"]["point"] == {"train.lora.r": 8}  # best on validation, worst on test
    ranks = {e["point"]["train.lora.r"]: e["rank"] for e in summary["points"]}
    assert ranks == {8: 1, 16: 2, 4: 3}
    assert summary["winner"]["verdict"] == "significant"
    margin = summary["winner"]["margin_over_runner_up"]
    # Paired over both seeds' rows: 100 held-out rows each.
    assert margin["n_rows"] == 200 and margin["margin"] == pytest.approx(0.15)
    # How far each change moved the metric from the first point (r=4), over the same rows.
    lever = {e["point"]["train.lora.r"]: e.get("vs_first_point") for e in summary["points"]}
    assert lever[4] is None and lever[8]["margin"] == pytest.approx(0.25)
    assert lever[16]["margin"] == pytest.approx(0.10) and lever[16]["significant"]
    table = sw.table(sweep, summary)
    assert "first point" in table.splitlines()[-2]  # r=4 ranks last
    assert table.splitlines()[2].startswith("1     lora.r=8")
    sw.plot(sweep, results, tmp_path / "sweep.png", summary)
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_and_missing_experiments_are_reported_not_ranked(tmp_path, monkeypatch):
    sweep = load(tmp_path, {"seeds": [1], "grid": {"train.lora.r": [4, 8, 16]}})
    accuracy = {json.dumps({"train.lora.r": r}): 0.9 for r in (4, 8, 16)}
    repo = FakeRepo(sweep, accuracy)
    monkeypatch.chdir(tmp_path)
    failed = sweep.experiment({"train.lora.r": 8}, 1)
    sw.record(sweep, failed, {"status": "failed", "seconds": 3.0, "reason": "ERROR: r too big"})
    del repo.commits[failed]
    del repo.commits[sweep.experiment({"train.lora.r": 16}, 1)]
    summary = sw.summarize(sweep, sw.collect(sweep, read=repo.read, experiments=repo.commits), 4)
    status = {e["point"]["train.lora.r"]: e["status"] for e in summary["points"]}
    assert status == {4: "complete", 8: "failed", 16: "not run"}
    assert summary["points"][1]["failed"] == {"1": "ERROR: r too big"}
    assert summary["winner"]["verdict"] == "only one complete point"
    assert "failed: ERROR: r too big" in sw.table(sweep, summary)


def test_apply_writes_the_point_into_params_keeping_comments(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO_ROOT / "params.yaml").read_text())
    before = params.read_text()
    changed = sw.set_params(params, {"train.lora.r": 32, "train.lora.target_modules": "all-linear"})
    assert changed == {"train.lora.r": (8, 32), "train.lora.target_modules": ("auto", "all-linear")}
    after = params.read_text()
    assert yaml.safe_load(after)["train"]["lora"]["r"] == 32
    # Only those two lines changed: every comment and every other line is as it was.
    diff = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert [b.split("#")[0].strip() for _, b in diff] == ["r: 32", "target_modules: all-linear"]
    assert sw.set_params(params, {"train.lora.r": 32}) == {}


def test_a_point_that_drops_rows_is_ranked_on_the_rows_every_point_scored(tmp_path):
    sweep = load(tmp_path, {"seeds": [1], "points": [{}, {"label_issues.action": "drop"}]})
    # Flagging keeps the 10 hard rows (gets 4 of them right); dropping removes them from its
    # validation slice, so its own score looks better while it is worse on the shared rows.
    keep = rows_for([True] * 88 + [False] * 2 + [True] * 4 + [False] * 6)
    drop = {k: v for k, v in rows_for([True] * 85 + [False] * 5 + [True] * 10).items()}
    for i in range(90, 100):
        del drop[(1, f"r{i}")]
    flag_point = sw.PointResult({}, {1: "a"}, {1: 0.92}, rows=keep)
    drop_point = sw.PointResult({"label_issues.action": "drop"}, {1: "b"}, {1: 85 / 90}, rows=drop)
    summary = sw.summarize(sweep, [flag_point, drop_point], 4)
    assert drop_point.mean > flag_point.mean  # on its own, easier rows
    assert summary["winner"]["point"] == {}  # on the 90 rows both scored: 88 right against 85
    assert summary["ranked_on"].startswith("90 held-out rows")
    # The winner's margin is on those same rows, so it agrees with the ranking.
    margin = summary["points"][1]["winner_margin"]
    assert margin["n_rows"] == 90 and margin["margin"] == pytest.approx(3 / 90, abs=1e-6)
    assert [e["common_rows_mean"] for e in summary["points"]] == [
        pytest.approx(88 / 90, abs=1e-6),
        pytest.approx(85 / 90, abs=1e-6),
    ]


def test_rows_scored_against_different_labels_are_left_out_of_the_ranking(tmp_path):
    """A review between two experiments relabels r0: each point scored it against another label,
    so it ranks neither and the summary says so."""
    sweep = load(tmp_path, {"seeds": [1], "points": [{}, {"train.lora.r": 16}]})
    before = rows_for([True] * 90 + [False] * 10)
    after = rows_for([True] * 80 + [False] * 20)
    after[(1, "r0")] = (3, 3)  # the person's label, and predicted so: right against it
    first = sw.PointResult({}, {1: "a"}, {1: 0.9}, rows=before)
    second = sw.PointResult({"train.lora.r": 16}, {1: "b"}, {1: 0.8}, rows=after)
    summary = sw.summarize(sweep, [first, second], 4)
    assert summary["ranked_on"].startswith("99 held-out rows")
    assert "1 left out, scored against different labels" in summary["ranked_on"]
    assert second.common == pytest.approx(79 / 99) and first.common == pytest.approx(89 / 99)
    assert summary["points"][1]["vs_first_point"]["n_rows"] == 99


def test_a_point_stopped_after_its_first_seed_is_shown_not_ranked(tmp_path, monkeypatch):
    sweep = load(
        tmp_path,
        {"seeds": [1, 2], "points": [{}, {"train.lora.r": 16, "seeds": [1]}, {"train.lora.r": 4}]},
    )
    assert [(p, s) for p, s, _ in sw.planned(sweep)] == [
        ({}, 1),
        ({"train.lora.r": 16}, 1),
        ({"train.lora.r": 4}, 1),
        ({}, 2),
        ({"train.lora.r": 4}, 2),
    ]
    accuracy = {
        json.dumps({}): 0.80,
        json.dumps({"train.lora.r": 16}): 0.99,  # best on its one seed, but not ranked
        json.dumps({"train.lora.r": 4}): 0.85,
    }
    repo = FakeRepo(sweep, accuracy)
    monkeypatch.chdir(tmp_path)
    summary = sw.summarize(sweep, sw.collect(sweep, read=repo.read, experiments=repo.commits), 4)
    status = [(e["status"], e["rank"]) for e in summary["points"]]
    assert status == [("complete", 2), ("stopped early", None), ("complete", 1)]
    assert summary["points"][1]["vs_first_point"]["margin"] == pytest.approx(0.19)


def test_floats_without_a_dot_are_numbers_in_the_sweep_and_in_what_apply_writes(tmp_path):
    path = tmp_path / "s.yaml"
    # As people write them; YAML 1.1 (yaml.safe_load) reads 5e-5 and 1e-4 as strings.
    path.write_text(
        "points:\n  - {train.learning_rate: 5e-5}\n"
        "grid:\n  train.weight_decay: {low: 1e-4, high: 1e-2, num: 3, scale: log}\n"
    )
    assert yaml.safe_load(path.read_text())["points"][0]["train.learning_rate"] == "5e-5"
    sweep = sw.load_sweep(path, REPO_ROOT / "params.yaml")
    assert sweep.points[0] == {"train.learning_rate": 5e-05, "train.weight_decay": 0.0001}
    params = tmp_path / "params.yaml"
    params.write_text((REPO_ROOT / "params.yaml").read_text())
    sw.set_params(params, sweep.points[0])
    from stages.common import load_params

    assert load_params("train", params)["learning_rate"] == 5e-05  # a number, not '5e-05'


@pytest.mark.parametrize(
    ("budget", "said"),
    [({"hours": "two"}, "budget.hours"), ({"max_experiments": 0}, "budget.max_experiments")],
)
def test_a_bad_budget_is_refused(tmp_path, budget, said):
    with pytest.raises(sw.SweepError, match=said):
        load(tmp_path, {"budget": budget})
