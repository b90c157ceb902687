"""Conformance suite for bits-server (replay/server.py): one test per rule of docs/protocol.md.

Requests go through http.client or raw sockets (so targets are sent exactly as written).
"""

from __future__ import annotations

import base64
import hashlib
import io
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitstrace.analyzer.bits.protocol import (
    BG_E_SESSION_NOT_FOUND,
    BG_E_TOO_LARGE,
    E_ACCESSDENIED,
    E_INVALIDARG,
    ERROR_DISK_FULL,
    PROTOCOL_GUID,
    Header,
    format_hresult,
    is_guid,
)
from bitstrace.replay.server.paths import STATE_DIR, UnsafePath, reply_target, upload_path
from bitstrace import __version__
from bitstrace.analyzer.bits.protocol import MAX_FRAGMENT
from bitstrace.cli.server import main
from bitstrace.replay.server import BitsServer, ServerOptions
from bitstrace.replay.server.sessions import TRANSITIONS, UploadEvent, IllegalTransition, UploadSession, UploadState
from tests.support import REPO

OTHER_GUID = "{11111111-2222-3333-4444-555555555555}"


# --- helpers ---------------------------------------------------------------------------------
class Reply:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def has(self, name: str) -> bool:
        return self.get(name) is not None


class Client:
    """A minimal BITS speaker over one keep-alive http.client connection."""

    def __init__(self, server: BitsServer, path: str = "/up/file.bin"):
        self.server = server
        self.path = path
        self.conn = http.client.HTTPConnection(*server.address, timeout=10)

    def post(self, packet: str | None, body: bytes = b"", path: str | None = None, **headers: str) -> Reply:
        sent = {"Content-Length": str(len(body))}
        if packet is not None:
            sent[Header.PACKET_TYPE] = packet
        sent.update({name.replace("_", "-"): value for name, value in headers.items()})
        self.conn.request("BITS_POST", path or self.path, body=body, headers=sent)
        response = self.conn.getresponse()
        return Reply(response.status, response.getheaders(), response.read())

    def get(self, path: str, **headers: str) -> Reply:
        self.conn.request("GET", path, headers={k.replace("_", "-"): v for k, v in headers.items()})
        response = self.conn.getresponse()
        return Reply(response.status, response.getheaders(), response.read())

    def create(self, path: str | None = None, protocols: str = PROTOCOL_GUID, **headers: str) -> Reply:
        return self.post("Create-Session", path=path, **{"BITS-Supported-Protocols": protocols}, **headers)

    def session(self, path: str | None = None) -> str:
        reply = self.create(path)
        assert reply.status == 200, reply.headers
        return reply.get(Header.SESSION_ID)

    def fragment(self, session_id: str, data: bytes, first: int, total: int, **headers: str) -> Reply:
        return self.post("Fragment", data, **{
            "BITS-Session-Id": session_id,
            "Content-Range": f"bytes {first}-{first + len(data) - 1}/{total}",
            **headers,
        })

    def close(self, session_id: str) -> Reply:
        return self.post("Close-Session", **{"BITS-Session-Id": session_id})

    def cancel(self, session_id: str) -> Reply:
        return self.post("Cancel-Session", **{"BITS-Session-Id": session_id})

    def upload(self, data: bytes, fragment: int = 64 * 1024, path: str | None = None) -> str:
        session_id = self.session(path)
        for first in range(0, len(data), fragment):
            reply = self.fragment(session_id, data[first:first + fragment], first, len(data))
            assert reply.status == 200 and int(reply.get(Header.RECEIVED_CONTENT_RANGE)) == min(
                first + fragment, len(data))
        assert self.close(session_id).status == 200
        return session_id


def raw_exchange(server: BitsServer, request: bytes, timeout: float = 10) -> Reply:
    """Send bytes exactly as given; parse one response (Content-Length framed)."""
    with socket.create_connection(server.address, timeout=timeout) as sock:
        sock.sendall(request)
        return read_response(sock)


def read_response(sock: socket.socket) -> Reply:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
    reply = Reply(status, headers, b"")
    length = int(reply.get("Content-Length") or 0)
    while len(body) < length:
        body += sock.recv(65536)
    reply.body = body
    return reply


def bits_request(target: str, packet: str, extra: str = "", body: bytes = b"",
                 content_length: bool = True) -> bytes:
    lines = [f"BITS_POST {target} HTTP/1.1", "Host: 127.0.0.1", f"{Header.PACKET_TYPE}: {packet}"]
    if extra:
        lines.extend(extra.split("\n"))
    if content_length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_ack(reply: Reply, status: int, session_id: str | None = None) -> None:
    """The rules every Ack follows (docs/protocol.md 1, 2.2)."""
    assert reply.status == status, (reply.status, reply.headers)
    assert reply.get(Header.PACKET_TYPE) == "Ack"
    assert reply.get(Header.CONTENT_LENGTH) == "0" and reply.body == b""
    if session_id is not None:
        assert reply.get(Header.SESSION_ID) == session_id
    if status in (200, 201):
        assert not reply.has(Header.ERROR_CODE) and not reply.has(Header.ERROR_CONTEXT)


