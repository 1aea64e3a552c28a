"""Memory budgets as people write them: "1.5GiB", "800MB", "60%" (of the device's memory), or bytes.

Parsing only: the planner that splits a budget between weights, KV cache and scratch is separate
(issue 7). Decimal units (kB, MB, GB, TB) are powers of 1000, binary ones (KiB, MiB, GiB, TiB)
powers of 1024, as in `ls --si` / `ls -h`; a bare number is bytes.
"""

from __future__ import annotations

import re

from edgeai.errors import OptionError

UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*|%)\s*$")
# Below this no model loads; a budget this small is a typo ("800" meant as MB).
MIN_BUDGET = 16 * 1024**2


def parse_budget(value: str | int | float | None, *, total_memory: int | None = None) -> int | None:
    """Bytes from a budget; None stays None (no budget).

    `total_memory` (bytes) is what a percentage refers to: the device's memory, or this machine's
    when None. Errors name the value and show the accepted forms.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise OptionError(f"memory budget {value!r} is not a size; write e.g. 1.5GiB, 800MB, 60% or a byte count")
    if isinstance(value, (int, float)):
        n = int(value)
        text = str(value)
    else:
        text = str(value)
        m = _BUDGET.match(text)
        if not m:
            raise OptionError(f"memory budget {text!r} is not a size; write e.g. 1.5GiB, 800MB, 60% or a byte count")
        number, unit = float(m.group(1)), m.group(2).lower()
        if unit == "%":
            if not 0 < number <= 100:
                raise OptionError(f"memory budget {text!r}: a percentage must be in (0, 100]")
            if total_memory is None:
                import psutil

                total_memory = psutil.virtual_memory().total
            n = int(total_memory * number / 100)
        elif unit in UNITS:
            n = int(number * UNITS[unit])
        else:
            raise OptionError(
                f"memory budget {text!r}: unknown unit {m.group(2)!r}; use one of kB, MB, GB, TB, KiB, MiB, GiB, TiB or %"
            )
    if n < MIN_BUDGET:
        raise OptionError(f"memory budget {text!r} is {n:,} bytes, below the {MIN_BUDGET // 2**20} MiB minimum; "
                          "did you forget the unit (e.g. 800MB)?")
    if total_memory is not None and n > total_memory:
        raise OptionError(f"memory budget {text!r} ({format_bytes(n)}) is more than the device's "
                          f"{format_bytes(total_memory)} of memory")
    return n


def format_bytes(n: int | float) -> str:
    """1536 MiB -> '1.50 GiB': binary units, three significant digits."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
