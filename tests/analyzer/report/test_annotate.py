"""--annotate OUT.pcapng: the input frames unchanged, commented where the report names them;
read back with tshark (`-Y frame.comment`) and with our own reader."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitstrace.analyzer.capture import CaptureReader
from bitstrace.analyzer.pcapng_writer import EPB_HEADER, EnhancedPacket, PcapngWriter
from tests.support import REPO

ROOT = REPO
CAPTURES = ROOT / "captures"
tshark = shutil.which("tshark")


def analyze(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "bitstrace.cli.analyze", *map(str, args)],
                          capture_output=True, cwd=ROOT, timeout=120)


def frames(path: Path) -> list[tuple[int, int, bytes, int]]:
    return [(ts, link, bytes(data), original) for _, ts, link, data, original in CaptureReader(path).records()]


def named_places(report: dict) -> dict[tuple[int, int], set[str]]:
    """Frame -> anomaly codes and session boundaries the JSON report names."""
    places: dict[tuple[int, int], set[str]] = {}
    for session in report["sessions"]:
        first, last = session["packets"][0], session["packets"][-1]
        places.setdefault((first["request"]["capture"], first["request"]["frame"]), set()).add("begins")
        end = last["response"] or last["request"]
        places.setdefault((end["capture"], end["frame"]), set()).add("ends")
        for item in session["anomalies"]:
            for capture, frame in zip(item["captures"], item["frames"]):
                places.setdefault((capture, frame), set()).add(item["code"])
    for item in report["anomalies"]:
        for capture, frame in zip(item["captures"], item["frames"]):
            places.setdefault((capture, frame), set()).add(item["code"])
    return places


def tshark_comments(path: Path) -> dict[int, str]:
    assert tshark is not None
    run = subprocess.run([tshark, "-r", str(path), "-Y", "frame.comment", "-T", "fields",
                          "-e", "frame.number", "-e", "frame.comment"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return {int(number): comment for number, comment in (line.split("\t", 1) for line in run.stdout.splitlines())}


@pytest.mark.skipif(tshark is None, reason="tshark is not installed")
@pytest.mark.parametrize("name", ["fragment-after-cancel.pcap", "gap.pcap", "malformed-requests.pcap",
                                  "host-id-redirect.pcapng", "two-sessions-interleaved.pcap"])
def test_every_named_frame_carries_its_comment_and_no_other_does(name: str, tmp_path: Path) -> None:
    capture = CAPTURES / name
    out = tmp_path / "annotated.pcapng"
    run = analyze("--json", "-", "--annotate", out, capture)
    assert run.returncode == 0, run.stderr.decode()
    report = json.loads(run.stdout)
    expected = {frame: codes for (_, frame), codes in named_places(report).items()}
    comments = tshark_comments(out)
    assert set(comments) == set(expected)
    for frame, codes in expected.items():
        for code in codes:
            wanted = {"begins": " begins: ", "ends": " ends here in the capture: "}.get(code, f" {code}: ")
            assert wanted in comments[frame], (frame, code)
    assert frames(out) == frames(capture)  # timestamps, link types, bytes and lengths unchanged


@pytest.mark.skipif(tshark is None, reason="tshark is not installed")
def test_several_inputs_become_sections_with_their_own_comments(tmp_path: Path) -> None:
    first, second = CAPTURES / "fragment-after-cancel.pcap", CAPTURES / "gap.pcap"
    out = tmp_path / "both.pcapng"
    run = analyze("--json", "-", "--annotate", out, first, second)
    assert run.returncode == 0, run.stderr.decode()
    report = json.loads(run.stdout)
    offset = len(frames(first))
    expected = {frame + offset * capture for (capture, frame) in named_places(report)}
    assert set(tshark_comments(out)) == expected
    assert frames(out) == frames(first) + frames(second)


def test_annotate_keeps_the_selection_and_refuses_standard_input(tmp_path: Path) -> None:
    capture = CAPTURES / "gap.pcap"
    out = tmp_path / "cut.pcapng"
    assert analyze("-q", "-c", "20", "--annotate", out, capture).returncode == 0
    assert frames(out) == frames(capture)[:20]
    refused = subprocess.run([sys.executable, "-m", "bitstrace.cli.analyze", "--annotate", str(out), "-"],
                             input=capture.read_bytes(), capture_output=True, cwd=ROOT, timeout=60)
    assert refused.returncode == 2 and b"standard input cannot be read twice" in refused.stderr


def test_plain_packets_are_packed_as_declared() -> None:
    """The struct fast path and the construct declaration give the same block."""
    for data in (b"", b"a", b"abcd", bytes(range(256)) * 6):
        stream = io.BytesIO()
        writer = PcapngWriter(stream)
        for _ in range(4):  # the packet names interface 3, nanosecond resolution
            writer.interface(1)
        start = stream.tell()
        writer.packet(3, 1795607823959647123, data, len(data) + 7)
        fast = io.BytesIO(stream.getvalue()[start:])
        high, low = divmod(1795607823959647123, 1 << 32)
        declared = EnhancedPacket.build({"body": {"interface": 3, "ts_high": high, "ts_low": low,
                                                  "original": len(data) + 7, "data": data, "options": []}})
        assert fast.getvalue() == declared
        assert fast.getvalue()[:EPB_HEADER.size] == declared[:EPB_HEADER.size]


def test_an_interface_at_microseconds_stamps_its_packets_in_microseconds(tmp_path: Path) -> None:
    """Timestamps are written in the units of the packet's interface, and read back the same."""
    out = tmp_path / "two.pcapng"
    with open(out, "wb") as stream:
        writer = PcapngWriter(stream)
        writer.section()
        micro, nano = writer.interface(1, tsresol=6), writer.interface(1)
        writer.packet(micro, 1_795_607_823_959_647_000, b"\x00" * 60, 60)
        writer.packet(nano, 1_795_607_823_959_647_123, b"\x00" * 60, 60)
    assert [ts for ts, _, _, _ in frames(out)] == [1_795_607_823_959_647_000, 1_795_607_823_959_647_123]
