"""Config value rules (the typed schema of :mod:`gren.train.config`), on the ground floor so that methods
can declare rules for their own keys (``schema`` class attribute of a :class:`gren.methods.Method`)::

    from gren.core.schema import Rule

    class MyMethod(Method):
        defaults = {"mine": {"mode": "fast", "weight": 0.5, "steps": 3}}
        schema = {"mine.mode": Rule(choices=("fast", "exact")), "mine.weight": Rule(ge=0), "mine.steps": Rule(ge=1)}

Types come from the defaults (``steps`` above takes whole numbers, ``weight`` finite numbers); a rule adds
choices, ranges, ``null`` and a check function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """What a config value may be, beyond the type its default gives it.

    Attributes:
        type: ``"int"``, ``"float"``, ``"bool"`` or ``"str"``; ``None`` (default): the default value's type
            (a key whose default is ``null`` then takes any single value).
        choices: the allowed values (compared after the type is applied).
        ge, gt, le, lt: inclusive / exclusive bounds for numbers.
        nullable: ``null`` is allowed (always allowed where the default is ``null``).
        check: ``value -> None`` or an error text (``"expected auto, cpu, cuda or cuda:N"``) for anything else.
        expect: how the expected value is described in messages (default: built from the other fields).
    """

    type: str | None = None
    choices: tuple = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    nullable: bool = False
    check: Callable[[Any], str | None] | None = None
    expect: str = ""

    def describe(self, kind: str | None) -> str:
        if self.expect:
            return self.expect
        if self.choices:
            return "one of " + ", ".join(show_value(c) for c in self.choices)
        parts = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text"}.get(kind or "",
                                                                                                     "a value")
        bounds = [f"{op} {show_value(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                  if v is not None]
        return parts + (" " + " and ".join(bounds) if bounds else "") + (" or null" if self.nullable else "")


def show_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
