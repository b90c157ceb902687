"""Reports of one run over rotated captures: every frame says which file it counts in."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from bitstrace.analyzer.analysis import analyze
from bitstrace.analyzer.report.json import build_report
from bitstrace.analyzer.report.presentation import frame_list
from bitstrace.analyzer.report.text import render_text
from tests.support import REPO

CAPTURES = REPO / "captures"

pytestmark = pytest.mark.skipif(shutil.which("editcap") is None or shutil.which("tshark") is None,
                                reason="needs editcap and tshark")


def split(name: str, per_file: int, into: Path) -> list[Path]:
    subprocess.run(["editcap", "-c", str(per_file), str(CAPTURES / name), str(into / "part.pcap")], check=True,
                   capture_output=True)
    return sorted(into.glob("part_*.pcap"))


def payload_starts(part: Path) -> dict[int, bytes]:
    """tshark's view of one part file: the first bytes of each frame's TCP payload."""
    out = subprocess.run(["tshark", "-n", "-r", str(part), "-Y", "tcp.len > 0", "-T", "fields",
                          "-e", "frame.number", "-e", "tcp.payload"], check=True, capture_output=True, text=True)
    starts = {}
    for line in out.stdout.splitlines():
        number, payload = line.split("\t")
        starts[int(number)] = bytes.fromhex(payload.replace(":", "")[:40])
    return starts


def places(report: dict) -> list[tuple[str, int, int]]:
    found = []
    for session in report["sessions"]:
        for pkt in session["packets"]:
            request, response = pkt["request"], pkt["response"]
            found.append(("request", request["capture"], request["frame"]))
            found.append(("request-end", request["last_capture"], request["last_frame"]))
            if response is not None:
                found.append(("response", response["capture"], response["frame"]))
    return found


def test_packet_frames_name_their_part_file(tmp_path: Path) -> None:
    per_file = 400
    parts = split("clean-multi-fragment.pcap", per_file, tmp_path)
    assert len(parts) == 3
    whole = build_report(analyze([CAPTURES / "clean-multi-fragment.pcap"]))
    rotated = build_report(analyze(parts))
    assert [c["file"] for c in rotated["captures"]] == [str(p) for p in parts]
    mine, theirs = places(rotated), places(whole)
    assert len(mine) == len(theirs) > 10
    assert {capture for _, capture, _ in mine} == {0, 1, 2}  # the session crosses both boundaries
    for (kind, capture, frame), (_, zero, number) in zip(mine, theirs):
        assert zero == 0
        assert (capture, frame) == ((number - 1) // per_file, (number - 1) % per_file + 1), kind
    starts = [payload_starts(part) for part in parts]
    for kind, capture, frame in mine:
        if kind == "request":
            assert starts[capture][frame].startswith(b"BITS_POST "), (capture, frame)
        elif kind == "response":
            assert starts[capture][frame].startswith(b"HTTP/1.1 "), (capture, frame)
        else:
            assert frame in starts[capture]  # the request's last byte is in a frame with payload


def test_anomalies_and_coverage_name_their_part_file(tmp_path: Path) -> None:
    per_file = 20
    parts = split("conflicting-resend.pcap", per_file, tmp_path)
    whole = build_report(analyze([CAPTURES / "conflicting-resend.pcap"], extract_dir=tmp_path / "one"))
    rotated = build_report(analyze(parts, extract_dir=tmp_path / "rotated"))

    def where(frames: list[int]) -> list[list[int]]:
        return [[(f - 1) // per_file, (f - 1) % per_file + 1] for f in frames]

    [one], [other] = whole["sessions"], rotated["sessions"]
    assert [a["code"] for a in other["anomalies"]] == [a["code"] for a in one["anomalies"]]
    assert any(len({c for c in a["captures"]}) > 1 for a in other["anomalies"])
    for mine, theirs in zip(other["anomalies"], one["anomalies"]):
        assert theirs["captures"] == [0] * len(theirs["frames"])
        assert [list(p) for p in zip(mine["captures"], mine["frames"])] == where(theirs["frames"])
    assert len(other["extracted"]["coverage"]) == len(one["extracted"]["coverage"]) > 0
    for mine, theirs in zip(other["extracted"]["coverage"], one["extracted"]["coverage"]):
        assert [list(p) for p in zip(mine["captures"], mine["frames"])] == where(theirs["frames"])
    assert [p["anomalies"] for p in other["packets"]] == [p["anomalies"] for p in one["packets"]]

    text = io.StringIO()
    render_text(rotated, text, color=False)
    out = text.getvalue()
    legend = "frames N:F are frame F of capture #N: " + ", ".join(f"#{n} {p}" for n, p in enumerate(parts, 1))
    assert " ".join(legend.split()) in " ".join(out.split())
    conflict = next(a for a in other["anomalies"] if a["code"] == "resend-conflict")
    shown = [f"{c + 1}:{f}" for c, f in zip(conflict["captures"], conflict["frames"])]
    assert all(label in out for label in shown) and shown[0].startswith("1:") and shown[-1].startswith("2:")

    single = io.StringIO()
    render_text(whole, single, color=False)
    assert "frames N:F" not in single.getvalue() and " 8, 24 " in single.getvalue()


def test_frame_runs_stay_within_their_file() -> None:
    assert frame_list([18, 8, 4, 19], captures=[1, 0, 1, 1]) == "1:8, 2:4, 2:18-19"
    assert frame_list([20, 1], captures=[0, 1]) == "1:20, 2:1"  # consecutive on the wire, not in number
    assert frame_list([20, 21]) == "20-21"
