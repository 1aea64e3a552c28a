"""Checks of options before anything starts: one rule, one message style.

Every knob a user sets (threads, max_tokens, batch and cache sizes, sample counts) goes through
`checked_int`, so a bad value is an OptionError naming the option, the value, the bound and why;
every mode (a cache policy, a read method) goes through `checked_choice`, which turns the name a
user writes into its enum member or names the choices.
"""

from __future__ import annotations

import operator
from enum import Enum
from typing import TypeVar

from edgeai.errors import OptionError

E = TypeVar("E", bound=Enum)


def checked_int(option: str, value: object, *, minimum: int, maximum: int | None = None, why: str = "") -> int:
    """`value` as an int in [minimum, maximum]; else an OptionError naming `option`, the value, the
    bounds and (when given) `why` the bound is there. bool and non-integral numbers are refused."""
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        n = None
    if n is None or n < minimum or (maximum is not None and n > maximum):
        bound = f">= {minimum:,}" if maximum is None else f"in {minimum:,}..{maximum:,}"
        raise OptionError(f"{option} must be a whole number {bound}, got {value!r:.60}" + (f" ({why})" if why else ""))
    return n


def checked_choice(option: str, value: object, choices: type[E]) -> E:
    """`value` as a member of the enum `choices`: a member itself, or a member's value (the name
    users write, any case); else an OptionError naming `option`, the value and the choices."""
    if isinstance(value, choices):
        return value
    if isinstance(value, str):
        for member in choices:
            if isinstance(member.value, str) and member.value.lower() == value.lower():
                return member
    names = ", ".join(str(member.value) for member in choices)
    raise OptionError(f"{option} must be one of {names}, got {value!r:.60}")
