"""Capture timestamps (integer nanoseconds since the epoch) as text and as float seconds.

Timestamps come from the capture file, so any value is possible: a pcapng interface offset or a
corrupt record can put them millennia away. Formatting never raises.
"""

from __future__ import annotations

import datetime as dt
import functools

NS = 1_000_000_000


def iso(ts_ns: int | None) -> str | None:
    """ISO 8601 UTC with microseconds (`2026-11-25T11:10:40.123456Z`); out-of-range stays numeric."""
    if ts_ns is None:
        return None
    seconds, ns = divmod(ts_ns, NS)
    second = _second(seconds)
    if second is None:
        return f"@{ts_ns / NS:.6f}"  # outside what datetime can show: seconds since the epoch
    return f"{second}.{ns // 1000:06d}Z"


@functools.lru_cache(maxsize=1024)
def _second(seconds: int) -> str | None:
    """`2026-11-25T11:10:40`, None outside datetime's range. Cached: a report formats thousands
    of timestamps a second, and datetime's formatting is most of their cost."""
    try:
        return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return None


def epoch(ts_ns: int | None) -> float | None:
    return None if ts_ns is None else ts_ns / NS
