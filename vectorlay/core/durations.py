"""Durations as people write them: `500ms`, `2s`, `1m30s`, `24h`, or a bare number of seconds."""

from __future__ import annotations

import math
import re

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str | int | float) -> float:
    """Return seconds; raise ValueError with a readable message for anything else."""
    if isinstance(text, bool):
        raise ValueError("expected a duration like 2s, 500ms or 1h, got a boolean")
    if isinstance(text, int | float):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"duration must be a finite, non-negative number, got {text}")
        return float(text)
    value = text.strip()
    if not value:
        raise ValueError("expected a duration like 2s, 500ms or 1h, got an empty string")
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"duration must be a finite, non-negative number, got {text!r}")
        return seconds
    position = 0
    total = 0.0
    for match in _PART.finditer(value):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
    if position != len(value) or position == 0:
        raise ValueError(f"expected a duration like 2s, 500ms or 1h, got {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """The shortest readable form: 500ms, 2s, 1m30s, 24h."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    whole = int(round(seconds))
    if whole < 60:
        return f"{seconds:g}s" if seconds != whole else f"{whole}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts)
