"""Human-readable byte sizes ("512MiB", "4GiB", 1048576) for configuration."""

from __future__ import annotations

import re

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

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, name: str = "size") -> int:
    """Return ``value`` as a whole number of bytes.

    Accepts a non-negative int or a string such as ``"512MiB"`` or ``"1.5GB"``
    (binary units KiB/MiB/GiB/TiB, decimal units KB/MB/GB/TB). ``name`` is the
    setting being parsed, so the error says which one was wrong.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a byte size (int or e.g. '4GiB'), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name}: expected a byte size >= 0, got {value}")
        return value
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if match:
            number, unit = match.groups()
            factor = _UNITS.get(unit.lower())
            if factor is not None:
                return int(float(number) * factor)
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
