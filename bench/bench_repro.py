"""The main job and a small experiment, from a fresh clone, before and after a change.

    python -m bench.bench_repro --before 2118bbd --after HEAD [--pin-avx2]

For each revision: a fresh `git clone` beside this checkout (so the team remote `../shared` resolves
as in CI), `make repro` timed as a whole (install included) and stage by stage (from the moment DVC
prints `Running stage`), then `dvc exp run -S train.max_train_samples=400 -S train.epochs=1` timed
end to end. The two revisions run one after the other on an otherwise idle machine. Each run
records the CPU, its flags that pick kernels (AVX-512, VNNI, bf16, AMX), what the stages resolved
(training precision and processes) and the test accuracy of each shipped graph, with the int8
graph's agreement and the int8 instructions it was measured on.

`--pin-avx2` runs everything with PyTorch, oneDNN and MKL pinned to AVX2 (`ATEN_CPU_CAPABILITY`,
`ONEDNN_MAX_CPU_ISA`, `MKL_ENABLE_INSTRUCTIONS`): what an AVX2-only CPU (AMD EPYC Zen 3) computes
in PyTorch, timed on this one. Each clone's `precision: auto` params are set to fp32, what `auto`
resolves to on such a CPU (a revision older than the pin-aware `native_bf16` would otherwise pick
bf16, emulated under the pins).
ONNX Runtime keeps this CPU's kernels (its AVX2 int8 figures: bench/bench_int8_isa.py, under QEMU).
Writes `reports/bench_repro.json` (`reports/bench_repro_avx2.json` pinned) and prints a table. Each
command is bounded by `--max-seconds`.
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
from stages.common import cpu_flags, write_json

OUT_FILE = Path("reports/bench_repro.json")
PINNED_FILE = Path("reports/bench_repro_avx2.json")
# PyTorch's own kernels, oneDNN's and MKL's, each capped at AVX2.
AVX2_PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
# The /proc/cpuinfo flags that change which kernels run, and so speed and int8 figures.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni")
KERNEL_FLAGS += ("amx_bf16", "amx_int8")
SMALL_EXPERIMENT = ["-S", "train.max_train_samples=400", "-S", "train.epochs=1"]


def kernel_flags() -> list[str]:
    """The kernel-picking flags this CPU has (KERNEL_FLAGS)."""
    flags = cpu_flags() or set()
    return [flag for flag in KERNEL_FLAGS if flag in flags]


def timed(
    cmd: list[str], cwd: Path, max_s: float, pins: dict[str, str]
) -> tuple[float, dict[str, float], str]:
    """Run `cmd` in the clone `cwd` with its own .venv first on PATH (stages call `python`) and
    the environment `pins`; its wall time, the seconds from each `Running stage` line to the next
    (or to the end), and its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")} | pins
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


def shipped_figures(clone: Path) -> dict:
    """What the run resolved and each shipped graph's test figures, from its own reports."""
    export = json.loads((clone / "reports" / "export.json").read_text())
    resolved = (clone / "reports" / "train" / "resolved.yaml").read_text()
    wanted = ("precision:", "launcher:", "world_size:", "bf16_support:")
    figures = {
        "resolved": [
            line.strip() for line in resolved.splitlines() if line.strip().startswith(wanted)
        ],
        "test_accuracy": {k: v for k, v in export["accuracy"].items() if k != "n_texts"},
    }
    parity = export["parity"]
    if "int8_top1_agreement" in parity:
        figures["int8"] = {
            "top1_agreement": parity["int8_top1_agreement"],
            "meets_bound": parity["int8_meets_bound"],
            "measured_on": parity.get("int8_measured_on"),
            "kept_fp32": len(export.get("int8", {}).get("kept_fp32", [])),
        }
    return figures


def run_revision(repo: Path, rev: str, max_s: float, pins: dict[str, str]) -> dict:
    clone = repo.parent / f"bench_repro_{rev}"
    if clone.exists():
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=clone, check=True)
    if pins:
        params = clone / "params.yaml"
        text = re.sub(r"^(\s+precision:\s*)auto\b", r"\1fp32", params.read_text(), flags=re.M)
        params.write_text(text)
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True
    ).stdout.strip()
    total, stages, _ = timed(["make", "repro"], clone, max_s, pins)
    metrics = json.loads((clone / "reports" / "metrics.json").read_text())
    shipped = shipped_figures(clone)
    dvc = str(clone / ".venv" / "bin" / "dvc")
    exp_total, exp_stages, _ = timed([dvc, "exp", "run", *SMALL_EXPERIMENT], clone, max_s, pins)
    return {
        "rev": sha,
        "make_repro": {
            "total_s": total,
            "stages_s": stages,
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
        }
        | shipped,
        "small_experiment": {
            "args": " ".join(SMALL_EXPERIMENT),
            "total_s": exp_total,
            "stages_s": exp_stages,
        }
        | shipped_figures(clone),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--before", required=True, help="git revision before the change")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="per command")
    parser.add_argument(
        "--only", choices=("before", "after"), help="run one revision, kept beside the JSON's other"
    )
    parser.add_argument(
        "--pin-avx2", action="store_true", help="PyTorch, oneDNN and MKL as on an AVX2-only CPU"
    )
    args = parser.parse_args()
    repo = Path.cwd()
    out_file = PINNED_FILE if args.pin_avx2 else OUT_FILE
    pins = AVX2_PINS if args.pin_avx2 else {}
    result = json.loads(out_file.read_text()) if args.only and out_file.exists() else {}
    result |= {"cpu": cpu_name(), "cpu_flags": kernel_flags(), "pinned": pins}
    for name, rev in (("before", args.before), ("after", args.after)):
        if args.only in (None, name):
            result[name] = run_revision(repo, rev, args.max_seconds, pins)
            write_json(result, out_file)  # what has run so far survives a stop
    if "before" not in result or "after" not in result:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['cpu']}; flags {' '.join(result['cpu_flags'])}; pinned {pins or 'no'}")
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
    small = [
        result[name]["small_experiment"].get("test_accuracy", {}).get("fp32", "-")
        for name in ("before", "after")
    ]
    print(f"{'small exp. accuracy':>22} {small[0]:>10} {small[1]:>10}")
    for part in ("make_repro", "small_experiment"):
        for name in ("before", "after"):
            int8 = result[name][part].get("int8")
            if int8:
                print(
                    f"  {part} {name}: int8 {int8} test accuracy {result[name][part]['test_accuracy']}"
                )
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
