"""`newsclf sweep run|show|apply FILE`: search a recipe with DVC's own experiment queue, choose it on
held-out train rows, and write the winner into params.yaml.

A sweep is a YAML file (`sweeps/*.yaml`, see `sweeps/recipe.yaml`): the params to vary (a grid of
lists or ranges, and/or explicit points), the seeds, the stage every experiment runs up to, the
validation metric and direction to select by, params every point shares (`set`), and a budget.

- `run` queues one `dvc exp run --queue -n NAME -S ... STAGE` per point and seed, starts one queue
  worker (`dvc queue start`; parallel workers are unreliable: iterative/dvc#10673, #10562), prints
  a line per finished experiment, and records failures with their reason in the sweep's journal
  (`reports/sweeps/NAME.json`). An experiment's name is the sweep's name, a hash of its point and
  its seed: a second `run` finds what is done, queued, running or failed and queues only the rest.
- `show` reads each experiment's `reports/train/validation.json` and per-row
  `reports/train/val_predictions.csv` from its commit (never a test metric), ranks the points by
  their mean over seeds, and gives the winner's margin over every other point with a 95% paired
  bootstrap interval over the same held-out rows. It prints the table and writes `reports/sweep.json`
  and a plot of the metric against each varied param.
- `apply` writes the winner's varied params into params.yaml (comments kept), as `dvc exp apply`
  would for the best experiment; `set` params (selection settings such as a larger validation
  slice) are not written.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import itertools
import json
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from newsclf.preset import PARAMS_FILE, PresetError, _has_key, set_param_args
from stages.common import read_params_file

# What selection may read from an experiment: validation scores of held-out train rows only.
VALIDATION_FILE = "reports/train/validation.json"
PREDICTIONS_FILE = "reports/train/val_predictions.csv"
METRICS = ("accuracy", "macro_f1")
# Stages that write VALIDATION_FILE or run after the stage that does (dvc.yaml).
STAGES = ("train", "evaluate", "export", "report")
JOURNAL_DIR = Path("reports/sweeps")
REPORT = Path("reports/sweep.json")
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
POLL_S = 5.0  # each `dvc queue status` costs a second of CPU the experiments could use
# DVC's experiment refs: refs/exps/<baseline sha, 2 + 38 hex digits>/<experiment name>.
EXP_REF = re.compile(r"^refs/exps/[0-9a-f]{2}/[0-9a-f]{38}/(?P<name>[^/]+)$")
SWEEP_KEYS = {"name", "stage", "seeds", "metric", "direction", "set", "grid", "points", "budget"}


class SweepError(Exception):
    """A malformed sweep file, or a DVC command that failed for the sweep as a whole."""


@dataclass(frozen=True)
class Budget:
    max_experiments: int  # the sweep is refused when its points times seeds exceed this
    hours: float | None  # once spent, queued experiments are taken off the queue (run resumes)


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    stage: str
    seeds: tuple[int, ...]
    metric: str
    direction: str
    fixed: dict[str, Any]  # `set`: every experiment gets these; `apply` does not write them
    points: tuple[dict[str, Any], ...]  # each point's own params (grid x points, in order)
    budget: Budget
    # The seeds each point runs: all of `seeds`, or the subset a point names (`seeds: [42]` in
    # the point: stopped early, as successive halving stops the points behind after one seed).
    point_seeds: tuple[tuple[int, ...], ...] = ()

    def seeds_of(self, index: int) -> tuple[int, ...]:
        return self.point_seeds[index] if self.point_seeds else self.seeds

    @property
    def varied(self) -> list[str]:
        """The params whose value differs between points, in first-seen order."""
        keys = dict.fromkeys(k for point in self.points for k in point)
        return [k for k in keys if len({_canon(p.get(k)) for p in self.points}) > 1]

    def experiment(self, point: dict[str, Any], seed: int) -> str:
        digest = hashlib.sha256(_canon({"point": point, "set": self.fixed}).encode()).hexdigest()
        return f"{self.name}-{digest[:8]}-s{seed}"

    def overrides(self, point: dict[str, Any], seed: int) -> dict[str, Any]:
        return self.fixed | point | {"train.seed": seed}


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def expand(spec: Any, where: str) -> list[Any]:
    """A grid entry's values: a list, `{low, high, num[, scale: linear|log]}` (both ends kept), or
    `{start, stop, step}` (stop kept when a step lands on it)."""
    if isinstance(spec, list):
        if not spec:
            raise SweepError(f"{where}: an empty list")
        return spec
    if isinstance(spec, dict) and {"low", "high", "num"} <= spec.keys():
        low, high, num = spec["low"], spec["high"], int(spec["num"])
        scale = spec.get("scale", "linear")
        if num < 2 or scale not in ("linear", "log") or (scale == "log" and min(low, high) <= 0):
            raise SweepError(f"{where}: needs num >= 2, scale linear|log, positive ends for log")
        values = np.geomspace(low, high, num) if scale == "log" else np.linspace(low, high, num)
        return [float(f"{v:.6g}") for v in values]
    if isinstance(spec, dict) and {"start", "stop", "step"} <= spec.keys():
        start, stop, step = spec["start"], spec["stop"], spec["step"]
        if step <= 0 or stop < start:
            raise SweepError(f"{where}: needs step > 0 and stop >= start")
        n = int(math.floor((stop - start) / step + 1e-9)) + 1
        values = [start + i * step for i in range(n)]
        ints = all(isinstance(v, int) for v in (start, stop, step))
        return [v if ints else float(f"{v:.6g}") for v in values]
    raise SweepError(
        f"{where}: expected a list, {{low, high, num[, scale]}} or {{start, stop, step}}"
    )


def load_sweep(path: Path, params_file: Path = PARAMS_FILE) -> Sweep:
    """The sweep in `path`, every key checked against params.yaml and every field validated."""
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    try:
        raw = read_params_file(path)  # YAML 1.2 floats (5e-5), as the stages read params
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping with {sorted(SWEEP_KEYS)}")
    if unknown := sorted(set(raw) - SWEEP_KEYS):
        raise SweepError(f"{path}: unknown key(s) {unknown} (known: {sorted(SWEEP_KEYS)})")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise SweepError(f"{path}: name {name!r}: letters, digits, `_`, `.` and `-` only")
    stage = raw.get("stage", "train")
    if stage not in STAGES:
        raise SweepError(
            f"{path}: stage {stage!r}: one of {list(STAGES)} (the validation scores are train's)"
        )
    metric = raw.get("metric", "accuracy")
    if metric not in METRICS:
        raise SweepError(
            f"{path}: metric {metric!r}: one of {list(METRICS)} of {VALIDATION_FILE} (selection "
            "reads held-out train rows only, never the test split)"
        )
    direction = raw.get("direction", "max")
    if direction not in ("max", "min"):
        raise SweepError(f"{path}: direction {direction!r}: max or min")
    seeds = raw.get("seeds", [42])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise SweepError(f"{path}: seeds: a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{path}: seeds: {seeds} repeats a seed")
    fixed = raw.get("set") or {}
    grid = raw.get("grid") or {}
    explicit = raw.get("points") or [{}]
    if not isinstance(fixed, dict) or not isinstance(grid, dict) or not isinstance(explicit, list):
        raise SweepError(f"{path}: `set` and `grid` are mappings, `points` a list of mappings")
    axes = {key: expand(spec, f"{path}: grid.{key}") for key, spec in grid.items()}
    points: list[dict[str, Any]] = []
    point_seeds: list[tuple[int, ...]] = []
    for i, base in enumerate(explicit):
        if not isinstance(base, dict):
            raise SweepError(f"{path}: points[{i}]: a mapping of dotted params keys to values")
        base = dict(base)
        own = base.pop("seeds", seeds)
        if not isinstance(own, list) or not own or not set(own) <= set(seeds):
            raise SweepError(f"{path}: points[{i}].seeds: a non-empty subset of seeds {seeds}")
        for combo in itertools.product(*axes.values()):
            point = base | dict(zip(axes, combo, strict=True))
            if _canon(point) not in {_canon(p) for p in points}:
                points.append(point)
                point_seeds.append(tuple(s for s in seeds if s in own))
    params = read_params_file(params_file) if params_file.is_file() else {}
    for key in itertools.chain(fixed, *points):
        if not isinstance(key, str) or not _has_key(params or {}, key):
            raise SweepError(f"{path}: `{key}` is not a key of {params_file}")
        if key == "train.seed":
            raise SweepError(f"{path}: `train.seed` comes from `seeds`, not a point or `set`")
    if clash := sorted(set(fixed) & {k for p in points for k in p}):
        raise SweepError(f"{path}: {clash} both in `set` and varied")
    budget_raw = raw.get("budget") or {}
    if not isinstance(budget_raw, dict) or set(budget_raw) - {"max_experiments", "hours"}:
        raise SweepError(f"{path}: budget: a mapping of max_experiments and/or hours")
    hours = budget_raw.get("hours")
    max_experiments = budget_raw.get("max_experiments", 64)
    if not isinstance(max_experiments, int) or max_experiments < 1:
        raise SweepError(f"{path}: budget.max_experiments: a positive integer")
    if hours is not None and (not isinstance(hours, int | float) or hours <= 0):
        raise SweepError(f"{path}: budget.hours: a positive number of hours")
    budget = Budget(max_experiments, hours)
    n = sum(len(own) for own in point_seeds)
    if n > budget.max_experiments:
        raise SweepError(
            f"{path}: {len(points)} point(s), {n} experiments with their seeds, over "
            f"budget.max_experiments={budget.max_experiments}"
        )
    sweep = Sweep(
        path,
        name,
        stage,
        tuple(seeds),
        metric,
        direction,
        fixed,
        tuple(points),
        budget,
        tuple(point_seeds),
    )
    for point in points:
        try:  # values with blanks cannot travel as `-S key=value`
            set_param_args(sweep.overrides(point, seeds[0]))
        except PresetError as err:
            raise SweepError(f"{path}: {err}") from err
    return sweep


# --- DVC and git ---------------------------------------------------------------------------------


def run_tool(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise SweepError(f"`{args[0]}` not found on PATH (source .venv/bin/activate)") from err
    if check and done.returncode != 0:
        raise SweepError(f"`{' '.join(args)}` exited {done.returncode}: {done.stderr.strip()}")
    return done


def finished_experiments() -> dict[str, str]:
    """{experiment name: commit} of every experiment in the repository, on any baseline."""
    out = run_tool("git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps/")
    found = {}
    for line in out.stdout.splitlines():
        ref, _, sha = line.partition(" ")
        if match := EXP_REF.match(ref):
            found[match["name"]] = sha
    return found


def queue_status() -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`."""
    out = run_tool("dvc", "queue", "status").stdout
    status = {}
    for line in out.splitlines():
        words = line.split()
        # A name queued again keeps its old finished task in the list too: the live one wins.
        if (
            len(words) >= 3
            and words[-1] in ("Queued", "Running", "Success", "Failed")
            and status.get(words[1]) not in ("Queued", "Running")
        ):
            status[words[1]] = words[-1]
    return status


