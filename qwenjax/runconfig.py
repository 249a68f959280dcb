"""Run configs: YAML files plus dotted `key=value` overrides, loaded into frozen dataclasses.

Every section is a dataclass owned by the module that uses it; this module only parses. Unknown
keys are errors naming the key and the file, so a typo never silently trains the wrong thing.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class RunConfigError(ValueError):
    """A run config key is unknown, missing or has a value of the wrong type."""


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a nested mapping, checking keys and scalar types."""
    if not isinstance(data, Mapping):
        raise RunConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RunConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    sub = (lambda n: f"{where} {n}") if where.endswith(":") else (lambda n: f"{where}.{n}")
    kwargs = {name: _convert(hints[name], value, sub(name)) for name, value in data.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RunConfigError(f"{where}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise RunConfigError(f"{where}{'' if where.endswith(':') else ':'} {e}") from e


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where)
            except RunConfigError:
                pass
        raise RunConfigError(f"{where}: {value!r} matches none of {args}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        if not isinstance(value, list | tuple):
            raise RunConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise RunConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RunConfigError(f"override {item!r} is not of the form key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RunConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_yaml(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Read `path` (YAML), apply overrides, and build `cls`; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise RunConfigError(f"run config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    return from_dict(cls, apply_overrides(data, overrides), where=f"{path}:")


def load_run_config(path: str | Path, overrides: Sequence[str] = ()):
    """The fine-tuning `RunConfig` of a YAML file (see configs/) with `key=value` overrides."""
    from qwenjax.train.loop import RunConfig

    return load_yaml(RunConfig, path, overrides)
