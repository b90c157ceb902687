"""Packets: typed fields from exchanges, and the checks a single exchange decides."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitstrace.analyzer.bits.catalogue import CATALOGUE, Severity
from bitstrace.analyzer.bits.packets import classify
from bitstrace.analyzer.bits.protocol import session_key
from bitstrace.analyzer.bits import protocol as p
from bitstrace.analyzer.bits.protocol import PROTOCOL_GUID, ContentRange, Header, PacketType
from tests.support.bits_fixtures import SID, SID2, UA, Wire, codes

T = 12_000


def packet_of(exchange):
    found = classify(exchange)
    assert found.packet is not None
    return found.packet


@pytest.mark.parametrize("spelling", ["Fragment", "FRAGMENT", "fragment", "FRAgmENT", " Fragment "])
def test_packet_type_is_case_insensitive(spelling: str) -> None:
    pkt = packet_of(Wire().fragment(SID, 0, 5119, T, packet_type=spelling))
    assert pkt.packet_type is PacketType.FRAGMENT and pkt.type_raw == spelling
    assert "unknown-packet-type" not in codes(pkt.anomalies)


@pytest.mark.parametrize("spelling,expected", [
    ("CREATE-SESSION", PacketType.CREATE_SESSION), ("pinG", PacketType.PING),
    ("CLOSE-SESSION", PacketType.CLOSE_SESSION), ("cancel-session", PacketType.CANCEL_SESSION),
])
def test_mcbup_spellings(spelling: str, expected: PacketType) -> None:
    w = Wire()
    pkt = packet_of(w.exchange("BITS_POST", "/u", [(Header.PACKET_TYPE, spelling), ("Content-Length", "0"),
                                                   (Header.SESSION_ID, SID), (Header.SUPPORTED_PROTOCOLS, PROTOCOL_GUID)],
                               ack=[(Header.PACKET_TYPE, "ACK"), (Header.PROTOCOL, PROTOCOL_GUID), (Header.SESSION_ID, SID)]))
    assert pkt.packet_type is expected
    assert "ack-malformed" not in codes(pkt.anomalies) and "unknown-packet-type" not in codes(pkt.anomalies)


def test_fragment_fields() -> None:
    exchange = Wire().fragment(SID, 5120, 10239, T, received=10240, content_name="report.bin")
    pkt = packet_of(exchange)
    assert pkt.session_id == SID and pkt.content_range == ContentRange(5120, 10239, T)
    assert pkt.content_length == 5120 == pkt.body_length and pkt.body_sha256 == exchange.request.body_sha256
    assert pkt.content_name == "report.bin" and pkt.user_agent == UA and pkt.host == "uploads.example"
    assert (pkt.status, pkt.received_offset, pkt.ack_session_id) == (200, 10240, SID)
    assert pkt.client == "192.0.2.10:50412" and pkt.server == "192.0.2.1:80" and pkt.client_ip == "192.0.2.10"
    assert pkt.request_frame == exchange.request.first_frame and pkt.response_frame == exchange.response.first_frame
    assert pkt.anomalies == ()


def test_create_fields_with_host_id_and_protocol_list() -> None:
    offered = "{AAAAAAAA-2222-3333-4444-555555555555}, " + PROTOCOL_GUID.upper()
    pkt = packet_of(Wire().create(offered=offered, ack=[
        (Header.PACKET_TYPE, "Ack"), (Header.PROTOCOL, PROTOCOL_GUID), (Header.SESSION_ID, SID),
        (Header.HOST_ID, "[2001:db8::7]"), (Header.HOST_ID_FALLBACK_TIMEOUT, "86400")]))
    assert pkt.offered_protocols == ("{AAAAAAAA-2222-3333-4444-555555555555}", PROTOCOL_GUID.upper())
    assert pkt.protocol == PROTOCOL_GUID and pkt.ack_session_id == SID
    assert (pkt.host_id, pkt.fallback_timeout_s) == ("[2001:db8::7]", 86400)
    assert pkt.anomalies == ()  # the chosen GUID matches the offered one case-insensitively


def test_ipv6_addresses_are_bracketed() -> None:
    w = Wire()
    w.connect(client=(bytes(15) + b"\x01", 50000), server=(bytes(15) + b"\x01", 8080))
    pkt = packet_of(w.ping())
    assert pkt.client == "[::1]:50000" and pkt.server_ip == "::1"


@pytest.mark.parametrize("name", [Header.ERROR_CODE, Header.ERROR_CODE_MCBUP])
@pytest.mark.parametrize("value,code", [("0x80070057", 0x80070057), ("80070057", 0x80070057),
                                        ("x8020001F", 0x8020001F), ("0X8020001f", 0x8020001F)])
def test_error_code_header_names_and_hresult_forms(name: str, value: str, code: int) -> None:
    pkt = packet_of(Wire().fragment(SID, 0, 5119, T, status=500, received=None,
                                    ack=[(name, value), (Header.ERROR_CONTEXT, "0x5")]))
    assert pkt.error_code == code and pkt.error_context == 5
    error, = [a for a in pkt.anomalies if a.code == "error-response"]
    assert f"0x{code:08X}" in error.message and "context 0x5" in error.message
    assert "error-header-misuse" not in codes(pkt.anomalies)


def test_zero_error_code_on_416_is_normal() -> None:
    pkt = packet_of(Wire().fragment(SID, 0, 5119, T, status=416, received=0,
                                    ack=[(Header.ERROR_CODE, "0"), (Header.ERROR_CONTEXT, "0x5")]))
    assert pkt.error_code == 0
    assert codes(pkt.anomalies) == ["out-of-sync"]


@pytest.mark.parametrize("ack,status,fragment", [
    ([(Header.ERROR_CODE, "0x80070057")], 200, "code on a 200"),
    ([(Header.ERROR_CODE, "banana"), (Header.ERROR_CONTEXT, "0x5")], 400, "non-hex code"),
    ([(Header.ERROR_CONTEXT, "0x5")], 400, "context without code"),
    ([(Header.ERROR_CODE, "0x80070057"), (Header.ERROR_CONTEXT, "0x3")], 400, "odd context"),
])
def test_error_header_misuse(ack: list, status: int, fragment: str) -> None:
    pkt = packet_of(Wire().fragment(SID, 0, 5119, T, status=status, ack=ack,
                                    received=5120 if status == 200 else None))
    assert "error-header-misuse" in codes(pkt.anomalies), fragment


def test_error_severity_follows_status() -> None:
    pkt = packet_of(Wire().create(status=302, ack=[(Header.PACKET_TYPE, "Ack"), (Header.ERROR_CODE, "0x80070005")]))
    error, = [a for a in pkt.anomalies if a.code == "error-response"]
    assert error.severity is Severity.WARNING
    pkt = packet_of(Wire().create(status=501, ack=[(Header.PACKET_TYPE, "Ack")]))
    error, = [a for a in pkt.anomalies if a.code == "error-response"]
    assert error.severity is Severity.ERROR and "HTTP 501" in error.message


def test_iis_ack_without_session_id_is_fine_but_a_different_one_is_not() -> None:
    assert packet_of(Wire().fragment(SID, 0, 5119, T, echo=False)).anomalies == ()
    lower = packet_of(Wire().fragment(SID, 0, 5119, T, echo=False, ack=[(Header.SESSION_ID, SID.lower())]))
    assert lower.anomalies == ()
    other = packet_of(Wire().fragment(SID, 0, 5119, T, echo=False, ack=[(Header.SESSION_ID, SID2)]))
    assert codes(other.anomalies) == ["ack-session-mismatch"]


@pytest.mark.parametrize("value", ["bytes 0-99", "bytes 5-3/10", "bytes 0-10/10", "items 0-9/10", "bytes a-b/c", ""])
def test_malformed_content_range_is_an_anomaly_not_an_exception(value: str) -> None:
    pkt = packet_of(Wire().fragment(SID, 0, 9, 10, content_range=value, status=400, received=None))
    assert pkt.content_range is None
    assert "range-malformed" in codes(pkt.anomalies)


def test_content_range_unit_is_case_insensitive() -> None:
    pkt = packet_of(Wire().fragment(SID, 0, 9, 10, content_range="Bytes 0-9/10"))
    assert pkt.content_range == ContentRange(0, 9, 10) and pkt.anomalies == ()


@pytest.mark.parametrize("received,code", [(None, "ack-offset-invalid"), ("lots", "ack-offset-invalid"),
                                           (13_000, "ack-offset-invalid"), (4000, "ack-offset-mismatch")])
def test_received_offset_checks(received, code: str) -> None:
    w = Wire()
    ack = [(Header.RECEIVED_CONTENT_RANGE, received)] if isinstance(received, str) else []
    pkt = packet_of(w.fragment(SID, 0, 5119, T, received=None if isinstance(received, str) else received, ack=ack))
    assert codes(pkt.anomalies) == [code]


def test_missing_received_offset_on_416() -> None:
    pkt = packet_of(Wire().fragment(SID, 0, 5119, T, status=416, received=None))
    assert "ack-offset-invalid" in codes(pkt.anomalies)


def test_ack_malformed_without_packet_type_and_with_body() -> None:
    w = Wire()
    pkt = packet_of(w.exchange("BITS_POST", "/u", [(Header.PACKET_TYPE, "Ping"), ("Content-Length", "0")],
                               ack=[("Content-Length", "0")]))
    assert codes(pkt.anomalies) == ["ack-malformed"]
    pkt = packet_of(w.ping(response_body=5))
    assert codes(pkt.anomalies) == ["ack-malformed"]


def test_plain_http_error_without_bits_headers_is_not_a_malformed_ack() -> None:
    pkt = packet_of(Wire().exchange("BITS_POST", "/u", [(Header.PACKET_TYPE, "Ping"), ("Content-Length", "0")],
                                    status=503, ack=[("Content-Type", "text/html")], response_body=300))
    assert codes(pkt.anomalies) == ["error-response"]


def test_protocol_mismatch_forms() -> None:
    assert "protocol-mismatch" in codes(packet_of(Wire().create(chosen=None)).anomalies)
    failed = packet_of(Wire().create(status=400, ack=[(Header.PACKET_TYPE, "Ack"), (Header.PROTOCOL, PROTOCOL_GUID)]))
    assert "protocol-mismatch" in codes(failed.anomalies)
    odd = packet_of(Wire().create(offered="bits-1.5", chosen="bits-1.5"))
    assert codes(odd.anomalies).count("nonstandard-id") == 2 and "protocol-mismatch" not in codes(odd.anomalies)


def test_missing_headers_per_packet_type() -> None:
    w = Wire()
    pkt = packet_of(w.exchange("BITS_POST", "/u", [(Header.PACKET_TYPE, "Fragment")], body=b"x" * 10,
                               ack=[(Header.PACKET_TYPE, "Ack")], status=400))
    missing, = [a for a in pkt.anomalies if a.code == "missing-header"]
    assert all(h in missing.message for h in (Header.SESSION_ID, Header.CONTENT_RANGE, Header.CONTENT_LENGTH))
    pkt = packet_of(w.exchange("BITS_POST", "/u", [(Header.PACKET_TYPE, "Create-Session"), ("Content-Length", "0")],
                               ack=[(Header.PACKET_TYPE, "Ack"), (Header.PROTOCOL, PROTOCOL_GUID), (Header.SESSION_ID, SID)]))
    assert [a.message for a in pkt.anomalies if a.code == "missing-header"] == [
        f"Create-Session lacks {Header.SUPPORTED_PROTOCOLS}"]
    pkt = packet_of(w.create(session=None))
    assert "missing-header" in codes(pkt.anomalies)


@pytest.mark.parametrize("body,length", [(b"abc", None), (b"", 3)])
def test_unexpected_body_on_bodyless_packets(body: bytes, length) -> None:
    w = Wire()
    headers = [(Header.PACKET_TYPE, "Ping"), ("Content-Length", str(len(body) if length is None else length))]
    pkt = packet_of(w.exchange("BITS_POST", "/u", headers, body=body, ack=[(Header.PACKET_TYPE, "Ack")]))
    assert "unexpected-body" in codes(pkt.anomalies)


def test_header_limits() -> None:
    w = Wire()
    assert "header-limits" in codes(packet_of(w.fragment(SID, 0, 9, 10, content_name="x" * 261)).anomalies)
    assert "header-limits" in codes(packet_of(w.fragment(SID, 0, 9, 10, content_name='a"b')).anomalies)
    big = packet_of(w.fragment(SID, 0, 9, 10, headers=[("X-Filler", "y" * 5000)]))
    assert "header-limits" in codes(big.anomalies)
    many = " ".join(f"{{{i:08x}-0000-0000-0000-000000000000}}" for i in range(101))
    assert "header-limits" in codes(packet_of(w.create(offered=many + " " + PROTOCOL_GUID)).anomalies)


def test_bits_headers_on_another_method_and_http10() -> None:
    w = Wire()
    found = classify(w.exchange("POST", "/u", [(Header.PACKET_TYPE, "Fragment"), ("Content-Length", "0")]))
    assert found.packet is None and codes(found.anomalies) == ["wrong-method-or-version"]
    pkt = packet_of(w.ping(version="HTTP/1.0"))
    assert codes(pkt.anomalies) == ["wrong-method-or-version"]


def test_bits_downloads_are_recorded() -> None:
    w = Wire()
    found = classify(w.exchange("GET", "/files/big.iso", [("User-Agent", UA), ("Host", "dl.example"),
                                                          ("Range", "bytes=0-4095")], status=206, response_body=4096))
    d = found.download
    assert d is not None and found.packet is None
    assert (d.method, d.target, d.status, d.bytes, d.range, d.host) == ("GET", "/files/big.iso", 206, 4096, "bytes=0-4095", "dl.example")
    assert classify(w.exchange("GET", "/", [("User-Agent", "Mozilla/5.0")])).download is None


def test_other_http_and_orphans() -> None:
    w = Wire()
    found = classify(w.exchange("", "", [], orphan=True, ack=[("Content-Type", "text/plain")]))
    assert found.packet is None and found.anomalies == []
    found = classify(w.exchange("", "", [], orphan=True, ack=[(Header.PACKET_TYPE, "Ack")]))
    assert codes(found.anomalies) == ["orphan-response"]


def test_auth_challenge_and_basic_credentials() -> None:
    w = Wire()
    pkt = packet_of(w.create(status=407, ack=[("Proxy-Authenticate", "Basic realm=x")]))
    assert codes(pkt.anomalies) == ["auth-challenge"]
    pkt = packet_of(w.create(headers=[("Proxy-Authorization", "basic Zm9vOmJhcg==")]))
    assert codes(pkt.anomalies) == ["basic-auth-cleartext"]
    found = classify(w.exchange("GET", "/f", [("User-Agent", UA), ("Authorization", "Basic Zm9vOmJhcg==")]))
    assert codes(found.anomalies) == ["basic-auth-cleartext"]


def test_fragment_too_large_413_and_bg_e_too_large() -> None:
    w = Wire()
    assert codes(packet_of(w.fragment(SID, 0, 5119, T, status=413, received=None)).anomalies) == ["fragment-too-large"]
    pkt = packet_of(w.fragment(SID, 0, 5119, T, status=500, received=None, ack=[(Header.ERROR_CODE, "0x80200020")]))
    assert sorted(codes(pkt.anomalies)) == ["error-response", "fragment-too-large"]


def test_reply_url_only_on_the_final_ack() -> None:
    w = Wire()
    assert packet_of(w.fragment(SID, 0, 9, 10, ack=[(Header.REPLY_URL, "r.bin")])).anomalies == ()
    assert codes(packet_of(w.close(ack=[(Header.REPLY_URL, "r.bin")])).anomalies) == ["reply-url-misplaced"]


def test_fallback_timeout_without_host_id() -> None:
    pkt = packet_of(Wire().create(ack=[(Header.PACKET_TYPE, "Ack"), (Header.PROTOCOL, PROTOCOL_GUID),
                                       (Header.SESSION_ID, SID), (Header.HOST_ID_FALLBACK_TIMEOUT, "60")]))
    assert codes(pkt.anomalies) == ["host-id-ignored"]


def test_content_encoding_identity_is_fine() -> None:
    w = Wire()
    assert packet_of(w.fragment(SID, 0, 9, 10, headers=[("Content-Encoding", "Identity")])).anomalies == ()
    assert codes(packet_of(w.fragment(SID, 0, 9, 10, headers=[("Content-Encoding", "gzip")])).anomalies) == ["content-encoding"]


def test_capture_flags() -> None:
    w = Wire()
    assert codes(packet_of(w.fragment(SID, 0, 9, 10, status=None)).anomalies) == ["no-response"]
    assert codes(packet_of(w.fragment(SID, 0, 9, 10, flags={"gap"})).anomalies) == ["capture-gap"]
    # a body cut by the capture is not a length mismatch
    assert "length-mismatch" not in codes(packet_of(w.fragment(SID, 0, 9, 10, body=b"abc", content_length=10,
                                                                flags={"gap", "partial"})).anomalies)


def test_session_key_folds_guid_case_only() -> None:
    assert session_key(SID) == session_key(SID.lower()) == SID.lower()
    assert session_key("Opaque-Id") != session_key("opaque-id")


def test_length_limits_of_ids_and_urls() -> None:
    w = Wire()
    assert "header-limits" in codes(packet_of(w.fragment("s" * 101, 0, 9, 10)).anomalies)
    assert "header-limits" in codes(packet_of(w.fragment(SID, 0, 9, 10, ack=[(Header.REPLY_URL, "/r" * 1101)])).anomalies)


_HEADER_NAMES = [Header.PACKET_TYPE, Header.SESSION_ID, Header.CONTENT_RANGE, "Content-Length", Header.CONTENT_NAME,
                 Header.SUPPORTED_PROTOCOLS, Header.PROTOCOL, Header.RECEIVED_CONTENT_RANGE, Header.ERROR_CODE,
                 Header.ERROR_CODE_MCBUP, Header.ERROR_CONTEXT, Header.REPLY_URL, Header.HOST_ID,
                 Header.HOST_ID_FALLBACK_TIMEOUT, "User-Agent", "Host", "Authorization", "Content-Encoding"]
_VALUES = st.one_of(st.sampled_from(["Fragment", "create-session", "Ack", "Close-Session", "Ping", "Cancel-Session",
                                     SID, "bytes 0-9/10", "bytes 9-0/10", "0", "-1", "99999999999999999999",
                                     "0x8020001F", "x", "{}", "", " ", PROTOCOL_GUID, "Basic x",
                                     # past int()'s 4,300-digit limit: must read as malformed
                                     "9" * 5000, f"bytes 0-{'9' * 5000}/{'9' * 5000}"]),
                    st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=40))
_HEADERS = st.lists(st.tuples(st.sampled_from(_HEADER_NAMES), _VALUES), max_size=10)


@settings(max_examples=150, deadline=None)
@given(requests=st.lists(st.tuples(_HEADERS, _HEADERS, st.sampled_from([None, 200, 201, 400, 401, 404, 413, 416, 500]),
                                   st.binary(max_size=20), st.sampled_from(["BITS_POST", "GET", "bits_post"])),
                         min_size=1, max_size=6))
def test_arbitrary_header_values_never_raise(tmp_path_factory, requests) -> None:
    w = Wire(tmp_path_factory.mktemp("x"))
    for request, ack, status, body, method in requests:
        w.exchange(method, "/u", request, body=body, status=status, ack=ack)
        w.wait(200)
    summary = w.finish()
    for session in summary.sessions:
        assert session.verdict in ("delivered", "not-delivered", "unknown")
        assert session.total is None or 0 < session.total < 10**21  # a bounded number, or none
    for item in summary.anomalies + [a for s in summary.sessions for a in s.anomalies]:
        assert item.code in CATALOGUE  # every finding is a catalogued code


def test_numbers_past_the_int_digit_limit_are_malformed() -> None:
    """int() refuses decimal strings over 4,300 digits; a hostile capture must not reach it."""
    huge = "9" * 5000
    assert p.parse_content_range(f"bytes 0-{huge}/{huge}") is None
    assert p.parse_decimal(huge) is None
    assert p.parse_content_range("bytes 0-99999999999999999998/99999999999999999999").total == 10**20 - 1


def test_packets_of_a_session_share_what_repeats() -> None:
    """Packets are kept for the whole run: a session's fragments on one connection hold one copy
    of the endpoints, of the repeated request fields and of the ack fields."""
    w = Wire()
    first, second = (packet_of(w.fragment(SID, a, b, T)) for a, b in ((0, 5119), (5120, 10239)))
    assert first.peers is second.peers and first.request is second.request and first.ack is second.ack
    assert (first.received_offset, second.received_offset) == (5120, 10240)  # not in the shared ack
    assert first.content_range != second.content_range and first.body_digest != second.body_digest
    w.connect()
    third = packet_of(w.fragment(SID, 10240, T - 1, T))
    assert third.peers is not first.peers and third.client != first.client and third.server == first.server
    assert third.request is first.request


def test_values_seen_before_read_as_the_first_time() -> None:
    """Ranges, lengths and offsets repeat across sessions of one file size: a repeated value,
    well-formed or not, gives what it gave the first time, in each packet."""
    w = Wire()
    for _ in range(2):
        pkts = [packet_of(w.fragment(sid, 0, 9, 10)) for sid in (SID, SID2)]
        assert [(x.content_range, x.content_length, x.received_offset) for x in pkts] == [
            (ContentRange(0, 9, 10), 10, 10)] * 2
        bad = [packet_of(w.fragment(sid, 0, 9, 10, content_range="bytes 9-0/10", content_length=9,
                                    received="x1")) for sid in (SID, SID2)]
        assert [(x.content_range, x.content_length, x.received_offset) for x in bad] == [(None, 9, None)] * 2
        assert all({"range-malformed", "length-mismatch", "ack-offset-invalid"} <= set(codes(x.anomalies))
                   for x in bad)
