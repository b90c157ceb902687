"""Sessions: one crafted case per anomaly code, clean traffic that stays silent, verdicts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bitstrace.analyzer.bits.catalogue import CATALOGUE, Severity
from bitstrace.analyzer.bits.extract import Extractor
from bitstrace.analyzer.bits.machine import State
from bitstrace.analyzer.bits.protocol import PROTOCOL_GUID, Header
from bitstrace.analyzer.bits.sessions import SessionTracker, Verdict
from tests.support.bits_fixtures import SID, SID2, UA, Wire, all_codes, codes, payload
from tests.support import REPO

T = 12_000  # three fragments: 0-5119, 5120-10239, 10240-11999
FRAGS = [(0, 5119), (5120, 10239), (10240, 11999)]
NOT_FOUND = [(Header.ERROR_CODE, "0x8020001F"), (Header.ERROR_CONTEXT, "0x5")]


def begun(w: Wire, session: str = SID, upto: int = 1) -> Wire:
    w.create(session)
    for first, last in FRAGS[:upto]:
        w.fragment(session, first, last, T)
    return w


def whole(w: Wire, session: str = SID) -> Wire:
    return begun(w, session, upto=3)


def _other_protocol() -> str:
    return "{11111111-2222-3333-4444-555555555555}"


# One scenario per catalogue code: each plays a capture that must raise that code.
SCENARIOS = {
    "fragment-after-cancel": lambda w: (begun(w), w.cancel(), w.fragment(SID, *FRAGS[1], T)),
    "fragment-after-close": lambda w: (whole(w), w.close(), w.fragment(SID, *FRAGS[0], T)),
    "cancel-after-complete": lambda w: (whole(w), w.cancel()),
    "packet-after-end": lambda w: (whole(w), w.close(), w.close()),
    "unknown-session": lambda w: (w.wait(900), w.fragment(SID, *FRAGS[1], T)),
    "session-before-capture": lambda w: (w.fragment(SID, *FRAGS[1], T), w.fragment(SID, *FRAGS[2], T), w.close()),
    "range-gap": lambda w: (begun(w), w.fragment(SID, *FRAGS[2], T, status=416, received=5120)),
    "range-resend": lambda w: (begun(w), w.fragment(SID, *FRAGS[0], T)),
    "no-progress": lambda w: (begun(w), [w.fragment(SID, *FRAGS[0], T, status=416, received=5120) for _ in range(3)]),
    "resend-conflict": lambda w: (begun(w), w.fragment(SID, *FRAGS[0], T, seed=7, status=416, received=5120)),
    "fragment-after-complete": lambda w: (whole(w), w.fragment(SID, *FRAGS[0], T)),
    "total-changed": lambda w: (begun(w), w.fragment(SID, 5120, 10239, 13_000)),
    "range-malformed": lambda w: (begun(w), w.fragment(SID, 5120, 10239, T, content_range="bytes 10239-5120/12000", status=400, received=None)),
    "length-mismatch": lambda w: (begun(w), w.fragment(SID, 5120, 10239, T, content_length=5000)),
    "ack-offset-mismatch": lambda w: (begun(w), w.fragment(SID, 5120, 10239, T, received=8000)),
    "ack-offset-invalid": lambda w: (begun(w), w.fragment(SID, 5120, 10239, T, received=None)),
    "ack-regressed": lambda w: (begun(w, upto=2), w.fragment(SID, *FRAGS[2], T, status=416, received=2000)),
    "ack-session-mismatch": lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, echo=False, ack=[(Header.SESSION_ID, SID2)])),
    "ack-malformed": lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, response_body=12)),
    "close-incomplete": lambda w: (begun(w), w.close()),
    "never-finished": lambda w: begun(w),
    "duplicate-create": lambda w: (begun(w), w.create(SID2)),
    "session-recreated": lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, status=500, ack=NOT_FOUND), w.create(SID2)),
    "error-response": lambda w: w.create(status=403, ack=[(Header.ERROR_CODE, "0x80070005"), (Header.ERROR_CONTEXT, "0x5")]),
    "error-header-misuse": lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, ack=[(Header.ERROR_CODE, "0x80070057")])),
    "protocol-mismatch": lambda w: w.create(chosen=_other_protocol()),
    "nonstandard-id": lambda w: (w.create("upload-42"), w.fragment("upload-42", 0, 4891, 4892), w.close("upload-42")),
    "missing-header": lambda w: (begun(w), w.close(session=None)),
    "unexpected-body": lambda w: (whole(w), w.close(body=b"bye")),
    "unknown-packet-type": lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, packet_type="Fragmentz", status=400, received=None)),
    "header-limits": lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, content_name="dir/report.bin")),
    "wrong-method-or-version": lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, version="HTTP/1.0")),
    "content-encoding": lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, headers=[("Content-Encoding", "gzip")])),
    # on a second connection: on one connection a BITS client waits for each ack (skew.py)
    "concurrent-requests": lambda w: (w.create(), w.fragment(SID, *FRAGS[0], T, overlap=True), w.connect(), w.fragment(SID, *FRAGS[1], T)),
    "reply-url-misplaced": lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, ack=[(Header.REPLY_URL, "/replies/x.bin")])),
    "host-id-ignored": lambda w: (w.create(ack=_host_id_ack()), w.fragment(SID, *FRAGS[0], T)),
    "host-redirect": lambda w: (w.create(ack=_host_id_ack()), w.fragment(SID, *FRAGS[0], T, host="node7.example")),
    "no-response": lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, status=None)),
    "orphan-response": lambda w: w.exchange("", "", [], orphan=True, ack=[(Header.PACKET_TYPE, "Ack")]),
    "out-of-sync": lambda w: (begun(w), w.fragment(SID, *FRAGS[0], T, status=416, received=5120)),
    "fragment-too-large": lambda w: (w.create(), w.fragment(SID, *FRAGS[0], T, status=413, received=None)),
    "auth-challenge": lambda w: w.create(status=401, ack=[("WWW-Authenticate", "Negotiate")]),
    "basic-auth-cleartext": lambda w: w.create(headers=[("Authorization", "Basic dXNlcjpwYXNz")]),
    "client-fingerprint": lambda w: w.create(user_agent="python-requests/2.31"),
    "stalled": lambda w: (begun(w), w.wait(400), w.fragment(SID, *FRAGS[1], T)),
    "capture-gap": lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, flags={"gap"})),
    "response-overrun": lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, extra_before=37)),
    "ack-beyond-sent": lambda w: (begun(w), w.fragment(SID, *FRAGS[2], T)),
    "ack-session-id-absent": lambda w: (whole(w), w.close(echo=False)),
}


def _host_id_ack() -> list[tuple[str, str]]:
    return [(Header.PACKET_TYPE, "Ack"), (Header.PROTOCOL, PROTOCOL_GUID), (Header.SESSION_ID, SID),
            (Header.HOST_ID, "node7.example"), (Header.HOST_ID_FALLBACK_TIMEOUT, "3600")]


def test_every_catalogue_code_has_a_scenario() -> None:
    assert sorted(SCENARIOS) == sorted(CATALOGUE)


@pytest.mark.parametrize("code", sorted(SCENARIOS))
def test_scenario_raises_its_code(code: str) -> None:
    w = Wire()
    SCENARIOS[code](w)
    summary = w.finish()
    found = [a for a in summary.anomalies + [a for s in summary.sessions for a in s.anomalies] if a.code == code]
    assert found, all_codes(summary)
    assert all(a.message and (a.frames or a.timestamps) for a in found)


# --- clean traffic stays silent ---------------------------------------------------------------

def test_windows_like_clean_upload_is_silent() -> None:
    w = Wire()
    w.upload()
    summary = w.finish()
    assert all_codes(summary) == []
    session, = summary.sessions
    assert (session.state, session.verdict) == (State.CLOSED, Verdict.DELIVERED)
    assert (session.total, session.acknowledged, session.bytes_sent) == (T, T, T)
    assert [(f.content_range.first, f.content_range.last) for f in session.fragments] == FRAGS
    assert session.content_name == "report.bin" and session.user_agent == UA
    assert session.protocol == PROTOCOL_GUID and session.host == "uploads.example"


def test_iis_acks_without_session_id_are_noted_only_on_close_and_cancel() -> None:
    w = Wire()
    w.upload(echo=False)
    w.ping()
    summary = w.finish()
    assert all_codes(summary) == ["ack-session-id-absent"]
    [note] = summary.sessions[0].anomalies
    assert note.severity is Severity.INFO and "Close-Session" in note.message
    w = Wire()
    begun(w)
    w.cancel(echo=False)
    assert all_codes(w.finish()) == ["ack-session-id-absent"]
    w = Wire()
    begun(w)
    w.cancel(echo=False, status=500)  # only success acks must carry it
    assert "ack-session-id-absent" not in all_codes(w.finish())


def test_spec_sample_single_fragment_with_pings_and_201_create() -> None:
    w = Wire()
    w.ping()
    w.create(status=201, headers=[("Content-Name", "rfc2119.txt")])
    w.fragment(SID, 0, 4891, 4892, echo=False, content_name=None)
    w.ping()
    w.close(echo=False)
    summary = w.finish()
    assert all_codes(summary) == ["ack-session-id-absent"]  # the sample's Close ack has none
    assert summary.sessions[0].verdict == Verdict.DELIVERED
    assert summary.sessions[0].content_name == "rfc2119.txt"


def test_lowercase_guid_in_fragments_belongs_to_the_uppercase_session() -> None:
    w = Wire()
    w.create(SID)
    for first, last in FRAGS:
        w.fragment(SID.lower(), first, last, T)
    w.close(SID.lower())
    summary = w.finish()
    assert len(summary.sessions) == 1 and summary.sessions[0].verdict == Verdict.DELIVERED
    assert all_codes(summary) == []


def test_resync_after_a_cut_is_only_out_of_sync() -> None:
    w = Wire()
    begun(w)
    w.fragment(SID, *FRAGS[1], T, status=None, flags={"partial"})  # connection cut, ack lost
    w.connect()
    w.ping()
    w.fragment(SID, *FRAGS[1], T, status=416, received=10240)  # server had it all
    w.fragment(SID, *FRAGS[2], T)
    w.close()
    summary = w.finish()
    assert all_codes(summary) == ["no-response", "out-of-sync"]
    session = summary.sessions[0]
    assert session.verdict == Verdict.DELIVERED and session.connections == [0, 1]


def test_session_followed_across_connections_and_resume_after_unanswered_fragment() -> None:
    w = Wire()
    begun(w)
    w.fragment(SID, *FRAGS[1], T, status=None)
    w.connect()
    w.fragment(SID, *FRAGS[2], T)  # the client did get the lost ack
    w.close()
    summary = w.finish()
    assert all_codes(summary) == ["no-response"]
    assert summary.sessions[0].connections == [0, 1]


def test_host_id_redirect_followed_without_ignored() -> None:
    w = Wire()
    w.create(ack=_host_id_ack())
    w.connect(server=(bytes([192, 0, 2, 7]), 80))
    w.ping(host="node7.example")
    for first, last in FRAGS:
        w.fragment(SID, first, last, T, host="node7.example")
    w.close(host="node7.example")
    summary = w.finish()
    assert all_codes(summary) == ["host-redirect"]
    assert summary.sessions[0].verdict == Verdict.DELIVERED


def test_host_id_fallback_after_timeout_is_not_ignored() -> None:
    w = Wire()
    w.create(ack=_host_id_ack())
    w.fragment(SID, *FRAGS[0], T, host="node7.example")
    w.wait(3700)
    w.fragment(SID, *FRAGS[1], T)
    assert "host-id-ignored" not in all_codes(w.finish())


def test_win32_overlap_trim_is_only_range_resend() -> None:
    w = Wire()
    begun(w)
    w.fragment(SID, 2560, 10239, T)  # overlaps 2560-5119, the server writes only the new bytes
    w.fragment(SID, *FRAGS[2], T)
    w.close()
    summary = w.finish()
    assert all_codes(summary) == ["range-resend"]
    assert summary.sessions[0].anomalies[0].severity is Severity.INFO


def test_exact_resend_of_final_fragment_after_lost_ack_is_normal() -> None:
    w = Wire()
    whole(w)
    w.fragment(SID, *FRAGS[2], T)
    w.close()
    assert "fragment-after-complete" not in all_codes(w.finish())


# --- individual codes in more detail ----------------------------------------------------------

def test_stalled_measures_the_gap_and_respects_threshold() -> None:
    w = Wire(stall_after_s=1000)
    begun(w)
    w.wait(400)
    w.fragment(SID, *FRAGS[1], T)
    assert "stalled" not in all_codes(w.finish())
    w = Wire()
    begun(w)
    w.wait(400)
    w.fragment(SID, *FRAGS[1], T)
    stalled = [a for a in w.finish().sessions[0].anomalies if a.code == "stalled"]
    assert len(stalled) == 1 and "400 s" in stalled[0].message and "5120" in stalled[0].message


def test_unknown_session_vs_before_capture_window() -> None:
    w = Wire()
    w.fragment(SID, *FRAGS[1], T)
    session = w.finish().sessions[0]
    assert session.before_capture and codes(session.anomalies).count("session-before-capture") == 1
    w = Wire()
    w.wait(30)
    w.close(SID)  # a Close is not a Fragment: unknown-session even early
    assert "unknown-session" in all_codes(w.finish())


def test_duplicate_create_not_raised_after_first_session_closed() -> None:
    w = Wire()
    w.upload()
    w.upload(SID2)
    assert all_codes(w.finish()) == []


def test_duplicate_create_names_the_open_session() -> None:
    w = Wire()
    begun(w)
    w.create(SID2)
    dup, = [a for s in w.finish().sessions for a in s.anomalies if a.code == "duplicate-create"]
    assert dup.session_id == SID2 and SID in dup.message


def test_session_recreated_after_unknown_stale_id() -> None:
    w = Wire()
    w.wait(900)
    w.fragment(SID, *FRAGS[1], T, status=500, received=None, ack=NOT_FOUND)
    w.create(SID2)
    summary = w.finish()
    stale, fresh = summary.sessions
    assert stale.state is State.EXPIRED and stale.verdict == Verdict.NOT_DELIVERED
    assert "session-recreated" in codes(fresh.anomalies)


def test_reply_url_on_final_ack_is_fine_and_fetch_after_close_is_not() -> None:
    reply = r"BITS-Sessions\Replies\{C85B4E0A}\responsefile.bin"
    w = Wire()
    begun(w, upto=2)
    w.fragment(SID, *FRAGS[2], T, ack=[(Header.REPLY_URL, reply)])
    w.exchange("GET", "/upload/BITS-Sessions/Replies/%7BC85B4E0A%7D/responsefile.bin",
               [("User-Agent", UA), ("Host", "uploads.example")], response_body=100)
    w.close()
    summary = w.finish()
    assert all_codes(summary) == []
    assert summary.sessions[0].reply_url == reply and len(summary.downloads) == 1
    w.exchange("GET", "/upload/BITS-Sessions/Replies/%7BC85B4E0A%7D/responsefile.bin",
               [("User-Agent", UA), ("Host", "uploads.example")], response_body=100)
    assert "reply-url-misplaced" in all_codes(w.tracker.finish())


def test_no_progress_raised_once_per_stuck_period() -> None:
    w = Wire()
    begun(w)
    for _ in range(5):
        w.fragment(SID, *FRAGS[0], T)
    assert codes(w.finish().sessions[0].anomalies).count("no-progress") == 1


def test_error_response_names_hresult_from_mcbup_header() -> None:
    w = Wire()
    begun(w)
    w.fragment(SID, *FRAGS[1], T, status=500, received=None, ack=[("BITS-Error", "x80070112"), (Header.ERROR_CONTEXT, "0x5")])
    error, = [a for a in w.finish().sessions[0].anomalies if a.code == "error-response"]
    assert "0x80070112 ERROR_DISK_FULL" in error.message and error.severity is Severity.ERROR


# --- verdicts -----------------------------------------------------------------------------------

VERDICTS = {
    "delivered-clean": (lambda w: (whole(w), w.close()), Verdict.DELIVERED),
    "delivered-not-closed": (lambda w: whole(w), Verdict.DELIVERED),
    "delivered-cancel-after": (lambda w: (whole(w), w.cancel()), Verdict.DELIVERED),
    "cancelled": (lambda w: (begun(w), w.cancel()), Verdict.NOT_DELIVERED),
    "cancel-unanswered": (lambda w: (begun(w), w.cancel(status=None)), Verdict.NOT_DELIVERED),
    "closed-incomplete": (lambda w: (begun(w), w.close()), Verdict.NOT_DELIVERED),
    "create-refused": (lambda w: w.create(status=404), Verdict.NOT_DELIVERED),
    "fragment-refused": (lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, status=400, received=None)), Verdict.NOT_DELIVERED),
    "expired": (lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, status=500, received=None, ack=NOT_FOUND)), Verdict.NOT_DELIVERED),
    "capture-ends": (lambda w: begun(w), Verdict.UNKNOWN),
    "transient-500": (lambda w: (begun(w), w.fragment(SID, *FRAGS[1], T, status=500, received=None)), Verdict.UNKNOWN),
    "began-after-final": (lambda w: w.close(), Verdict.UNKNOWN),
    "final-416-only": (lambda w: (begun(w, upto=2), w.fragment(SID, *FRAGS[2], T, status=416, received=10240)), Verdict.UNKNOWN),
}


@pytest.mark.parametrize("name", sorted(VERDICTS))
def test_verdict(name: str) -> None:
    play, expected = VERDICTS[name]
    w = Wire()
    play(w)
    session, = w.finish().sessions
    assert session.verdict == expected, session.verdict_reason
    assert session.verdict_reason


def test_cancel_after_complete_keeps_delivered_and_warns() -> None:
    w = Wire()
    whole(w)
    w.cancel()
    session, = w.finish().sessions
    assert session.verdict == Verdict.DELIVERED and session.state is State.CANCELLED
    assert "cancel-after-complete" in codes(session.anomalies)


def test_counts_other_http_and_downloads() -> None:
    w = Wire()
    w.exchange("GET", "/index.html", [("User-Agent", "curl/8"), ("Host", "x")], response_body=10)
    w.exchange("HEAD", "/big.iso", [("User-Agent", UA), ("Host", "x")])
    w.upload()
    summary = w.finish()
    assert summary.counts == {"http_exchanges": 7, "bits_exchanges": 5, "other_http": 1, "downloads": 1}
    assert summary.downloads[0].target == "/big.iso" and summary.downloads[0].method == "HEAD"


def test_anomaly_record_carries_context() -> None:
    w = Wire()
    begun(w)
    w.connect()
    gap = w.fragment(SID, *FRAGS[2], T, status=416, received=5120)
    anomaly, = [a for a in w.finish().sessions[0].anomalies if a.code == "range-gap"]
    assert anomaly.session_id == SID and anomaly.connection == 1
    assert set(anomaly.frames) == {gap.request.first_frame, gap.response.first_frame}
    assert anomaly.timestamps[0] == gap.request.first_ts_ns
    assert "10240" in anomaly.message and "5120" in anomaly.message
    assert anomaly.severity is Severity.ERROR


# --- the capture corpus: real TCP recorded with tcpdump ------------------------------------------

CAPTURES = REPO / "captures"
EXPECTED = json.loads((CAPTURES / "expected.json").read_text())["captures"] if (CAPTURES / "expected.json").exists() else {}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_capture_corpus(name: str, tmp_path: Path) -> None:
    from bitstrace.analyzer.pipeline import read_exchanges

    expected = EXPECTED[name]
    extractor = Extractor(tmp_path)
    tracker = SessionTracker(extractor)
    read_exchanges([CAPTURES / name], tracker.on_exchange, extractor.on_body)
    summary = tracker.finish()
    found = set(all_codes(summary))
    assert set(expected["anomalies"]) <= found
    if expected["anomalies_exhaustive"]:
        assert found == set(expected["anomalies"])
    assert len(summary.sessions) == len(expected["sessions"])
    for session, want in zip(summary.sessions, expected["sessions"]):
        assert (session.id, session.url, session.content_name) == (want["id"], want["url"], want["file"])
        assert (session.verdict, session.total, session.acknowledged) == (want["delivery"], want["total"], want["bytes_acknowledged"])
        assert session.state.server_state == want["final_state"]
        entity = session.entity
        data = Path(entity.path).read_bytes()
        assert hashlib.sha256(data[:want["bytes_acknowledged"]]).hexdigest() == want["acknowledged_sha256"]
        assert entity.complete == (want["bytes_acknowledged"] == want["total"])
        if entity.complete:
            assert entity.sha256 == want["sha256"]


def test_fragment_too_large_follows_the_shrink() -> None:
    w = Wire()
    w.create()
    w.fragment(SID, 0, 11999, T, status=413, received=None)
    w.fragment(SID, *FRAGS[0], T)
    anomaly, = [a for a in w.finish().sessions[0].anomalies if a.code == "fragment-too-large"]
    assert "12000 bytes" in anomaly.message and "shrank its next fragment to 5120 bytes" in anomaly.message


def test_slow_fragment_transfer_is_not_a_stall() -> None:
    w = Wire()
    begun(w, upto=2)
    w.fragment(SID, *FRAGS[2], T, ack_after=400)  # sending and acknowledging it took 400 s
    w.close()
    assert "stalled" not in all_codes(w.finish())
    w = Wire()
    begun(w, upto=2)
    w.wait(400)  # 400 s of silence before the client sends again
    w.fragment(SID, *FRAGS[2], T)
    w.close()
    assert "stalled" in all_codes(w.finish())


def test_packets_outside_sessions_are_fingerprinted_once_per_client_and_agent() -> None:
    w = Wire()
    for _ in range(3):
        w.exchange("BITS_POST", "/u", [("BITS-Packet-Type", "Ping"), ("Content-Length", "0"), ("User-Agent", "curl/8.5")],
                   ack=[("BITS-Packet-Type", "Ack")])
    w.ping()
    summary = w.finish()
    fingerprint, = [a for a in summary.anomalies if a.code == "client-fingerprint"]
    assert "curl/8.5" in fingerprint.message and "192.0.2.10" in fingerprint.message


@pytest.mark.parametrize("several", [False, True])
def test_refused_creates_keyed_by_their_frame_in_its_file(several: bool) -> None:
    """Frame numbers restart in each file of a rotated capture: the key names the file too."""
    w = Wire(several_captures=several)
    w.create(status=403)
    w.rotate()
    w.create(status=403)
    keys = [s.key for s in w.finish().sessions]
    assert keys == (["refused-create@1:1", "refused-create@2:1"] if several else ["refused-create@1", "refused-create@1"])


def _grouping(sessions: list) -> list[tuple[str, str | None, int, list[int]]]:
    return [(s.key, s.id, s.generation, sorted(pkt.exchange for pkt in s.packets)) for s in sessions]


def test_on_exchange_returns_the_packet_and_sessions_group_as_finish_does() -> None:
    """The replay planner takes packets from on_exchange and groups by sessions() without
    finish: both must agree with the analysis (an id issued again is a new generation; a Ping
    and a challenged Create are packets filed in no session; a download or other HTTP none)."""
    w = Wire()
    returned = {}
    file = w.tracker.on_exchange
    w.tracker.on_exchange = lambda exchange: returned.setdefault(exchange.index, file(exchange))
    aside = {w.ping().index, w.create(status=401).index}
    w.upload(SID)
    w.connect()
    w.upload(SID2, seed=1)
    not_bits = {w.exchange("HEAD", "/big.iso", [("User-Agent", UA), ("Host", "x")]).index,
                w.exchange("GET", "/index.html", [("User-Agent", "curl/8"), ("Host", "x")]).index}
    w.upload(SID.upper(), seed=2)  # the server issues SID again
    assert {index for index, pkt in returned.items() if pkt is None} == not_bits
    assert all(pkt.exchange == index for index, pkt in returned.items() if pkt is not None)
    grouped = _grouping(w.tracker.sessions())
    assert [(key, generation) for key, _, generation, _ in grouped] == [
        (SID.lower(), 0), (SID2.lower(), 0), (SID.lower(), 1)]
    filed = [index for *_, indices in grouped for index in indices]
    assert sorted(filed) == sorted(set(returned) - not_bits - aside)
    assert grouped == _grouping(w.finish().sessions)


# --- checks found missing on real peers ---------------------------------------------------------

def test_ack_beyond_sent_names_the_hole_and_only_a_real_one() -> None:
    w = Wire()
    begun(w)
    w.fragment(SID, *FRAGS[2], T)  # 10240-11999 acked 12000: 5120-10239 never sent
    summary = w.finish()
    [found] = [a for a in summary.sessions[0].anomalies if a.code == "ack-beyond-sent"]
    assert "bytes 5120-11999" in found.message and "0-5119" in found.message
    # out of order but whole: the hole is filled before the ack that covers it
    w = Wire()
    w.create()
    w.fragment(SID, *FRAGS[1], T, status=None)
    w.fragment(SID, *FRAGS[0], T, received=10240)
    w.fragment(SID, *FRAGS[2], T)
    w.close()
    assert "ack-beyond-sent" not in all_codes(w.finish())
    # a resend of a cut fragment, then the rest: every byte acked was on the wire
    w = Wire()
    begun(w)
    w.fragment(SID, *FRAGS[1], T, status=None, body=payload_slice(5120, 8000), flags={"partial"})
    w.fragment(SID, *FRAGS[1], T)
    w.fragment(SID, *FRAGS[2], T)
    assert "ack-beyond-sent" not in all_codes(w.finish())
    # a capture gap may have swallowed the missing fragment: no claim
    w = Wire()
    begun(w)
    w.fragment(SID, *FRAGS[2], T, flags={"gap"})
    assert "ack-beyond-sent" not in all_codes(w.finish())


def payload_slice(first: int, end: int) -> bytes:
    return payload(T)[first:end]


def test_unanswered_sends_at_the_acknowledged_offset_are_no_progress() -> None:
    w = Wire()
    begun(w)
    for _ in range(3):
        w.fragment(SID, *FRAGS[1], T, status=None)
        w.connect()
        w.ping()
    w.fragment(SID, *FRAGS[1], T)
    w.fragment(SID, *FRAGS[2], T)
    w.close()
    summary = w.finish()
    [stuck] = [a for a in summary.sessions[0].anomalies if a.code == "no-progress"]
    assert "(3 unanswered)" in stuck.message and "past 5120" in stuck.message
    assert summary.sessions[0].verdict == Verdict.DELIVERED
    # two lost acks are not yet a pattern
    w = Wire()
    begun(w)
    for _ in range(2):
        w.fragment(SID, *FRAGS[1], T, status=None)
    w.fragment(SID, *FRAGS[1], T)
    assert "no-progress" not in all_codes(w.finish())


def test_416_without_received_range_says_no_offset_was_named() -> None:
    w = Wire()
    begun(w)
    w.fragment(SID, *FRAGS[1], T, status=416, received=None)
    summary = w.finish()
    [resync] = [a for a in summary.sessions[0].anomalies if a.code == "out-of-sync"]
    assert "names no offset" in resync.message and "None" not in resync.message
    assert "ack-offset-invalid" in all_codes(summary)


@pytest.mark.parametrize("skew_ms", [-500, -20, 20, 500])
def test_a_skewed_server_clock_changes_no_verdict_or_anomaly(skew_ms: int) -> None:
    def play(skew_ns: int) -> tuple:
        w = Wire()
        w.server_clock_ns = skew_ns
        whole(w)
        w.connect()  # the Cancel on a second connection, after the final ack
        w.cancel()
        summary = w.finish()
        session = summary.sessions[0]
        return session.verdict, session.state, all_codes(summary), summary.clock_skew
    unskewed = play(0)
    assert unskewed[3] == {}
    verdict, state, found, skews = play(skew_ms * 1_000_000)
    assert (verdict, state, found) == unskewed[:3] == (Verdict.DELIVERED, State.CANCELLED, ["cancel-after-complete"])
    [skew] = skews.values()
    assert skew.detected and (skew.offset_ns < 0) == (skew_ms < 0)
    assert abs(skew.offset_ns) <= abs(skew_ms) * 1_000_000
