"""The main job and a small experiment, from a fresh clone, before and after a change.

    python -m bench.bench_repro --before 2118bbd --after HEAD

For each revision: a fresh `git clone` beside this checkout (so the team remote `../shared` resolves
as in CI), `make repro` timed as a whole (install included) and stage by stage (from the moment DVC
prints `Running stage`), then `dvc exp run -S train.max_train_samples=400 -S train.epochs=1` timed
end to end. The two revisions run one after the other on an otherwise idle machine. Writes
`reports/bench_repro.json` and prints a table. Each command is bounded by `--max-seconds`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from bench import cpu_name
from stages.common import write_json

OUT_FILE = Path("reports/bench_repro.json")
SMALL_EXPERIMENT = ["-S", "train.max_train_samples=400", "-S", "train.epochs=1"]


def timed(cmd: list[str], cwd: Path, max_s: float) -> tuple[float, dict[str, float], str]:
    """Run `cmd` in the clone `cwd` with its own .venv first on PATH (stages call `python`); its
    wall time, the seconds from each `Running stage` line to the next (or to the end), and its
    output."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    path = [p for p in env["PATH"].split(":") if ".venv" not in p]
    env["PATH"] = ":".join([str(cwd / ".venv" / "bin"), *path])
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    marks: list[tuple[str, float]] = []
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if found := re.match(r"Running stage '([^']+)'", line):
            marks.append((found.group(1), time.perf_counter()))
        if time.perf_counter() - start > max_s:
            proc.kill()
            raise SystemExit(f"{' '.join(cmd)} in {cwd}: over {max_s} s")
    proc.wait()
    end = time.perf_counter()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {cwd} failed:\n{''.join(lines[-40:])}")
    stages = {
        name: round((marks[i + 1][1] if i + 1 < len(marks) else end) - t, 1)
        for i, (name, t) in enumerate(marks)
    }
    return round(end - start, 1), stages, "".join(lines)


def run_revision(repo: Path, rev: str, max_s: float) -> dict:
    clone = repo.parent / f"bench_repro_{rev}"
    if clone.exists():
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=clone, check=True)
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True
    ).stdout.strip()
    total, stages, _ = timed(["make", "repro"], clone, max_s)
    metrics = json.loads((clone / "reports" / "metrics.json").read_text())
    dvc = str(clone / ".venv" / "bin" / "dvc")
    exp_total, exp_stages, _ = timed([dvc, "exp", "run", *SMALL_EXPERIMENT], clone, max_s)
    return {
        "rev": sha,
        "make_repro": {
            "total_s": total,
            "stages_s": stages,
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
        },
        "small_experiment": {
            "args": " ".join(SMALL_EXPERIMENT),
            "total_s": exp_total,
            "stages_s": exp_stages,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--before", required=True, help="git revision before the change")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="per command")
    parser.add_argument(
        "--only", choices=("before", "after"), help="run one revision, kept beside the JSON's other"
    )
    args = parser.parse_args()
    repo = Path.cwd()
    result = json.loads(OUT_FILE.read_text()) if args.only and OUT_FILE.exists() else {}
    result["cpu"] = cpu_name()
    for name, rev in (("before", args.before), ("after", args.after)):
        if args.only in (None, name):
            result[name] = run_revision(repo, rev, args.max_seconds)
            write_json(result, OUT_FILE)  # what has run so far survives a stop
    if "before" not in result or "after" not in result:
        print(json.dumps(result, indent=1))
        return
    print(result["cpu"])
    print(f"{'':>22} {'before':>10} {'after':>10}")
    for label, key in (
        ("make repro (s)", "make_repro"),
        ("small experiment (s)", "small_experiment"),
    ):
        print(
            f"{label:>22} {result['before'][key]['total_s']:>10} {result['after'][key]['total_s']:>10}"
        )
    stages = dict.fromkeys(
        [*result["before"]["make_repro"]["stages_s"], *result["after"]["make_repro"]["stages_s"]]
    )
    for stage in stages:
        before = result["before"]["make_repro"]["stages_s"].get(stage, "-")
        after = result["after"]["make_repro"]["stages_s"].get(stage, "-")
        print(f"{'  ' + stage:>22} {before:>10} {after:>10}")
    print(
        f"{'accuracy':>22} {result['before']['make_repro']['accuracy']:>10} "
        f"{result['after']['make_repro']['accuracy']:>10}"
    )
    print(f"wrote {OUT_FILE}")


if __name__ == "__main__":
    main()
