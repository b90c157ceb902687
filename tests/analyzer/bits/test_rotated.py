"""Message sentences of a run over rotated captures name frames `capture:frame`, as the reports do."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bitstrace.analyzer.analysis import analyze
from tests.support import REPO

CAPTURES = REPO / "captures"
PER_FILE = 25

pytestmark = pytest.mark.skipif(shutil.which("editcap") is None, reason="needs editcap")


def split(name: str, into: Path) -> list[Path]:
    subprocess.run(["editcap", "-c", str(PER_FILE), str(CAPTURES / name), str(into / "part.pcap")], check=True,
                   capture_output=True)
    return sorted(into.glob("part_*.pcap"))


def rotated_frame(match: re.Match) -> str:
    number = int(match.group(2))
    return f"{match.group(1)}{(number - 1) // PER_FILE + 1}:{(number - 1) % PER_FILE + 1}"


FRAME_IN_SENTENCE = re.compile(r"(frames? )(\d+)")


def sentences(analysis) -> list[str]:
    found = [a.message for a in analysis.bits.anomalies]
    for session in analysis.bits.sessions:
        found += [session.verdict_reason, session.key] + [a.message for a in session.anomalies]
    return found


@pytest.mark.parametrize("name,extract", [
    ("fragment-after-close.pcap", False), ("fragment-after-cancel.pcap", False), ("cancel-after-complete.pcap", False),
    ("fragment-too-large.pcap", False), ("conflicting-resend.pcap", False), ("conflicting-resend.pcap", True),
])
def test_sentences_name_the_file_of_each_frame(name: str, extract: bool, tmp_path: Path) -> None:
    parts = split(name, tmp_path)
    assert len(parts) > 1
    whole = analyze([CAPTURES / name], extract_dir=tmp_path / "whole" if extract else None)
    rotated = analyze(parts, extract_dir=tmp_path / "rotated" if extract else None)
    mine, theirs = sentences(rotated), sentences(whole)
    assert sum(bool(FRAME_IN_SENTENCE.search(s)) for s in theirs) >= 1
    assert mine == [FRAME_IN_SENTENCE.sub(rotated_frame, s) for s in theirs]
