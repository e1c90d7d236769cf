"""Strict conversion between frozen dataclasses and JSON-compatible values.

`dump` turns a dataclass tree into dicts/lists; `load` checks every field's type against the
annotations and raises `CodecError` naming the offending path, so a peer's malformed message is
rejected before any handler sees it. Supported annotations: str, int, float, bool, None, enums,
unions (`X | None`), `tuple[X, ...]`, `list[X]`, `dict[str, X]` and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class CodecError(ValueError):
    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path or 'message'}: {message}")


def dump(value: Any) -> Any:
    """A dataclass tree as plain JSON-compatible values (tuples become lists)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: dump(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [dump(item) for item in value]
    if isinstance(value, dict):
        return {key: dump(item) for key, item in value.items()}
    return value


def load(cls: type[T], data: Any, path: str = "") -> T:
    """Build `cls` from JSON values, checking types; missing fields take their defaults."""
    return typing.cast(T, _load(cls, data, path))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _load(annotation: Any, data: Any, path: str) -> Any:
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return _load_dataclass(annotation, data, path)
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        return _load_union(annotation, data, path)
    if origin is tuple:
        items = typing.get_args(annotation)[0]
        return tuple(_load(items, item, f"{path}[{i}]") for i, item in enumerate(_expect_list(data, path)))
    if origin is list:
        items = typing.get_args(annotation)[0]
        return [_load(items, item, f"{path}[{i}]") for i, item in enumerate(_expect_list(data, path))]
    if origin is dict:
        values = typing.get_args(annotation)[1]
        if not isinstance(data, dict):
            raise CodecError(path, f"expected an object, got {_kind(data)}")
        return {_expect_str(k, path): _load(values, v, f"{path}.{k}") for k, v in data.items()}
    if annotation is Any:
        return data
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(data)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in annotation)
            raise CodecError(path, f"expected one of {allowed}, got {data!r}") from None
    return _load_scalar(annotation, data, path)


@functools.cache
def _plan(cls: type) -> tuple[frozenset[str], tuple[tuple[str, Any, bool], ...]]:
    """Per dataclass, computed once: its field names, and (name, annotation, required) per field.
    Decoding runs for every message (thousands of heartbeats a second at fleet scale)."""
    hints = _hints(cls)
    fields = tuple(
        (f.name, hints[f.name], f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        for f in dataclasses.fields(cls)
    )
    return frozenset(name for name, _, _ in fields), fields


def _load_dataclass(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise CodecError(path, f"expected an object, got {_kind(data)}")
    names, fields = _plan(cls)
    if not names.issuperset(data):
        raise CodecError(path, f"unknown field {sorted(set(data) - names)[0]!r}")
    kwargs = {}
    for name, annotation, required in fields:
        if name in data:
            kwargs[name] = _load(annotation, data[name], f"{path}.{name}" if path else name)
        elif required:
            raise CodecError(f"{path}.{name}" if path else name, "missing required field")
    return cls(**kwargs)


def _load_union(annotation: Any, data: Any, path: str) -> Any:
    options = typing.get_args(annotation)
    if data is None:
        if type(None) in options:
            return None
        raise CodecError(path, "must not be null")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _load(option, data, path)
        except CodecError as error:
            errors.append(error)
    raise errors[0]


def _load_scalar(annotation: Any, data: Any, path: str) -> Any:
    if annotation is float:
        if isinstance(data, int | float) and not isinstance(data, bool):
            try:
                value = float(data)
            except OverflowError:
                raise CodecError(path, "number is too large") from None
            if not math.isfinite(value):
                raise CodecError(path, "expected a finite number")
            return value
        raise CodecError(path, f"expected a number, got {_kind(data)}")
    if annotation is int:
        if isinstance(data, int) and not isinstance(data, bool):
            return data
        raise CodecError(path, f"expected an integer, got {_kind(data)}")
    if annotation is bool:
        if isinstance(data, bool):
            return data
        raise CodecError(path, f"expected true or false, got {_kind(data)}")
    if annotation is str:
        return _expect_str(data, path)
    if annotation is type(None):
        if data is None:
            return None
        raise CodecError(path, f"expected null, got {_kind(data)}")
    raise TypeError(f"codec cannot load {annotation!r}")  # a programming error, not bad input


def _expect_list(data: Any, path: str) -> list[Any]:
    if not isinstance(data, list):
        raise CodecError(path, f"expected a list, got {_kind(data)}")
    return data


def _expect_str(data: Any, path: str) -> str:
    if not isinstance(data, str):
        raise CodecError(path, f"expected a string, got {_kind(data)}")
    return data


def _kind(data: Any) -> str:
    if data is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(data), type(data).__name__)
