"""replay.client against the reference server (replay.server) over real loopback TCP.

Every upload is checked byte for byte: the file the server stored has the sha256 of the source.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from bitstrace.analyzer.bits.protocol import (
    BG_E_SESSION_NOT_FOUND,
    E_INVALIDARG,
    PROTOCOL_GUID,
    ErrorContext,
    Header,
    PacketType,
)
from bitstrace.replay.client import (
    CHUNK_SIZE,
    BitsClient,
    FileSlice,
    UploadError,
    resolve_reply_url,
)
from bitstrace.replay.server import BitsServer

FRAGMENT = 16 * 1024


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def source(tmp_path: Path):
    def make(size: int, seed: int = 1, name: str = "payload.bin") -> Path:
        path = tmp_path / "src" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(random.Random(seed).randbytes(size))
        return path
    return make


@pytest.fixture
def serve(tmp_path: Path):
    servers: list[BitsServer] = []

    def start(**options) -> BitsServer:
        server = BitsServer(tmp_path / "root", log=None, **options)
        server.start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


def stored(server: BitsServer, name: str = "payload.bin") -> Path:
    return server.root / "up" / name


def packets(client: BitsClient) -> list[str | None]:
    return [t.packet_type or t.method for t in client.log]


def test_multi_fragment_upload_is_byte_exact_on_one_connection(serve, source):
    server = serve()
    path = source(300_000)
    client = BitsClient(server.url + "up/payload.bin")
    result = client.upload(path, fragment_size=64 * 1024)
    assert sha256(stored(server)) == sha256(path)
    assert result.acknowledged == result.total == 300_000
    assert packets(client) == ["Create-Session"] + ["Fragment"] * 5 + ["Close-Session"]
    assert {t.connection for t in client.log} == {0} and client.connections_opened == 1
    ranges = [t.header(Header.CONTENT_RANGE) for t in client.log if t.packet_type == "Fragment"]
    assert ranges[0] == "bytes 0-65535/300000" and ranges[-1] == "bytes 262144-299999/300000"


def test_requests_look_like_windows_on_the_wire(source):
    """A raw listener records the bytes exactly as they arrive."""
    path = source(1000)
    listener = socket.create_server(("127.0.0.1", 0))
    heads: list[bytes] = []

    def answer() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as stream:
            for ack in (b"BITS-Session-Id: {11111111-2222-3333-4444-555555555555}\r\n"
                        b"BITS-Protocol: " + PROTOCOL_GUID.encode() + b"\r\n",
                        b"BITS-Received-Content-Range: 1000\r\n", b""):
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    head += stream.readline()
                heads.append(head)
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                stream.read(length)
                conn.sendall(b"HTTP/1.1 200 OK\r\nBITS-Packet-Type: Ack\r\n" + ack + b"Content-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer)
    thread.start()
    port = listener.getsockname()[1]
    BitsClient(f"http://127.0.0.1:{port}/up/payload.bin").upload(path)
    thread.join(5)
    listener.close()
    create, fragment, close = (head.decode("latin-1").split("\r\n") for head in heads)
    assert create[:7] == [
        "BITS_POST /up/payload.bin HTTP/1.1", "Accept: */*", "BITS-Packet-Type: Create-Session",
        f"BITS-Supported-Protocols: {PROTOCOL_GUID}", "User-Agent: Microsoft BITS/7.8",
        f"Host: 127.0.0.1:{port}", "Content-Length: 0",
    ]
    assert fragment[1:10] == [
        "Accept: */*", "BITS-Packet-Type: Fragment",
        "BITS-Session-Id: {11111111-2222-3333-4444-555555555555}", "Content-Name: payload.bin",
        "Content-Range: bytes 0-999/1000", "User-Agent: Microsoft BITS/7.8", f"Host: 127.0.0.1:{port}",
        "Content-Length: 1000", "Connection: Keep-Alive",
    ]
    assert "Content-Name: payload.bin" in close and "BITS-Packet-Type: Close-Session" in close


def test_file_slice_streams_in_chunks(source):
    path = source(3 * CHUNK_SIZE + 5)
    chunks = list(FileSlice(path, 7, 2 * CHUNK_SIZE + 3).chunks())
    assert all(len(chunk) <= CHUNK_SIZE for chunk in chunks) and len(chunks) == 3
    assert b"".join(chunks) == path.read_bytes()[7:7 + 2 * CHUNK_SIZE + 3]


def test_resume_after_connection_cut_mid_fragment(serve, source):
    server = serve()
    path = source(100_000)
    client = BitsClient(server.url + "up/payload.bin")
    client.create_session()
    client.send_file(path, FRAGMENT, until=FRAGMENT)
    assert client.fragment(path, FRAGMENT, 2 * FRAGMENT - 1, cut_after=5000) is None
    assert client.log[-1].body_sent == 5000 and client.log[-1].response is None
    client.send_file(path, FRAGMENT)
    client.close()
    assert sha256(stored(server)) == sha256(path)
    after_cut = client.log[3:]
    assert after_cut[0].packet_type == "Ping" and after_cut[0].connection == 1
    assert after_cut[1].header(Header.CONTENT_RANGE) == f"bytes {FRAGMENT}-{2 * FRAGMENT - 1}/100000"
    assert client.connections_opened == 2


def test_lost_ack_is_resynchronised_by_416(serve, source):
    server = serve(overlap="reject")
    path = source(80_000)
    client = BitsClient(server.url + "up/payload.bin")
    client.create_session()
    assert client.fragment(path, 0, FRAGMENT - 1, abandon=True) is None
    assert client.offset == 0  # the client never read the ack
    client.send_file(path, FRAGMENT)
    client.close()
    resend = client.log[3]
    assert (resend.packet_type, resend.response.status, resend.response.received_offset) == ("Fragment", 416, FRAGMENT)
    assert client.log[4].header(Header.CONTENT_RANGE).startswith(f"bytes {FRAGMENT}-")
    assert sha256(stored(server)) == sha256(path)


def test_cancel_then_fragment_after_cancel(serve, source):
    server = serve()
    path = source(80_000)
    client = BitsClient(server.url + "up/payload.bin")
    client.create_session()
    client.send_file(path, FRAGMENT, until=2 * FRAGMENT)
    assert client.cancel().status == 200
    late = client.fragment(path, 2 * FRAGMENT, 3 * FRAGMENT - 1)
    assert late.status == 500 and late.session_not_found
    assert late.error_context == ErrorContext.REMOTE_FILE
    assert not stored(server).exists()


def test_fragment_after_close_leaves_the_file_intact(serve, source):
    server = serve()
    path = source(40_000)
    client = BitsClient(server.url + "up/payload.bin")
    client.upload(path, FRAGMENT)
    late = client.fragment(path, 0, FRAGMENT - 1, body=bytes(FRAGMENT))
    assert late.status == 500 and late.error_code == BG_E_SESSION_NOT_FOUND.code
    assert sha256(stored(server)) == sha256(path)


def test_upload_reply_fetched_before_close(serve, source):
    server = serve(reply=True)
    path = source(50_000)
    client = BitsClient(server.url + "up/payload.bin")
    result = client.upload(path, FRAGMENT)
    receipt = json.loads(result.reply)
    assert receipt["sha256"] == sha256(path) and receipt["size"] == 50_000
    assert packets(client)[-3:] == ["HEAD", "GET", "Close-Session"]
    get = client.log[-2]
    assert get.header("Range") == f"bytes=0-{len(result.reply) - 1}" and get.response.status == 206
    assert sha256(stored(server)) == sha256(path)


def test_reply_url_with_backslashes_resolves_against_the_upload_directory():
    assert resolve_reply_url(
        "http://h:81/vdir/up.bin", "BITS-Sessions\\Replies\\{C85B4E0A-1111}\\responsefile.bin"
    ) == "http://h:81/vdir/BITS-Sessions/Replies/%7BC85B4E0A-1111%7D/responsefile.bin"
    assert resolve_reply_url("http://h/vdir/up.bin", "http://other/static") == "http://other/static"


def test_basic_auth_challenge_is_answered_once_and_remembered(serve, source):
    server = serve(auth=("bits", "secret"))
    path = source(40_000)
    client = BitsClient(server.url + "up/payload.bin", credentials=("bits", "secret"))
    client.upload(path, FRAGMENT)
    statuses = [t.response.status for t in client.log]
    assert statuses[:2] == [401, 200] and statuses.count(401) == 1
    assert client.log[0].header("Authorization") is None
    assert all(t.header("Authorization") == "Basic Yml0czpzZWNyZXQ=" for t in client.log[1:])
    assert sha256(stored(server)) == sha256(path)

    anonymous = BitsClient(server.url + "up/other.bin")
    with pytest.raises(UploadError) as refused:
        anonymous.upload(path)
    assert refused.value.response.status == 401


def test_host_id_moves_the_client_to_the_named_host(serve, source):
    server = serve(host_id="bitsnode1")
    path = source(40_000)
    client = BitsClient(server.url + "up/payload.bin", resolve={"bitsnode1": "127.0.0.1"})
    client.upload(path, FRAGMENT)
    port = server.address[1]
    create, ping, *rest = client.log
    assert create.header("Host") == f"127.0.0.1:{port}" and create.connection == 0
    assert ping.packet_type == "Ping" and ping.connection == 1
    assert all(t.header("Host") == f"bitsnode1:{port}" for t in [ping, *rest])
    assert sha256(stored(server)) == sha256(path)


def test_413_makes_fragments_smaller(serve, source):
    server = serve(max_fragment_size=40_000)
    path = source(100_000)
    client = BitsClient(server.url + "up/payload.bin")
    client.upload(path, fragment_size=64 * 1024)
    fragments = [t for t in client.log if t.packet_type == "Fragment"]
    assert fragments[0].response.status == 413
    assert {t.body_sent for t in fragments[1:-1]} == {32 * 1024}
    assert sha256(stored(server)) == sha256(path)


def test_413_below_the_smallest_fragment_gives_up(serve, source):
    server = serve(max_fragment_size=4000)
    client = BitsClient(server.url + "up/payload.bin", min_fragment=5 * 1024)
    with pytest.raises(UploadError) as failed:
        client.upload(source(20_000), fragment_size=10 * 1024)
    assert failed.value.response.status == 413


def test_session_not_found_starts_over_in_a_new_session(serve, source):
    server = serve(session_timeout=0.3)
    path = source(60_000)
    client = BitsClient(server.url + "up/payload.bin")
    client.create_session()
    client.send_file(path, FRAGMENT, until=FRAGMENT)
    deadline = time.monotonic() + 10
    while server.sessions() and time.monotonic() < deadline:
        time.sleep(0.05)
    client.send_file(path, FRAGMENT)
    client.close()
    lost = next(i for i, t in enumerate(client.log) if t.response.session_not_found)
    assert client.log[lost + 1].packet_type == "Create-Session"
    assert client.log[lost + 2].header(Header.CONTENT_RANGE) == "bytes 0-16383/60000"
    assert len(client.session_ids) == 2 and client.session_ids[0] != client.session_ids[1]
    assert client.log[lost + 2].header(Header.SESSION_ID) == client.session_ids[1]
    assert sha256(stored(server)) == sha256(path)


def test_gap_draws_416_and_the_loop_follows_the_server(serve, source):
    server = serve()
    path = source(80_000)
    client = BitsClient(server.url + "up/payload.bin")
    client.create_session()
    client.send_file(path, FRAGMENT, until=FRAGMENT)
    gap = client.fragment(path, 3 * FRAGMENT, 4 * FRAGMENT - 1)
    assert (gap.status, gap.received_offset, gap.error_code) == (416, FRAGMENT, 0)
    client.send_file(path, FRAGMENT)
    client.close()
    assert sha256(stored(server)) == sha256(path)


@pytest.mark.parametrize("overlap, status", [("trim", 200), ("reject", 416)])
def test_resends_keep_the_first_copy(serve, source, overlap, status):
    server = serve(overlap=overlap)
    path = source(50_000)
    client = BitsClient(server.url + "up/payload.bin")
    client.create_session()
    client.send_file(path, FRAGMENT, until=FRAGMENT)
    same = client.fragment(path, 0, FRAGMENT - 1)
    different = client.fragment(path, 0, FRAGMENT - 1, body=random.Random(99).randbytes(FRAGMENT))
    assert [(r.status, r.received_offset) for r in (same, different)] == [(status, FRAGMENT)] * 2
    assert client.log[-1].body_sent == FRAGMENT
    client.send_file(path, FRAGMENT)
    client.close()
    assert sha256(stored(server)) == sha256(path)


def test_changed_total_is_refused(serve, source):
    server = serve()
    path = source(50_000)
    client = BitsClient(server.url + "up/payload.bin")
    client.create_session()
    client.send_file(path, FRAGMENT, until=FRAGMENT)
    changed = client.fragment(path, FRAGMENT, 2 * FRAGMENT - 1, total=60_000)
    assert client.log[-1].header(Header.CONTENT_RANGE) == f"bytes {FRAGMENT}-{2 * FRAGMENT - 1}/60000"
    assert (changed.status, changed.error_code) == (400, E_INVALIDARG.code)
    client.send_file(path, FRAGMENT)
    client.close()
    assert sha256(stored(server)) == sha256(path)


def test_missing_garbled_and_unknown_packets_are_sent_as_told(serve, source):
    server = serve()
    path = source(20_000)
    client = BitsClient(server.url + "up/payload.bin")
    client.create_session()
    no_range = client.fragment(path, 0, 999, headers={Header.CONTENT_RANGE: None})
    garbled = client.fragment(path, 0, 999, headers={Header.CONTENT_RANGE: "bytes 999-0/20000"})
    unknown = client.send_packet("Frobnicate", session_id=client.session_id)
    untyped = client.send_packet(None, session_id=client.session_id)
    extra = client.send_packet(PacketType.PING, headers={"X-Test": "1"})
    assert [r.status for r in (no_range, garbled, unknown, untyped)] == [400] * 4
    assert all(r.error_code == E_INVALIDARG.code for r in (no_range, garbled, unknown, untyped))
    sent = [t.headers for t in client.log[1:]]
    assert not any(name == Header.CONTENT_RANGE for name, _ in sent[0])
    assert (Header.CONTENT_RANGE, "bytes 999-0/20000") in sent[1]
    assert (Header.PACKET_TYPE, "Frobnicate") in sent[2]
    assert not any(name == Header.PACKET_TYPE for name, _ in sent[3])
    names = [name for name, _ in sent[4]]
    assert extra.status == 200 and names.index("X-Test") == names.index(Header.CONTENT_LENGTH) - 1
    client.send_file(path, FRAGMENT)
    client.close()
    assert sha256(stored(server)) == sha256(path)


def test_zero_byte_file_is_refused_before_sending(serve, source):
    server = serve()
    client = BitsClient(server.url + "up/payload.bin")
    client.create_session()
    with pytest.raises(UploadError):
        client.send_file(source(0))
    assert packets(client) == ["Create-Session"]


def test_two_sessions_on_two_connections_share_one_log(serve, source):
    server = serve()
    log = []
    first = BitsClient(server.url + "up/a.bin", log=log)
    second = BitsClient(server.url + "up/b.bin", log=log)
    a, b = source(40_000, 1, "a.bin"), source(30_000, 2, "b.bin")
    first.create_session()
    second.create_session()
    while first.offset < 40_000 or second.offset < 30_000:
        for client, path in ((first, a), (second, b)):
            client.send_file(path, FRAGMENT, until=client.offset + 1)
    first.close()
    second.close()
    assert sha256(stored(server, "a.bin")) == sha256(a) and sha256(stored(server, "b.bin")) == sha256(b)
    assert [t.header(Header.CONTENT_NAME) for t in log if t.packet_type == "Fragment"][:4] == [
        "a.bin", "b.bin", "a.bin", "b.bin"]
    assert first.connections_opened == second.connections_opened == 1


def test_ipv6_loopback(tmp_path, source):
    try:
        server = BitsServer(tmp_path / "root", host="::1", log=None).start()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        path = source(30_000)
        client = BitsClient(server.url + "up/payload.bin")
        client.upload(path, FRAGMENT)
        assert client.log[0].header("Host") == f"[::1]:{server.address[1]}"
        assert sha256(stored(server)) == sha256(path)
    finally:
        server.stop()


def test_connection_dropped_by_the_server_is_resent_on_a_fresh_one(serve, source):
    """The server dropped the idle kept-alive connection: the next fragment finds it closed
    before any answer, and goes again at once on a fresh connection, without a Ping first."""
    server = serve(idle_timeout=0.3)
    path = source(50_000)
    client = BitsClient(server.url + "up/payload.bin")
    client.create_session()
    client.send_file(path, FRAGMENT, until=FRAGMENT)
    time.sleep(1.5)  # the server drops the idle keep-alive connection after 0.3 s
    client.send_file(path, FRAGMENT)
    client.close()
    broken = next(i for i, t in enumerate(client.log) if t.response is None)
    assert client.log[broken].connection == 0
    resent = client.log[broken + 1]
    assert resent.packet_type == "Fragment" and resent.connection == 1 and resent.response.ok
    assert resent.header(Header.CONTENT_RANGE) == client.log[broken].header(Header.CONTENT_RANGE)
    assert "Ping" not in packets(client)
    assert sha256(stored(server)) == sha256(path)


class LoopbackServer:
    """A listener on 127.0.0.1 (port picked by the kernel) serving each connection it accepts
    with `handle` on a thread of its own, until `close`."""

    scheme = "http"

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"{self.scheme}://127.0.0.1:{self.port}/"
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        self.thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            self.handle(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    @staticmethod
    def read_head(conn: socket.socket, buffered: bytes) -> tuple[bytes, bytes] | None:
        """The next request head on `conn` (up to its empty line, which is left out) and the
        bytes read past it, `buffered` first; None when the peer closes before one."""
        while b"\r\n\r\n" not in buffered:
            data = conn.recv(65536)
            if not data:
                return None
            buffered += data
        head, rest = buffered.split(b"\r\n\r\n", 1)
        return head, rest


class OneRequestPerConnection(LoopbackServer):
    """A proxy in front of bits-server that passes one request per connection and closes the
    connection after its answer, without saying `Connection: close` (a small WSGI BITS server
    behaves so). The answer's end is found by the project's own parser."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        from bitstrace.analyzer.http import HttpParser, MessageEnd, RequestHead

        requests, answers = HttpParser("request"), HttpParser("response")
        with socket.create_connection(self.upstream, timeout=10) as upstream:
            done = False
            while not done:  # the request, up to its end
                data = conn.recv(65536)
                if not data:
                    return
                for event in requests.feed(data, 0, 0):
                    if isinstance(event, RequestHead):
                        answers.expect_response_to(event.method)
                    done = done or isinstance(event, MessageEnd)
                upstream.sendall(data)
            done = False
            while not done:  # its answer, up to its end
                data = upstream.recv(65536)
                if not data:
                    return
                conn.sendall(data)
                done = any(isinstance(e, MessageEnd) for e in answers.feed(data, 0, 0))


