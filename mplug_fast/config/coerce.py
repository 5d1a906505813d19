"""The one coercion engine: plain data (YAML / JSON / ``--set``) <-> typed dataclasses.

Every config of the package (the model's `MPlugConfig`, the run's `RunConfig`, and the typed options of a
task) is a tree of dataclasses. `from_mapping` builds one from nested mappings and checks each value
against its field's annotation; `to_mapping` is its inverse; `apply_overrides` applies dotted
``a.b=value`` overrides with the same checks. Errors are `ConfigError`, one line, naming the dotted field,
what was expected, what was given and the file (``where``) it came from:

    runs/x.yaml: unknown key 'optim.learning_rate'; valid keys of optim: ['accum_steps', 'betas', ...]
    runs/x.yaml: optim.lr must be a number, got str 'fast'

Supported annotations: ``bool``, ``int``, ``float`` (ints accepted; also the strings YAML 1.1 leaves
unparsed, such as ``"1e-4"``), ``str``, ``Any``, ``None``, ``X | Y`` / ``Optional[X]``, ``Literal[...]``,
``list[X]``, ``tuple[X, ...]`` / ``tuple[X, Y]``, ``dict[str, X]`` and nested dataclasses (frozen or not).
Value checks beyond types live in each dataclass's ``__post_init__``; a ``ValueError`` / ``TypeError``
raised there is re-raised as a `ConfigError` with ``where`` in front.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
_SCALARS = {bool: "true or false", int: "an integer", str: "a string"}  # type -> what the error says

__all__ = [
    "ConfigError",
    "apply_overrides",
    "coerce",
    "field_annotation",
    "from_mapping",
    "load_yaml",
    "parse_override",
    "set_dotted",
    "to_mapping",
]


class ConfigError(ValueError, TypeError):
    """A config with an unknown key, a wrong type or an invalid value (a ``ValueError``; also a
    ``TypeError`` so that code catching either keeps working)."""


def _in(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}" if where else message)


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _got(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation, for the fields set by ``__init__``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _looks_like_float(text: str) -> bool:
    """True for number strings such as "1e-4" (YAML 1.1 leaves them as strings); not for nan / inf."""
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower().lstrip("+-") not in ("nan", "inf", "infinity")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads exponent numbers without a dot (``1e-4``) as floats, as YAML
    1.2 does (YAML 1.1, which PyYAML follows, leaves them strings)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with ``1e-4`` read as a float (the loader of every config file and ``--set``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


# ---- plain data -> typed values -------------------------------------------------------------------------


def coerce(annotation: Any, value: Any, *, name: str, where: str = "") -> Any:
    """``value`` checked against ``annotation`` and converted losslessly (int -> float, "1e-4" -> 1e-4,
    list -> tuple, mapping -> dataclass). ``name`` is the dotted field for the error message."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return from_mapping(annotation, value, where=where, prefix=name)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if annotation is type(None):
        if value is not None:
            raise _in(where, f"{name} must be null, got {_got(value)}")
        return None
    if value is None and not (origin in (typing.Union, types.UnionType) and type(None) in args):
        raise _in(where, f"{name} may not be null (expected {_type_name(annotation)})")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return coerce(option, value, name=name, where=where)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise _in(where, f"{name} must be {_type_name(annotation)}, got {_got(value)}")
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):
            raise _in(where, f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            kind = "a list" if origin is list else "a list (tuple)"
            raise _in(where, f"{name} must be {kind}, got {_got(value)}")
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):  # list[X], tuple[X, ...]
            items = (args[0] if args else Any,) * len(value)
        elif args and len(args) != len(value):  # tuple[X, Y]
            raise _in(where, f"{name} must have {len(args)} items, got {len(value)}: {value!r}")
        else:
            items = args or (Any,) * len(value)
        out = [coerce(a, v, name=f"{name}[{i}]", where=where) for i, (a, v) in enumerate(zip(items, value))]
        return out if origin is list else tuple(out)
    if origin is dict or annotation is dict:
        if not isinstance(value, Mapping):
            raise _in(where, f"{name} must be a mapping, got {_got(value)}")
        key_type, item = args or (Any, Any)
        out = {}
        for k, v in value.items():
            if key_type is str and not isinstance(k, str):
                raise _in(where, f"{name} keys must be strings, got {_got(k)}")
            out[k] = coerce(item, v, name=f"{name}.{k}", where=where)
        return out
    if annotation in _SCALARS:  # bool, int, str: the value as is (a bool is not an int here)
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise _in(where, f"{name} must be {_SCALARS[annotation]}, got {_got(value)}")
        return value
    if annotation is float:
        if isinstance(value, str) and _looks_like_float(value):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _in(where, f"{name} must be a number, got {_got(value)}")
        return float(value)
    raise TypeError(f"{name}: field type {annotation!r} is not supported by the config engine")


