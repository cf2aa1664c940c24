"""`newsclf preset`: params presets for `dvc exp run`, checked against params.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from newsclf.cli import main
from newsclf.preset import PresetError, load_preset, set_param_args
from tests.pipeline_fixture import REPO_ROOT


def test_fast_preset_names_real_params() -> None:
    preset = load_preset("fast", REPO_ROOT / "presets", REPO_ROOT / "params.yaml")
    assert preset["label_issues.models"] == ["tfidf_lr"]
    assert set_param_args(preset)[:2] == ["-S", "label_issues.models=[tfidf_lr]"]


def write(tmp_path: Path, preset: str) -> tuple[Path, Path]:
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "p.yaml").write_text(preset)
    (tmp_path / "params.yaml").write_text("train:\n  lora:\n    r: 8\n  epochs: 1\n")
    return tmp_path / "presets", tmp_path / "params.yaml"


def test_misspelt_key_is_an_error(tmp_path: Path) -> None:
    presets, params = write(tmp_path, "train.lora.rank: 4\n")
    with pytest.raises(PresetError, match=r"p.yaml: `train.lora.rank` is not a key of"):
        load_preset("p", presets, params)


def test_unknown_preset_lists_the_known_ones(tmp_path: Path) -> None:
    presets, params = write(tmp_path, "train.epochs: 2\n")
    with pytest.raises(PresetError, match=r"no such preset \(known: p\)"):
        load_preset("fats", presets, params)


def test_args_are_blank_free_yaml(tmp_path: Path) -> None:
    args = set_param_args({"a.b": [1, "x"], "c": None, "d": 0.5, "e": True})
    assert args == ["-S", "a.b=[1,x]", "-S", "c=null", "-S", "d=0.5", "-S", "e=true"]
    with pytest.raises(PresetError, match="blanks or quotes"):
        set_param_args({"a": "two words"})


def test_cli_prints_args(tmp_path: Path, monkeypatch, capsys) -> None:
    write(tmp_path, "train.lora.r: 4\ntrain.epochs: 2\n")
    monkeypatch.chdir(tmp_path)
    assert main(["preset", "p"]) == 0
    assert capsys.readouterr().out.strip() == "-S train.lora.r=4 -S train.epochs=2"
    assert main(["preset", "nope"]) == 1
    assert "presets/nope.yaml: no such preset" in capsys.readouterr().err
