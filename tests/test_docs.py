"""The README's params table and params.yaml name the same keys with the same defaults."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.pipeline_fixture import REPO_ROOT

# Rows whose default is described in words rather than spelled as a value.
DESCRIBED = {"ingest.sources": "the four files of `data/raw/ag_news/`"}


def leaf_keys(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of every value that is not a mapping (lists are values)."""
    out = {}
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= leaf_keys(value, f"{dotted}.")
        else:
            out[dotted] = value
    return out


def split_top_level(cell: str) -> list[str]:
    """`a, [b, c], d` -> ['a', '[b, c]', 'd']: commas inside brackets do not split."""
    parts, depth, current = [], 0, ""
    for ch in cell:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    return [*parts, current.strip()]


def readme_params() -> dict[str, str]:
    """Dotted key -> the default as the README's params table spells it."""
    text = (REPO_ROOT / "README.md").read_text()
    table = text.split("\n## Params\n", 1)[1].split("\n## ", 1)[0]
    documented = {}
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        keys_cell, default_cell = (c.strip() for c in line.strip("|").split("|")[:2])
        names = re.findall(r"`([^`]+)`", keys_cell)
        prefix = names[0].rsplit(".", 1)[0] if "." in names[0] else ""
        keys = [names[0]] + [
            f"{prefix}{n}" if n.startswith(".") else (n if "." in n else f"{prefix}.{n}")
            for n in names[1:]
        ]
        if len(keys) == 1 and keys[0] in DESCRIBED:
            assert default_cell == DESCRIBED[keys[0]], keys[0]
            documented[keys[0]] = default_cell
            continue
        defaults = split_top_level(default_cell)
        assert len(defaults) == len(keys), f"README params row {keys}: defaults {defaults}"
        documented |= {k: d.strip("`") for k, d in zip(keys, defaults, strict=True)}
    return documented


def same_value(documented: str, actual: Any) -> bool:
    value = yaml.safe_load(documented)
    if isinstance(actual, float) and not isinstance(value, bool):
        return float(value) == actual
    return value == actual


def test_readme_params_table_matches_params_yaml() -> None:
    params = leaf_keys(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()))
    documented = readme_params()
    # `augment.ops.<op>.x` in the README stands for the key of every op.
    expanded = {}
    for key, default in documented.items():
        if "<op>" in key:
            pattern = re.compile(re.escape(key).replace("<op>", r"[a-z_]+"))
            matches = [k for k in params if pattern.fullmatch(k)]
            assert matches, key
            expanded |= dict.fromkeys(matches, default)
        else:
            expanded[key] = default
    assert sorted(expanded) == sorted(params)
    wrong = {
        key: (default, params[key])
        for key, default in expanded.items()
        if key not in DESCRIBED and not same_value(default, params[key])
    }
    assert not wrong, f"README default != params.yaml: {wrong}"
    sources = params["ingest.sources"]
    assert len(sources) == 4 and all(s["path"].startswith("data/raw/ag_news/") for s in sources)


def test_readme_base_model_table_is_the_families_table() -> None:
    """README's "Choosing a base model" lists every supported type once, with what `auto` gives."""
    from stages.families import FAMILIES, resolve_lora

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Choosing a base model", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    listed = {}
    for kind, types, targets, saved, _ in rows[1:]:  # the header row first
        for model_type in re.findall(r"`([^`]+)`", types):
            listed[model_type] = (kind.strip(), targets, saved)
    assert sorted(listed) == sorted(FAMILIES)
    for model_type, (kind, targets, saved) in listed.items():
        family = FAMILIES[model_type]
        choice = resolve_lora(model_type, family, "auto", "auto")
        assert kind == family.kind, model_type
        assert re.findall(r"`([^`]+)`", targets) == [", ".join(choice.target_modules)], model_type
        assert re.findall(r"`([^`]+)`", saved) == [", ".join(choice.modules_to_save)], model_type
