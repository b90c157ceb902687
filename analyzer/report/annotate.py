"""The report taken back into Wireshark: the input frames, unchanged, in a pcapng file whose
frames carry a comment wherever the report names them (each anomaly's frames, each session's
first and last frame). Wireshark shows them as `frame.comment` and in Expert Info, so a filter
such as `frame.comment contains "range-gap"` finds every frame the analyzer flagged.

Each input file becomes a section of the output, in the order read; frames keep their
timestamps (nanosecond resolution, which holds microsecond and nanosecond times exactly) and
link types, one interface per link type of the file.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import BinaryIO

from bitstrace.analyzer.capture import CaptureReader, FrameFields
from bitstrace.analyzer.pcapng_writer import PcapngWriter
from bitstrace.analyzer.problems import Problem
from bitstrace.analyzer.report.schema import AnomalyRecord, Report, SessionRecord

Place = tuple[int, int]  # (capture index, frame number)
#: Frames of a file after a selection (a filter, a time range, a count): what the analysis read.
FrameSource = Callable[[Iterator[FrameFields]], Iterator[FrameFields]]


def comments_by_frame(report: Report, sessions: Iterable[SessionRecord]) -> dict[Place, list[str]]:
    """What to say at each frame: session boundaries, then anomalies, worst first as the report
    lists them. `sessions` are the report's sessions with their packets."""
    notes: dict[Place, list[str]] = defaultdict(list)
    for session in sessions:
        packets = session["packets"]
        label = session["id"] or "refused Create-Session"
        if packets:
            first, last = packets[0], packets[-1]
            request = first["request"]
            _note(notes, request["capture"], request["frame"],
                  f"bitstrace session {label} begins: {first['type'] or first['type_raw']} {session['url']} "
                  f"from {session['client']}")
            end = last["response"] or last["request"]
            _note(notes, end["capture"], end["frame"],
                  f"bitstrace session {label} ends here in the capture: {session['state']}, "
                  f"{session['verdict']} ({session['verdict_reason']})")
        for item in session["anomalies"]:
            _anomaly_notes(item, notes)
    for item in report["anomalies"]:
        _anomaly_notes(item, notes)
    return notes


def _anomaly_notes(item: AnomalyRecord, notes: dict[Place, list[str]]) -> None:
    session = f" [session {item['session']}]" if item.get("session") else ""
    text = f"bitstrace {item['severity']} {item['code']}: {item['message']}{session}"
    for capture, frame in zip(item.get("captures") or [0] * len(item["frames"]), item["frames"]):
        _note(notes, capture, frame, text)


def _note(notes: dict[Place, list[str]], capture: int | None, frame: int | None, text: str) -> None:
    if frame is not None and text not in notes[(capture or 0, frame)]:
        notes[(capture or 0, frame)].append(text)


def write_annotated(sources: Sequence[str | os.PathLike[str]], notes: Mapping[Place, Sequence[str]],
                    out: BinaryIO, select: FrameSource | None = None) -> list[Problem]:
    """Every frame of `sources` (as `select` keeps them) into `out`, with `notes` as comments.
    Returns the problems met reading the inputs again (a file that changed since the analysis)."""
    writer = PcapngWriter(out)
    problems: list[Problem] = []
    for index, source in enumerate(sources):
        reader = CaptureReader(source)
        writer.section([f"bitstrace annotations of {os.fspath(source)}"])
        interfaces: dict[int, int] = {}
        records: Iterator[FrameFields] = reader.records()
        if select is not None:
            records = select(records)
        for number, ts_ns, link_type, data, original in records:
            interface = interfaces.get(link_type)
            if interface is None:
                interface = interfaces[link_type] = writer.interface(link_type)
            writer.packet(interface, ts_ns, data, original, notes.get((index, number), ()))
        problems.extend(reader.problems)
    return problems
