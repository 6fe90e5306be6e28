"""FHIR date and time values as Postgres understands them.

FHIR ``dateTime`` may be partial (``2020``, ``2020-05``, ``2020-05-17``) and carries a timezone only when it
has a time. Our rule, applied everywhere:
- a full date-time (with time and zone, as R4 requires) is kept exactly;
- a partial date or a bare date becomes the first instant of that period (``2020-05`` -> 2020-05-01 00:00) in
  the configured default timezone (``ODYSSEY_DEFAULT_TIMEZONE``, UTC by default);
- a ``date`` column (birth date) takes the first day of the period (``1970`` -> 1970-01-01).
Values were already checked against the FHIR regexes by ``fhir.resources`` before they get here.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

_PARTIAL = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


@lru_cache(maxsize=16)
def timezone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def to_timestamp(value: str | None, default_tz: str) -> str | None:
    """A FHIR date/dateTime/instant as an ISO 8601 string with an explicit offset, or None."""
    if not value:
        return None
    match = _PARTIAL.match(value)
    if match is None:
        return value  # full date-time with its own zone
    year, month, day = match.groups()
    start = datetime(int(year), int(month or 1), int(day or 1), tzinfo=timezone(default_tz))
    return start.isoformat()


def is_partial(value: str) -> bool:
    """Whether a FHIR date/dateTime has no time (``2180-09-09``, ``2180-09``, ``2180``)."""
    return _PARTIAL.match(value) is not None


def to_date(value: str | None) -> str | None:
    """A FHIR date (possibly partial) as ``YYYY-MM-DD``, or None."""
    if not value:
        return None
    match = _PARTIAL.match(value)
    if match is None:
        return value[:10]
    year, month, day = match.groups()
    return date(int(year), int(month or 1), int(day or 1)).isoformat()


def period_start(period: dict | None) -> str | None:
    return period.get("start") if isinstance(period, dict) else None


def period_end(period: dict | None) -> str | None:
    return period.get("end") if isinstance(period, dict) else None
