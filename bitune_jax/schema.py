"""Rules of config fields, declared once on the dataclass that owns the field.

A library dataclass that is also a section of the YAML run config
(``bitune.MethodConfig``, ``model.peft.PeftConfig``,
``training.step.OptimConfig``, and the sections of :mod:`bitune_jax.config`)
declares each field's allowed values next to its default: a choice field has
a ``Literal[...]`` type, a range with :func:`field`. Two readers apply them:

* the library dataclasses call :func:`validate` in ``__post_init__``, so a
  bad value fails however the object is built (``MethodConfig(variant="x")``
  from Python as well as from YAML);
* the YAML loader (:mod:`bitune_jax.config`) calls :func:`field_error` for
  each value as it reads it, so the message also says which file or override
  the value came from.

Example:

    >>> import dataclasses
    >>> from typing import Literal
    >>> @dataclasses.dataclass(frozen=True)
    ... class Dropout:
    ...     rate: float = field(0.1, ge=0.0, lt=1.0)
    ...     where: Literal["input", "output"] = "input"
    ...
    ...     def __post_init__(self):
    ...         validate(self, "dropout")
    >>> Dropout(rate=0.5).rate
    0.5
    >>> Dropout(rate=1.0)
    Traceback (most recent call last):
    ...
    bitune_jax.schema.ConfigError: 'dropout.rate'=1.0 is out of range; allowed: >= 0.0 and < 1.0
    >>> field_error("dropout.where", "middle", Literal["input", "output"], {})
    "'dropout.where'='middle' is not allowed; allowed: input, output"

This module imports nothing from ``bitune_jax``, so every module can use it.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Literal, Mapping, Optional

_BOUNDS = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
           ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b))


class ConfigError(ValueError):
    """A configuration key or value that is not allowed."""


def field(default, *, ge=None, gt=None, le=None, lt=None,
          check: Optional[Callable[[Any], Optional[str]]] = None):
    """A dataclass field whose value must satisfy the given bounds.

    ``check`` is a ``value -> error message or None`` for a rule that is not a
    plain range (e.g. every item of a list is a known name). A None value
    (of an ``Optional`` field) satisfies every rule.
    """
    rules = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, check=check).items() if v is not None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=rules)
    return dataclasses.field(default=default, metadata=rules)


def choices(tp) -> Optional[tuple]:
    """The allowed values of a ``Literal[...]`` (or ``Optional[Literal[...]]``) type; None for other types."""
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def field_error(key: str, value, tp, rules: Mapping[str, Any]) -> Optional[str]:
    """Why ``value`` may not be the value of the field ``key`` (type ``tp``, :func:`field` rules), or None."""
    if value is None:
        return None
    allowed = choices(tp)
    if allowed is not None and value not in allowed:
        return f"'{key}'={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}"
    if any(name in rules and not ok(value, rules[name]) for name, _, ok in _BOUNDS):
        bounds = " and ".join(f"{sym} {rules[name]}" for name, sym, _ in _BOUNDS if name in rules)
        return f"'{key}'={value!r} is out of range; allowed: {bounds}"
    message = rules["check"](value) if "check" in rules else None
    return f"'{key}'={value!r}: {message}" if message else None


def validate(obj, prefix: str) -> None:
    """Raises :class:`ConfigError` for the first field of ``obj`` that breaks its declared rules.

    ``prefix`` is the section's dotted key in the run config (``method.peft``),
    so the message names the key a user would set.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        message = field_error(f"{prefix}.{f.name}", getattr(obj, f.name), hints[f.name], f.metadata)
        if message:
            raise ConfigError(message)
