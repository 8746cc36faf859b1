"""Human-readable byte sizes ("512MiB", "4GiB", 1048576) for configuration."""

from __future__ import annotations

import re
from fractions import Fraction

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")  # ASCII digits: "١٢٣" is no size
# The largest size taken, in bytes: what a signed 64-bit file offset or C size can hold (8 EiB).
MAX_SIZE = (1 << 63) - 1


def parse_size(value: int | str, name: str = "size") -> int:
    """Return ``value`` as a whole number of bytes.

    Accepts a non-negative int or a string such as ``"512MiB"`` or ``"1.5GB"``
    (binary units KiB/MiB/GiB/TiB, decimal units KB/MB/GB/TB). ``name`` is the
    setting being parsed, so the error says which one was wrong.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a byte size (int or e.g. '4GiB'), got {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= MAX_SIZE:
            raise ValueError(f"{name}: expected a byte size from 0 to {MAX_SIZE}, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            number, unit = match.groups()
            factor = _UNITS.get(unit.lower())
            if factor is not None:
                if len(number) > 40:  # past any size taken; Fraction would work through it all the same
                    raise ValueError(f"{name}: expected a byte size up to {MAX_SIZE}, got {value[:60]!r}...")
                exact = Fraction(number) * factor  # exact: float lost the units of 2**53 and up
                if factor == 1 and exact.denominator != 1:
                    raise ValueError(f"{name}: expected a whole number of bytes, got {value!r}")
                size = int(exact)
                if size > MAX_SIZE:
                    raise ValueError(f"{name}: expected a byte size up to {MAX_SIZE}, got {value!r}")
                return size
    raise ValueError(
        f"{name}: expected a byte size such as 536870912, '512MiB' or '4GiB', got {value!r}"
    )


def format_size(nbytes: int) -> str:
    """Format a byte count with a binary unit, for humans (CLI output)."""
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
