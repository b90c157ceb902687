"""The JSON, JSON Lines and HTML writers stream: bits-analyze builds the report without packets
and the writers take each session's packets from a PacketSource while they write that session.
What they write must be what the whole report dict gives, byte for byte."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import report_fixtures as fx
from bitstrace.analyzer.analysis import analyze
from bitstrace.analyzer.report.html import render_html, write_html
from bitstrace.analyzer.report.json import (build_report, sessions_with_packets, filter_report, jsonl_records, packet_source,
                                  write_json, write_jsonl)
from tests.support import REPO

CAPTURES = REPO / "captures"
SEVERITIES = ("info", "warning", "error")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=6), children, max_size=4)
    | st.dictionaries(st.integers() | st.floats() | st.booleans() | st.none(), children, max_size=3),
    max_leaves=30)


def json_text(report: dict, packets=None) -> str:
    out = io.StringIO()
    write_json(report, out, packets)
    return out.getvalue()


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5), st.lists(json_values, max_size=4))
def test_write_json_is_json_dump_byte_for_byte(fields: dict, sessions: list) -> None:
    report = {**fields, "sessions": sessions}
    expected = io.StringIO()
    json.dump(report, expected, indent=2)
    assert json_text(report) == expected.getvalue() + "\n"


def test_write_json_of_a_hand_made_report_is_json_dump() -> None:
    report = fx.hostile_report()
    report["sessions"][0]["odd"] = {"nan": float("nan"), "inf": [float("inf"), -float("inf")], "neg": -0.0,
                                    "big": 10**30, "tuple": (1, "\u202e"), 3: "int key", None: {}, "empty": []}
    assert json_text(report) == json.dumps(report, indent=2) + "\n"


@pytest.fixture(scope="module")
def analyses() -> dict:
    # gap.pcap has anomalies of all three severities, several at the same packets;
    # two-sessions-interleaved.pcap two sessions; upload-reply.pcap a download.
    return {name: analyze([CAPTURES / name])
            for name in ("gap.pcap", "two-sessions-interleaved.pcap", "upload-reply.pcap")}


def both_ways(analysis, session_filter: str | None, min_severity: str) -> tuple[dict, dict]:
    """(the whole filtered report, the report without packets filtered the same way)"""
    whole = filter_report(build_report(analysis, session_filter=session_filter), min_severity)
    outline = filter_report(build_report(analysis, session_filter=session_filter, with_packets=False), min_severity)
    return whole, outline


@pytest.mark.parametrize("min_severity", SEVERITIES)
@pytest.mark.parametrize("name", ["gap.pcap", "two-sessions-interleaved.pcap", "upload-reply.pcap"])
def test_streamed_writers_write_the_whole_report(analyses: dict, name: str, min_severity: str) -> None:
    analysis = analyses[name]
    whole, outline = both_ways(analysis, None, min_severity)
    packets = packet_source(analysis, outline)

    assert json_text(outline, packets) == json.dumps(whole, indent=2) + "\n"
    lines, expected_lines = io.StringIO(), io.StringIO()
    write_jsonl(jsonl_records(outline, packets), lines)
    write_jsonl(jsonl_records(whole), expected_lines)
    assert lines.getvalue() == expected_lines.getvalue()
    page = io.StringIO()
    write_html(outline, page, sessions_with_packets(outline, packets))
    assert page.getvalue() == render_html(whole)


def test_filtering_leaves_codes_out_of_the_packets(analyses: dict) -> None:
    """gap.pcap: an error and an info anomaly at packets; with --min-severity error the info
    codes leave the packets' lists too, streamed as whole."""
    analysis = analyses["gap.pcap"]
    whole, outline = both_ways(analysis, None, "error")
    info = {a["code"] for s in build_report(analysis)["sessions"] for a in s["anomalies"] if a["severity"] == "info"}
    streamed = json.loads(json_text(outline, packet_source(analysis, outline)))
    codes = {c for s in streamed["sessions"] for pkt in s["packets"] for c in pkt["anomalies"]}
    assert info and codes and not codes & info
    assert streamed == json.loads(json.dumps(whole))


def test_one_session_streamed(analyses: dict) -> None:
    analysis = analyses["two-sessions-interleaved.pcap"]
    second = build_report(analysis)["sessions"][1]["id"]
    whole, outline = both_ways(analysis, second.lower(), "info")
    assert [s["id"] for s in whole["sessions"]] == [second]
    assert json_text(outline, packet_source(analysis, outline)) == json.dumps(whole, indent=2) + "\n"


def test_a_session_is_written_before_the_next_ones_packets_are_built(analyses: dict) -> None:
    analysis = analyses["two-sessions-interleaved.pcap"]
    outline = build_report(analysis, with_packets=False)
    source = packet_source(analysis, outline)
    out = io.StringIO()
    asked: list[int] = []

    def packets(index: int) -> list[dict]:
        # Every earlier session, packets and all, is already out.
        for earlier in outline["sessions"][:index]:
            assert earlier["id"] in out.getvalue()
        assert outline["sessions"][index]["id"] not in out.getvalue()
        asked.append(index)
        return source(index)

    write_json(outline, out, packets)
    assert asked == [0, 1]
    assert [len(s["packets"]) for s in json.loads(out.getvalue())["sessions"]] == [
        len(s["packets"]) for s in build_report(analysis)["sessions"]]


def test_downloads_say_when_and_which_sessions_reply_they_fetch(analyses: dict) -> None:
    """upload-reply.pcap: the client fetches its reply (HEAD, then GET) before Close."""
    report = build_report(analyses["upload-reply.pcap"])
    (session,) = report["sessions"]
    assert [d["method"] for d in report["downloads"]] == ["HEAD", "GET"]
    close = next(p for p in session["packets"] if p["type"] == "Close-Session")
    for download in report["downloads"]:
        assert download["session"] == session["id"]
        assert session["first_ts"] < download["ts"] < close["request"]["ts"]
        assert download["time"].startswith(session["first_time"][:19].rsplit(":", 1)[0])
    for name in ("gap.pcap", "two-sessions-interleaved.pcap"):
        assert build_report(analyses[name])["downloads"] == []


def test_a_download_of_another_client_or_path_is_no_reply(analyses: dict) -> None:
    from dataclasses import replace

    from bitstrace.analyzer.bits.sessions import _link_reply_fetches

    bits = analyses["upload-reply.pcap"].bits
    fetch = bits.downloads[-1]
    others = [replace(fetch, client_ip="192.0.2.9"), replace(fetch, target="/uploads/other.bin"),
              replace(fetch, sent_ns=bits.sessions[0].first_ns - 1)]
    downloads = [replace(fetch, reply_of=None), *others]
    _link_reply_fetches(bits.sessions, downloads)
    assert [d.reply_of for d in downloads] == [bits.sessions[0].id, None, None, None]
