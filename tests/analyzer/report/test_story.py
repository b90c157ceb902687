"""The story of a session in words (presentation.session_story), told alike by the text report and
the HTML page, on the corpus captures where it matters: a cut connection and a resume, a session
recreated after BG_E_SESSION_NOT_FOUND, a Host-Id redirect. And the text report's width in a pipe."""

from __future__ import annotations

import html
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bitstrace.analyzer.analysis import analyze
from bitstrace.analyzer.report.html import render_html
from bitstrace.analyzer.report.json import build_report, packet_source
from bitstrace.analyzer.report.presentation import has_story, recreations, session_story, short_ids
from bitstrace.analyzer.report.text import render_text
from tests.support import REPO

ROOT = REPO
CAPTURES = ROOT / "captures"
BITS_ANALYZE = Path(sys.executable).parent / "bits-analyze"

STORIES = {
    "connection-cut-resume.pcap": [[
        "Connection 0 closed mid-fragment (bytes 32768-65535: 10,000 of 32,768 body bytes sent, no ack); "
        "resumed on connection 1 from byte 32768.",
        "Connection 1 ended after the server acknowledged bytes 65536-98303 (frame 109), an ack the client "
        "evidently did not read; resumed on connection 2 from byte 65536: the server answered 416 (it had "
        "98,304 bytes already) and the client went on from there.",
    ]],
    "session-not-found.pcap": [
        ["The server no longer knew the session (BG_E_SESSION_NOT_FOUND at frame 39) with 16,384 of 64,000 bytes "
         "acknowledged; the client created session {second} (frame 41) for the same URL."],
        ["Created (frame 41) after the server no longer knew session {first} (BG_E_SESSION_NOT_FOUND): a new "
         "session for the same URL, starting over from byte 0."],
    ],
    "host-id-redirect.pcapng": [[
        "The server's ack named BITS-Host-Id bitsnode1: the upload moved to that host on connection 1 from byte 0.",
    ]],
    "clean-multi-fragment.pcap": [[]],
    "fragment-after-cancel.pcap": [[]],
}


@pytest.mark.parametrize("name", sorted(STORIES))
def test_stories_of_the_corpus_in_text_and_html(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    analysis = analyze([CAPTURES / name])
    report = build_report(analysis)
    sessions = report["sessions"]
    ids = short_ids([s["id"] for s in sessions])
    short = [ids[s["id"]] for s in sessions]
    expected = [[sentence.format(first=short[0], second=short[-1]) for sentence in story] for story in STORIES[name]]
    links = recreations(sessions, several=False)
    assert [session_story(s, n, links, sessions, ids, False) for n, s in enumerate(sessions)] == expected
    assert [has_story(s) for s in sessions] == [bool(story) for story in expected]

    # The text report, from a report without packets (as bits-analyze builds it) and its source.
    outline = build_report(analysis, with_packets=False)
    out = io.StringIO()
    monkeypatch.delenv("COLUMNS", raising=False)
    render_text(outline, out, color=False, packets=packet_source(analysis, outline))
    text = out.getvalue()
    page = render_html(report)
    for story in expected:
        for sentence in story:
            assert f"\n  {sentence}\n" in text
            assert html.escape(sentence) in page
    if not any(expected):
        assert "  Connection" not in text and "<ul class=\"story\">" not in page


def test_what_happened_names_each_problem_sessions_reason() -> None:
    report = build_report(analyze([CAPTURES / "fragment-after-cancel.pcap", CAPTURES / "clean-multi-fragment.pcap"]))
    out = io.StringIO()
    render_text(report, out, color=False)
    block = out.getvalue().split("What happened\n")[1].split("\n\n")[0].splitlines()
    # The cancelled session only: the clean one has nothing to tell.
    assert block == [f"{report['sessions'][0]['id'][1:9]}… not-delivered: cancelled before the final fragment was "
                     "acknowledged."]


def run_in_a_pipe(*arguments: str, columns: str | None) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        environment["COLUMNS"] = columns
    run = subprocess.run([BITS_ANALYZE, "--no-progress", *arguments], capture_output=True, text=True,
                         env=environment, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_a_pipe_without_columns_never_folds_and_columns_is_honoured() -> None:
    capture = str(CAPTURES / "fragment-after-cancel.pcap")
    message = ("HTTP 500 Internal Server Error to Fragment bytes 32768-49151/100000 (0x8020001F BG_E_SESSION_NOT_FOUND: "
               "the session id is unknown or expired on the server, context 0x5)")
    unbounded = run_in_a_pipe(capture, columns=None)
    anomaly_rows = [line for line in unbounded.splitlines() if line.startswith("error ")]
    assert len(anomaly_rows) == 2 and anomaly_rows[0].rstrip().endswith(message)  # one record, one line
    assert "Start" in unbounded  # the widest sessions table, with its start times
    narrow = run_in_a_pipe(capture, columns="90")
    assert max(len(line) for line in narrow.splitlines()) <= 90 and message not in narrow
