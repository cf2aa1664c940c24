"""dvc.yaml says what each stage's code reads: a dependency or param left out would let
`dvc repro` skip a stage whose output it changes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from stages import paths
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
    declared = {d for d in STAGES[stage]["deps"] if d.startswith("stages/") and d.endswith(".py")}
    imported = {f"stages/{m}.py" for m in imported_stage_modules(stage)}
    assert declared == imported


def test_every_stage_runs_after_params_are_validated() -> None:
    # validate_params reads the whole file; every other stage depends on its output.
    assert STAGES["validate_params"]["params"] == [{"params.yaml": None}]
    for stage, spec in STAGES.items():
        if stage != "validate_params":
            assert str(paths.PARAMS_CHECKED) in spec["deps"], stage


@pytest.mark.parametrize("stage", sorted(set(STAGES) - {"validate_params"}))
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


def named_paths(stage: str) -> set[Path]:
    """The `paths.NAME` the stage's module uses, as paths relative to the repository."""
    tree = ast.parse((REPO_ROOT / "stages" / f"{stage}.py").read_text())
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "paths":
            path = getattr(paths, node.attr)
            used.add(path.relative_to(REPO_ROOT) if path.is_absolute() else path)
    return used


def declared_paths(stage: str) -> set[Path]:
    """The stage's data deps, outs, metrics and plots in dvc.yaml (code deps left out)."""
    spec = STAGES[stage]
    entries = [d for d in spec["deps"] if not d.startswith(("stages/", "newsclf/"))]
    if stage != "validate_params":
        entries.remove(str(paths.PARAMS_CHECKED))  # checked in its own test above
    for kind in ("outs", "metrics", "plots"):
        entries += [next(iter(e)) if isinstance(e, dict) else e for e in spec.get(kind, [])]
    # `${augment.reviews}`: DVC interpolates params.yaml values into dvc.yaml.
    return {Path(e.replace("${augment.reviews}", PARAMS["augment"]["reviews"])) for e in entries}


def covers(a: Path, b: Path) -> bool:
    """`a` is `b` or a folder holding it."""
    return a == b or a in b.parents


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_data_deps_and_outs_are_the_paths_the_stage_names(stage: str) -> None:
    used, declared = named_paths(stage), declared_paths(stage)
    undeclared = {u for u in used if not any(covers(u, d) or covers(d, u) for d in declared)}
    unused = {d for d in declared if not any(covers(u, d) or covers(d, u) for u in used)}
    if stage == "augment":
        # The reviews file comes from `augment.reviews`, which dvc.yaml interpolates.
        reviews = Path(PARAMS["augment"]["reviews"])
        assert reviews in declared
        unused.discard(reviews)
    if stage == "ingest":
        # Its raw files come from `ingest.sources`, which must point into the declared folder.
        unused.discard(paths.RAW)
        sources = PARAMS["ingest"]["sources"]
        assert all(covers(paths.RAW, Path(s["path"])) for s in sources)
    assert not undeclared, f"{stage} uses paths dvc.yaml does not declare: {undeclared}"
    assert not unused, f"{stage} declares paths its code does not name: {unused}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_outside_stages_are_imported(stage: str) -> None:
    for dep in STAGES[stage]["deps"]:
        if dep.startswith("newsclf/"):
            module = "newsclf." + Path(dep).stem
            sources = [
                (REPO_ROOT / "stages" / f"{m}.py").read_text()
                for m in imported_stage_modules(stage)
            ]
            assert any(f"from {module} import" in s for s in sources), (stage, dep)


def test_the_model_artifact_is_the_exported_folder_with_its_card() -> None:
    artifact = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["artifacts"]["text-classifier"]
    assert artifact["path"] == str(paths.ONNX) and artifact["type"] == "model"
    # Classes and base model travel inside the folder (DVC would not interpolate params here).
    assert artifact["meta"]["card"] == str(paths.ONNX / "README.md")
    assert artifact["meta"]["classes_and_base_model"] == str(paths.ONNX / "newsclf_onnx.json")