def failure_reason(name: str) -> str:
    """The experiment's error in one line, from its queue log: the stage's own `[stage] ERROR`
    line where there is one, else DVC's last `ERROR:` line, else the log's last line."""
    log = run_tool("dvc", "queue", "logs", name, check=False).stdout
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    stage = [line for line in lines if re.match(r"^\[\w+\] ERROR ", line)]
    dvc = [line for line in lines if line.startswith("ERROR")]
    return (stage or dvc or lines or ["no log"])[-1][:500]


def read_at(commit: str, path: str) -> str:
    return run_tool("git", "show", f"{commit}:{path}").stdout


# --- run -------------------------------------------------------------------------------------------


def journal_path(sweep: Sweep) -> Path:
    return JOURNAL_DIR / f"{sweep.name}.json"


def read_journal(sweep: Sweep) -> dict[str, dict[str, Any]]:
    path = journal_path(sweep)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def record(sweep: Sweep, name: str, entry: dict[str, Any]) -> None:
    """Add one experiment's outcome to the journal, re-read first (another `run` may follow the
    same queue) and replaced atomically (a crash leaves the old file or the new one)."""
    path = journal_path(sweep)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # read-modify-replace, one writer at a time
        journal = read_journal(sweep) | {name: entry}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        text = json.dumps(dict(sorted(journal.items())), indent=2) + "\n"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


