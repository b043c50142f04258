"""Typed run configurations: defaults in one visible place, YAML files plus ``--key value`` overrides.

Each stage has a flat dataclass; its field defaults are the toytown CPU defaults and the annotated YAML files in
``configs/`` hold the paper-scale settings. Unknown keys and values of the wrong type are errors that name the
key (and the file), never silently ignored lines. The resolved config is saved beside every run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hias_nb.errors import InputError

__all__ = ["load_config", "parse_overrides", "config_to_dict", "coerce"]

T = TypeVar("T")


def _parse_scalar(text: str) -> Any:
    """Parse a command-line value with YAML's scalar rules (``1e-3`` → float, ``true`` → bool, ``[1,2]`` → list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(value: Any, tp: Any, field: str, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is lossless (int → float, list → tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = InputError(f"{where}: {field}: expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, field, where)
            except InputError:
                continue
        raise bad
    if origin is typing.Literal:
        if value in args:
            return value
        raise InputError(f"{where}: {field}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = _parse_scalar(value)
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], field, where) for v in value)
        if origin is tuple:
            if len(args) != len(value):
                raise bad
            return tuple(coerce(v, a, field, where) for v, a in zip(value, args, strict=True))
        return [coerce(v, args[0], field, where) for v in value] if args else list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(cls: type[T], base: T, values: dict[str, Any], where: str) -> T:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in names:
            close = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise InputError(f"{where}: unknown config key {key!r}{hint}")
        changes[name] = coerce(value, hints[name], name, where)
    return dataclasses.replace(base, **changes)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--lr", "1e-3", "--amp", "false"]`` → ``{"lr": 0.001, "amp": False}``; also accepts ``--key=value``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise InputError(f"command line: expected --key value, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise InputError(f"command line: {arg} needs a value")
            key, text = arg[2:], args[i + 1]
            i += 2
        out[key] = _parse_scalar(text)
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults of `cls`, updated by the YAML file at `path` (if any), then by `overrides`; every key checked."""
    cfg = cls()
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise InputError(f"{path}: not valid YAML ({e})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise InputError(f"{path}: a config file must be a mapping of key: value")
        cfg = _apply(cls, cfg, data, str(path))
    if overrides:
        cfg = _apply(cls, cfg, overrides, "command line")
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-friendly dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
