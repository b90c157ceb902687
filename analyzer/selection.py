"""Which frames of the captures an analysis reads: tcpdump's and tshark's selections.

A BPF filter (`-f EXPR`) is compiled and run by libpcap itself, through pcapy-ng, so an
expression means exactly what it means to tcpdump: one compiled program per link type, made
when a frame of that link type first comes. A time range (`--from`, `--to`) and a frame count
(`-c N`, counted over all files, after the other selections, as tcpdump counts) cut the run.
Frames keep their numbers in their file: what the reports name is what Wireshark shows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

from bitstrace.analyzer.capture import FrameFields

#: libpcap's "netmask unknown": `ip broadcast` cannot be compiled, everything else can.
_NETMASK_UNKNOWN = 0xFFFFFFFF
_SNAPLEN = 262144
_ETHERNET = 1


class SelectionError(ValueError):
    """A selection that cannot be used: a filter that does not compile, a bad time."""


def _compile(link_type: int, expression: str) -> Any:
    import pcapy  # only a run with a filter needs libpcap

    try:
        return pcapy.compile(link_type, _SNAPLEN, expression, 1, _NETMASK_UNKNOWN)
    except pcapy.PcapError as error:
        raise SelectionError(f"filter {expression!r}: {error}") from None


def parse_time(text: str) -> int:
    """A point in time as ns since the epoch: seconds since the epoch (`1795607823.96`), or ISO
    8601 (`2026-11-25T11:57:03.959Z`, `2026-11-25 11:57:03+01:00`; without an offset, UTC, as
    the reports write times)."""
    try:
        return round(float(text) * 1_000_000_000)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SelectionError(f"{text!r} is neither seconds since the epoch nor an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    delta = moment - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


class FrameSelection:
    """Frames kept: matching `bpf` (if given), at or after `start_ns`, before or at `end_ns`, and
    at most `count` of them over every file the selection is applied to."""

    def __init__(self, bpf: str | None = None, start_ns: int | None = None, end_ns: int | None = None,
                 count: int | None = None) -> None:
        self.bpf = bpf
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.remaining = count
        self._programs: dict[int, Any] = {}
        #: link types the filter does not compile for (their frames are left out), with why
        self.unfilterable: dict[int, str] = {}
        if bpf is not None:
            self._programs[_ETHERNET] = _compile(_ETHERNET, bpf)  # a syntax error shows up front

    @property
    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0

    def apply(self, records: Iterator[FrameFields]) -> Iterator[FrameFields]:
        """The records kept, in order; stops reading once `count` frames were kept."""
        if self.exhausted:
            return
        start, end, bpf = self.start_ns, self.end_ns, self.bpf
        for record in records:
            ts_ns = record[1]
            if start is not None and ts_ns < start:
                continue
            if end is not None and ts_ns > end:
                continue
            if bpf is not None and not self._matches(record[2], record[3]):
                continue
            yield record
            if self.remaining is not None:
                self.remaining -= 1
                if self.remaining <= 0:
                    return

    def _matches(self, link_type: int, data: Any) -> bool:
        program = self._programs.get(link_type)
        if program is None:
            if link_type in self.unfilterable:
                return False
            assert self.bpf is not None
            try:
                program = self._programs[link_type] = _compile(link_type, self.bpf)
            except SelectionError as error:
                self.unfilterable[link_type] = str(error)
                return False
        return bool(program.filter(bytes(data)))
