"""The recipe a sweep chose on held-out train rows against today's default, on the test split, in one
run: the one place the two are scored on test.

    python -m bench.bench_recipe sweeps/recipe.yaml --default-from HEAD --seeds 42 7

The winner comes from `newsclf sweep`'s own selection (validation files only). "Today's default" is
the winner's keys at the values params.yaml has at `--default-from` (before `sweep apply`). Each
recipe and seed is one `dvc exp run --queue ... evaluate` (train on the train rows at params.yaml's
`train.val_fraction`, then the full test split), run through DVC's queue with one worker by the
sweep engine. Writes `reports/bench_recipe.json` and prints a table, the CPU named.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from bench import cpu_name
from newsclf import sweep as sw
from stages.common import ParamsLoader, write_json

OUT_FILE = Path("reports/bench_recipe.json")


def params_at(rev: str) -> dict:
    shown = subprocess.run(
        ["git", "show", f"{rev}:params.yaml"], capture_output=True, text=True, check=True
    )
    return yaml.load(shown.stdout, Loader=ParamsLoader)  # noqa: S506 (as the stages read it)


def value_at(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        node = node[part]
    return node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--default-from", default="HEAD", help="git rev of today's params.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    args = parser.parse_args()

    chosen = sw.load_sweep(args.sweep)
    summary = sw.summarize(chosen, sw.collect(chosen), sw.n_labels())
    if summary["winner"] is None:
        raise SystemExit(f"{args.sweep}: no complete point yet: `newsclf sweep run` it first")
    winner = summary["winner"]["point"]
    baseline = params_at(args.default_from)
    default = {key: value_at(baseline, key) for key in winner}
    if default == winner:
        raise SystemExit(f"the winner {winner} is params.yaml at {args.default_from} already")
    test_run = replace(
        chosen,
        name=f"{chosen.name}-test",
        stage="evaluate",
        seeds=tuple(args.seeds),
        fixed={},
        points=(default, winner),
        point_seeds=(),  # both recipes on every seed
    )
    sw.run(test_run, say=lambda line: print(line, flush=True))

    found = sw.finished_experiments()
    journal = sw.read_journal(test_run)
    rows = []
    for label, point in (("default", default), ("chosen", winner)):
        per_seed = {}
        for seed in test_run.seeds:
            name = test_run.experiment(point, seed)
            if name not in found:
                entry = journal.get(name, {})
                raise SystemExit(f"{name} did not finish: {entry.get('reason', 'not run')}")
            metrics = json.loads(sw.read_at(found[name], "reports/metrics.json"))
            per_seed[str(seed)] = {
                "experiment": name,
                "accuracy": metrics["accuracy"],
                "macro_f1": metrics["macro_f1"],
                "seconds": journal.get(name, {}).get("seconds"),
            }
        rows.append(
            {
                "recipe": label,
                "point": point,
                "seeds": per_seed,
                "mean_accuracy": round(
                    float(np.mean([s["accuracy"] for s in per_seed.values()])), 6
                ),
                "mean_macro_f1": round(
                    float(np.mean([s["macro_f1"] for s in per_seed.values()])), 6
                ),
            }
        )
    report = {
        "cpu": cpu_name(),
        "sweep": str(args.sweep),
        "selected_on": summary["metric"],
        "validation_winner": summary["winner"],
        "default_from": args.default_from,
        "recipes": rows,
        "gain": round(rows[1]["mean_accuracy"] - rows[0]["mean_accuracy"], 6),
    }
    write_json(report, OUT_FILE)
    print(f"test split, {cpu_name()}")
    print(f"{'recipe':<8}  " + "  ".join(f"s{s:<6}" for s in test_run.seeds) + "  mean")
    for row in rows:
        accs = "  ".join(f"{100 * row['seeds'][str(s)]['accuracy']:6.2f}" for s in test_run.seeds)
        print(f"{row['recipe']:<8}  {accs}   {100 * row['mean_accuracy']:.2f}  {row['point']}")
    print(f"wrote {OUT_FILE}")


if __name__ == "__main__":
    main()
