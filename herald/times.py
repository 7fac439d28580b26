"""Times and ages as operators type them on the command line.

A **time** (``--since``, ``--until``, ``--to-datetime``) is ISO 8601 — a date
(``2026-11-22``) or a date and time (``2026-11-22T03:14``, ``2026-11-22
03:14:07.5+01:00``); without a zone it is UTC, the zone herald prints every
time in, so a time copied from herald's output means the same when pasted
back — or an age ago: ``90s``, ``30m``, ``12h``, ``7d``, ``2w``.

An **age** (``--older-than``) is a number and a unit: ``s``, ``m``, ``h``,
``d`` or ``w``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Final

from herald.errors import UsageError

__all__ = ["MAX_AGE", "format_age", "parse_age", "parse_time"]

_AGE: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

#: The longest age herald accepts (100 years): more is a typo.
MAX_AGE: Final = timedelta(days=36500)


def parse_age(text: str, option: str) -> timedelta:
    """``"30d"`` as a timedelta; a one-line :class:`UsageError` naming ``option`` otherwise."""
    match = _AGE.match(text)
    if match is None:
        raise UsageError(
            f"{option}: {text!r} is not an age (a number and a unit: 90s, 30m, 12h, 7d, 2w)"
        )
    age = timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    if age <= timedelta(0):
        raise UsageError(f"{option}: an age must be more than 0, not {text!r}")
    if age > MAX_AGE:
        raise UsageError(f"{option}: {text!r} is more than {MAX_AGE.days // 365} years")
    return age


def parse_time(text: str, option: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC unless it names a zone) or an age ago, as an aware datetime."""
    text = text.strip()
    if _AGE.match(text):
        return (now or datetime.now(UTC)) - parse_age(text, option)
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise UsageError(
            f"{option}: {text!r} is not a time (ISO 8601 such as 2026-11-22T03:14:00Z, "
            "UTC unless a zone is given, or an age ago such as 30m, 12h, 7d)"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def format_age(seconds: float) -> str:
    """A short human age: ``45 s``, ``12 min``, ``3.5 h``, ``9 d``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"