def planned(sweep: Sweep) -> list[tuple[dict[str, Any], int, str]]:
    """(point, seed, experiment name), every point's first seed before any point's second: the
    queue runs in this order, so a sweep stopped early has compared every point once."""
    return [
        (p, s, sweep.experiment(p, s))
        for s in sweep.seeds
        for i, p in enumerate(sweep.points)
        if s in sweep.seeds_of(i)
    ]


def run(sweep: Sweep, say: Callable[[str], None] = print, poll_s: float = POLL_S) -> int:
    """Queue what is not done, run the queue with one worker, follow it to the end."""
    plan = planned(sweep)
    done = finished_experiments()
    status = queue_status()
    journal = read_journal(sweep)
    for _, _, name in plan:
        # Failed while no `run` was following the queue: recorded now, not queued again.
        if status.get(name) == "Failed" and name not in journal:
            entry = {"status": "failed", "reason": failure_reason(name)}
            record(sweep, name, entry)
            journal[name] = entry
    to_queue = [
        (point, seed, name)
        for point, seed, name in plan
        if name not in done
        and journal.get(name, {}).get("status") != "failed"
        and status.get(name) not in ("Queued", "Running")
    ]
    skipped = len(plan) - len(to_queue)
    say(
        f"sweep {sweep.name}: {len(sweep.points)} point(s), {len(sweep.seeds)} seed(s): "
        f"{len(plan)} experiments up to `{sweep.stage}`; {skipped} done, failed or in the "
        f"queue already, {len(to_queue)} to queue"
    )
    for point, seed, name in to_queue:
        if name in status:  # a finished task of that name (its journal entry was deleted)
            run_tool("dvc", "queue", "remove", name, check=False)
        args = set_param_args(sweep.overrides(point, seed))
        run_tool("dvc", "exp", "run", "--queue", "-n", name, *args, sweep.stage)
        say(f"queued {name}: {' '.join(args[1::2])}")
    mine = {name for _, _, name in plan}
    if not any(queue_status().get(n) in ("Queued", "Running") for n in mine):
        say("nothing to run")
        return 0
    # The worker DVC starts outlives the command and would hold a captured stdout open.
    started = subprocess.run(
        ["dvc", "queue", "start"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    if started.returncode != 0:
        raise SweepError(f"`dvc queue start` exited {started.returncode}")
    return follow(sweep, mine, say, poll_s)


def follow(sweep: Sweep, mine: set[str], say: Callable[[str], None], poll_s: float) -> int:
    """Poll the queue until none of `mine` is queued or running; a line per finished experiment.
    Tasks already finished when it starts are not counted again (`run` recorded them)."""
    started = time.monotonic()
    running_since: dict[str, float] = {}
    last: dict[str, str] = {
        n: s for n, s in queue_status().items() if n in mine and s in ("Success", "Failed")
    }
    total = len(mine)
    failures = 0
    while True:
        status = {n: s for n, s in queue_status().items() if n in mine}
        now = time.monotonic()
        for name, state in status.items():
            before = last.get(name)
            if state == "Running" and name not in running_since:
                running_since[name] = now
                say(f"running {name}")
            if state in ("Success", "Failed") and before in ("Queued", "Running"):
                entry: dict[str, Any] = {"status": "done" if state == "Success" else "failed"}
                if name in running_since:  # else it started and ended between two polls
                    entry["seconds"] = round(now - running_since[name], 1)
                if state == "Failed":
                    entry["reason"] = failure_reason(name)
                    failures += 1
                record(sweep, name, entry)
                finished = len(mine & read_journal(sweep).keys())
                say(
                    f"[{finished}/{total}] {name}: {entry['status']}"
                    + (f" in {entry['seconds']:.0f} s" if "seconds" in entry else "")
                    + (f": {entry['reason']}" if state == "Failed" else "")
                )
            last[name] = state
        pending = [n for n, s in status.items() if s in ("Queued", "Running")]
        if not pending:
            say(
                f"sweep {sweep.name}: queue done ({failures} failed); `newsclf sweep show {sweep.path}`"
            )
            return 0
        hours = sweep.budget.hours
        if hours is not None and now - started > hours * 3600:
            queued = [n for n in pending if status[n] == "Queued"]
            if queued:
                run_tool("dvc", "queue", "remove", *queued)
                say(
                    f"budget.hours={hours} spent: {len(queued)} queued experiment(s) taken off "
                    "the queue; raise it and `run` again to go on"
                )
        time.sleep(poll_s)


# --- show ------------------------------------------------------------------------------------------


@dataclass
class PointResult:
    point: dict[str, Any]
    experiments: dict[int, str]  # seed -> name
    scores: dict[int, float] = field(default_factory=dict)  # seed -> metric
    seconds: float = 0.0
    untimed: int = 0  # experiments that ran while no `run` was following the queue
    failed: dict[int, str] = field(default_factory=dict)  # seed -> reason
    # (seed, id) -> (label scored against, predicted)
    rows: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)
    # The metric on the held-out rows every complete point scored, mean over seeds: what ranks.
    common: float | None = None

    @property
    def complete(self) -> bool:
        return len(self.scores) == len(self.experiments)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.scores.values()))) if self.scores else math.nan


