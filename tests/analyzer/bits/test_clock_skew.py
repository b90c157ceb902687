"""Clock skew between the two directions of a real capture: one direction's timestamps moved by a
constant, the frames merged by time as mergecap merges two taps (each direction keeps its own
order). States, verdicts, anomalies and the exchanges' bodies stay those of the original; the
capture gets a clock_skew note saying which way and how far."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from bitstrace.analyzer.analysis import analyze
from bitstrace.analyzer.pipeline import read_exchanges
from bitstrace.analyzer.report.json import build_report
from bitstrace.analyzer.report.text import render_text
from tests.support import REPO

CAPTURES = REPO / "captures"
EXPECTED = json.loads((CAPTURES / "expected.json").read_text())["captures"]
MS = 1_000_000

_MAGICS = {b"\xd4\xc3\xb2\xa1": ("<", 1000), b"\xa1\xb2\xc3\xd4": (">", 1000),
           b"\x4d\x3c\xb2\xa1": ("<", 1), b"\xa1\xb2\x3c\x4d": (">", 1)}


def skewed(name: str, server_ahead_ns: int, out: Path) -> Path:
    """A copy of corpus capture `name` (pcap, Ethernet) whose server→client frames are stamped
    `server_ahead_ns` later (earlier when negative), merged by time, stably."""
    data = (CAPTURES / name).read_bytes()
    endian, unit = _MAGICS[data[:4]]
    port = EXPECTED[name]["server_port"]
    records, pos = [], 24
    while pos + 16 <= len(data):
        seconds, fraction, length, original = struct.unpack(endian + "IIII", data[pos:pos + 16])
        frame = data[pos + 16:pos + 16 + length]
        ip = 14 + (40 if frame[12:14] == b"\x86\xdd" else (frame[14] & 15) * 4)
        ts = seconds * 1_000_000_000 + fraction * unit
        if struct.unpack(">H", frame[ip:ip + 2])[0] == port:
            ts += server_ahead_ns
        records.append((ts, length, original, frame))
        pos += 16 + length
    records.sort(key=lambda record: record[0])
    path = out / f"skewed-{name}"
    with path.open("wb") as f:
        f.write(data[:24])
        for ts, length, original, frame in records:
            seconds, rest = divmod(ts, 1_000_000_000)
            f.write(struct.pack(endian + "IIII", seconds, rest // unit, length, original) + frame)
    return path


def outcome(path: Path) -> tuple:
    report = build_report(analyze([path]))
    return ([(s["state"], s["verdict"], sorted(a["code"] for a in s["anomalies"])) for s in report["sessions"]],
            sorted(a["code"] for a in report["anomalies"]))


def bodies(path: Path) -> list:
    found = []
    read_exchanges([path], lambda e: found.append(
        (e.request and e.request.body_sha256, e.response and (e.response.status, e.response.body_sha256),
         sorted(e.flags))))
    return found


# Skews whose frames today's reassembler keeps whole (a gap from data recorded behind its ACK is
# tcp.py's to recover): the server's clock behind on every capture with a Cancel, a HEAD or a
# Close after completion, ahead where the acks' late stamps made concurrency and verdicts wrong.
CASES = [
    ("cancel-after-complete.pcap", 20 * MS), ("cancel-after-complete.pcap", 500 * MS),
    ("cancel-after-complete.pcap", -20 * MS), ("cancel-after-complete.pcap", -500 * MS),
    ("upload-reply.pcap", 20 * MS), ("upload-reply.pcap", -20 * MS), ("upload-reply.pcap", -500 * MS),
    ("clean-multi-fragment.pcap", 500 * MS), ("fragment-after-close.pcap", -500 * MS),
    ("connection-cut-resume.pcap", -20 * MS), ("session-not-found.pcap", -500 * MS),
    ("two-sessions-interleaved.pcap", 500 * MS), ("ipv6.pcap", -20 * MS), ("ipv6.pcap", 500 * MS),
    ("basic-auth.pcap", -500 * MS),
]


@pytest.mark.parametrize("name,server_ahead_ns", CASES)
def test_skew_changes_timings_only(name: str, server_ahead_ns: int, tmp_path: Path) -> None:
    original = CAPTURES / name
    path = skewed(name, server_ahead_ns, tmp_path)
    assert outcome(path) == outcome(original)
    assert bodies(path) == bodies(original)
    [capture] = build_report(analyze([path]))["captures"]
    skew = capture["clock_skew"]
    assert skew is not None and capture["tcp"]["gap_bytes"] == 0
    if server_ahead_ns < 0:
        assert skew["answers_before_requests"] and skew["offset_s"] < 0
    else:
        assert skew["answers_after_next_request"] and skew["offset_s"] > 0
    # a bound, never more than the skew itself
    assert 0 < abs(skew["offset_s"]) * 1e9 <= abs(server_ahead_ns)


def test_an_unskewed_capture_has_no_note_and_the_text_report_one_line(tmp_path: Path) -> None:
    report = build_report(analyze([CAPTURES / "cancel-after-complete.pcap"]))
    assert report["captures"][0]["clock_skew"] is None
    report = build_report(analyze([skewed("cancel-after-complete.pcap", -20 * MS, tmp_path)]))
    out = tmp_path / "report.txt"
    with out.open("w") as f:
        render_text(report, f, color=False)
    lines = [line for line in out.read_text().splitlines() if "clock skew" in line]
    assert len(lines) == 1 and "behind" in out.read_text()


def test_assembler_pairs_answers_recorded_first(tmp_path: Path) -> None:
    """Every answer of the skewed copy pairs with the request it answers: none is an orphan."""
    path = skewed("upload-reply.pcap", -500 * MS, tmp_path)
    found = []
    read_exchanges([path], found.append)
    assert found and all(e.request is not None and e.response is not None for e in found)
    assert [e.request.method for e in found if e.request.method != "BITS_POST"] == ["HEAD", "GET"]
