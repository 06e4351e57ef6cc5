"""Checks shared by every config dataclass: the strict constructor from a plain mapping, and value checks whose
messages name the config key (`data.seq_len must be an integer, got 'abc'`).

A leaf: it imports nothing of `sdt` but the error type, so configs at every layer of the package can use it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from sdt.common.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Removed:
    """An option a config class no longer has: the value that meant "off", and why it went (the measurement)."""

    default: Any
    why: str


def removed_options(cls: type) -> Mapping[str, Removed]:
    """The removed options of config class `cls` (its `REMOVED` class attribute), by field name."""
    return getattr(cls, "REMOVED", {})


def without_removed(cls: type, d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """`d` without the removed options of `cls` that it sets to their old default (configs and checkpoints written
    before the removal); a removed option set to anything else is an error naming the key and saying why it went."""
    out = dict(d)
    for name, removed in removed_options(cls).items():
        if name in out:
            value = out.pop(name)
            if value != removed.default:
                raise UserError(f"{prefix}.{name}={value!r}: {prefix}.{name} was removed: {removed.why}")
    return out


def strict_kwargs(cls: type, d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """`d` as keyword arguments of dataclass `cls`, after checking that it names only fields of `cls`.

    `prefix` is the config key of the mapping (`model`, `data.tokenizer`, `cola`): a typo in an override fails with
    the full key and the valid options instead of being silently ignored. A removed option (`cls.REMOVED`) at its old
    default is dropped; set to anything else it fails with why it was removed.
    """
    if not isinstance(d, Mapping):
        raise UserError(f"{prefix} must be a mapping, got {type(d).__name__}")
    d = without_removed(cls, d, prefix)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in d if k not in valid)
    if unknown:
        keys = ", ".join(f"{prefix}.{k}" for k in unknown)
        raise UserError(f"unknown {prefix} option(s) {unknown} ({keys}); valid options: {', '.join(valid)}")
    return dict(d)


def from_mapping(cls: type[T], d: Mapping[str, Any] | None, prefix: str) -> T:
    """Build dataclass `cls` from a plain (or OmegaConf) mapping with `strict_kwargs`; None builds the defaults."""
    return cls(**strict_kwargs(cls, {} if d is None else d, prefix))


def check_int(key: str, value: Any, minimum: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # bool is a subclass of int, but `seq_len: true` is surely a mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"{key} must be an integer{' or null' if allow_none else ''}, got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"{key} must be >= {minimum}, got {value}")


def check_str(key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, str) or not value:
        raise UserError(f"{key} must be a non-empty string{' or null' if allow_none else ''}, got {value!r}")


def check_all(checks: Iterable[tuple[bool, str]]) -> None:
    """Raise the message of the first (ok, message) pair that does not hold."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def literal_choices(annotation: object) -> tuple[object, ...] | None:
    """The values of a `Literal[...]` annotation (or of `Literal[...] | None`, None included); None otherwise."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    args = get_args(annotation)
    literals = [a for a in args if get_origin(a) is Literal]
    if len(literals) == 1 and type(None) in args:
        return (*get_args(literals[0]), None)
    return None


@functools.cache
def _literal_fields(cls: type) -> tuple[tuple[str, tuple[object, ...]], ...]:
    """(field name, choices) of every field of `cls` typed as a Literal; resolved once per class."""
    fields = ((name, literal_choices(annotation)) for name, annotation in get_type_hints(cls).items())
    return tuple((name, choices) for name, choices in fields if choices is not None)


def check_literal_fields(cfg: object, prefix: str) -> None:
    """Every dataclass field of `cfg` typed as a `Literal` holds one of its values: the type is the one list of
    choices, and the message names the key (`model.gate_mode must be one of ste, soft; got 'hard'`)."""
    for name, choices in _literal_fields(type(cfg)):
        value = getattr(cfg, name)
        if value not in choices:
            shown = ", ".join("null" if c is None else str(c) for c in choices)
            raise UserError(f"{prefix}.{name} must be one of {shown}; got {value!r}")
