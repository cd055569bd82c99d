"""Loading a config: YAML files (with ``base:``), ``--set a.b=c`` overrides, JSON round trips.

Owns reading and merging the files, applying overrides, and coercing plain data into the section
dataclasses by their type hints; unknown, retired and refused keys and values of the wrong type
raise ``ConfigError`` naming the dotted key. The range checks are the sections' own
(``Section.validate``), run once on the whole built ``Config``. Must not import sglang, torch or
any package module but ``errors`` and this package.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

import yaml

from alchemist_sgl.config.rules import Section, python_name, yaml_name
from alchemist_sgl.config.sections import REFUSED_VALUES, RETIRED_KEYS, Config
from alchemist_sgl.errors import ConfigError

S = TypeVar("S", bound=Section)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads ``path`` (or the defaults when None), applies ``a.b=c`` overrides, validates.

    Raises ConfigError naming the dotted key for unknown keys and bad values.
    """
    raw: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        _apply_override(raw, item)
    return _load(raw)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data with YAML spellings (for logs and experiment records)."""
    plain = _plain(config)
    assert isinstance(plain, dict)
    return plain


def config_to_json(config: Config) -> str:
    return json.dumps(config_to_dict(config), sort_keys=True)


def config_from_json(text: str) -> Config:
    """The config ``config_to_json`` wrote, validated again (the scheduler process's load)."""
    return _load(json.loads(text))


def _load(raw: object) -> Config:
    config = _build(Config, raw, "")
    config.validate()
    return config


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {yaml_name(f.name): _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("<file>", f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError("base", f"config files include each other: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("<file>", f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("<file>", f"{path} must hold a mapping of sections")
    base_name = data.pop("base", None)
    if base_name is None:
        return data
    base = _read_yaml(path.parent / str(base_name), seen + (path.resolve(),))
    return _deep_merge(base, data)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(item, "an override must read a.b=value")
    dotted, text = item.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(dotted, "an override names a section and a key, e.g. train.replay=false")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(dotted, f"'{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text != "" else ""


def _build(cls: type[S], raw: object, prefix: str) -> S:
    """An instance of the section dataclass ``cls`` from the mapping ``raw`` (keys at ``prefix``)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix or "<root>", f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = python_name(str(key))
        dotted = f"{prefix}{key}"
        if dotted in RETIRED_KEYS:
            raise ConfigError(dotted, RETIRED_KEYS[dotted])
        for refused, reason in REFUSED_VALUES.get(dotted, {}).items():
            if value == refused:
                raise ConfigError(dotted, reason)
        if name not in fields:
            known = ", ".join(sorted(yaml_name(n) for n in fields))
            raise ConfigError(dotted, f"unknown key (known here: {known})")
        kwargs[name] = _coerce(hints[name], value, dotted)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(prefix.rstrip(".") or "<root>", str(exc)) from exc


def _coerce(hint: Any, value: object, dotted: str) -> Any:
    """``value`` as the type ``hint`` names (a section, mapping, Literal, union, tuple or scalar)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(hint, type) and issubclass(hint, Section):
        return _build(hint, value if value is not None else {}, dotted + ".")
    if hint is Any:
        return value
    if origin in (Mapping, collections.abc.Mapping) or hint is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(dotted, "expected a mapping")
        return types.MappingProxyType(dict(value))
    if origin is Literal:
        if value not in args:
            raise ConfigError(dotted, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(hint, args, value, dotted)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(dotted, "expected a list")
        return tuple(_coerce(args[0], v, f"{dotted}[{i}]") for i, v in enumerate(value))
    return _coerce_scalar(hint, value, dotted)


def _coerce_union(hint: Any, args: tuple[Any, ...], value: object, dotted: str) -> Any:
    for option in args:
        if option is type(None):
            if value is None:
                return None
            continue
        try:
            return _coerce(option, value, dotted)
        except ConfigError:
            continue
    raise ConfigError(dotted, f"{value!r} fits none of {hint}")


def _coerce_scalar(hint: Any, value: object, dotted: str) -> object:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(dotted, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(dotted, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(dotted, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(dotted, f"expected a string, got {value!r}")
        return value
    raise ConfigError(dotted, f"unsupported type {hint}")
