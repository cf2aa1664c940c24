"""Named sets of params overrides for `dvc exp run`: `dvc exp run $(newsclf preset fast)`.

A preset is `presets/<name>.yaml`, a mapping of dotted params keys (as `dvc exp run -S` takes them)
to values. Every key must already exist in `params.yaml`: `-S` with a misspelt key would quietly add
a param that no stage reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PRESETS_DIR = Path("presets")
PARAMS_FILE = Path("params.yaml")


class PresetError(Exception):
    """A missing or malformed preset, or one naming a param that params.yaml lacks."""


def _has_key(params: dict[str, Any], dotted: str) -> bool:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def load_preset(
    name: str, presets_dir: Path = PRESETS_DIR, params_file: Path = PARAMS_FILE
) -> dict[str, Any]:
    """The preset's dotted keys and values, each key checked against `params_file`."""
    path = presets_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in presets_dir.glob("*.yaml"))
        raise PresetError(f"{path}: no such preset (known: {', '.join(known) or 'none'})")
    preset = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(preset, dict) or not preset:
        raise PresetError(f"{path}: expected a mapping of dotted params keys to values")
    if not params_file.is_file():
        raise PresetError(f"{params_file}: not found (run from the repository root)")
    params = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    for key in preset:
        if not isinstance(key, str) or not _has_key(params, key):
            raise PresetError(f"{path}: `{key}` is not a key of {params_file}")
    return preset


def set_param_args(preset: dict[str, Any]) -> list[str]:
    """`-S key=value` arguments for `dvc exp run`, values in YAML flow style without blanks."""
    args = []
    for key, value in preset.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        text = text.removesuffix("\n...").replace(", ", ",")
        if any(ch.isspace() or ch in "'\"\\" for ch in text):
            # The arguments travel through `$(...)`, which splits on blanks and keeps quotes.
            raise PresetError(f"`{key}`: value {text!r} has blanks or quotes; use -S by hand")
        args += ["-S", f"{key}={text}"]
    return args