def metric_value(metric: str, truth: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    if metric == "accuracy":
        return float((truth == pred).mean())
    f1s = []
    for k in range(n_classes):
        tp = np.sum((pred == k) & (truth == k))
        denom = np.sum(pred == k) + np.sum(truth == k)
        f1s.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1s))


def paired_interval(
    metric: str,
    winner: PointResult,
    other: PointResult,
    n_classes: int,
    rows: set[tuple[int, str]] | None = None,
    better: str = "either",
) -> dict[str, Any]:
    """`winner`'s margin over `other` on the held-out rows both scored (same seed, same id), or
    on `rows`, with a 95% percentile interval from BOOTSTRAP_SAMPLES paired resamples of those
    rows (the trained models fixed: row noise, not seed-to-seed training noise). `significant`:
    the interval excludes 0 (`better` "either"), or lies above it ("max") or below it ("min")."""
    keys = sorted(
        same_truth(
            (winner.rows.keys() & other.rows.keys()) if rows is None else rows, [winner, other]
        )
    )
    if not keys:
        return {"n_rows": 0, "margin": None, "low": None, "high": None, "significant": False}
    truth = np.array([winner.rows[k][0] for k in keys])
    pred_a = np.array([winner.rows[k][1] for k in keys])
    pred_b = np.array([other.rows[k][1] for k in keys])
    margin = metric_value(metric, truth, pred_a, n_classes) - metric_value(
        metric, truth, pred_b, n_classes
    )
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    diffs = np.empty(BOOTSTRAP_SAMPLES)
    for b in range(BOOTSTRAP_SAMPLES):
        idx = rng.integers(0, len(keys), len(keys))
        diffs[b] = metric_value(metric, truth[idx], pred_a[idx], n_classes) - metric_value(
            metric, truth[idx], pred_b[idx], n_classes
        )
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {
        "n_rows": len(keys),
        "margin": round(float(margin), 6),
        "low": round(float(low), 6),
        "high": round(float(high), 6),
        "significant": bool(
            {"either": low > 0 or high < 0, "max": low > 0, "min": high < 0}[better]
        ),
    }


