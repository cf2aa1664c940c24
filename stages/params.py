"""Typed params: every stage's section of params.yaml parsed the same way into a frozen dataclass.

A stage declares its section as a dataclass whose fields have no defaults (params.yaml holds them,
so nothing here can drift from it) and calls `load_section`, the one way params are read. A missing,
unknown or badly typed key fails naming `section.key`. What types cannot express (ranges, a rule
between two keys) the dataclass checks in its own `__post_init__` with `check_values`, so every
section is checked in full where it is parsed, and the error names `section.key=value` and the rule.
Supported field types: bool, int, float, str, `X | None`, `X | Y`, `Literal[...]`, `tuple[X, ...]`,
a nested dataclass for a nested mapping, and `dict` for a mapping the stage checks itself.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from stages.common import PARAMS_FILE, StageError, load_params

T = TypeVar("T")


class BadValues(StageError):
    """Values a params dataclass refuses, as {key: "value (must be ...)"}; `parse_section` prefixes
    each key with its section."""

    def __init__(self, faults: dict[str, str]) -> None:
        self.faults = faults
        super().__init__("bad value(s) " + ", ".join(f"{k}={v}" for k, v in faults.items()))


def check_values(params: object, rules: dict[str, tuple[bool, str]]) -> None:
    """For a dataclass's `__post_init__`: `rules` maps a field to (holds, what it must be)."""
    faults = {
        key: f"{getattr(params, key)!r} (must be {must})"
        for key, (holds, must) in rules.items()
        if not holds
    }
    if faults:
        raise BadValues(faults)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return parse_section(value, hint, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except StageError:
                continue
        names = " or ".join(
            [getattr(a, "__name__", repr(a)) for a in options]
            + ["null"] * (len(options) < len(args))
        )
        raise StageError(
            f"params.yaml {key}: expected {names}, got {type(value).__name__} {value!r}"
        )
    if origin is Literal:
        if value not in args:
            raise StageError(f"params.yaml {key}: {value!r}; choose from {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise StageError(f"params.yaml {key}: expected a list, got {value!r}")
        return tuple(_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value))
    # bool is an int in Python: `batch_size: true` must not pass as 1.
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,), dict: (dict,)}.get(
        hint
    )
    if expected is None:
        raise TypeError(f"{key}: unsupported params type {hint!r}")
    if not isinstance(value, expected) or (hint is not bool and isinstance(value, bool)):
        raise StageError(
            f"params.yaml {key}: expected {hint.__name__}, got {type(value).__name__} {value!r}"
        )
    return float(value) if hint is float else value


def parse_section(raw: Any, cls: type[T], section: str) -> T:
    """`raw` (the mapping at `section` in params.yaml) as a `cls` instance, every key checked."""
    if not isinstance(raw, dict):
        raise StageError(f"params.yaml {section}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [f"{section}.{name}" for name in names if name not in raw]
    if missing:
        raise StageError(f"params.yaml: missing key(s) {', '.join(missing)}")
    unknown = [f"{section}.{key}" for key in raw if key not in names]
    if unknown:
        raise StageError(f"params.yaml: unknown key(s) {', '.join(unknown)}")
    values = {name: _coerce(raw[name], hints[name], f"{section}.{name}") for name in names}
    try:
        return cls(**values)
    except BadValues as err:
        shown = ", ".join(f"{section}.{k}={v}" for k, v in err.faults.items())
        raise StageError(f"params.yaml: bad value(s) {shown}") from None


def load_section(section: str, cls: type[T], path: Path = PARAMS_FILE) -> T:
    """The `section` of params.yaml, parsed as `cls`."""
    return parse_section(load_params(section, path), cls, section)
