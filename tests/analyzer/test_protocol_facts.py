"""The protocol facts written once (analyzer.bits.protocol, analyzer.authority,
analyzer.basic_auth), as the analyzer, the client, the replayer and the server read them."""

from __future__ import annotations

import base64

from bitstrace.analyzer.authority import format_authority, host_name, url_authority
from bitstrace.analyzer.basic_auth import (
    auth_scheme,
    basic_authorization,
    basic_credentials,
    credentials_match,
    is_basic,
)
from bitstrace.analyzer.bits.protocol import (
    BG_E_SESSION_NOT_FOUND,
    E_INVALIDARG,
    is_session_not_found,
    same_id,
    session_key,
)
from bitstrace.analyzer.decode import format_endpoint

GUID = "{6C2E5A3B-1F0D-4E8A-9B7C-2D4E6F8A0B1C}"


def test_session_key_folds_guid_case_and_padding_only() -> None:
    assert session_key(f"  {GUID} ") == session_key(GUID.lower()) == GUID.lower()
    assert session_key(" Opaque-Id ") == "Opaque-Id" != session_key("opaque-id")
    assert same_id(GUID, GUID.lower()) and same_id(" Opaque-Id", "Opaque-Id ")
    assert not same_id("Opaque-Id", "opaque-id") and not same_id(GUID, GUID[1:-1])


def test_session_not_found_is_one_code() -> None:
    assert is_session_not_found(BG_E_SESSION_NOT_FOUND.code)
    assert not is_session_not_found(E_INVALIDARG.code) and not is_session_not_found(None)


def test_basic_credentials_round_trip_and_refuse_others() -> None:
    value = basic_authorization("jürgen", "pa:ss")
    assert value == "Basic " + base64.b64encode("jürgen:pa:ss".encode()).decode()
    assert basic_credentials(value) == "jürgen:pa:ss".encode()
    assert credentials_match(value, "jürgen", "pa:ss") and not credentials_match(value, "jürgen", "x")
    assert not credentials_match(None, "a", "b") and not credentials_match("Basic !!!", "a", "b")
    assert basic_credentials("NTLM TlRMTVNTUAAB") is None and auth_scheme("  NTLM abc") == "ntlm"
    assert is_basic("basic\tdXNlcjpwdw==") and not is_basic("Basicx abc") and auth_scheme("") == ""


def test_authority_brackets_ipv6_and_drops_default_ports() -> None:
    assert url_authority("http", "::1", 80) == "[::1]" and url_authority("https", "::1", 80) == "[::1]:80"
    assert url_authority("https", "host.example", 443) == "host.example"
    assert format_authority("10.0.0.1", 8080) == "10.0.0.1:8080"
    assert format_endpoint(bytes(15) + b"\x01", 443) == "[::1]:443"
    assert host_name("[2001:DB8::1]:8080") == "2001:db8::1" and host_name("Host.Example:80") == "host.example"
    assert host_name("2001:db8::1") == "2001:db8::1" and host_name("") is None