def collect(
    sweep: Sweep,
    read: Callable[[str, str], str] = read_at,
    experiments: dict[str, str] | None = None,
) -> list[PointResult]:
    """Each point's validation scores and rows per seed, from its experiments' commits. Only
    VALIDATION_FILE and PREDICTIONS_FILE are read."""
    import polars as pl

    found = finished_experiments() if experiments is None else experiments
    journal = read_journal(sweep)
    results = []
    for i, point in enumerate(sweep.points):
        res = PointResult(point, {s: sweep.experiment(point, s) for s in sweep.seeds_of(i)})
        for seed, name in res.experiments.items():
            entry = journal.get(name, {})
            res.seconds += entry.get("seconds", 0.0)
            res.untimed += name in found and "seconds" not in entry
            if name not in found:
                if entry.get("status") == "failed":
                    res.failed[seed] = entry.get("reason", "failed")
                continue
            scores = json.loads(read(found[name], VALIDATION_FILE))
            res.scores[seed] = float(scores[sweep.metric])
            rows = pl.read_csv(io.StringIO(read(found[name], PREDICTIONS_FILE)))
            # `given_label`: the column's name in experiments run before reviewed labels.
            truth = "scored_label" if "scored_label" in rows.columns else "given_label"
            for id_, given, pred in rows.select("id", truth, "predicted").iter_rows():
                res.rows[(seed, id_)] = (given, pred)
        results.append(res)
    return results


def same_truth(keys: set[tuple[int, str]], points: list[PointResult]) -> set[tuple[int, str]]:
    """The rows of `keys` that every point scored against the same label: experiments made with
    different reviews files (a review between two runs) disagree on the rows a person relabelled,
    and a comparison on those rows would score each point against its own truth."""
    return {k for k in keys if len({p.rows[k][0] for p in points}) == 1}


def fully_run(sweep: Sweep, results: list[PointResult]) -> list[PointResult]:
    """The points complete on every seed of the sweep: those that are ranked."""
    return [r for r in results if r.complete and len(r.experiments) == len(sweep.seeds)]


