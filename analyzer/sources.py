"""What the command line names → capture points, each an ordered run of capture files.

A capture point is one place traffic was recorded (an upload endpoint, a tap). The files named
directly on the command line form one capture point, read in the order given, as one run
(rotated captures: connections and sessions cross the file boundaries). A directory holding
capture files is a capture point of its own; its files are one run ordered by the timestamp of
their first packet (not by name: `tcpdump -C` numbers `cap`, `cap1`, `cap10`, `cap2`...), and
each of its sub-directories is another capture point. Files of a run that overlap in time are
read merged by timestamp (analyzer/pipeline.py), as mergecap would merge them. A file is a capture when its content
says so, as CaptureReader sniffs it (pcap, pcapng, either gzip-compressed); anything else in a
directory is skipped with a note (a Problem of kind "not-a-capture"), never fatal.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field

from bitstrace.analyzer.capture import CaptureReader, Frame
from bitstrace.analyzer.problems import Problem

_GZIP_MAGIC = b"\x1f\x8b"
_CAPTURE_MAGICS = frozenset((
    b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4",  # pcap, microseconds
    b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d",  # pcap, nanoseconds
    b"\x0a\x0d\x0d\x0a",  # pcapng section header block
))


@dataclass
class CapturePoint:
    """One run: `name` is its directory (None for the files named on the command line)."""

    name: str | None
    files: list[str] = field(default_factory=list)


@dataclass
class Inputs:
    points: list[CapturePoint]
    notes: list[Problem]

    @property
    def files(self) -> list[str]:
        """Every capture file, in run order: the index of a file here is its capture index."""
        return [f for point in self.points for f in point.files]

    @property
    def has_directories(self) -> bool:
        return any(point.name is not None for point in self.points)


def is_capture(path: str) -> bool:
    """Whether the file's first bytes are a pcap or pcapng magic, after gzip if compressed."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(4)
            if head[:2] == _GZIP_MAGIC:
                stream.seek(0)
                with gzip.GzipFile(fileobj=stream) as inner:
                    head = inner.read(4)
    except (OSError, EOFError, zlib.error):
        return False
    return head in _CAPTURE_MAGICS


def first_timestamp(path: str) -> int | None:
    """The first packet's time (ns), or None for a capture without packets."""
    reader = CaptureReader(path)
    record = next(reader.records(), None)
    return None if record is None else Frame(*record).ts_ns


def expand(paths: list[str]) -> Inputs:
    """The capture points the command line names, in the order first named."""
    direct = CapturePoint(None)
    points: list[CapturePoint] = []
    notes: list[Problem] = []
    for path in paths:
        if path != "-" and os.path.isdir(path):
            points.extend(_directory_points(path, notes))
        else:
            if not direct.files:
                points.append(direct)
            direct.files.append(path)
    return Inputs(points, notes)


def _directory_points(top: str, notes: list[Problem]) -> list[CapturePoint]:
    found: list[CapturePoint] = []
    for directory, subdirectories, names in os.walk(top, onerror=lambda error: notes.append(
            Problem("unreadable-directory", f"cannot list: {error.strerror or error}", file=error.filename))):
        subdirectories.sort()
        timed: list[tuple[int, str]] = []
        for name in sorted(names):
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                continue
            if not is_capture(path):
                notes.append(Problem("not-a-capture", "skipped: not a pcap or pcapng capture (gzip or not)", file=path))
                continue
            ts = first_timestamp(path)
            timed.append((ts if ts is not None else -1, path))  # an empty file first: it changes nothing
        if timed:
            found.append(CapturePoint(directory, [path for _, path in sorted(timed)]))
    return found
