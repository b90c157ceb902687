"""Capture timestamps (integer nanoseconds since the epoch) as text and as float seconds.

Timestamps come from the capture file, so any value is possible: a pcapng interface offset or a
corrupt record can put them millennia away. Formatting never raises.
"""

from __future__ import annotations

import datetime as dt

NS = 1_000_000_000


def iso(ts_ns: int | None) -> str | None:
    """ISO 8601 UTC with microseconds (`2026-11-25T11:10:40.123456Z`); out-of-range stays numeric."""
    if ts_ns is None:
        return None
    seconds, ns = divmod(ts_ns, NS)
    try:
        moment = dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"@{ts_ns / NS:.6f}"  # outside what datetime can show: seconds since the epoch
    return moment.replace(microsecond=ns // 1000).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def epoch(ts_ns: int | None) -> float | None:
    return None if ts_ns is None else ts_ns / NS