def shared_rows(points: list[PointResult]) -> set[tuple[int, str]]:
    """The held-out rows every one of `points` scored, whatever label each scored them against."""
    return set.intersection(*(set(r.rows) for r in points)) if points else set()


def score_common_rows(
    sweep: Sweep, results: list[PointResult], n_classes: int
) -> set[tuple[int, str]]:
    """Set each complete point's `common`: its metric on the held-out rows that every complete
    point scored (same seed, same id) against the same label (`same_truth`), the mean over seeds.
    A point that drops rows (`label_issues.action: drop`) holds fewer validation rows, and those
    it dropped are the suspects, the hardest rows: its own mean would be over an easier set.
    Returns those rows; none (no point ranked) when the complete points share no row of some
    seed."""
    complete = fully_run(sweep, results)
    if not complete:
        return set()
    keys = same_truth(shared_rows(complete), complete)
    if {seed for seed, _ in keys} != set(sweep.seeds):
        return set()
    for res in complete:
        per_seed = []
        for seed in sweep.seeds:
            rows = [res.rows[k] for k in sorted(keys) if k[0] == seed]
            if rows:
                truth, pred = np.array(rows).T
                per_seed.append(metric_value(sweep.metric, truth, pred, n_classes))
        res.common = float(np.mean(per_seed))
    return keys


def ranked(sweep: Sweep, results: list[PointResult]) -> list[PointResult]:
    """Complete points, best first by `common` (ties: the earlier point in the file)."""
    sign = -1 if sweep.direction == "max" else 1
    complete = [r for r in results if r.complete and r.common is not None]
    return sorted(complete, key=lambda r: sign * r.common)


def summarize(sweep: Sweep, results: list[PointResult], n_classes: int) -> dict[str, Any]:
    common = score_common_rows(sweep, results, n_classes)
    ranked_on = f"{len(common)} held-out rows every complete point scored (all seeds)"
    # Rows every point scored, but against different labels (a review between the experiments).
    disagree = len(shared_rows(fully_run(sweep, results))) - len(common)
    if common and disagree > 0:
        ranked_on += (
            f"; {disagree} left out, scored against different labels (reviews file changed "
            "between the experiments)"
        )
    order = ranked(sweep, results)
    winner = order[0] if order else None
    points = []
    for res in results:
        entry: dict[str, Any] = {
            "point": res.point,
            "experiments": res.experiments,
            "scores": {str(s): round(v, 6) for s, v in sorted(res.scores.items())},
            "mean": round(res.mean, 6) if res.scores else None,
            "common_rows_mean": round(res.common, 6) if res.common is not None else None,
            "seconds": round(res.seconds, 1),
            "untimed_experiments": res.untimed,
            "status": (
                ("complete" if len(res.experiments) == len(sweep.seeds) else "stopped early")
                if res.complete
                else ("failed" if res.failed else ("partial" if res.scores else "not run"))
            ),
        }
        if res.failed:
            entry["failed"] = {str(s): why for s, why in res.failed.items()}
        if winner is not None and res.complete and res is not winner:
            # On the rows that ranked them when `res` is ranked too, else on the rows both scored.
            entry["winner_margin"] = paired_interval(
                sweep.metric,
                winner,
                res,
                n_classes,
                common if res.common is not None else None,
                sweep.direction,
            )
        reference = results[0]
        if res is not reference and res.scores and reference.scores:
            # How far this point's change moved the metric from the file's first point, on the
            # rows both scored (a partial point too: enough to decide what to run next).
            entry["vs_first_point"] = paired_interval(sweep.metric, res, reference, n_classes)
        entry["rank"] = order.index(res) + 1 if res in order else None
        points.append(entry)
    summary: dict[str, Any] = {
        "sweep": str(sweep.path),
        "name": sweep.name,
        "metric": f"{VALIDATION_FILE}:{sweep.metric}",
        "direction": sweep.direction,
        "selected_on": "held-out train rows (train.val_fraction); the test split is never read",
        "seeds": list(sweep.seeds),
        "set": sweep.fixed,
        "varied": sweep.varied,
        "first_point": sweep.points[0],
        "ranked_on": ranked_on,
        "bootstrap": {"samples": BOOTSTRAP_SAMPLES, "seed": BOOTSTRAP_SEED, "interval": 0.95},
        "points": points,
        "winner": None,
    }
    if winner is not None:
        runner_up = order[1] if len(order) > 1 else None
        vs = (
            paired_interval(sweep.metric, winner, runner_up, n_classes, common, sweep.direction)
            if runner_up
            else None
        )
        summary["winner"] = {
            "point": winner.point,
            "mean": round(winner.mean, 6),
            "common_rows_mean": round(winner.common, 6),
            "runner_up": runner_up.point if runner_up else None,
            "margin_over_runner_up": vs,
            "verdict": (
                "only one complete point"
                if vs is None
                else ("significant" if vs["significant"] else "no significant difference")
            ),
        }
    return summary