def test_server_answering_one_request_per_connection(serve, source):
    """Every request after the first on a connection finds it closed: each is resent on a
    fresh connection, no Ping uses up the one request, and the upload lands whole."""
    server = serve()
    proxy = OneRequestPerConnection(server.address)
    try:
        path = source(70_000)
        client = BitsClient(proxy.url + "up/payload.bin", timeout=5)
        result = client.upload(path, FRAGMENT)
    finally:
        proxy.close()
    assert result.acknowledged == 70_000 and sha256(stored(server)) == sha256(path)
    answered = [t for t in client.log if t.response is not None]
    assert [t.packet_type for t in answered] == ["Create-Session"] + ["Fragment"] * 5 + ["Close-Session"]
    assert "Ping" not in packets(client)
    assert len({t.connection for t in answered}) == len(answered) == client.connections_opened
    assert proxy.connections == client.connections_opened


class ScriptedServer(LoopbackServer):
    """Answers each request it reads (head up to the empty line; these requests have no body)
    with the next of `answers`, bytes exactly as given, on one kept-alive connection."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = list(answers)
        super().__init__()
        self.url += "up/x.bin"

    def handle(self, conn: socket.socket) -> None:
        buffered = b""
        for answer in self.answers:
            read = self.read_head(conn, buffered)
            if read is None:
                return
            buffered = read[1]
            conn.sendall(answer)
        conn.recv(1)


SID_UPPER = "{0A1B2C3D-4E5F-4A6B-8C7D-9E0F1A2B3C4D}"


def test_real_servers_answers_are_read_as_bits_replay_reads_them():
    """Answers real servers send are read as bits-analyze reads them in a capture: a chunked
    ack (with a chunk extension and a trailer), an obs-folded header, a reason phrase with
    bytes outside ASCII, a Content-Length list of equal values, no reason at all, and an
    empty line before the next status line."""
    answers = [
        (b"HTTP/1.1 200 OK\r\nBITS-Packet-Type: Ack\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"3;name=value\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"),
        (b"HTTP/1.1 200 Tr\xe8s bien \x80\r\nBITS-Packet-Type: Ack\r\nBITS-Session-Id:\r\n "
         b"" + SID_UPPER.encode() + b"\r\nBITS-Protocol: " + PROTOCOL_GUID.encode()
         + b"\r\nContent-Length: 0, 0\r\n\r\n"),
        (b"\r\nHTTP/1.1 500\r\nBITS-Packet-Type: Ack\r\nBITS-Error-Code: 0x8020001F\r\n"
         b"BITS-Error-Context: 0x5\r\nContent-Length: 0\r\n\r\n"),
    ]
    server = ScriptedServer(answers)
    try:
        client = BitsClient(server.url, timeout=5)
        ping = client.ping()
        created = client.create_session()
        cancelled = client.cancel()
    finally:
        server.close()
    assert (ping.status, ping.packet_type, ping.body) == (200, PacketType.ACK, b"abc")
    assert created.reason == "Tr\xe8s bien \x80" and created.session_id == SID_UPPER
    assert client.session_id == SID_UPPER
    assert (cancelled.status, cancelled.reason, cancelled.session_not_found) == (500, "", True)
    assert cancelled.error_context == ErrorContext.REMOTE_FILE
    assert client.connections_opened == 1


@pytest.mark.parametrize("answer, what", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12x\r\n\r\n", "invalid Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size line"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "not a status line"),
])
def test_malformed_answers_are_transport_errors_naming_what_and_where(answer, what):
    """No ValueError escapes: a malformed answer is replay.transport's MalformedAnswer, naming
    the server, what is wrong and at which byte of the answer."""
    from bitstrace.replay.transport import MalformedAnswer

    server = ScriptedServer([answer])
    try:
        client = BitsClient(server.url, timeout=5)
        with pytest.raises(MalformedAnswer) as failed:
            client.ping()
    finally:
        server.close()
    assert str(failed.value).startswith(f"127.0.0.1:{server.port} sent a malformed HTTP answer: {what}")
    assert str(failed.value).endswith(" of the answer)")


def test_reply_receipt_hashes_exactly_the_bytes_stored_after_cuts_and_overlaps(serve, source):
    """Upload-reply mode is the one mode the server hashes in: a fragment cut mid-body (rolled
    back), a resend of other bytes over received ones (the first copy kept) and a fragment
    straddling the offset (only its new bytes kept) all leave the receipt's sha256 equal to
    the file's."""
    server = serve(reply=True)
    path = source(60_000)
    client = BitsClient(server.url + "up/payload.bin")
    client.create_session()
    client.send_file(path, FRAGMENT, until=FRAGMENT)
    assert client.fragment(path, FRAGMENT, 2 * FRAGMENT - 1, cut_after=3000) is None
    other = random.Random(98).randbytes(FRAGMENT)
    assert client.fragment(path, 0, FRAGMENT - 1, body=other).received_offset == FRAGMENT
    straddling = client.fragment(path, FRAGMENT // 2, 2 * FRAGMENT - 1)
    assert straddling.status == 200 and straddling.received_offset == 2 * FRAGMENT
    client.send_file(path, FRAGMENT)
    receipt = json.loads(client.fetch_reply())
    assert receipt == {"session_id": client.session_id, "path": "/up/payload.bin",
                       "size": 60_000, "sha256": sha256(path)}
    client.close()
    assert sha256(stored(server)) == sha256(path)


def test_an_offset_beyond_the_total_is_not_taken_as_progress(serve, source):
    """A server acking N past the file's end makes send_file give up, and the client does not
    keep that N as its offset (it once did: the next send_file then found nothing left to send
    and Close discarded the upload)."""
    from bitstrace.replay.server import Ack

    server = serve()
    path = source(20_000)
    client = BitsClient(server.url + "up/payload.bin")
    client.create_session()
    handle = server.service.handle
    server.service.handle = lambda packet, request: (
        Ack(416, session_id=client.session_id, received=30_000) if packet is PacketType.FRAGMENT
        else handle(packet, request))
    with pytest.raises(UploadError, match="no usable received offset"):
        client.send_file(path, FRAGMENT)
    assert client.offset == 0
    server.service.handle = handle
    assert client.send_file(path, FRAGMENT) == 20_000
    client.close()
    assert sha256(stored(server)) == sha256(path)


class TlsFront(LoopbackServer):
    """A TLS-terminating relay on 127.0.0.1 in front of a plain server (as load balancers sit
    in front of IIS farms), with a self-signed certificate made by openssl for 127.0.0.1."""

    scheme = "https"

    def __init__(self, upstream: tuple[str, int], directory: Path) -> None:
        import ssl
        import subprocess

        cert, key = directory / "cert.pem", directory / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                       timeout=60)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.upstream = upstream
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        secure = self.context.wrap_socket(conn, server_side=True)
        upstream = socket.create_connection(self.upstream, timeout=10)

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for end in (source, sink):
                    try:
                        end.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        back = threading.Thread(target=pump, args=(upstream, secure), daemon=True)
        back.start()
        pump(secure, upstream)
        back.join(10)
        secure.close()
        upstream.close()


