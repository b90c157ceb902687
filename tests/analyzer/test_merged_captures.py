"""Files of one capture point that overlap in time are read merged by timestamp, as mergecap
merges them; frame numbers stay those of their own file."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bitstrace.analyzer.analysis import analyze
from bitstrace.analyzer.partition import analyze_units, partition_options, run_in_process
from bitstrace.analyzer.sources import expand
from tests.support import REPO

CAPTURES = REPO / "captures"


def split_by_direction(source: Path, out: Path, back: Path) -> dict[int, tuple[int, int]]:
    """Two pcaps of one Ethernet/IPv4 pcap by raw record copying: the frames the client sent
    (towards the port of the first SYN) and the rest, each in the original order. Returns where
    each original frame went: (file index, frame number in that file)."""
    data = source.read_bytes()
    header, pos = data[:24], 24
    parts: list[list[bytes]] = [[], []]
    where: dict[int, tuple[int, int]] = {}
    server_port = None
    number = 0
    while pos < len(data):
        incl = struct.unpack_from("<I", data, pos + 8)[0]
        record = data[pos:pos + 16 + incl]
        frame = record[16:]
        tcp = 14 + (frame[14] & 0x0F) * 4
        sport, dport = struct.unpack_from(">HH", frame, tcp)
        if server_port is None and frame[tcp + 13] & 0x02:  # SYN
            server_port = dport
        side = 0 if dport == server_port else 1
        parts[side].append(record)
        number += 1
        where[number] = (side, len(parts[side]))
        pos += 16 + incl
    out.write_bytes(header + b"".join(parts[0]))
    back.write_bytes(header + b"".join(parts[1]))
    return where


def outline(analysis, place) -> list:
    """What the sessions are, with every frame named by `place` (capture, frame) → a name."""
    def frames(item) -> tuple:
        return tuple(sorted(place(c, f) for c, f in zip(item.captures, item.frames)))  # places sort by file first
    return [(s.id, s.state.value, s.verdict, s.total, s.acknowledged, s.bytes_sent, s.fragment_count,
             len(s.connections), sorted((a.code, frames(a)) for a in s.anomalies),
             [(place(p.request_capture, p.request_frame),
               None if p.response_frame is None else place(p.response_capture, p.response_frame), p.status)
              for p in s.packets])
            for s in analysis.bits.sessions]


@pytest.mark.parametrize("capture", ["connection-cut-resume.pcap", "two-sessions-interleaved.pcap",
                                     "clean-multi-fragment.pcap", "conflicting-resend.pcap"])
def test_a_capture_split_by_direction_reads_merged_as_the_original(capture: str, tmp_path: Path) -> None:
    source = CAPTURES / capture
    point = tmp_path / "point"
    point.mkdir()
    where = split_by_direction(source, point / "requests.pcap", point / "answers.pcap")
    original = analyze([source])
    assert original.bits.sessions
    names = [str(point / "requests.pcap"), str(point / "answers.pcap")]
    expected = outline(original, lambda capture, frame: where[frame])
    merged = analyze(names)
    assert outline(merged, lambda capture, frame: (capture, frame)) == expected
    # every frame is numbered in its own file
    assert [c.frames for c in merged.run.captures] == [sum(1 for s, _ in where.values() if s == side) for side in (0, 1)]
    assert sum(c.exchanges for c in merged.run.captures) == sum(c.exchanges for c in original.run.captures)
    assert sum(c.tcp["connections"] for c in merged.run.captures) == original.run.captures[0].tcp["connections"]
    # a directory (a capture point, its files in time order) and its units merge them alike
    inputs = expand([str(point)])
    for partitions in (1, 2, 3):
        units = analyze_units(inputs.points, partitions, partition_options(inputs.files, None, None), run_in_process)
        assert outline(units, lambda capture, frame: (capture, frame)) == expected, partitions


def test_files_one_after_the_other_are_read_in_the_order_named(tmp_path: Path) -> None:
    """Files that do not overlap are read in the order given (rotated captures named in order,
    or a later capture named first): merging by time changes nothing there."""
    first, second = CAPTURES / "single-fragment.pcap", CAPTURES / "clean-multi-fragment.pcap"
    forward = analyze([first, second])
    backward = analyze([second, first])
    assert [s.id for s in backward.bits.sessions] == [s.id for s in forward.bits.sessions][::-1]