def point_label(point: dict[str, Any], varied: Sequence[str]) -> str:
    shown = {k: point[k] for k in varied if k in point}
    return ", ".join(f"{k.removeprefix('train.')}={v}" for k, v in shown.items()) or "(params.yaml)"


def interval_text(margin: dict[str, Any] | None) -> str:
    """`+1.23 pt [+0.40, +2.05]`, with ` n.s.` where the interval crosses 0; "" for none."""
    if not margin or margin["margin"] is None:
        return ""
    return (
        f"{100 * margin['margin']:+.2f} pt [{100 * margin['low']:+.2f}, "
        f"{100 * margin['high']:+.2f}]" + ("" if margin["significant"] else " n.s.")
    )


def table(sweep: Sweep, summary: dict[str, Any]) -> str:
    varied = summary["varied"]
    head = ["rank", "point"] + [f"s{s}" for s in sweep.seeds]
    head += [
        "mean",
        "common rows",
        "this - first point [95% CI]",
        "winner - this [95% CI]",
        "seconds",
        "status",
    ]
    lines = []
    entries = sorted(summary["points"], key=lambda e: (e["rank"] is None, e["rank"] or 0))
    for e in entries:
        row = [str(e["rank"] or "-"), point_label(e["point"], varied)]
        row += [
            f"{100 * e['scores'][str(s)]:.2f}" if str(s) in e["scores"] else "-"
            for s in sweep.seeds
        ]
        row += [
            f"{100 * e['mean']:.2f}" if e["mean"] is not None else "-",
            f"{100 * e['common_rows_mean']:.2f}" if e["common_rows_mean"] is not None else "-",
            interval_text(e.get("vs_first_point"))
            or ("first point" if e["point"] == summary["first_point"] else ""),
            interval_text(e.get("winner_margin")) or ("winner" if e["rank"] == 1 else ""),
            f"{e['seconds']:.0f}" + (" + ?" if e["untimed_experiments"] else ""),
            e["status"] + (f": {next(iter(e['failed'].values()))}" if e.get("failed") else ""),
        ]
        lines.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True))  # noqa: E731
    out = [
        f"{sweep.name}: validation {sweep.metric} (%); ranked by `common rows`, the "
        f"{summary['ranked_on']}; {sweep.direction} wins",
        fmt(head),
    ]
    out += [fmt(r) for r in lines]
    if summary["winner"]:
        w = summary["winner"]
        said = w["verdict"] + ("" if w["runner_up"] is None else " over the runner-up")
        out.append(f"winner: {point_label(w['point'], varied)} ({said})")
    return "\n".join(out)


