"""Checks of user-written settings (YAML configs) against the dataclasses that hold them.

A value of the wrong type or out of range is refused in one line that names the setting, what it
must be and what it was (`k: eight`, `batch_size: 0`, `tokens: -100`), before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from deepseemoe.errors import DeepSeeMoEError


def _describe(t) -> str:
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(t))
    if typing.get_origin(t) is list:
        (item,) = typing.get_args(t) or (object,)
        return f"a list of {_describe(item)}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(t, getattr(t, "__name__", str(t)))


def _matches(value, t) -> bool:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(t))
    if origin is list:
        (item,) = typing.get_args(t) or (object,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if t is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is typing.Any:
        return True
    return isinstance(value, t)


def check_fields(obj, where: str, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Type-check every field of the dataclass `obj` (ints accepted where numbers are expected, and
    made floats) and the ranges named; raise one DeepSeeMoEError naming the first bad setting."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _matches(value, hints[f.name]):
            raise DeepSeeMoEError(f"{where}: `{f.name}` must be {_describe(hints[f.name])}, not {value!r}")
        if hints[f.name] is float and isinstance(value, int):
            setattr(obj, f.name, float(value))
    for name in positive:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise DeepSeeMoEError(f"{where}: `{name}` must be greater than 0, not {value!r}")
    for name in non_negative:
        value = getattr(obj, name)
        if value is not None and value < 0:
            raise DeepSeeMoEError(f"{where}: `{name}` must be 0 or more, not {value!r}")


def known_keys(cls, d: dict, where: str) -> None:
    """Refuse a setting the dataclass `cls` does not have (a typo would otherwise be ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise DeepSeeMoEError(f"{where}: unknown setting(s) {', '.join(map(repr, unknown))}; known: "
                              f"{', '.join(sorted(names))}")
