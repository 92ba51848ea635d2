"""Durations as users write them: ``"30m"``, ``"90s"``, ``"1h"``, ``"1h30m"`` or seconds."""

from __future__ import annotations

import re

from mvm.errors import InvalidArgument

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(value: str | float | int, what: str = "duration") -> float:
    """Seconds from ``value``; InvalidArgument (with the accepted forms) if it is not one."""
    if isinstance(value, bool):
        raise InvalidArgument(f"invalid {what}: {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for m in PART.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * UNITS[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise InvalidArgument(
                    f"invalid {what}: {value!r}",
                    hint="use seconds or a duration such as 90s, 30m, 1h, 1h30m",
                ) from None
    if not seconds > 0 or seconds == float("inf"):
        raise InvalidArgument(f"invalid {what}: {value!r} (must be positive)")
    return seconds
