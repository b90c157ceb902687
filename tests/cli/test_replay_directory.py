"""bits-replay DIR: a directory is its capture files, read as one run in the order of their
first packets (analyzer/sources.py), as bits-analyze reads a capture point."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

from bitstrace.cli.common import Exit
from bitstrace.cli.replay import main
from tests.support import REPO

CAPTURES = REPO / "captures"
TARGET = "http://127.0.0.1:9/"  # --dry-run: nothing is sent


def rotate(source: Path, cut: int, first: Path, second: Path) -> None:
    """Two files of one pcap by raw record copying, the first `cut` records in `first`."""
    data = source.read_bytes()
    header, records, pos = data[:24], [], 24
    while pos < len(data):
        incl = struct.unpack_from("<I", data, pos + 8)[0]
        records.append(data[pos:pos + 16 + incl])
        pos += 16 + incl
    first.write_bytes(header + b"".join(records[:cut]))
    second.write_bytes(header + b"".join(records[cut:]))


def dry_run(*captures: str) -> tuple[int, dict, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*captures, "--target", TARGET, "--dry-run", "--json"], out=out, err=err)
    return code, json.loads(out.getvalue()) if out.getvalue() else {}, err.getvalue()


def test_directory_replays_its_rotated_files_in_time_order(tmp_path: Path) -> None:
    source = CAPTURES / "connection-cut-resume.pcap"
    point = tmp_path / "edge"
    point.mkdir()
    # names that sort against time order: the directory is read by first packet, not by name
    rotate(source, 40, point / "z-earlier.pcap", point / "a-later.pcap")
    (point / "notes.txt").write_text("not a capture\n")
    code, by_dir, err = dry_run(str(point))
    named_code, named, _ = dry_run(str(point / "z-earlier.pcap"), str(point / "a-later.pcap"))
    assert code == named_code == Exit.OK
    assert by_dir == named and by_dir["sessions"]
    assert "notes.txt: skipped: not a pcap or pcapng capture" in err
    backwards_code, backwards, _ = dry_run(str(point / "a-later.pcap"), str(point / "z-earlier.pcap"))
    assert backwards != by_dir  # the order matters, and the directory's is the time order


def test_several_capture_points_are_a_usage_error(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.pcap").write_bytes((CAPTURES / "single-fragment.pcap").read_bytes())
    code, _, err = dry_run(str(tmp_path))
    assert code == Exit.USAGE
    assert "one capture point at a time" in err and str(tmp_path / "a") in err and str(tmp_path / "b") in err
