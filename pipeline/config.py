"""Typed configuration: YAML + dotted ``key=value`` overrides -> nested dataclasses.

Rules (stricter than torchtune/nanoGPT on purpose):
- an unknown key anywhere is an error that names the dotted key and suggests the closest valid one;
- a value of the wrong type is an error naming the key, the expected and the given type;
- every error is collected and reported at once, before any model is loaded;
- a file may extend others: ``base: FILE`` or ``base: [FILE, ...]`` (relative to it; mappings merge deeply,
  lists and values replace; see ``_read_yaml``); the resolved config (``dump_yaml``) is fully expanded;
- a dataclass may define ``check(self) -> list[str]`` for cross-field rules (messages name keys
  relative to that dataclass; they are prefixed with its dotted path). It runs when the fields it reads
  are valid: all fields, or those named in a class attribute ``check_reads``.

Supported field types: bool, int, float, str, ``Literal[...]``, ``X | None``, ``A | B``,
``list[X]``, ``dict[str, X]``, nested dataclasses, and any of these ``Annotated`` with range and
length constraints of ``annotated_types`` (``Ge``, ``Gt``, ``Le``, ``Lt``, ``Interval``,
``MultipleOf``, ``MinLen``, ``MaxLen``, ``Len``; see pipeline/schema/common.py). An int is accepted for
a float; a string that parses as a number is accepted for a float (YAML 1.1 reads ``1e-8`` as a string).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import annotated_types as at
import yaml

from pipeline.errors import ConfigError

T = TypeVar("T")
_MISSING = object()


def _constraints(tp: Any) -> tuple[Any, list]:
    """``Annotated[X, Interval(ge=0, lt=1)]`` -> ``(X, [Ge(0), Lt(1)])``."""
    base, *meta = get_args(tp)
    return base, [c for m in meta for c in (m if isinstance(m, at.GroupedMetadata) else [m])]


def _holds(c: Any, v: Any) -> bool:
    if isinstance(c, at.Ge):
        return v >= c.ge
    if isinstance(c, at.Gt):
        return v > c.gt
    if isinstance(c, at.Le):
        return v <= c.le
    if isinstance(c, at.Lt):
        return v < c.lt
    if isinstance(c, at.MultipleOf):
        return v % c.multiple_of == 0
    if isinstance(c, at.MinLen):
        return len(v) >= c.min_length
    if isinstance(c, at.MaxLen):
        return len(v) <= c.max_length
    raise TypeError(f"unsupported config constraint {c!r}")  # a schema bug, not a user error


def _describe(cs: list, sep: str = ", ") -> str:
    """What the constraints ask for, to follow "must be": ``in [0, 1)``, ``>= 1``, ``non-empty``."""
    lo = next((c for c in cs if isinstance(c, at.Ge | at.Gt)), None)
    hi = next((c for c in cs if isinstance(c, at.Le | at.Lt)), None)
    short = next((c.min_length for c in cs if isinstance(c, at.MinLen)), None)
    long = next((c.max_length for c in cs if isinstance(c, at.MaxLen)), None)
    parts = []
    if lo is not None and hi is not None:
        a, b = ("[", lo.ge) if isinstance(lo, at.Ge) else ("(", lo.gt)
        c, d = (hi.le, "]") if isinstance(hi, at.Le) else (hi.lt, ")")
        parts.append(f"in {a}{b}, {c}{d}")
    elif lo is not None:
        parts.append(f">= {lo.ge}" if isinstance(lo, at.Ge) else f"> {lo.gt}")
    elif hi is not None:
        parts.append(f"<= {hi.le}" if isinstance(hi, at.Le) else f"< {hi.lt}")
    parts += [f"a multiple of {c.multiple_of}" for c in cs if isinstance(c, at.MultipleOf)]
    if short == 1 and long is None:
        parts.append("non-empty")
    elif short is not None and short == long:
        parts.append(f"of length {short}")
    else:
        parts += [f"of length >= {short}"] if short is not None else []
        parts += [f"of length <= {long}"] if long is not None else []
    return sep.join(parts)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        base, cs = _constraints(tp)
        desc = _describe(cs)  # "int >= 1", "float in [0, 1)"; "str, non-empty"
        return f"{_type_name(base)}{' ' if desc[0] in '<>i' else ', '}{desc}"
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if origin is dict:
        return f"dict[str, {_type_name(get_args(tp)[1])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _close(word: str, valid: list[str]) -> str | None:
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def _suggest(key: str, valid: list[str]) -> str:
    close = _close(key, valid)
    return f" (did you mean '{close}'?)" if close else f" (valid keys: {', '.join(sorted(valid))})"


def _convert(value: Any, tp: Any, path: str, errors: list[str], unknown: list[str]) -> Any:
    """Return ``value`` converted to ``tp`` or _MISSING after appending an error."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, cs = _constraints(tp)
        out = _convert(value, base, path, errors, unknown)
        if out is _MISSING or all(_holds(c, out) for c in cs):
            return out
        errors.append(f"{path}: must be {_describe(cs, ' and ')}, got {value!r}")
        return _MISSING
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            errors.append(
                f"{path}: expected a mapping (section {tp.__name__}), got {type(value).__name__} {value!r}"
            )
            return _MISSING
        return _build(tp, value, path, errors, unknown)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and not (
            isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)
        ):
            return value
        close = _close(value, [str(c) for c in choices]) if isinstance(value, str) else None
        hint = f" (did you mean '{close}'?)" if close else ""
        errors.append(f"{path}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}")
        return _MISSING
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # X | None: X's own message (its range, its choices)
            return _convert(value, others[0], path, errors, unknown)
        # try each member without recording its errors; bool before numbers so True is not 1
        for arg in args:
            if arg is type(None):
                continue
            trial: list[str] = []
            out = _convert(value, arg, path, trial, trial)
            if not trial:
                return out
        errors.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return _MISSING
    if origin is list:
        if not isinstance(value, list | tuple):
            errors.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
            return _MISSING
        (item_tp,) = get_args(tp)
        out = [_convert(v, item_tp, f"{path}[{i}]", errors, unknown) for i, v in enumerate(value)]
        return _MISSING if any(v is _MISSING for v in out) else out
    if origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
            return _MISSING
        _, val_tp = get_args(tp)
        out = {str(k): _convert(v, val_tp, f"{path}.{k}", errors, unknown) for k, v in value.items()}
        return _MISSING if any(v is _MISSING for v in out.values()) else out
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    errors.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return _MISSING