def plot(sweep: Sweep, results: list[PointResult], out: Path, summary: dict[str, Any]) -> None:
    """Left: every point's validation metric (a dot per seed, a bar at the mean) and its margin over
    the first point with the 95% interval, best first. Then one panel per varied param: the metric
    against the param's value, for the first point and the points that set that param."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    varied = sweep.varied
    entries = {id(r): e for r, e in zip(results, summary["points"], strict=True)}
    order = sorted(
        results, key=lambda r: (entries[id(r)]["rank"] is None, entries[id(r)]["rank"] or 0)
    )
    fig, axes = plt.subplots(
        1,
        2 + len(varied),
        figsize=(5 + 4 + 3 * len(varied), 0.45 * len(results) + 2),
        squeeze=False,
        gridspec_kw={"width_ratios": [5, 4] + [3] * len(varied)},
    )
    metric_ax, margin_ax = axes[0][0], axes[0][1]
    labels = [point_label(r.point, varied) for r in order]
    for y, res in enumerate(order):
        xs = [100 * v for v in res.scores.values()]
        metric_ax.scatter(xs, [y] * len(xs), s=16, color="tab:blue", alpha=0.7)
        if res.scores:
            metric_ax.vlines(100 * res.mean, y - 0.3, y + 0.3, color="tab:red")
        margin = entries[id(res)].get("vs_first_point")
        if margin and margin["margin"] is not None:
            low, mid, high = (100 * margin[k] for k in ("low", "margin", "high"))
            color = "tab:green" if low > 0 else ("tab:red" if high < 0 else "tab:gray")
            margin_ax.errorbar(
                mid, y, xerr=[[mid - low], [high - mid]], fmt="o", color=color, capsize=3
            )
    for ax in (metric_ax, margin_ax):
        ax.set_yticks(range(len(order)), labels if ax is metric_ax else [""] * len(order))
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    metric_ax.tick_params(axis="y", labelsize=8)
    metric_ax.set_xlabel(f"validation {sweep.metric} (%): dots = seeds, red = mean")
    margin_ax.axvline(0, color="black", linewidth=0.8)
    margin_ax.set_xlabel("this - first point (pt), 95% paired interval")
    first = results[0]
    for ax, key in zip(axes[0][2:], varied, strict=True):
        shown = [first] + [r for r in results[1:] if key in r.point]
        values = [str(r.point.get(key, "first point")) for r in shown]
        ticks = sorted(set(values), key=_natural)
        for res, value in zip(shown, values, strict=True):
            x = ticks.index(value)
            ys = [100 * v for v in res.scores.values()]
            ax.scatter([x] * len(ys), ys, s=14, alpha=0.6, color="tab:blue")
            if res.scores:
                ax.hlines(100 * res.mean, x - 0.25, x + 0.25, color="tab:red")
        ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"sweep {sweep.name}: validation {sweep.metric} on held-out train rows", fontsize=10
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, metadata={"Software": None})
    plt.close(fig)


def _natural(text: str) -> tuple:
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def n_labels(params_file: Path = PARAMS_FILE) -> int:
    return len(read_params_file(params_file)["labels"])


def show(sweep: Sweep, out: Path = REPORT, say: Callable[[str], None] = print) -> dict[str, Any]:
    results = collect(sweep)
    summary = summarize(sweep, results, n_labels())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    plot(sweep, results, out.with_suffix(".png"), summary)
    say(table(sweep, summary))
    say(f"wrote {out} and {out.with_suffix('.png')}")
    return summary


# --- apply -----------------------------------------------------------------------------------------


def set_params(params_file: Path, values: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Write dotted `values` into params.yaml keeping its comments (ruamel, as `dvc exp run -S`
    does); {key: (old, new)} of what changed."""
    from ruamel.yaml import YAML

    ryaml = YAML()
    ryaml.preserve_quotes = True
    ryaml.width = 4096
    ryaml.indent(mapping=2, sequence=4, offset=2)  # params.yaml's own layout
    ryaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    doc = ryaml.load(params_file.read_text(encoding="utf-8"))
    changed = {}
    for key, value in values.items():
        node = doc
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        old = node[leaf]
        if _canon(_plain(old)) != _canon(value):
            node[leaf] = value
            changed[key] = (_plain(old), value)
    buf = io.StringIO()
    ryaml.dump(doc, buf)
    params_file.write_text(buf.getvalue(), encoding="utf-8")
    return changed


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def apply(
    sweep: Sweep, params_file: Path = PARAMS_FILE, say: Callable[[str], None] = print
) -> dict[str, tuple[Any, Any]]:
    summary = summarize(sweep, collect(sweep), n_labels(params_file))
    if summary["winner"] is None:
        raise SweepError(f"{sweep.path}: no point has finished every seed; `newsclf sweep run` it")
    winner = summary["winner"]
    changed = set_params(params_file, winner["point"])
    say(f"winner: {point_label(winner['point'], summary['varied'])}; {winner['verdict']}")
    for key, (old, new) in changed.items():
        say(f"  {key}: {old} -> {new}")
    say(
        f"{params_file}: {len(changed)} param(s) changed"
        + ("; `dvc repro` trains it and scores the test split once" if changed else "")
    )
    return changed


def main(action: str, path: Path, out: Path = REPORT) -> int:
    sweep = load_sweep(path)
    if action == "run":
        return run(sweep, say=lambda line: print(line, flush=True))
    if action == "show":
        show(sweep, out)
        return 0
    apply(sweep)
    return 0
