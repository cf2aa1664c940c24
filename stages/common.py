"""What every stage shares: the label set, params, the data contract, deterministic file I/O, logging and errors.

Stages run from the repository root as modules (`python -m stages.<name>`), which is what
`dvc.yaml` does; paths here are relative to that root.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import yaml

PARAMS_FILE = Path("params.yaml")
# The exit status of a launched rank (torchrun) that stopped on a StageError, and the folder
# (set by stages/launch.py) where it leaves its message: the launcher says the first one once.
RANK_STAGE_ERROR = 3
RANK_ERRORS_ENV = "NEWSCLF_RANK_ERRORS"

# The data contract: every table between stages carries at least these columns.
CONTRACT_SCHEMA: dict[str, pl.DataType] = {
    "id": pl.String(),
    "split": pl.String(),
    "label": pl.Int64(),
    "text": pl.String(),
}
SPLITS: tuple[str, ...] = ("train", "test")


class StageError(Exception):
    """A fault the user can fix (bad input, missing file, bad param): reported in one clear line."""


def cpu_model() -> str:
    """The CPU's model name and core count: beside every quoted speed, and in resolved.yaml."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


# The int8 dot-product instructions ONNX Runtime's kernels can use, best first, by CPU flag. With
# VNNI (or AMX) u8 x s8 products are summed in 32 bits; without it (AVX2, AVX512BW) VPMADDUBSW
# saturates 16-bit sums, so a graph's int8 agreement depends on which of these the CPU has.
INT8_INSTRUCTIONS = (
    ("amx_int8", "AMX-INT8"),
    ("avx512_vnni", "AVX512-VNNI"),
    ("avx_vnni", "AVX-VNNI"),
    ("avx512bw", "AVX512BW, no VNNI"),
    ("avx2", "AVX2, no VNNI"),
)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """This CPU's flags from /proc/cpuinfo (its first `flags` line), or None where it has none."""
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def int8_instructions(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The best int8 instruction set of this CPU (INT8_INSTRUCTIONS), from /proc/cpuinfo's flags:
    recorded beside every int8 agreement figure, which depends on it."""
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return "unknown (no CPU flags in /proc/cpuinfo)"
    return next((name for flag, name in INT8_INSTRUCTIONS if flag in flags), "no AVX2")


def available_cores() -> int:
    """The cores this process may run on (its affinity, where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def get_logger(name: str) -> logging.Logger:
    """A logger that prints `[stage] message` to stderr, once per process."""
    logger = logging.getLogger(f"newsclf.{name}")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[{name}] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2's floats without a dot (`5e-05`, `1e3`): what DVC's
    `-S train.learning_rate=5e-5` writes into params.yaml, which YAML 1.1 reads as a string."""


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_params_file(path: Path) -> Any:
    """params.yaml as the stages read it (ParamsLoader)."""
    return yaml.load(path.read_text(encoding="utf-8"), Loader=ParamsLoader)  # noqa: S506


def load_params(section: str, path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The `section` of params.yaml; a missing file or section is a StageError."""
    if not path.exists():
        raise StageError(f"{path}: params file not found (run from the repository root)")
    params = read_params_file(path) or {}
    if section not in params:
        raise StageError(f"{path}: no `{section}:` section")
    return params[section]


def parse_labels(raw: Any, where: str = f"{PARAMS_FILE} labels") -> tuple[str, ...]:
    """The class names in id order: two or more distinct, non-empty strings."""
    if not isinstance(raw, list) or not all(isinstance(name, str) for name in raw):
        raise StageError(f"{where}: expected a list of class names, got {raw!r}")
    names = tuple(name.strip() for name in raw)
    if len(names) < 2:
        raise StageError(f"{where}: {len(names)} class(es); a classifier needs at least two")
    if any(not name for name in names):
        raise StageError(f"{where}: an empty class name in {list(raw)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise StageError(f"{where}: class name(s) listed twice: {repeated}")
    return names


def load_labels(path: Path = PARAMS_FILE) -> tuple[str, ...]:
    """The top-level `labels:` of params.yaml (what every stage and the model call the classes)."""
    return parse_labels(load_params("labels", path), f"{path} labels")


def check_contract(df: pl.DataFrame, path: str | Path, label_names: tuple[str, ...]) -> None:
    """The one check of a table between stages: contract columns and types, a label id for one
    of `label_names` and a text on every row. The error names the file, the row id and the field."""
    for column, dtype in CONTRACT_SCHEMA.items():
        if column not in df.columns:
            raise StageError(f"{path}: missing column `{column}` (found {df.columns})")
        if df.schema[column] != dtype:
            raise StageError(f"{path}: column `{column}` is {df.schema[column]}, expected {dtype}")
    faults = {
        "label": pl.col("label").is_null() | ~pl.col("label").is_between(0, len(label_names) - 1),
        "text": pl.col("text").is_null(),
        "id": pl.col("id").is_null(),
    }
    for field, bad in faults.items():
        rows = df.filter(bad)
        if rows.height:
            what = (
                f"label {rows['label'][0]} is not an id of labels 0-{len(label_names) - 1} "
                f"{list(label_names)}"
                if field == "label"
                else f"{field} is null"
            )
            raise StageError(f"{path}: row id={rows['id'][0]}: {what} ({rows.height} such rows)")


def require_file(path: str | Path) -> Path:
    """`path` as a Path; a StageError naming it when the stage upstream has not made it yet."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: not found; run `dvc repro` to build the stages upstream")
    return path


def read_table(path: str | Path, columns: list[str] | None = None) -> pl.DataFrame:
    """Read a stage's Parquet input, naming the stage that makes it when it is missing."""
    return pl.read_parquet(require_file(path), columns=columns)


def write_table(df: pl.DataFrame, path: str | Path) -> None:
    """Write Parquet byte-for-byte reproducibly: one row group, fixed compression, no timestamps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(
        path, compression="zstd", compression_level=3, statistics=True, row_group_size=1 << 30
    )


def write_csv(df: pl.DataFrame, path: str | Path) -> None:
    """Write a small plot/report table as CSV (what `dvc plots` reads), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_csv(path)


def write_json(obj: Any, path: str | Path) -> None:
    """Write a small report as stable, human-diffable JSON (what `dvc metrics diff` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def run_main(main: Callable[[], None], name: str) -> None:
    """Run a stage's `main`, turning a StageError into one clear line and exit status 1. Under
    stages/launch.py each rank instead leaves its line in the launcher's folder (the first rank
    to fail is stopped with the others, maybe before it could log) and exits RANK_STAGE_ERROR;
    the launcher says the line once. Under another launcher each rank logs it."""
    try:
        main()
    except StageError as err:
        folder, rank = os.environ.get(RANK_ERRORS_ENV), os.environ.get("RANK")
        if folder is None or rank is None:
            get_logger(name).error("%s", err)
            sys.exit(1 if rank is None else RANK_STAGE_ERROR)
        (Path(folder) / f"rank{rank}.txt").write_text(f"{name}\t{err}", encoding="utf-8")
        sys.exit(RANK_STAGE_ERROR)