def test_https_upload_writes_a_key_log(serve, source, tmp_path):
    """Over https the client uploads byte-exact, and appends every connection's TLS secrets
    to the key log (the NSS format bits-analyze --tls-keylog and Wireshark read)."""
    server = serve()
    front = TlsFront(server.address, tmp_path)
    keylog = tmp_path / "keys.log"
    try:
        path = source(40_000)
        client = BitsClient(front.url + "up/payload.bin", verify_tls=False, tls_keylog=keylog,
                            timeout=5)
        result = client.upload(path, FRAGMENT)
    finally:
        front.close()
    assert result.acknowledged == 40_000 and sha256(stored(server)) == sha256(path)
    assert all(t.header("Host") == front.url[len("https://"):-1] for t in client.log)
    labels = {line.split()[0] for line in keylog.read_text().splitlines() if line.strip()}
    assert labels & {"CLIENT_RANDOM", "CLIENT_TRAFFIC_SECRET_0"}


def test_https_with_verification_refuses_an_unknown_certificate(serve, tmp_path):
    """Verification is on by default: a self-signed certificate is a TLS failure, named."""
    from bitstrace.replay.transport import TlsFailed

    server = serve()
    front = TlsFront(server.address, tmp_path)
    try:
        client = BitsClient(front.url + "up/x.bin", timeout=5)
        with pytest.raises(TlsFailed, match=r"^TLS with 127\.0\.0\.1:\d+ failed: CERTIFICATE_VERIFY_FAILED"):
            client.ping()
    finally:
        front.close()


def test_an_answer_sent_before_the_body_ended_is_read(serve, source):
    """bits-server answers a fragment far over its limit with 413 before reading the body and
    closes (the unread body makes the kernel reset the connection under the client's sends):
    the 413 that came is read, not lost in the reset, and the fragments shrink until they fit."""
    server = serve(max_fragment_size=400_000)
    size = 24 << 20  # more than the loopback socket buffers hold: the reset cuts the sending
    path = source(size)
    client = BitsClient(server.url + "up/payload.bin", timeout=10)
    client.upload(path, fragment_size=size)
    fragments = [t for t in client.log if t.packet_type == "Fragment"]
    assert fragments[0].response is not None and fragments[0].body_sent < size
    refused = [t for t in fragments if t.response is not None and t.response.status == 413]
    assert [t.body_sent for t in refused][-1] == 768 * 1024  # the largest the server drains
    assert fragments[len(refused)].body_sent == 384 * 1024
    assert all(t.response is not None for t in fragments)
    assert sha256(stored(server)) == sha256(path)