def _build(cls: type[T], data: dict, prefix: str, errors: list[str], unknown: list[str]) -> T:
    """Build ``cls`` from ``data``: value errors go to ``errors``, unknown keys to ``unknown``.

    A field whose value is bad keeps its default, so the other fields and sections are still checked.
    The cross-field ``check`` runs when the fields it reads (``check_reads``, default: all) had no value
    error: a bad value elsewhere, or an unknown key, does not hide a cross-field error.
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            unknown.append(
                f"{prefix + '.' if prefix else ''}{key}: unknown key{_suggest(str(key), list(fields))}"
            )
    kwargs, failed = {}, set()
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        before = len(errors)
        if name in data:
            value = _convert(data[name], hints[name], path, errors, unknown)
            if value is not _MISSING:
                kwargs[name] = value
        elif (
            dataclasses.is_dataclass(hints[name])
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            kwargs[name] = _build(hints[name], {}, path, errors, unknown)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{path}: missing required key ({_type_name(hints[name])})")
        if len(errors) > before:
            failed.add(name)
    try:
        obj = cls(**kwargs)
    except TypeError:
        return None  # type: ignore[return-value]  # missing fields: already reported
    check = getattr(obj, "check", None)
    if check is not None and not failed.intersection(getattr(cls, "check_reads", fields)):
        errors.extend(f"{prefix + '.' if prefix else ''}{msg}" for msg in check())
    return obj


def _set_dotted(data: dict, dotted: str, value: Any, errors: list[str]) -> None:
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            errors.append(f"{'.'.join(parts[: i + 1])}: is a value, cannot set '{dotted}'")
            return
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> tuple[list[tuple[str, Any]], list[str]]:
    """``["a.b=1", "c=x"]`` -> ``[("a.b", 1), ("c", "x")]``; values are parsed as YAML scalars."""
    out, errors = [], []
    for item in overrides:
        if item.startswith("-"):
            errors.append(
                f"{item}: unknown option; overrides are written key=value (e.g. model.path=/models/sd15)"
            )
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key:
            errors.append(f"{item!r}: not a key=value override")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out, errors


def _merge(base: dict, over: dict) -> dict:
    """Deep merge: mappings merge key by key, anything else in ``over`` (lists included) replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: str | Path, chain: tuple[Path, ...] = ()) -> dict:
    """Read a config file with its bases: a top-level ``base: FILE`` (or a list of files, merged in
    order) names files it extends, relative to it; chains are allowed. Returns the merged mapping."""
    p = Path(path)
    if p.resolve() in [c.resolve() for c in chain]:
        raise ConfigError([f"{chain[0]}: base cycle: {' -> '.join(str(c) for c in (*chain, p))}"])
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from e
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError([f"{path}: the top level must be a mapping, got {type(loaded).__name__}"])
    data = loaded or {}
    bases = data.pop("base", [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError([f"{path}: base: expected a file name or a list of them, got {bases!r}"])
    merged: dict = {}
    for b in bases:
        bp = p.parent / b
        if not bp.is_file():
            raise ConfigError([f"{path}: base {b}: no such file ({bp})"])
        merged = _merge(merged, _read_yaml(bp, (*chain, p)))
    return _merge(merged, data)


def read_config_file(path: str | Path) -> dict:
    """A config file merged with its bases, before any check (to read one key ahead of loading)."""
    return _read_yaml(path)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``path`` (YAML, with its bases) into ``cls`` and apply dotted overrides; raise ConfigError
    listing every problem."""
    errors: list[str] = []
    data: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError([f"--config {path}: no such file"])
        data = _read_yaml(path)
    pairs, errs = parse_overrides(overrides or [])
    errors.extend(errs)
    for key, value in pairs:
        _set_dotted(data, key, value, errors)
    unknown: list[str] = []
    cfg = _build(cls, data, "", errors, unknown)
    if errors or unknown:
        raise ConfigError(unknown + errors)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def write_resolved(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config atomically (tmp + rename) and return its path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(dump_yaml(cfg))
    tmp.replace(p)
    return p


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for diffs between configs)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def schema_default(cls: type, dotted: str) -> Any:
    """The schema's default of a dotted key (``dataclasses.MISSING`` when it has none or no such key):
    lets a resume accept keys that a newer version added, at their defaults."""
    parts = dotted.split(".")
    for i, name in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return dataclasses.MISSING
        f = {x.name: x for x in dataclasses.fields(cls)}.get(name)
        if f is None:
            return dataclasses.MISSING
        if i == len(parts) - 1:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                v = f.default_factory()
                return to_dict(v) if dataclasses.is_dataclass(v) else v
            return dataclasses.MISSING
        cls = typing.get_type_hints(cls)[name]
    return dataclasses.MISSING
