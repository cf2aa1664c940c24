"""dvc.yaml says what each stage's code reads: a dependency or param left out would let
`dvc repro` skip a stage whose output it changes."""

from __future__ import annotations

import ast

import pytest
import yaml

from tests.pipeline_fixture import REPO_ROOT

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())


def imported_stage_modules(name: str, seen: set[str] | None = None) -> set[str]:
    """`stages/<name>.py` and every `stages.*` module it imports, transitively."""
    seen = set() if seen is None else seen
    if name in seen:
        return seen
    seen.add(name)
    tree = ast.parse((REPO_ROOT / "stages" / f"{name}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("stages."):
                imported_stage_modules(node.module.split(".")[1], seen)
            elif node.module == "stages":
                for alias in node.names:
                    imported_stage_modules(alias.name, seen)
    return seen


def leaf_keys(node: object, prefix: str) -> set[str]:
    if isinstance(node, dict):
        return {k for key, value in node.items() for k in leaf_keys(value, f"{prefix}.{key}")}
    return {prefix}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_the_modules_the_stage_imports(stage: str) -> None:
    declared = {d for d in STAGES[stage]["deps"] if d.startswith("stages/")}
    imported = {f"stages/{m}.py" for m in imported_stage_modules(stage)}
    assert declared == imported


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_key_of_the_stages_own_section_is_declared(stage: str) -> None:
    declared = set(STAGES[stage].get("params", []))
    own = leaf_keys(PARAMS[stage], stage)
    assert {p for p in declared if p.split(".")[0] == stage} == own
    # Keys of other sections are declared only if they exist.
    for key in declared:
        section, *rest = key.split(".")
        node = PARAMS[section]
        for part in rest:
            node = node[part]
