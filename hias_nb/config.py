"""Typed run configurations: defaults in one visible place, YAML files plus ``--key value`` overrides.

Each stage has a flat dataclass; its field defaults are the toytown CPU defaults and the annotated YAML files in
``configs/`` hold the paper-scale settings. Unknown keys and values of the wrong type are errors that name the
key (and the file), never silently ignored lines. The resolved config is saved beside every run.

A config may also hold whole stage configs as *sections* (a field whose type is a dataclass, as ``DemoConfig``
does): ``section.key`` sets one of their keys, and a bare ``key`` does too when it is no field of the config itself
and exactly one section has it (an error lists the candidates when several do). In a YAML file a section is a
nested mapping (``round: {lr: 1.0e-4}``) or dotted keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hias_nb.errors import InputError

__all__ = ["load_config", "override", "parse_overrides", "config_to_dict", "coerce", "check_ranges"]

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
        if value is False and "off" in args:  # YAML 1.1 (PyYAML) reads a bare `off` as false
            return "off"
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
            if not math.isfinite(value):  # nan or inf is never a setting; it would pass every range check
                raise InputError(f"{where}: {field}: expected a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and math.isfinite(number):
                return number
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


def _sections(cls: type) -> dict[str, type]:
    """The fields of `cls` that hold a whole config of their own (a dataclass), by name."""
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _unknown(key: str, names: Iterable[str], where: str) -> InputError:
    close = difflib.get_close_matches(key.replace("-", "_"), sorted(set(names)), n=3, cutoff=0.6)  # best first
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return InputError(f"{where}: unknown config key {key!r}{hint}")


def _locate(cls: type, key: str, where: str, fixed: frozenset[str]) -> tuple[str | None, str]:
    """The (section, field) that `key` names (section None: a field of `cls` itself); see the module docstring.
    Section fields in `fixed` are set by the caller for each run (paths, seeds) and cannot be set here."""
    sections = _sections(cls)
    top = [f.name for f in dataclasses.fields(cls) if f.name not in sections]
    every = {s: {f.name for f in dataclasses.fields(t)} for s, t in sections.items()}
    keys = {s: sorted(names - fixed) for s, names in every.items()}
    section, dot, name = key.replace("-", "_").rpartition(".")
    if dot and section in keys and name in keys[section]:
        return section, name
    if not dot and name in top:
        return None, name
    owners = [s for s in keys if name in keys[s]] if not dot else []
    if len(owners) == 1:
        return owners[0], name
    if owners:
        options = [f"{s}.{name}" for s in owners]
        listed = f"{', '.join(options[:-1])} or {options[-1]}"
        raise InputError(f"{where}: config key {key!r} is ambiguous: {listed} (write one of them)")
    if name in fixed and any(name in every[s] for s in every if not dot or s == section):
        raise InputError(f"{where}: config key {key!r} cannot be set: {cls.__name__} sets it for each stage")
    candidates = top + [k for s in keys for k in keys[s]] + [f"{s}.{k}" for s in keys for k in keys[s]]
    raise _unknown(key, candidates, where)


def _flatten(values: dict[Any, Any], sections: dict[str, type]) -> Iterator[tuple[str, Any]]:
    """``{"round": {"lr": 1e-4}}`` (a section as a nested mapping) → ``("round.lr", 1e-4)``; other items as is
    (``warmup: 0`` names a key, as ``--warmup 0`` does, though a section is called warmup too)."""
    for key, value in values.items():
        key = str(key)
        if key.replace("-", "_") in sections and isinstance(value, dict):
            yield from ((f"{key}.{k}", v) for k, v in value.items())
        else:
            yield key, value


def _apply(cls: type[T], base: T, values: dict[str, Any], where: str, fixed: frozenset[str] = frozenset()) -> T:
    hints, sections = _hints(cls), _sections(cls)
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in _flatten(values, sections):
        section, name = _locate(cls, key, where, fixed)
        if section is None:
            changes[name] = coerce(value, hints[name], name, where)
        else:
            tp = _hints(sections[section])[name]
            nested.setdefault(section, {})[name] = coerce(value, tp, f"{section}.{name}", where)
    for section, values_ in nested.items():
        changes[section] = dataclasses.replace(getattr(base, section), **values_)
    return dataclasses.replace(base, **changes)


def override(cfg: T, values: dict[str, Any], where: str = "command line", fixed: frozenset[str] = frozenset()) -> T:
    """`cfg` with `values` (``key: value``, keys as on the command line) applied and checked; see `load_config`."""
    return _apply(type(cfg), cfg, values, where, fixed)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--lr", "1e-3", "--amp", "off"]`` → ``{"lr": 0.001, "amp": False}`` (YAML reads `off` as false; a
    Literal setting with an "off" choice takes it back); also accepts ``--key=value``."""
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as e:
        raise InputError(f"{path}: cannot be read as a YAML text file ({type(e).__name__})") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config file must be a mapping of key: value")
    return data


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    base: T | None = None,
    fixed: frozenset[str] = frozenset(),
) -> T:
    """`base` (default: the defaults of `cls`), updated by the YAML file at `path` (if any), then by `overrides`;
    every key checked, then ``validate()`` where `cls` has one. `fixed`: section keys that cannot be set."""
    cfg = cls() if base is None else base
    if path is not None:
        cfg = _apply(cls, cfg, _read_yaml(Path(path)), str(path), fixed)
    if overrides:
        cfg = _apply(cls, cfg, overrides, "command line", fixed)
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-friendly dict (tuples become lists, sections nested dicts)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return config_to_dict(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def check_ranges(
    cfg: Any,
    *,
    positive: tuple[str, ...] = (),
    non_negative: tuple[str, ...] = (),
    unit: tuple[str, ...] = (),
    sizes: tuple[str, ...] = (),
    scale_ranges: tuple[str, ...] = (),
) -> None:
    """The range checks every stage config's ``validate()`` shares; an `InputError` names the first bad field.

    `positive`: numbers > 0 (a None ``stop_after`` is allowed); `non_negative`: numbers >= 0; `unit`: numbers in
    [0, 1]; `sizes`: None or pairs of positive integers (H, W); `scale_ranges`: pairs ``0 < lo <= hi <= 1``.
    Written ``not x > 0`` so that NaN fails every check.
    """

    def bad(name: str, rule: str) -> InputError:
        return InputError(f"{name}: must be {rule}, got {getattr(cfg, name)!r}")

    for name in positive:
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            raise bad(name, "positive")
    for name in non_negative:
        if not getattr(cfg, name) >= 0:
            raise bad(name, ">= 0")
    for name in unit:
        if not 0 <= getattr(cfg, name) <= 1:
            raise bad(name, "in [0, 1]")
    for name in sizes:
        v = getattr(cfg, name)
        if v is not None and not all(x > 0 for x in v):
            raise bad(name, "positive (H, W) or null")
    for name in scale_ranges:
        lo, hi = getattr(cfg, name)
        if not 0 < lo <= hi <= 1:
            raise bad(name, "a range 0 < low <= high <= 1")
