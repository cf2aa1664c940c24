"""validate_params: every section of params.yaml checked before any stage runs or any output is removed.

dvc.yaml runs this stage on the whole of params.yaml and makes every other stage depend on its
output, so a params change runs it first: a refused value (a typo'd key, a wrong type, an unknown
section, a source outside data/raw/, a base model that is not there or not supported, LoRA module
names the base does not have) stops `dvc repro`, `dvc exp run` and `dvc queue` here, before DVC
removes the outputs of any stage it would rerun. Its output names only the sections it checked, so it does not change when
valid params do, and reruns nothing downstream by itself.
"""

from __future__ import annotations

from typing import Any

import yaml

from stages import paths
from stages.base_model import base_model_problem
from stages.common import (
    PARAMS_FILE,
    StageError,
    get_logger,
    parse_labels,
    read_params_file,
    run_main,
    write_json,
)
from stages.ingest import parse_sources
from stages.params import parse_section
from stages.sections import (
    AugmentParams,
    CleanParams,
    EvaluateParams,
    ExportParams,
    IngestParams,
    LabelIssuesParams,
    MonitorParams,
    ReportParams,
    TokenizeParams,
)
from stages.train_params import TrainParams

log = get_logger("validate_params")

# Every section of params.yaml, in the order of the pipeline, and the dataclass that parses it.
SECTIONS: dict[str, type] = {
    "ingest": IngestParams,
    "clean": CleanParams,
    "tokenize": TokenizeParams,
    "label_issues": LabelIssuesParams,
    "augment": AugmentParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
    "report": ReportParams,
    "monitor": MonitorParams,  # not a stage: `newsclf monitor` reads it
}
TOP_LEVEL = ("labels", *SECTIONS)


def params_problems(params: Any) -> list[str]:
    """Every fault of a params.yaml mapping, one line each: all sections are checked, so that one
    run names every fault at once."""
    if not isinstance(params, dict):
        return [f"{PARAMS_FILE}: expected a mapping of sections, got {params!r}"]
    problems = []
    unknown = [key for key in params if key not in TOP_LEVEL]
    if unknown:
        problems.append(f"{PARAMS_FILE}: unknown section(s) {unknown}; expected {list(TOP_LEVEL)}")
    missing = [key for key in TOP_LEVEL if key not in params]
    if missing:
        problems.append(f"{PARAMS_FILE}: missing section(s) {missing}")
    for section in (key for key in TOP_LEVEL if key in params):
        try:
            if section == "labels":
                parse_labels(params["labels"])
                continue
            parsed = parse_section(params[section], SECTIONS[section], section)
            if section == "ingest":
                parse_sources(list(parsed.sources))
            if section == "train" and (
                problem := base_model_problem(parsed.base_model, parsed.lora)
            ):
                problems.append(problem)
        except StageError as err:
            problems.append(str(err))
    return problems


def main() -> None:
    if not PARAMS_FILE.exists():
        raise StageError(f"{PARAMS_FILE}: params file not found (run from the repository root)")
    try:
        params = read_params_file(PARAMS_FILE)
    except yaml.YAMLError as err:
        raise StageError(f"{PARAMS_FILE}: not valid YAML ({err})") from None
    problems = params_problems(params)
    if problems:
        raise StageError(
            "\n".join(problems) + "\n(nothing ran and no output was removed: fix params.yaml, "
            "or restore it with `git checkout params.yaml`)"
        )
    log.info("params.yaml: sections %s valid", list(TOP_LEVEL))
    write_json({"checked": list(TOP_LEVEL)}, paths.PARAMS_CHECKED)


if __name__ == "__main__":
    run_main(main, "validate_params")
