"""Records read back from JSON (box records, run.json): each field checked against its type.

A file edited by hand or damaged must be one clear line naming the field, never a
traceback later, wherever the wrong value is first used.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """cls's field types, evaluated once (annotations are strings under __future__)."""
    return typing.get_type_hints(cls)


def _describe(annotation: Any) -> str:
    """A type as people read it: "int", "str or null", "list of str"."""
    if annotation is type(None):
        return "null"
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_describe(args[0])}"
    if origin is dict:
        return f"object of {_describe(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a value read from JSON fits the annotation (JSON has lists for tuples)."""
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        item, *rest = typing.get_args(annotation)
        if origin is tuple and rest != [Ellipsis]:
            raise TypeError(f"records cannot check fields of type {annotation!r}")
        return isinstance(value, list | tuple) and all(_fits(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(annotation)
        return isinstance(value, dict) and all(_fits(k, key) and _fits(v, item)
                                               for k, v in value.items())
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    raise TypeError(f"records cannot check fields of type {annotation!r}")


def _got(value: Any) -> str:
    """A value as the message shows it: "str '22x'", "null"."""
    if value is None:
        return "null"
    shown = repr(value)
    return f"{type(value).__name__} {shown[:40] + '...' if len(shown) > 40 else shown}"


def check(cls: type, data: Any) -> None:
    """Raise ValueError naming the first field of data that is missing or of the wrong type."""
    if not isinstance(data, dict):
        raise ValueError(f"expected an object with {cls.__name__}'s fields, got {_got(data)}")
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        if field.name not in data:
            required = (field.default is dataclasses.MISSING
                        and field.default_factory is dataclasses.MISSING)
            if required:
                raise ValueError(f"field {field.name!r} is missing")
            continue
        annotation, value = hints[field.name], data[field.name]
        if not _fits(value, annotation):
            raise ValueError(f"field {field.name!r}: expected {_describe(annotation)}, "
                             f"got {_got(value)}")


def build(cls: type[T], data: Any) -> T:
    """An instance of the dataclass cls from a checked dict (unknown keys, from a newer dlbox,
    are ignored; lists become tuples where the field is a tuple)."""
    check(cls, data)
    hints = _hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in data:
            value = data[field.name]
            if isinstance(value, list) and _is_tuple(hints[field.name]):
                value = tuple(value)
            values[field.name] = value
    return cls(**values)


def _is_tuple(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple(a) for a in typing.get_args(annotation))
    return origin is tuple