def assert_error(reply: Reply, status: int, code: int | None, header: str = Header.ERROR_CODE) -> None:
    assert_ack(reply, status)
    if code is None:
        assert not reply.has(header)
        return
    assert reply.get(header) == format_hresult(code)
    assert reply.get(Header.ERROR_CONTEXT) == "0x5"
    assert not reply.has(Header.PROTOCOL)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def make_server(root: Path):
    started: list[BitsServer] = []

    def make(**options) -> BitsServer:
        server = BitsServer(root, log=None, **options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def server(make_server) -> BitsServer:
    return make_server()


@pytest.fixture
def client(server: BitsServer) -> Client:
    return Client(server)


def payload(size: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"{seed}".encode()).digest(size)


# --- Ping and Create-Session -----------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["Ping", "PING", "pinG"])
def test_ping_is_acked_whatever_the_case(client: Client, spelling: str) -> None:
    reply = client.post(spelling)
    assert_ack(reply, 200)
    assert not reply.has(Header.SESSION_ID)


def test_create_ack_carries_protocol_fresh_uppercase_guid_and_identity(client: Client) -> None:
    first, second = client.create(), client.post("CREATE-SESSION", **{
        "BITS-Supported-Protocols": PROTOCOL_GUID})
    ids = []
    for reply in (first, second):
        assert_ack(reply, 200)
        assert reply.get(Header.PROTOCOL) == PROTOCOL_GUID
        assert reply.get(Header.ACCEPT_ENCODING) == "identity"
        session_id = reply.get(Header.SESSION_ID)
        assert is_guid(session_id) and session_id == session_id.upper()
        assert not reply.has(Header.HOST_ID)
        ids.append(session_id)
    assert ids[0] != ids[1]


@pytest.mark.parametrize("offered", [
    PROTOCOL_GUID.upper(),
    f"{OTHER_GUID} {PROTOCOL_GUID}",
    f"{OTHER_GUID},{PROTOCOL_GUID}",
    f"{OTHER_GUID}, {PROTOCOL_GUID.upper()}",
])
def test_create_negotiates_the_upload_protocol(client: Client, offered: str) -> None:
    reply = client.create(protocols=offered)
    assert_ack(reply, 200)
    assert reply.get(Header.PROTOCOL) == PROTOCOL_GUID


def test_create_without_a_common_protocol_is_invalidarg(client: Client) -> None:
    assert_error(client.create(protocols=OTHER_GUID), 400, E_INVALIDARG.code)


def test_create_without_supported_protocols_is_invalidarg(client: Client) -> None:
    assert_error(client.post("Create-Session"), 400, E_INVALIDARG.code)


def test_create_status_201_option(make_server) -> None:
    reply = Client(make_server(create_status=201)).create()
    assert_ack(reply, 201)
    assert reply.get(Header.PROTOCOL) == PROTOCOL_GUID


def test_create_ack_announces_host_id(make_server) -> None:
    reply = Client(make_server(host_id="node-7.example", host_id_fallback_timeout=300)).create()
    assert_ack(reply, 200)
    assert reply.get(Header.HOST_ID) == "node-7.example"
    assert reply.get(Header.HOST_ID_FALLBACK_TIMEOUT) == "300"


def test_host_id_fallback_without_host_id_is_refused(root: Path) -> None:
    with pytest.raises(ValueError):
        BitsServer(root, log=None, host_id_fallback_timeout=5)


# --- uploads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("size,fragment", [(1, 1), (4892, 4892), (300_001, 65_536), (200_000, 7_000)])
def test_round_trip_is_byte_exact_and_published_only_on_close(
        server: BitsServer, client: Client, root: Path, size: int, fragment: int) -> None:
    data = payload(size, size)
    session_id = client.session()
    for first in range(0, size, fragment):
        chunk = data[first:first + fragment]
        reply = client.post("FRAgmENT", chunk, **{"BITS-Session-Id": session_id,
                                                  "Content-Range": f"bytes {first}-{first + len(chunk) - 1}/{size}",
                                                  "Content-Name": "../../ignored.bin"})
        assert_ack(reply, 200, session_id)
        assert reply.get(Header.RECEIVED_CONTENT_RANGE) == str(first + len(chunk))
        assert not reply.has(Header.REPLY_URL)
    destination = root / "up" / "file.bin"
    assert not destination.exists()
    assert_ack(client.close(session_id), 200, session_id)
    assert hashlib.sha256(destination.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert list((root / STATE_DIR / "Requests").iterdir()) == []
    assert not (root.parent / "ignored.bin").exists() and not (root / "ignored.bin").exists()
    assert server.sessions() == []


def test_content_range_unit_is_case_insensitive(client: Client, root: Path) -> None:
    session_id = client.session()
    reply = client.post("Fragment", b"abc", **{"BITS-Session-Id": session_id, "Content-Range": "Bytes 0-2/3"})
    assert_ack(reply, 200, session_id)
    assert reply.get(Header.RECEIVED_CONTENT_RANGE) == "3"


def test_session_ids_compare_case_insensitively(client: Client, root: Path) -> None:
    session_id = client.session()
    reply = client.fragment(session_id.lower(), b"xyz", 0, 3)
    assert_ack(reply, 200, session_id.lower())
    assert_ack(client.close(session_id.lower()), 200)
    assert (root / "up" / "file.bin").read_bytes() == b"xyz"


def test_gap_is_416_with_the_next_offset(client: Client) -> None:
    session_id = client.session()
    data = payload(300)
    client.fragment(session_id, data[:100], 0, 300)
    reply = client.fragment(session_id, data[200:], 200, 300)
    assert_ack(reply, 416, session_id)
    assert reply.get(Header.RECEIVED_CONTENT_RANGE) == "100"
    assert reply.get(Header.ERROR_CODE) == format_hresult(0)
    assert reply.get(Header.ERROR_CONTEXT) == "0x5"


def test_overlap_keeps_only_new_bytes_by_default(client: Client, root: Path) -> None:
    session_id = client.session()
    data = payload(200, 7)
    client.fragment(session_id, data[:101], 0, 200)
    reply = client.fragment(session_id, data[50:151], 50, 200)
    assert_ack(reply, 200, session_id)
    assert reply.get(Header.RECEIVED_CONTENT_RANGE) == "151"
    again = client.fragment(session_id, data[10:60], 10, 200)  # nothing new: acked at N
    assert_ack(again, 200, session_id)
    assert again.get(Header.RECEIVED_CONTENT_RANGE) == "151"
    assert client.fragment(session_id, data[151:], 151, 200).get(Header.RECEIVED_CONTENT_RANGE) == "200"
    client.close(session_id)
    assert (root / "up" / "file.bin").read_bytes() == data


def test_overlap_is_416_under_the_mcbup_policy(make_server, root: Path) -> None:
    client = Client(make_server(overlap="reject"))
    session_id = client.session()
    data = payload(200, 8)
    client.fragment(session_id, data[:101], 0, 200)
    reply = client.fragment(session_id, data[50:151], 50, 200)
    assert_ack(reply, 416, session_id)
    assert reply.get(Header.RECEIVED_CONTENT_RANGE) == "101"
    client.fragment(session_id, data[101:], 101, 200)
    client.close(session_id)
    assert (root / "up" / "file.bin").read_bytes() == data


def test_resent_final_fragment_is_reacked_with_the_total(client: Client, root: Path) -> None:
    session_id = client.session()
    data = payload(50)
    first = client.fragment(session_id, data, 0, 50)
    assert first.get(Header.RECEIVED_CONTENT_RANGE) == "50"
    for _ in range(2):
        again = client.fragment(session_id, data, 0, 50)
        assert_ack(again, 200, session_id)
        assert again.get(Header.RECEIVED_CONTENT_RANGE) == "50"
    assert_ack(client.close(session_id), 200, session_id)
    assert (root / "up" / "file.bin").read_bytes() == data


def test_session_survives_tcp_reconnects(server: BitsServer, root: Path) -> None:
    data = payload(30_000, 3)
    session_id = Client(server).session()
    for first in range(0, len(data), 10_000):
        reply = Client(server).fragment(session_id, data[first:first + 10_000], first, len(data))
        assert_ack(reply, 200, session_id)
    assert_ack(Client(server).close(session_id), 200, session_id)
    assert (root / "up" / "file.bin").read_bytes() == data


def test_close_before_the_last_byte_discards_the_upload(client: Client, root: Path) -> None:
    session_id = client.session()
    client.fragment(session_id, b"partial", 0, 100)
    assert_ack(client.close(session_id), 200, session_id)
    assert not (root / "up" / "file.bin").exists()
    assert_error(client.fragment(session_id, b"more", 7, 100), 500, BG_E_SESSION_NOT_FOUND.code)


def test_close_when_the_entity_is_gone_is_404(server: BitsServer, client: Client) -> None:
    session_id = client.session()
    client.fragment(session_id, b"done", 0, 4)
    (session,) = server.sessions()
    session.data_file.unlink()
    reply = client.close(session_id)
    assert_ack(reply, 404, session_id)
    assert not reply.has(Header.ERROR_CODE)


def test_cancel_deletes_temporary_data_and_ends_the_session(server: BitsServer, client: Client,
                                                            root: Path) -> None:
    session_id = client.session()
    client.fragment(session_id, b"some bytes", 0, 100)
    (session,) = server.sessions()
    assert session.data_file.read_bytes() == b"some bytes"
    assert_ack(client.cancel(session_id), 200, session_id)
    assert not session.data_dir.exists()
    assert not (root / "up" / "file.bin").exists()
    for reply in (client.fragment(session_id, b"x", 10, 100), client.close(session_id), client.cancel(session_id)):
        assert_error(reply, 500, BG_E_SESSION_NOT_FOUND.code)
        assert reply.get(Header.SESSION_ID) == session_id


def test_packets_after_close_draw_session_not_found(client: Client) -> None:
    session_id = client.session()
    client.fragment(session_id, b"abc", 0, 3)
    client.close(session_id)
    assert_error(client.close(session_id), 500, BG_E_SESSION_NOT_FOUND.code)
    assert_error(client.fragment(session_id, b"abc", 0, 3), 500, BG_E_SESSION_NOT_FOUND.code)


# --- the error table (docs/protocol.md 4) ----------------------------------------------------
UNKNOWN_ID = "{00000000-1111-2222-3333-444444444444}"


@pytest.mark.parametrize("packet", ["Fragment", "Close-Session", "Cancel-Session"])
def test_unknown_session_is_500_session_not_found(client: Client, packet: str) -> None:
    headers = {"BITS-Session-Id": UNKNOWN_ID}
    body = b""
    if packet == "Fragment":
        headers["Content-Range"] = "bytes 0-2/3"
        body = b"abc"
    reply = client.post(packet, body, **headers)
    assert_error(reply, 500, BG_E_SESSION_NOT_FOUND.code)
    assert reply.get(Header.SESSION_ID) == UNKNOWN_ID


@pytest.mark.parametrize("packet", ["Fragment", "Close-Session", "Cancel-Session"])
def test_missing_session_id_is_invalidarg(client: Client, packet: str) -> None:
    headers = {"Content-Range": "bytes 0-2/3"} if packet == "Fragment" else {}
    assert_error(client.post(packet, b"abc" if headers else b"", **headers), 400, E_INVALIDARG.code)


@pytest.mark.parametrize("content_range", [None, "bytes 5-2/10", "bytes 0-9", "items 0-2/3", "bytes 0-3/3",
                                           "bytes=0-2/3", "bytes -1-2/3"])
def test_bad_content_range_is_invalidarg(client: Client, content_range: str | None) -> None:
    session_id = client.session()
    headers = {"BITS-Session-Id": session_id}
    if content_range is not None:
        headers["Content-Range"] = content_range
    assert_error(client.post("Fragment", b"abc", **headers), 400, E_INVALIDARG.code)


def test_content_length_differing_from_the_range_is_invalidarg(client: Client) -> None:
    session_id = client.session()
    reply = client.post("Fragment", b"abcd", **{"BITS-Session-Id": session_id, "Content-Range": "bytes 0-2/10"})
    assert_error(reply, 400, E_INVALIDARG.code)


def test_changed_total_is_invalidarg(client: Client) -> None:
    session_id = client.session()
    client.fragment(session_id, b"abc", 0, 10)
    assert_error(client.fragment(session_id, b"def", 3, 11), 400, E_INVALIDARG.code)
    assert client.fragment(session_id, b"def", 3, 10).get(Header.RECEIVED_CONTENT_RANGE) == "6"


@pytest.mark.parametrize("packet", ["Ping", "Create-Session", "Close-Session", "Cancel-Session"])
def test_body_on_a_bodyless_packet_is_invalidarg(client: Client, packet: str) -> None:
    session_id = client.session()
    reply = client.post(packet, b"unexpected", **{"BITS-Session-Id": session_id,
                                                  "BITS-Supported-Protocols": PROTOCOL_GUID})
    assert_error(reply, 400, E_INVALIDARG.code)
    assert_ack(client.post("Ping"), 200)  # the body was drained: the connection is still usable


@pytest.mark.parametrize("packet", [None, "Ack", "Upload", "Fragment-Session"])
def test_unknown_packet_type_is_invalidarg(client: Client, packet: str | None) -> None:
    assert_error(client.post(packet), 400, E_INVALIDARG.code)


def test_missing_content_length_is_invalidarg(server: BitsServer) -> None:
    reply = raw_exchange(server, bits_request("/up/x.bin", "Ping", content_length=False))
    assert_error(reply, 400, E_INVALIDARG.code)


def test_chunked_body_is_invalidarg(server: BitsServer) -> None:
    request = bits_request("/up/x.bin", "Ping", "Transfer-Encoding: chunked", content_length=False)
    assert_error(raw_exchange(server, request + b"0\r\n\r\n"), 400, E_INVALIDARG.code)


def test_header_over_4_kib_is_invalidarg(client: Client) -> None:
    assert_error(client.post("Ping", **{"X-Padding": "a" * 4097}), 400, E_INVALIDARG.code)
    assert_ack(Client(client.server).post("Ping", **{"X-Padding": "a" * 4000}), 200)


def test_header_line_over_64_kib_is_invalidarg_in_bits_form(server: BitsServer) -> None:
    reply = raw_exchange(server, bits_request("/up/x.bin", "Ping", "X-Padding: " + "a" * 70_000))
    assert_error(reply, 400, E_INVALIDARG.code)


def test_content_encoding_other_than_identity_is_invalidarg(client: Client) -> None:
    session_id = client.session()
    assert_error(client.fragment(session_id, b"abc", 0, 3, **{"Content-Encoding": "gzip"}), 400, E_INVALIDARG.code)
    assert_ack(client.fragment(session_id, b"abc", 0, 3, **{"Content-Encoding": "identity"}), 200, session_id)


def test_entity_over_the_maximum_upload_size_is_too_large(make_server) -> None:
    client = Client(make_server(max_upload_size=1000))
    session_id = client.session()
    assert_error(client.fragment(session_id, b"abc", 0, 1001), 500, BG_E_TOO_LARGE.code)
    assert_ack(client.fragment(session_id, b"abc", 0, 1000), 200, session_id)


def test_fragment_over_the_maximum_fragment_size_is_413(make_server) -> None:
    client = Client(make_server(max_fragment_size=10 * 1024))
    session_id = client.session()
    data = payload(20 * 1024)
    reply = client.fragment(session_id, data, 0, len(data))
    assert_error(reply, 413, None)
    reply = client.fragment(session_id, data[:10 * 1024], 0, len(data))
    assert reply.get(Header.RECEIVED_CONTENT_RANGE) == str(10 * 1024)


def test_mcbup_error_header_name_option(make_server) -> None:
    client = Client(make_server(error_header="mcbup"))
    reply = client.post("Fragment", b"abc", **{"BITS-Session-Id": UNKNOWN_ID, "Content-Range": "bytes 0-2/3"})
    assert_error(reply, 500, BG_E_SESSION_NOT_FOUND.code, header=Header.ERROR_CODE_MCBUP)
    assert not reply.has(Header.ERROR_CODE)


def test_default_error_header_name_is_bits_error_code(client: Client) -> None:
    reply = client.post("Fragment", b"abc", **{"BITS-Session-Id": UNKNOWN_ID, "Content-Range": "bytes 0-2/3"})
    assert reply.get(Header.ERROR_CODE) == format_hresult(BG_E_SESSION_NOT_FOUND.code)
    assert not reply.has(Header.ERROR_CODE_MCBUP)


# --- existing destination ----------------------------------------------------------------------
def test_existing_destination_is_overwritten_by_default(client: Client, root: Path) -> None:
    (root / "up").mkdir(parents=True)
    (root / "up" / "file.bin").write_bytes(b"old contents")
    client.upload(b"new")
    assert (root / "up" / "file.bin").read_bytes() == b"new"


@pytest.mark.parametrize("status", [409, 403])
def test_existing_destination_is_refused_with_no_overwrite(make_server, root: Path, status: int) -> None:
    (root / "up").mkdir(parents=True)
    (root / "up" / "file.bin").write_bytes(b"old contents")
    client = Client(make_server(overwrite=False, exists_status=status))
    assert_error(client.create(), status, E_ACCESSDENIED.code)
    assert (root / "up" / "file.bin").read_bytes() == b"old contents"
    client.upload(b"elsewhere", path="/up/other.bin")
    assert (root / "up" / "other.bin").read_bytes() == b"elsewhere"


def test_destination_appearing_during_the_upload_is_refused_at_close(make_server, root: Path) -> None:
    client = Client(make_server(overwrite=False))
    session_id = client.session()
    client.fragment(session_id, b"late", 0, 4)
    (root / "up").mkdir(parents=True)
    (root / "up" / "file.bin").write_bytes(b"first")
    reply = client.close(session_id)
    assert_error(reply, 409, E_ACCESSDENIED.code)
    assert reply.get(Header.SESSION_ID) == session_id
    assert (root / "up" / "file.bin").read_bytes() == b"first"
    assert_ack(client.cancel(session_id), 200, session_id)


# --- safety ------------------------------------------------------------------------------------
TRAVERSALS = [
    "/../escape.bin",
    "/up/../../escape.bin",
    "/%2e%2e/escape.bin",
    "/up/%2E%2E/%2e%2e/escape.bin",
    "/up/..%2fescape.bin",
    "/up/..%2F..%2Fescape.bin",
    "/up\\..\\..\\escape.bin",
    "/up/%5c..%5c..%5cescape.bin",
    "/up/escape.bin%00.txt",
    "//tmp/escape.bin",
    "/./escape.bin",
    "/up/%zz.bin",
    "/%c0%ae%c0%ae/escape.bin",
    "http://127.0.0.1/../escape.bin",
    "escape.bin",
    "/BITS-Sessions/Requests/x.bin",
    "/up/bits-sessions/Replies/x.bin",
    "/up/",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_unsafe_upload_urls_are_refused(server: BitsServer, root: Path, tmp_path: Path, target: str) -> None:
    request = bits_request(target, "Create-Session", f"{Header.SUPPORTED_PROTOCOLS}: {PROTOCOL_GUID}")
    assert_error(raw_exchange(server, request), 400, E_INVALIDARG.code)
    assert server.sessions() == []
    assert not list(tmp_path.rglob("escape.bin*"))


def test_symlink_on_the_way_is_refused(server: BitsServer, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    (root / "file-link.bin").symlink_to(outside / "target.bin")
    for target in ("/link/escape.bin", "/file-link.bin"):
        request = bits_request(target, "Create-Session", f"{Header.SUPPORTED_PROTOCOLS}: {PROTOCOL_GUID}")
        assert_error(raw_exchange(server, request), 400, E_INVALIDARG.code)
    assert list(outside.iterdir()) == []


def test_url_naming_an_existing_directory_is_invalidarg(client: Client, root: Path) -> None:
    (root / "up" / "file.bin").mkdir(parents=True)
    assert_error(client.create(), 400, E_INVALIDARG.code)
    assert_error(client.create("/up"), 400, E_INVALIDARG.code)


def test_percent_encoded_names_are_decoded_inside_the_root(server: BitsServer, root: Path) -> None:
    Client(server, "/up/a%20b%2Fc.bin").upload(b"nested")
    assert (root / "up" / "a b" / "c.bin").read_bytes() == b"nested"


def test_upload_path_unit(root: Path) -> None:
    root.mkdir()
    assert upload_path(root, "/a/b.bin?x=1") == (root / "a" / "b.bin", "/a/b.bin")
    assert upload_path(root, "http://example/a/b.bin") == (root / "a" / "b.bin", "/a/b.bin")
    with pytest.raises(UnsafePath):
        upload_path(root, "/a/%2e%2e/%2e%2e/b")
    assert reply_target(f"/a/{STATE_DIR}/Replies/%7B{UNKNOWN_ID[1:-1]}%7D/responsefile.bin") == ("/a/", UNKNOWN_ID)
    assert reply_target("/a/b.bin") is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["/", ".", "..", "%2e", "%2E", "%2f", "%5c", "\\", "%00", "a", "b",
                                 "BITS-Sessions", "%", "%c0%ae", "?", "#", "~"]), min_size=1, max_size=12))
def test_upload_path_never_leaves_the_root_nor_enters_the_state_dir(tmp_path_factory, pieces: list[str]) -> None:
    root = tmp_path_factory.getbasetemp() / "fuzz-root"
    root.mkdir(exist_ok=True)
    try:
        destination, _ = upload_path(root, "/" + "".join(pieces))
    except UnsafePath:
        return
    relative = destination.resolve().relative_to(root.resolve())
    assert relative.parts and STATE_DIR.casefold() not in (part.casefold() for part in relative.parts)


# --- timeouts ----------------------------------------------------------------------------------
def test_stalled_client_is_dropped_and_the_session_rolled_back(make_server, root: Path) -> None:
    server = make_server(idle_timeout=0.3)
    session_id = Client(server).session()
    with socket.create_connection(server.address, timeout=10) as sock:
        head = bits_request("/up/file.bin", "Fragment",
                            f"{Header.SESSION_ID}: {session_id}\nContent-Range: bytes 0-9999/10000")
        sock.sendall(head.replace(b"Content-Length: 0", b"Content-Length: 10000") + b"x" * 100)
        assert sock.recv(1024) == b""  # the server closes without an answer
    data = payload(10_000)
    reply = Client(server).fragment(session_id, data, 0, 10_000)
    assert_ack(reply, 200, session_id)
    assert reply.get(Header.RECEIVED_CONTENT_RANGE) == "10000"
    Client(server).close(session_id)
    assert (root / "up" / "file.bin").read_bytes() == data


def test_trickling_client_hits_the_request_timeout(make_server) -> None:
    server = make_server(idle_timeout=1.0, request_timeout=0.5)
    session_id = Client(server).session()
    with socket.create_connection(server.address, timeout=10) as sock:
        head = bits_request("/up/file.bin", "Fragment",
                            f"{Header.SESSION_ID}: {session_id}\nContent-Range: bytes 0-99/100")
        sock.sendall(head.replace(b"Content-Length: 0", b"Content-Length: 100"))
        closed = False
        for _ in range(60):  # one byte every 0.1 s never trips the idle timeout
            try:
                sock.sendall(b"x")
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            sock.setblocking(False)
            try:
                closed = sock.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed = True
            sock.setblocking(True)
            if closed:
                break
        assert closed
    reply = Client(server).fragment(session_id, b"y" * 100, 0, 100)
    assert reply.get(Header.RECEIVED_CONTENT_RANGE) == "100"


def test_idle_session_expires(make_server) -> None:
    # long enough that a loaded machine still sends the fragment within it, short for the suite
    server = make_server(session_timeout=1.5)
    client = Client(server)
    session_id = client.session()
    assert client.fragment(session_id, b"abc", 0, 10).status == 200
    (session,) = server.sessions()
    deadline = time.monotonic() + 10
    while server.sessions() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not session.data_dir.exists()
    assert_error(client.fragment(session_id, b"def", 3, 10), 500, BG_E_SESSION_NOT_FOUND.code)


# --- disk full ---------------------------------------------------------------------------------
@pytest.fixture
def tiny_filesystem():
    directory = tempfile.mkdtemp(prefix="bits-tiny-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", directory],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        os.rmdir(directory)
        pytest.skip(f"cannot mount a 64 KiB tmpfs (needs root): {mounted.stderr.strip()}")
    yield Path(directory)
    subprocess.run(["umount", directory], check=False)
    os.rmdir(directory)


def test_full_disk_is_reported_and_rolled_back(tiny_filesystem: Path) -> None:
    with BitsServer(tiny_filesystem, log=None) as server:
        client = Client(server)
        session_id = client.session()
        data = payload(200_000)
        reply = client.fragment(session_id, data, 0, len(data))
        assert_error(reply, 500, ERROR_DISK_FULL.code)
        assert reply.get(Header.SESSION_ID) == session_id
        (session,) = server.sessions()
        assert session.data_file.stat().st_size == 0
        small = client.fragment(session_id, data[:8000], 0, len(data))
        assert_ack(small, 200, session_id)
        assert small.get(Header.RECEIVED_CONTENT_RANGE) == "8000"
        assert_ack(client.cancel(session_id), 200, session_id)


def fill(directory: Path, leave: int) -> Path:
    """Fill a filesystem, then free `leave` bytes (whole pages on tmpfs)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - leave)
    return filler


def test_failed_reply_notification_is_context_7_and_retried_by_a_resend(tiny_filesystem: Path) -> None:
    with BitsServer(tiny_filesystem, log=None, reply=True) as server:
        client = Client(server)
        session_id = client.session()
        filler = fill(tiny_filesystem, leave=8192)  # room for the data, none for the receipt
        data = payload(8192)
        failed = client.fragment(session_id, data, 0, len(data))
        assert_ack(failed, 500, session_id)
        assert failed.get(Header.ERROR_CODE) == format_hresult(ERROR_DISK_FULL.code)
        assert failed.get(Header.ERROR_CONTEXT) == "0x7"
        assert not failed.has(Header.REPLY_URL)
        assert server.sessions()[0].state is UploadState.RECEIVE_FRAGMENTS
        filler.unlink()
        retried = client.fragment(session_id, data, 0, len(data))
        assert_ack(retried, 200, session_id)
        assert retried.get(Header.RECEIVED_CONTENT_RANGE) == "8192" and retried.has(Header.REPLY_URL)
        assert_ack(client.close(session_id), 200, session_id)
        assert (tiny_filesystem / "up" / "file.bin").read_bytes() == data


# --- upload-reply --------------------------------------------------------------------------------
def test_reply_mode_end_to_end(make_server, root: Path) -> None:
    server = make_server(reply=True)
    client = Client(server, "/jobs/in/report.bin")
    data = payload(150_000, 11)
    session_id = client.session()
    reply = client.fragment(session_id, data[:100_000], 0, len(data))
    assert not reply.has(Header.REPLY_URL)
    final = client.fragment(session_id, data[100_000:], 100_000, len(data))
    assert_ack(final, 200, session_id)
    url = final.get(Header.REPLY_URL)
    assert url == f"BITS-Sessions\\Replies\\{session_id}\\responsefile.bin"
    assert client.fragment(session_id, data[100_000:], 100_000, len(data)).get(Header.REPLY_URL) == url
    fetch = "/jobs/in/" + url.replace("\\", "/").replace("{", "%7B").replace("}", "%7D")
    got = client.get(fetch)
    assert got.status == 200
    receipt = json.loads(got.body)
    assert receipt["size"] == len(data) and receipt["sha256"] == hashlib.sha256(data).hexdigest()
    client.conn.request("HEAD", fetch)
    head = client.conn.getresponse()
    assert head.status == 200 and head.getheader("Content-Length") == str(len(got.body)) and head.read() == b""
    partial = client.get(fetch, Range="bytes=0-9")
    assert partial.status == 206 and partial.body == got.body[:10]
    assert partial.get("Content-Range") == f"bytes 0-9/{len(got.body)}"
    assert client.get("/elsewhere/" + url.replace("\\", "/")).status == 404
    assert_ack(client.close(session_id), 200, session_id)
    assert client.get(fetch).status == 404
    assert (root / "jobs" / "in" / "report.bin").read_bytes() == data


def test_plain_upload_has_no_reply_url(client: Client) -> None:
    session_id = client.session()
    final = client.fragment(session_id, b"abc", 0, 3)
    assert not final.has(Header.REPLY_URL)
    assert client.get(f"/up/BITS-Sessions/Replies/{session_id}/responsefile.bin").status == 404


# --- auth ------------------------------------------------------------------------------------------
def test_basic_auth_challenge_then_success(make_server) -> None:
    client = Client(make_server(auth=("alice", "s3cret")))
    challenge = client.post("Ping")
    assert challenge.status == 401
    assert challenge.get("WWW-Authenticate").startswith("Basic ")
    assert challenge.body == b""
    wrong = base64.b64encode(b"alice:wrong").decode()
    assert client.post("Ping", Authorization=f"Basic {wrong}").status == 401
    right = base64.b64encode(b"alice:s3cret").decode()
    assert_ack(client.post("Ping", Authorization=f"Basic {right}"), 200)
    assert client.create(Authorization=f"Basic {right}").status == 200


# --- concurrency and logging ----------------------------------------------------------------------
def test_fifty_concurrent_uploads_are_kept_apart(make_server, root: Path) -> None:
    server = make_server()
    count = 50
    datas = [payload(30_000 + i * 37, 100 + i) for i in range(count)]
    barrier = threading.Barrier(count, action=lambda: in_flight.append(len(server.sessions())))
    in_flight: list[int] = []
    failures: list[BaseException] = []

    def upload(i: int) -> None:
        try:
            client = Client(server, f"/many/{i}.bin")
            session_id = client.session()
            barrier.wait(timeout=30)
            for first in range(0, len(datas[i]), 10_000):
                reply = client.fragment(session_id, datas[i][first:first + 10_000], first, len(datas[i]))
                assert reply.status == 200
            assert client.close(session_id).status == 200
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == []
    assert in_flight == [count]
    for i, data in enumerate(datas):
        assert hashlib.sha256((root / "many" / f"{i}.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    sessions = {r.session_id for r in server.records if r.packet == "Create-Session"}
    assert len(sessions) == count and server.sessions() == []


def test_every_packet_is_recorded_in_order(make_server) -> None:
    seen = []
    server = make_server(on_packet=seen.append)
    client = Client(server)
    session_id = client.upload(b"hello", fragment=3)
    assert [(r.packet, r.status, r.received) for r in seen] == [
        ("Create-Session", 200, None), ("Fragment", 200, 3), ("Fragment", 200, 5), ("Close-Session", 200, None)]
    assert {r.session_id for r in seen} == {session_id}
    assert seen[1].content_range == "bytes 0-2/5"
    assert all(r.started <= r.finished for r in seen) and list(server.records) == seen


def test_log_lines_go_to_the_given_stream(root: Path) -> None:
    class Lines(list):
        def write(self, text: str) -> None:
            self.append(text)

        def flush(self) -> None:
            pass

    lines = Lines()
    with BitsServer(root, log=lines) as server:
        Client(server).post("Ping")
    assert len(lines) == 1 and re.search(r"BITS_POST /up/file\.bin Ping -> 200", lines[0])


# --- the state table ------------------------------------------------------------------------------
def test_state_table_refuses_undefined_transitions(tmp_path: Path) -> None:
    session = UploadSession("{X}", tmp_path / "d", "/d", tmp_path, tmp_path, PROTOCOL_GUID, last_activity=0.0)
    with pytest.raises(IllegalTransition):
        session.fire(UploadEvent.FRAGMENT)
    session.fire(UploadEvent.CREATE)
    session.fire(UploadEvent.LAST_BYTE)
    with pytest.raises(IllegalTransition):
        session.fire(UploadEvent.CLOSE)  # Close is answered only after the notification settled
    assert session.fire(UploadEvent.NOTIFIED) is UploadState.WAIT_FOR_CLOSE
    assert all(source not in (UploadState.COMPLETE, UploadState.CANCELLED, UploadState.EXPIRED) for source, _ in TRANSITIONS)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        ServerOptions(overlap="keep")
    with pytest.raises(ValueError):
        ServerOptions(exists_status=404)
    with pytest.raises(ValueError):
        ServerOptions(idle_timeout=0)


# --- the command line -------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_prints_its_url_serves_and_stops_on_a_signal(root: Path, signum: int) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "bitstrace.cli.server", "--root", str(root), "--port", "0", "--create-status", "201"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = process.stdout.readline()
        match = re.fullmatch(r"bits-server: listening on http://127\.0\.0\.1:(\d+)/\n", line)
        assert match, line
        conn = http.client.HTTPConnection("127.0.0.1", int(match.group(1)), timeout=10)
        conn.request("BITS_POST", "/cli.bin", headers={
            Header.PACKET_TYPE: "Create-Session", Header.SUPPORTED_PROTOCOLS: PROTOCOL_GUID, "Content-Length": "0"})
        assert conn.getresponse().status == 201
        conn.close()
        process.send_signal(signum)
        assert process.wait(timeout=10) == 0
        errors = process.stderr.read()
        assert "Create-Session" in errors and "stopped" in errors
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("arguments, says", [
    (["--port", "99999"], "error: argument --port: '99999' is not in 0..65535"),
    (["--port", "-1"], "error: argument --port: '-1' is not in 0..65535"),
    (["--idle-timeout", "inf"], "error: argument --idle-timeout: 'inf': must be more than 0"),
    (["--session-timeout", "nan"], "error: argument --session-timeout: 'nan': must be more than 0"),
    (["--max-fragment-size", "0"], "error: argument --max-fragment-size: '0' is not in 1.."),
    (["--host-id-fallback-timeout", "5"], "bits-server: host_id_fallback_timeout needs host_id"),
])
def test_cli_bad_arguments_are_one_line_and_exit_2(root: Path, arguments: list[str], says: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--root", str(root), *arguments])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and says in err and "Traceback" not in err


def test_cli_unusable_root_names_the_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = tmp_path / "a-file"
    file.write_bytes(b"")
    for root, why in ((file, "it exists and is not a directory"),
                      (file / "below", "a parent of it is not a directory")):
        with pytest.raises(SystemExit) as stop:
            main(["--root", str(root)])
        assert stop.value.code == 2
        assert capsys.readouterr().err == f"bits-server: cannot use --root {str(root)!r}: {why}\n"


def test_cli_cannot_listen_is_one_line(root: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as stop:
            main(["--root", str(root), "--port", str(port)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith(f"bits-server: cannot listen on 127.0.0.1 port {port}: ")


def test_cli_help_names_units_and_defaults_and_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0
    assert "--max-fragment-size BYTES" in help_text and f"(default: {MAX_FRAGMENT})" in help_text
    assert "--idle-timeout SECONDS" in help_text and "(default: 60.0)" in help_text
    assert "(default: None)" not in help_text and "(default: False)" not in help_text
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"bits-server {__version__}\n"


def test_cli_serves_with_nobody_reading_its_stdout(root: Path) -> None:
    """`bits-server ... | head -0`: the 'listening' line cannot be written; the server serves anyway."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "bitstrace.cli.server", "--root", str(root), "--port", str(port), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    process.stdout.close()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("BITS_POST", "/x.bin", headers={Header.PACKET_TYPE: "Ping", "Content-Length": "0"})
                break
            except ConnectionRefusedError:
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
                time.sleep(0.05)
        assert conn.getresponse().status == 200
        conn.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_resend_cut_before_its_ack_is_logged_as_not_answered(server: BitsServer, client: Client) -> None:
    """A fragment the server already holds is answered without reading its body; when the client
    cuts that body, the request still leaves a log record (it used to vanish)."""
    data = payload(1000)
    session_id = client.session()
    assert client.fragment(session_id, data, 0, 1000).status == 200
    head = (f"BITS_POST /up/file.bin HTTP/1.1\r\nHost: x\r\nBITS-Packet-Type: Fragment\r\n"
            f"BITS-Session-Id: {session_id}\r\nContent-Range: bytes 0-999/1000\r\n"
            f"Content-Length: 1000\r\n\r\n").encode()
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(head + data[:10])
        sock.shutdown(socket.SHUT_WR)
        sock.recv(65536)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(server.records) < 3:
        time.sleep(0.01)
    cut = server.records[-1]
    assert cut.packet == "Fragment" and cut.status is None and "not answered" in cut.note
    assert "no answer" in cut.line()


# --- hardening (issue 13) ----------------------------------------------------------------------
def read_all(sock: socket.socket, limit: float = 10) -> bytes:
    """Everything the server sends until it closes (bounded in time)."""
    sock.settimeout(limit)
    data = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return data


PING_AFTER = bits_request("/up/x.bin", "Ping")


@pytest.mark.parametrize("bad_line", ["Transfer-Encoding : chunked", "Content-Length\t: 0", "a line without a colon",
                                      "X-Folded: one\n  two"])
def test_malformed_header_lines_are_400_and_close_the_connection(server: BitsServer, bad_line: str) -> None:
    """RFC 9112 5.1, 5.2: nothing after a malformed head is read as a request (smuggling)."""
    request = bits_request("/up/x.bin", "Ping", f"Content-Length: 0\n{bad_line}", content_length=False)
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(request + PING_AFTER)
        answers = read_all(sock)
    assert answers.startswith(b"HTTP/1.1 400 ") and answers.count(b"HTTP/1.1") == 1
    assert b"\r\nConnection: close\r\n" in answers and b"BITS-Error-Code: 0x80070057" in answers


@pytest.mark.parametrize("garbage", [b"GARBAGE\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                                     b"GET /\r\n\r\n", b"BITS_POST /x HTTP/2.0\r\n\r\n"])
def test_garbage_gets_a_real_400_status_line(server: BitsServer, garbage: bytes) -> None:
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(garbage)
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:80]
    assert server.records[-1].status == 400 and "malformed request" in server.records[-1].note


def test_sessions_are_capped_per_client_with_a_transient_bits_error(make_server) -> None:
    server = make_server(max_sessions_per_client=3)
    client = Client(server)
    sessions = [client.session(f"/up/{n}.bin") for n in range(3)]
    refused = client.create("/up/3.bin")
    assert_ack(refused, 503)
    assert refused.get(Header.ERROR_CODE) == "0x801901F7" and refused.get(Header.ERROR_CONTEXT) == "0x5"
    assert refused.get("Retry-After") == "60" and len(server.sessions()) == 3
    assert "127.0.0.1 holds its maximum of 3 sessions" in server.records[-1].note
    assert client.cancel(sessions[0]).status == 200
    assert client.create("/up/3.bin").status == 200  # a freed slot is usable again


def test_sessions_are_capped_per_server(make_server) -> None:
    server = make_server(max_sessions=2, max_sessions_per_client=100)
    client = Client(server)
    client.session("/up/a.bin"), client.session("/up/b.bin")
    refused = client.create("/up/c.bin")
    assert_ack(refused, 503)
    assert "the server holds its maximum of 2 sessions" in server.records[-1].note


def stalled_fragment(server: BitsServer, session_id: str, size: int = 100_000, sent: int = 100) -> socket.socket:
    """A connection whose Fragment head is in and whose body stops after `sent` bytes."""
    sock = socket.create_connection(server.address, timeout=10)
    head = bits_request("/up/file.bin", "Fragment",
                        f"{Header.SESSION_ID}: {session_id}\nContent-Range: bytes 0-{size - 1}/{size}")
    sock.sendall(head.replace(b"Content-Length: 0", f"Content-Length: {size}".encode()) + b"x" * sent)
    return sock


def wait_for(condition, limit: float = 10) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_busy_connections_at_the_cap_refuse_a_newcomer_with_503_and_close(make_server) -> None:
    server = make_server(max_connections=3, idle_timeout=30)
    client = Client(server)
    session_ids = [client.session(f"/up/{n}.bin") for n in range(3)]
    client.conn.close()
    assert wait_for(lambda: server.connection_count == 0)
    busy = [stalled_fragment(server, session_id) for session_id in session_ids]
    try:
        assert wait_for(lambda: server.connection_count == 3 and all(
            s.streaming is not None for s in server.sessions()))
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(PING_AFTER)
            answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"\r\nConnection: close\r\n" in answer
        assert server.refused_connections == 1 and server.connection_count == 3
    finally:
        for sock in busy:
            sock.close()


def test_slow_heads_beyond_the_cap_do_not_stop_pings(make_server) -> None:
    """Slowloris: the cap + 50 connections each holding a head open; Pings are still answered."""
    cap = 20
    server = make_server(max_connections=cap, idle_timeout=30, request_timeout=30)
    slow = []
    try:
        for _ in range(cap + 50):
            sock = socket.create_connection(server.address, timeout=10)
            sock.sendall(b"BITS_POST /up/x.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            slow.append(sock)
        assert wait_for(lambda: server.evicted_connections >= 50)
        for _ in range(5):
            reply = raw_exchange(server, PING_AFTER, timeout=5)
            assert_ack(reply, 200)
        assert server.connection_count <= cap
        closed = 0
        for sock in slow:
            sock.settimeout(0.01)
            try:
                closed += sock.recv(1) == b""
            except (TimeoutError, ConnectionResetError):
                closed += isinstance(sys.exc_info()[1], ConnectionResetError)
        assert closed >= 50
    finally:
        for sock in slow:
            sock.close()


def test_a_slow_head_hits_the_request_timeout(make_server) -> None:
    """The request timeout runs from a request's first byte, so a head trickled in one byte at a
    time within the idle timeout is dropped all the same."""
    server = make_server(idle_timeout=5, request_timeout=0.5)
    head = bits_request("/up/x.bin", "Ping")
    started = time.monotonic()
    with socket.create_connection(server.address, timeout=10) as sock:
        closed = False
        for byte in head[:-4]:  # never completes its head
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            sock.settimeout(0.1)
            try:
                closed = sock.recv(1) == b""
            except TimeoutError:
                pass
            except OSError:
                closed = True
            if closed or time.monotonic() - started > 8:
                break
    assert closed and time.monotonic() - started < 4


@pytest.mark.parametrize("target, why", [
    ("/up/" + "n" * 256 + ".bin", "segment over 255 bytes"),
    ("/" + "/".join(["d" * 250] * 20) + "/f.bin", "over 4095 bytes"),
    ("/" + "a/" * 1100 + "f.bin", "1100 directories deep"),
])
def test_paths_the_filesystem_cannot_hold_are_invalidarg_at_create(server: BitsServer, client: Client, target: str,
                                                                   why: str) -> None:
    assert_error(client.create(target), 400, E_INVALIDARG.code)
    assert why in server.records[-1].note
    assert not server.sessions()


def test_directories_left_by_a_killed_server_are_removed_at_start(root: Path) -> None:
    process = subprocess.Popen([sys.executable, "-m", "bitstrace.cli.server", "--root", str(root), "--quiet"],
                               stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().split()[-1]
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {Header.PACKET_TYPE: "Create-Session", Header.SUPPORTED_PROTOCOLS: PROTOCOL_GUID,
                   "Content-Length": "0"}
        conn.request("BITS_POST", "/up/file.bin", headers=headers)
        created = conn.getresponse()
        created.read()
        session_id = created.getheader(Header.SESSION_ID)
        conn.request("BITS_POST", "/up/file.bin", body=b"abc", headers={
            Header.PACKET_TYPE: "Fragment", Header.SESSION_ID: session_id, "Content-Range": "bytes 0-2/10"})
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    left = root / STATE_DIR / "Requests" / session_id
    assert (left / "requestfile.bin").read_bytes() == b"abc"
    log = io.StringIO()
    with BitsServer(root, log=log):
        assert not left.exists()
    assert f"removed 1 session directory left by an earlier run: {session_id}" in log.getvalue()


def test_cancel_does_not_wait_for_a_fragment_streaming_on_another_connection(make_server, root: Path) -> None:
    server = make_server(idle_timeout=30, request_timeout=60)
    client = Client(server)
    session_id = client.session()
    with stalled_fragment(server, session_id) as stalled:
        assert wait_for(lambda: server.sessions() and server.sessions()[0].streaming is not None)
        (session,) = server.sessions()
        started = time.monotonic()
        client.conn.timeout = 5
        reply = client.cancel(session_id)
        assert_ack(reply, 200, session_id)
        assert time.monotonic() - started < 3
        assert read_all(stalled, 5) == b""  # the cut fragment gets no answer
    assert wait_for(lambda: not session.data_dir.exists())
    assert session.state is UploadState.CANCELLED
    assert_error(client.fragment(session_id, b"abc", 0, 3), 500, BG_E_SESSION_NOT_FOUND.code)


def test_accept_pauses_when_descriptors_run_out(root: Path) -> None:
    """With every descriptor in use an accept fails at once; the server pauses instead of
    retrying in a loop that keeps a core busy, and accepts again once descriptors are free."""
    import resource

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    process = subprocess.Popen([sys.executable, "-m", "bitstrace.cli.server", "--root", str(root),
                                "--max-connections", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=low_limit)
    held: list[socket.socket] = []
    try:
        port = int(process.stdout.readline().rstrip().rstrip("/").rsplit(":", 1)[1])
        for _ in range(60):  # more than the server's 48 descriptors
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        time.sleep(0.3)

        def cpu_seconds() -> float:
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        before, started = cpu_seconds(), time.monotonic()
        time.sleep(1.5)
        used, elapsed = cpu_seconds() - before, time.monotonic() - started
        assert used < 0.25 * elapsed, f"{used:.2f} s of CPU in {elapsed:.2f} s"
        for sock in held:
            sock.close()
        held.clear()
        deadline = time.monotonic() + 10
        while True:  # the connections waiting in the backlog are served first, then a new one
            try:
                reply = raw_exchange_to(("127.0.0.1", port), PING_AFTER)
                break
            except (ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert_ack(reply, 200)
    finally:
        for sock in held:
            sock.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    errors = process.stderr.read()
    assert "cannot accept connections (Too many open files); pausing accepts" in errors
    assert "accepting again after" in errors


def raw_exchange_to(address: tuple[str, int], request: bytes, timeout: float = 5) -> Reply:
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        return read_response(sock)


def unwritable_root(tmp_path: Path):
    """A directory this process cannot create files in: a read-only tmpfs as root, else mode 0555."""
    directory = tmp_path / "readonly"
    directory.mkdir()
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(directory)],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs: {mounted.stderr.strip()}")
        return directory, lambda: subprocess.run(["umount", str(directory)], check=False)
    directory.chmod(0o555)
    return directory, lambda: directory.chmod(0o755)


def test_cli_refuses_a_root_it_cannot_write(tmp_path: Path) -> None:
    directory, restore = unwritable_root(tmp_path)
    try:
        done = subprocess.run([sys.executable, "-m", "bitstrace.cli.server", "--root", str(directory)],
                              capture_output=True, text=True, timeout=30)
    finally:
        restore()
    assert done.returncode == 2 and "Traceback" not in done.stderr and not done.stdout
    assert done.stderr.startswith(f"bits-server: cannot use --root '{directory}': cannot create files in it (")


def test_onedrive_form_post_with_method_override(server: BitsServer, root: Path) -> None:
    """POST + X-Http-Method-Override: BITS_POST is BITS_POST; its Create is answered 201."""
    conn = http.client.HTTPConnection(*server.address, timeout=10)

    def post(packet: str, body: bytes = b"", **headers: str) -> http.client.HTTPResponse:
        conn.request("POST", "/up/onedrive.bin", body=body, headers={
            "X-Http-Method-Override": "BITS_POST", Header.PACKET_TYPE: packet,
            "Content-Length": str(len(body)), **{k.replace("_", "-"): v for k, v in headers.items()}})
        response = conn.getresponse()
        response.read()
        return response

    created = post("Create-Session", BITS_Supported_Protocols=PROTOCOL_GUID)
    assert created.status == 201 and created.getheader(Header.PACKET_TYPE) == "Ack"
    session_id = created.getheader(Header.SESSION_ID)
    assert post("Fragment", b"hello", BITS_Session_Id=session_id, Content_Range="bytes 0-4/5").status == 200
    assert post("Close-Session", BITS_Session_Id=session_id).status == 200
    assert (root / "up" / "onedrive.bin").read_bytes() == b"hello"
    conn.request("POST", "/up/plain.bin", headers={"Content-Length": "0"})  # a plain POST is not BITS
    assert conn.getresponse().status == 501


# --- HTTPS (issue 14 item 6) ----------------------------------------------------------------------
def tls_client(server: BitsServer, version: ssl.TLSVersion | None = None, cadata: str | None = None) -> Client:
    context = ssl.create_default_context(cadata=cadata or server.certificate_pem.decode("ascii"))
    if version is not None:
        context.minimum_version = context.maximum_version = version
    client = Client(server)
    client.conn = http.client.HTTPSConnection(*server.address, timeout=10, context=context)
    return client


@pytest.mark.parametrize("version, secret", [(ssl.TLSVersion.TLSv1_2, "CLIENT_RANDOM "),
                                             (ssl.TLSVersion.TLSv1_3, "CLIENT_TRAFFIC_SECRET_0 ")],
                         ids=["TLS 1.2", "TLS 1.3"])
def test_https_with_a_self_signed_certificate_and_a_key_log(make_server, root: Path, tmp_path: Path,
                                                            version: ssl.TLSVersion, secret: str) -> None:
    keylog = tmp_path / "keys.log"
    server = make_server(tls_self_signed=True, tls_keylog=str(keylog))
    assert server.url.startswith("https://127.0.0.1:")
    client = tls_client(server, version)  # verifies the certificate and its 127.0.0.1 name
    data = payload(200_000, 7)
    client.upload(data, fragment=70_000)
    assert client.conn.sock.version() == {"TLSv1_2": "TLSv1.2", "TLSv1_3": "TLSv1.3"}[version.name]
    assert (root / "up" / "file.bin").read_bytes() == data
    lines = keylog.read_text().splitlines()
    assert any(line.startswith(secret) for line in lines) and oct(keylog.stat().st_mode & 0o777) == "0o600"


def test_https_with_a_given_certificate_and_key(make_server, tmp_path: Path) -> None:
    from bitstrace.replay.server.tls import self_signed_certificate

    certificate, key = self_signed_certificate("127.0.0.1")
    (tmp_path / "cert.pem").write_bytes(certificate)
    (tmp_path / "key.pem").write_bytes(key)
    server = make_server(tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "key.pem"))
    assert server.certificate_pem is None
    assert_ack(tls_client(server, cadata=certificate.decode("ascii")).post("Ping"), 200)
    assert_error(tls_client(server, cadata=certificate.decode("ascii")).create(protocols=OTHER_GUID),
                 400, E_INVALIDARG.code)


def test_plain_http_to_an_https_server_is_dropped_and_logged(root: Path) -> None:
    log = io.StringIO()
    with BitsServer(root, log=log, tls_self_signed=True) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(bits_request("/up/x.bin", "Ping"))
            assert read_all(sock) == b""
        assert_ack(tls_client(server).post("Ping"), 200)  # still serving
    assert "TLS failed" in log.getvalue() and "Traceback" not in log.getvalue()


@pytest.mark.parametrize("arguments, says", [
    (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"], "bits-server: cannot read '/nonexistent/"),
    (["--tls-cert", "/nonexistent/cert.pem"], "bits-server: tls_cert and tls_key go together"),
    (["--tls-keylog", "keys.log"], "bits-server: tls_keylog needs tls_cert/tls_key or tls_self_signed"),
    (["--tls-self-signed", "--tls-keylog", "/nonexistent/keys.log"], "bits-server: cannot write --tls-keylog"),
])
def test_cli_tls_mistakes_are_one_line_and_exit_2(root: Path, arguments: list[str], says: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--root", str(root), *arguments])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(says) and "Traceback" not in err


def test_a_second_server_on_the_same_root_leaves_the_first_ones_sessions(root: Path) -> None:
    with BitsServer(root, log=None) as first:
        session_id = Client(first).session()
        (session,) = first.sessions()
        log = io.StringIO()
        with BitsServer(root, log=log):
            assert session.data_dir.is_dir()
        assert "another bits-server uses" in log.getvalue()
        assert_ack(Client(first).fragment(session_id, b"abc", 0, 3), 200, session_id)


# --- the HTTP front: what http.server did, kept -------------------------------------------------------
def test_pipelined_requests_are_answered_in_order_on_one_connection(server: BitsServer) -> None:
    session_request = bits_request("/up/p.bin", "Create-Session", f"{Header.SUPPORTED_PROTOCOLS}: {PROTOCOL_GUID}")
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(PING_AFTER + session_request + PING_AFTER)
        sock.shutdown(socket.SHUT_WR)
        answers = read_all(sock)
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answers)
    assert statuses == [b"200", b"200", b"200"] and answers.count(b"BITS-Session-Id: {") == 1


def test_http_1_0_closes_after_its_answer_and_expect_100_continue_is_honoured(server: BitsServer) -> None:
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(PING_AFTER.replace(b"HTTP/1.1", b"HTTP/1.0") + PING_AFTER)
        answers = read_all(sock)
    assert answers.count(b"HTTP/1.1 200 ") == 1 and b"Connection: close" in answers
    session_id = Client(server).session()
    head = bits_request("/up/file.bin", "Fragment", f"{Header.SESSION_ID}: {session_id}\n"
                        "Content-Range: bytes 0-2/3\nExpect: 100-continue").replace(b"Content-Length: 0", b"Content-Length: 3")
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(head)
        assert sock.recv(64) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"abc")
        assert_ack(read_response(sock), 200, session_id)


@settings(max_examples=10, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=2000), min_size=0, max_size=12))
def test_an_upload_split_at_any_bytes_is_answered_the_same(tmp_path_factory, cuts: list[int]) -> None:
    """The front frames requests by our parser whatever the TCP pieces: a whole upload sent on
    one connection in pieces cut anywhere (heads and bodies alike) lands byte-exact."""
    root = tmp_path_factory.mktemp("split")
    data = payload(3000, len(cuts))
    with BitsServer(root, log=None) as server:
        session_id = Client(server).session("/up/split.bin")
        wire = b"".join(
            bits_request("/up/split.bin", "Fragment", f"{Header.SESSION_ID}: {session_id}\n"
                         f"Content-Range: bytes {first}-{first + 999}/3000", data[first:first + 1000])
            for first in range(0, 3000, 1000)) + bits_request(
            "/up/split.bin", "Close-Session", f"{Header.SESSION_ID}: {session_id}")
        points = sorted({min(cut * 3, len(wire) - 1) for cut in cuts})
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for start, stop in zip([0, *points], [*points, len(wire)]):
                sock.sendall(wire[start:stop])
                time.sleep(0.002)
            sock.shutdown(socket.SHUT_WR)
            answers = read_all(sock)
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answers) == [b"200"] * 4
        assert re.findall(rb"BITS-Received-Content-Range: (\d+)", answers) == [b"1000", b"2000", b"3000"]
    assert (root / "up" / "split.bin").read_bytes() == data
