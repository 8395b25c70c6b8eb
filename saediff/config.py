"""Stage configs as small dataclasses: field docstrings double as CLI help, YAML mirrors them.

Each stage declares a dataclass whose fields carry a one-line docstring right below them;
`add_dataclass_args` turns it into argparse options and `build_config` merges YAML and
command-line overrides into a validated instance (validation lives in `__post_init__`);
`config_from_args` is the one path every CLI command takes from parsed flags to its config.
Shared sub-configs (`saediff.cache.source.ModelSource`, `saediff.judged.GenerationConfig`,
`JudgeConfig`) are inherited, so their fields stay flat: one flag and one YAML key each.

Why not `simple_parsing` (as sparsify and SAELens use): it is not a dependency today, and it
would replace only `add_dataclass_args` (~60 lines): the YAML merging with unset-flag
detection, the value checks with one-line errors, HELP_REQUIRED and the defaults in --help
stay ours; its nested dataclasses would prefix flags (`--generation.samples`), breaking the
flat flags and YAML keys users have.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from saediff.errors import SaediffError


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal right after `name: type = default`)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for `X | None` / `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                       required: tuple[str, ...] = (), defaults_none: bool = False) -> None:
    """Add one `--field-name` option per dataclass field.

    With `defaults_none`, unset options parse as None so they do not override a YAML file.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, _ = _unwrap(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "help": docs.get(f.name, "")}
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        origin = typing.get_origin(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kw["choices"] = list(typing.get_args(tp))
            kw["type"] = type(typing.get_args(tp)[0])
        elif origin in (list, tuple):
            inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kw["nargs"] = "+"
            kw["type"] = inner if inner in (int, float, str) else str
        elif origin is dict:
            kw["type"] = _parse_mapping
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            kw["type"] = str
        kw["default"] = None if defaults_none else default
        if f.name in required:
            kw["required"] = True
        elif (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING) \
                or f.name in getattr(cls, "HELP_REQUIRED", ()):  # type: ignore[misc]
            # HELP_REQUIRED: fields that default to None only because a shared sub-config
            # (ModelSource) leaves them optional for another stage
            kw["help"] += " (required: a flag or the YAML config)"
        else:
            kw["help"] = _with_default(kw["help"], default, tp)
        parser.add_argument(flag, **kw)


def _with_default(help_text: str, default: Any, tp: Any) -> str:
    """The field's default in its help, unless the docstring already states it."""
    if "default" in help_text.lower():
        return help_text
    if default is None:
        return help_text + " (default: none)"
    if tp is bool:
        shown = "on" if default else "off"
    elif isinstance(default, (list, tuple)):
        shown = " ".join(map(str, default)) if default else "none"
    elif isinstance(default, dict):
        shown = ",".join(f"{k}={v}" for k, v in default.items()) if default else "none"
    else:
        shown = str(default)
    return f"{help_text} (default: {shown})"


def _unknown_fields(cls: type, unknown: list[str], names: set[str]) -> SaediffError:
    """One line: each unknown key with its nearest field name when there is one."""
    import difflib

    parts = []
    for key in unknown:
        near = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
        parts.append(f"{key} (did you mean {near[0]}?)" if near else str(key))
    return SaediffError(f"unknown {cls.__name__} field(s): {', '.join(parts)}; "
                        f"known: {', '.join(sorted(names))}")


def _parse_mapping(text: str) -> dict[str, float]:
    """`base=0.5,finetuned=0.5` -> {"base": 0.5, "finetuned": 0.5}."""
    out: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected name=weight pairs, got {text!r}")
        out[key.strip()] = float(value)
    return out


def build_config(cls: type, yaml_path: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> Any:
    """YAML values, then non-None overrides, into `cls(...)` (which validates itself)."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        loaded = load_yaml(path)
        if not isinstance(loaded, dict):
            raise SaediffError(f"{path}: expected a mapping of config fields at top level")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise _unknown_fields(cls, unknown, names)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in values
               and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if missing:
        raise SaediffError(f"missing required {cls.__name__} field(s): "
                         f"{', '.join('--' + m.replace('_', '-') for m in missing)} "
                         "(give them as flags or in the YAML config)")
    values = check_field_values(cls, values, yaml_path)
    try:
        return cls(**values)
    except ValueError as exc:  # __post_init__ validation: the user's input, not a bug
        if isinstance(exc, SaediffError):
            raise
        raise SaediffError(f"{cls.__name__}: {exc}") from exc


def config_from_args(cls: type, args: argparse.Namespace, overrides: dict[str, Any] | None = None,
                     yaml_path: Any = ...) -> Any:
    """The one path from parsed arguments to a stage config: the YAML file (`yaml_path`; by
    default the parser's `--config` when it has one; None = no file), then the flags that are fields of `cls` (unset
    flags parse as None and leave the YAML value alone), then `overrides`. Options that are not
    fields (`--no-html`, a sub-command's name) never reach the config."""
    ns = vars(args)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in ns.items() if k in names}
    values.update(overrides or {})
    return build_config(cls, ns.get("config") if yaml_path is ... else yaml_path, values)


def load_yaml(path: str | Path) -> Any:
    """`yaml.safe_load` of a file; syntax errors and refused tags name the file and line."""
    path = Path(path)
    try:
        loader = _UniqueKeyLoader(path.read_text(encoding="utf-8"))  # a yaml.SafeLoader
        try:
            return loader.get_single_data() or {}
        finally:
            loader.dispose()
    except UnicodeDecodeError as exc:
        raise SaediffError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except _DuplicateKey as exc:
        raise SaediffError(f"{path}:{exc.line + 1}: key {exc.key!r} is given twice (first on line "
                           f"{exc.first + 1}); keep one of them") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SaediffError(f"{where}: invalid YAML ({what}); only plain YAML values are "
                           "accepted (no python tags)") from exc


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON/YAML-safe dict of a config dataclass."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


# --- value checks (YAML gives strings, nulls and duplicate keys where numbers were meant) ------

class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader (no tags beyond plain YAML), refusing a key given twice (plain
    YAML keeps the last one silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line, seen[key])
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: the base class reports it
                pass
        return super().construct_mapping(node, deep=deep)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0] if typing.get_args(tp) else str)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp`, or raise TypeError/ValueError. Numeric strings become numbers:
    PyYAML reads `lr: 3e-4` (no dot) as the string "3e-4"."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ValueError(value)
        return value
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        return [_coerce(v, inner) for v in value] if inner in (int, float, bool) else value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(value)
        num = float(value) if isinstance(value, str) else value
        if tp is int:
            if isinstance(num, float) and not (num.is_integer() and math.isfinite(num)):
                raise ValueError(value)
            return int(num)
        return float(num)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def check_field_values(cls: type, values: dict[str, Any], source: Any = None) -> dict[str, Any]:
    """Each value fits its field's type (nulls only where the field is optional), before the
    dataclass sees it: one clear line instead of a TypeError deep in a stage."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    where = f"{source}: " if source is not None else ""
    out = dict(values)
    for name, value in values.items():
        if name not in fields:
            continue
        tp, optional = _unwrap(hints[name])
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else None
        hint = f" or remove it to use the default ({default!r})" if default is not None else ""
        if value is None:
            if not optional:
                raise SaediffError(f"{where}{name} is empty (null); give {_type_name(tp)}{hint}")
            continue
        try:
            out[name] = _coerce(value, tp)
        except (TypeError, ValueError):
            raise SaediffError(f"{where}{name} must be {_type_name(tp)}, got {value!r}{hint}") \
                from None
    return out
