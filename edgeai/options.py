"""Checks of numeric options (resource knobs) before anything starts: one rule, one message style.

Every knob a user sets (threads, max_tokens, batch and cache sizes, sample counts) goes through
`checked_int`, so a bad value is an OptionError naming the option, the value, the bound and why.
"""

from __future__ import annotations

import operator

from edgeai.errors import OptionError


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
