"""When to ask the server again: ``Retry-After`` (seconds or an HTTP date), capped, and capped exponential backoff.

Pure functions over numbers and header values; the client sleeps. Servers differ: Epic answers polls with a short
``Retry-After``, some servers send hours (a day-long export), some send nothing. A very long ``Retry-After`` is
capped at ``max_wait`` (the job is still polled; its status URL stays valid), a missing one falls back to backoff.
"""

from __future__ import annotations

import datetime as dt
import email.utils
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    first_wait: float = 1.0  # seconds before the first retry when the server says nothing
    max_wait: float = 300.0  # no single wait is longer (also caps Retry-After)
    factor: float = 2.0
    max_attempts: int = 8  # transient failures in a row before giving up (polls that answer 202 do not count)

    def backoff(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (0-based) when the server gave no Retry-After."""
        return min(self.max_wait, self.first_wait * self.factor ** max(0, attempt))

    def wait(self, attempt: int, retry_after: str | None, now: dt.datetime | None = None) -> float:
        """Seconds to wait: the server's Retry-After when it gave a usable one (capped), else the backoff."""
        asked = parse_retry_after(retry_after, now)
        if asked is None:
            return self.backoff(attempt)
        return min(self.max_wait, max(0.0, asked))


def parse_retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds (``120``) or an HTTP date (``Wed, 21 Oct 2026 07:28:00 GMT``,
    counted from ``now``). None when missing or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - now).total_seconds())
