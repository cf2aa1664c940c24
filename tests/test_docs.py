"""The docs agree with the code: the params table with params.yaml, the base-model table with
stages/families.py; every relative link resolves; the README stays a ten-minute read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.pipeline_fixture import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
PARAMS_DOC, PARAMS_HEADING = DOCS / "params.md", "## Every key, its default and meaning"
BASE_MODELS_DOC, BASE_MODELS_HEADING = DOCS / "base_models.md", "## Choosing a base model"
README_MAX_LINES = 250

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


def section(path: Path, heading: str) -> str:
    """The text under `heading` (a line of its own) up to the next heading of its level or above."""
    text = path.read_text()
    assert f"\n{heading}\n" in text, f"{path.relative_to(REPO_ROOT)}: no {heading!r}"
    body = text.split(f"\n{heading}\n", 1)[1]
    level = heading.split(" ", 1)[0]
    return re.split(rf"\n#{{1,{len(level)}}} ", body, maxsplit=1)[0]


def documented_params() -> dict[str, str]:
    """Dotted key -> the default as docs/params.md's table spells it."""
    table = section(PARAMS_DOC, PARAMS_HEADING)
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
        assert len(defaults) == len(keys), f"params table row {keys}: defaults {defaults}"
        documented |= {k: d.strip("`") for k, d in zip(keys, defaults, strict=True)}
    return documented


def same_value(documented: str, actual: Any) -> bool:
    value = yaml.safe_load(documented)
    if isinstance(actual, float) and not isinstance(value, bool):
        return float(value) == actual
    return value == actual


def test_params_table_matches_params_yaml() -> None:
    params = leaf_keys(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()))
    documented = documented_params()
    # `augment.ops.<op>.x` in the table stands for the key of every op.
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
    assert not wrong, f"docs/params.md default != params.yaml: {wrong}"
    sources = params["ingest.sources"]
    assert len(sources) == 4 and all(s["path"].startswith("data/raw/ag_news/") for s in sources)


def test_base_model_table_is_the_families_table() -> None:
    """docs/base_models.md's "Choosing a base model" lists every supported type once, with what
    `auto` gives."""
    from stages.families import FAMILIES, resolve_lora

    table = section(BASE_MODELS_DOC, BASE_MODELS_HEADING)
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
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


# --- links and length ------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def doc_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def without_code_blocks(path: Path) -> str:
    return re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)


def prose(path: Path) -> str:
    """The page without its fenced code blocks and inline code (neither holds links)."""
    return re.sub(r"`[^`\n]*`", "", without_code_blocks(path))


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, each space a hyphen."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", without_code_blocks(path), flags=re.M)}


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_point_at_files_that_exist(page: Path) -> None:
    """Every relative link in README.md and docs/*.md names an existing file (and, where it names a
    section of a Markdown page, a heading of that page)."""
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(REPO_ROOT)}: broken links {broken}"


def test_readme_links_every_docs_page() -> None:
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_is_a_ten_minute_read() -> None:
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"
    )
