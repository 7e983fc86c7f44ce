"""Turning YAML and `a.b=value` text into checked config values, and the config's own documentation.

`config.py` holds the typed sections and the entry points (`load_config`, `config_from_dict`);
this module holds what they share: the type check of every field (`check_types`), dotted keys
and overrides, the YAML files (a path or `@NAME` for a config shipped in the package), and
`reference_rows` (every key, default and docstring: the README's reference and `init`'s starter).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import operator
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from ddp_finetune.errors import UserError

# --------------------------------------------------------------------------- types


def check_types(obj, prefix: str) -> None:
    """Every field of a config section (and its sub-sections) against its type: the one check of
    choices (`Literal`), numbers and lists, whether the section came from YAML or was built in code."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check_types(value, f"{prefix}{f.name}.")
        else:
            setattr(obj, f.name, _coerce(prefix + f.name, value, hints[f.name]))


def _unwrap_optional(tp):
    """(the type without `| None`, whether None is allowed); `int | Literal["auto"]` stays a union."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return functools.reduce(operator.or_, args), type(None) in typing.get_args(tp)
    return tp, False


def _type_name(tp) -> str:
    inner, optional = _unwrap_optional(tp)
    if typing.get_origin(inner) in (typing.Union, types.UnionType):
        name = " or ".join(_type_name(arm) for arm in typing.get_args(inner))
    elif typing.get_origin(inner) is Literal:
        name = "one of " + ", ".join(str(a) for a in typing.get_args(inner))
    else:
        name = str(inner).replace("typing.", "") if typing.get_args(inner) else getattr(inner, "__name__", str(inner))
    return f"{name} or null" if optional else name


def _scalar(value: Any, tp) -> tuple[bool, Any]:
    """(fits, value converted) for bool / int / float / str / Any."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return number, float(value) if number else value
    if tp is str:
        return isinstance(value, str) or number, value if isinstance(value, str) else str(value)
    return True, value  # Any


def _coerce(key: str, value: Any, tp) -> Any:
    """Check (and lightly convert) one value against a field type: scalars, Literal choices,
    list[T] and dict[str, Any], each optionally `| None`."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise UserError(f"{key} cannot be null; give a {_type_name(tp)}")
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin in (typing.Union, types.UnionType):  # e.g. int | Literal["auto"]: the first arm that takes the value
        for arm in args:
            try:
                return _coerce(key, value, arm)
            except UserError:
                pass
        raise UserError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise UserError(f"{key}={value!r} is not one of {', '.join(str(a) for a in args)}")
    if origin is list:
        if isinstance(value, list):
            return [_coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return value
    else:
        fits, converted = _scalar(value, inner)
        if fits:
            return converted
    raise UserError(f"{key}={value!r} has the wrong type; expected {_type_name(tp)}")


def _unknown_key(key: str, valid: list[str]) -> UserError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], [v.rsplit(".", 1)[-1] for v in valid], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UserError(f"unknown config key {key!r}{hint}; valid keys here: {', '.join(valid)}")


def build_section(cls, values: dict, prefix: str = ""):
    if not isinstance(values, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(prefix + str(key), [prefix + n for n in names])
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_section(tp, value or {}, prefix + key + ".")
        else:
            kwargs[key] = _coerce(prefix + key, value, tp)
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} is not of the form key=value, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def validate_key_path(root, dotted: str) -> None:
    """Check a dotted override key against the config classes from `root` down."""
    cls = root
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            prefix = ".".join(parts[:i])
            names = [f.name for f in dataclasses.fields(cls)]
            raise _unknown_key(dotted, [f"{prefix}.{n}" if prefix else n for n in names])
        tp = hints[part]
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif i != len(parts) - 1 and typing.get_origin(tp) is not dict and _unwrap_optional(tp)[0] is not dict:
            raise UserError(
                f"config key {'.'.join(parts[: i + 1])} is a value, not a section; use {'.'.join(parts[: i + 1])}=VALUE"
            )
        else:
            return


# --------------------------------------------------------------------------- files


SHIPPED_PREFIX = "@"
"""`@NAME` names the config `ddp_finetune/configs/NAME.yaml` shipped inside the package."""


def _shipped_folder():
    # importlib.resources, not a path next to __file__: the same for a wheel, `pip install .` and `-e .`
    return resources.files("ddp_finetune") / "configs"


def shipped_configs() -> list[str]:
    """Names of the configs shipped inside the package, each usable as `@NAME`."""
    return sorted(f.name.removesuffix(".yaml") for f in _shipped_folder().iterdir() if f.name.endswith(".yaml"))


def _shipped_list() -> str:
    return ", ".join(SHIPPED_PREFIX + name for name in shipped_configs())


def config_source(path: str | Path):
    """The file a config argument names: `@NAME` (shipped) or a path; a Path or a resources Traversable."""
    text = str(path)
    if not text.startswith(SHIPPED_PREFIX):
        return Path(path)
    name = text[len(SHIPPED_PREFIX) :].removesuffix(".yaml")
    if name not in shipped_configs():
        raise UserError(f"{text!r} is not a shipped config; the shipped ones are {_shipped_list()}")
    return _shipped_folder() / f"{name}.yaml"


def load_yaml(path: str | Path) -> dict:
    p = config_source(path)
    if not p.is_file():
        raise UserError(
            f"config file {str(p)!r} does not exist; give the path to a YAML config (write one with "
            f"`ddp-finetune init`) or a shipped one: {_shipped_list()}"
        )
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"config file {str(p)!r} is not valid YAML{where}: {problem}; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(p)!r} must hold a mapping of keys at the top level")
    return data


def flow_yaml(value: Any) -> str:
    """One value as YAML on one line (`null`, `true`, `[0.9, 0.999]`, `'no'`): how the reference shows defaults."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def reference_rows(root) -> list[tuple[str, str, str]]:
    """(key, default, doc) for every config key, in order: the README's reference table."""
    import ast
    import inspect

    rows = []

    def docs_of(cls) -> dict:
        docs = {}
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and i + 1 < len(body):
                nxt = body[i + 1]
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[node.target.id] = " ".join(str(nxt.value.value).split())
        return docs

    def walk(cls, prefix):
        docs = docs_of(cls)
        default_obj = cls()
        for f in dataclasses.fields(cls):
            value = getattr(default_obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), prefix + f.name + ".")
            else:
                rows.append(
                    (
                        prefix + f.name,
                        flow_yaml(value),
                        docs.get(f.name, ""),
                    )
                )

    walk(root, "")
    return rows
