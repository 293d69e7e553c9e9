"""One way to build a typed option block (a frozen dataclass such as ResolventConfig or BKConfig)
from what a caller has: the dataclass itself, a mapping (a YAML block read without the CLI) or None."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def config_of(cls: type[T], value: Any) -> T:
    """`value` if it is a `cls` (or a subclass of it), `cls()` for None, `cls(**value)` for a mapping.

    A mapping key that is not a field of `cls` is a one-line ValueError listing the valid ones.
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    names = [f.name for f in fields(cls)]
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; the options are {names}.")
        return cls(**value)
    raise ValueError(f"{cls.__name__}: expected a {cls.__name__} or a mapping, got {type(value).__name__}.")