def from_mapping(cls: type[T], data: Mapping[str, Any] | T | None, *, where: str = "", prefix: str = "") -> T:
    """``cls(**data)`` with every key and value checked; nested mappings build nested dataclasses.

    Args:
        cls: a dataclass (frozen or not); its fields' annotations say what each key accepts.
        data: a mapping (None: all defaults), or already a ``cls`` (returned as is).
        where: the source named in errors, e.g. the YAML file's path or ``"--set optim.lr=x"``.
        prefix: the dotted name of ``data`` inside a bigger config (``"optim"``), for messages.
    Returns:
        the ``cls`` instance; missing keys keep their defaults.
    Raises:
        ConfigError: unknown key (with the valid ones), wrong type (with the field, the expected type and
        the value), or an invalid value rejected by ``cls.__post_init__``.
    """
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _in(where, f"{prefix or 'the config'} must be a mapping, got {_got(data)}")
    hints = _hints(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        dotted = [f"{prefix}.{k}" if prefix else str(k) for k in unknown]
        shown = repr(dotted[0]) if len(dotted) == 1 else str(dotted)
        raise _in(
            where,
            f"unknown key{'s' if len(dotted) > 1 else ''} {shown}; "
            f"valid keys of {prefix or 'the config'}: {sorted(hints)}",
        )
    kwargs = {
        k: coerce(hints[k], v, name=f"{prefix}.{k}" if prefix else k, where=where) for k, v in data.items()
    }
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__'s value checks (ConfigError included)
        raise _in(where, str(e)) from None


def to_mapping(obj: Any) -> Any:
    """The inverse of `from_mapping`: dataclasses -> dicts, tuples -> lists (plain YAML / JSON data)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {k: to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    return obj


# ---- dotted overrides -----------------------------------------------------------------------------------


def field_annotation(cls: type, path: list[str], *, where: str = "") -> Any:
    """The annotation of the field at ``path`` (["optim", "lr"]) below dataclass ``cls``; keys below a
    ``dict[str, X]`` field give ``X``. ConfigError for an unknown key or a path through a plain value."""
    annotation: Any = cls
    for depth, part in enumerate(path):
        if annotation is Any:  # below a free-form mapping: anything goes
            return Any
        union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
        options = typing.get_args(annotation) if union else (annotation,)  # X | None: X
        sections = [a for a in options if dataclasses.is_dataclass(a) and isinstance(a, type)]
        mappings = [a for a in options if a is dict or typing.get_origin(a) is dict]
        if len(sections) == 1:
            hints = _hints(sections[0])
            if part not in hints:
                dotted, parent = ".".join(path[: depth + 1]), ".".join(path[:depth]) or "the config"
                raise _in(where, f"unknown key {dotted!r}; valid keys of {parent}: {sorted(hints)}")
            annotation = hints[part]
        elif mappings:
            annotation = (typing.get_args(mappings[0]) or (str, Any))[1]
        else:
            raise _in(where, f"{'.'.join(path[:depth])!r} is a value, not a section")
    return annotation


def set_dotted(cls: type, data: dict[str, Any], path: list[str], value: Any, *, where: str = "") -> None:
    """``data[path[0]]...[path[-1]] = value`` in place, after checking ``path`` and ``value`` against the
    fields of ``cls``. Missing intermediate mappings are created; a non-mapping one is replaced."""
    annotation = field_annotation(cls, path, where=where)
    value = coerce(annotation, value, name=".".join(path), where=where)
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = to_mapping(value)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], the value parsed by `load_yaml`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value (e.g. optim.lr=1e-4)")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None
    return key.split("."), value


def apply_overrides(cls: type, data: Mapping[str, Any] | None, overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` (plain nested mappings for ``cls``) with each ``a.b=value`` override applied.

    Each override's key path and value are checked against ``cls`` at once (the error names the override);
    the result still goes through `from_mapping` to build the config."""
    out = copy.deepcopy(dict(data or {}))
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(cls, out, path, value, where=f"--set {text}")
    return out
