"""Pairing requests with responses per connection into Exchange records."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bitstrace.analyzer.bits.protocol import Header, parse_content_range
from bitstrace.analyzer.capture import CaptureReader
from bitstrace.analyzer.decode import Decoder

from bitstrace.analyzer.exchanges import Exchange, ExchangeAssembler, HttpMessage, exchange_to_json
from bitstrace.analyzer.tcp import CLIENT, SERVER, Connection, TcpReassembler
from tests.support import REPO

CAPTURES = REPO / "captures"
EXPECTED = json.loads((CAPTURES / "expected.json").read_text())["captures"]


def connection(id: int = 0, handshake_seen: bool = True,
               client: tuple[bytes, int] = (bytes([192, 0, 2, 1]), 49152),
               server: tuple[bytes, int] = (bytes([192, 0, 2, 80]), 80)) -> Connection:
    conn = Connection(id, client, server, 1, 0)
    conn.handshake_seen = handshake_seen
    return conn


@dataclass
class Recorder:
    exchanges: list[Exchange] = field(default_factory=list)
    bodies: dict[int, bytearray] = field(default_factory=dict)  # id(message) -> body, holes zeroed
    body_owners: list[HttpMessage] = field(default_factory=list)

    def exchange(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)

    def body(self, conn: Connection, message: HttpMessage, chunk: memoryview, body_offset: int) -> None:
        if id(message) not in self.bodies:
            self.bodies[id(message)] = bytearray()
            self.body_owners.append(message)
        body = self.bodies[id(message)]
        assert body_offset >= len(body)  # blocks come in order and never overlap
        body += bytes(body_offset - len(body)) + chunk

    def body_of(self, message: HttpMessage) -> bytes:
        return bytes(self.bodies.get(id(message), b""))


class Session:
    """Drives an assembler the way the TCP reassembler does, numbering frames as it goes."""

    def __init__(self, conn: Connection | None = None,
                 assembler: ExchangeAssembler | None = None,
                 recorder: Recorder | None = None) -> None:
        self.recorder = recorder or Recorder()
        self.assembler = assembler or ExchangeAssembler(self.recorder.exchange,
                                                        self.recorder.body)
        self.conn = conn or connection()
        self.frame = 0
        self.assembler.on_open(self.conn)

    def _tick(self) -> tuple[int, int]:
        self.frame += 1
        self.conn.last_frame = self.frame
        self.conn.last_ts_ns = 1_700_000_000_000_000_000 + self.frame * 1_000_500
        return self.conn.last_frame, self.conn.last_ts_ns

    def send(self, direction: int, data: bytes) -> int:
        frame, ts = self._tick()
        self.assembler.on_data(self.conn, direction, data, frame, ts)
        return frame

    def gap(self, direction: int, size: int) -> None:
        self.assembler.on_gap(self.conn, direction, size, *self._tick())

    def fin(self, direction: int) -> None:
        self.assembler.on_fin(self.conn, direction, *self._tick())

    def close(self) -> None:
        self.assembler.on_close(self.conn)


def post(target: str, body: bytes, method: str = "BITS_POST") -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: server\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


def reply(status: int, body: bytes = b"", reason: str = "OK") -> bytes:
    return f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_one_exchange_with_bodies_frames_and_digests() -> None:
    session = Session()
    request = post("/upload/a.bin", b"0123456789")
    first = session.send(CLIENT, request[:20])
    session.send(CLIENT, request[20:-3])
    last = session.send(CLIENT, request[-3:])
    response_frame = session.send(SERVER, reply(200, b"ack body"))
    [exchange] = session.recorder.exchanges
    assert exchange.index == 0 and exchange.connection is session.conn and not exchange.flags
    req, resp = exchange.request, exchange.response
    assert (req.method, req.target, req.version, req.is_request) == (
        "BITS_POST", "/upload/a.bin", "HTTP/1.1", True)
    assert (req.body_length, req.body_sha256) == (10, sha(b"0123456789"))
    assert (req.first_frame, req.last_frame) == (first, last)
    assert req.last_ts_ns - req.first_ts_ns == (last - first) * 1_000_500
    assert (resp.status, resp.reason, resp.body_sha256) == (200, "OK", sha(b"ack body"))
    assert resp.first_frame == resp.last_frame == response_frame
    assert resp.headers.get("content-length") == "8"
    assert session.recorder.body_of(req) == b"0123456789"
    assert session.recorder.body_owners == [req]  # response bodies are hashed, not streamed


def test_pipelined_three_requests_then_three_responses() -> None:
    session = Session()
    stream = [post("/1", b"a"), post("/2", b"bb", method="HEAD"), post("/3", b"ccc")]
    session.send(CLIENT, b"".join(stream))
    assert session.recorder.exchanges == []
    session.send(SERVER, reply(200, b"x") + b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n"
                 + reply(201, b"zzz"))
    exchanges = session.recorder.exchanges
    assert [e.index for e in exchanges] == [0, 1, 2]
    assert [(e.request.target, e.response.status, e.response.body_length) for e in exchanges] == [
        ("/1", 200, 1), ("/2", 200, 0), ("/3", 201, 3)]
    assert [e.request.stream_offset for e in exchanges] == [
        0, len(stream[0]), len(stream[0] + stream[1])]
    assert all(not e.flags for e in exchanges)


def test_100_continue_is_informational() -> None:
    session = Session()
    session.send(CLIENT, b"BITS_POST /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    session.send(SERVER, b"HTTP/1.1 100 Continue\r\n\r\n")
    session.send(CLIENT, b"abc")
    session.send(SERVER, reply(200))
    [exchange] = session.recorder.exchanges
    assert [m.status for m in exchange.informational] == [100]
    assert exchange.response.status == 200 and exchange.request.body_sha256 == sha(b"abc")


def test_early_response_waits_for_the_end_of_the_request() -> None:
    session = Session()
    request = post("/too-big", b"x" * 100)
    session.send(CLIENT, request[:-60])
    session.send(SERVER, reply(413, reason="Request Entity Too Large"))
    assert session.recorder.exchanges == []
    session.send(CLIENT, request[-60:])
    [exchange] = session.recorder.exchanges
    assert exchange.response.status == 413 and exchange.request.body_length == 100


def test_orphan_response_and_no_response() -> None:
    session = Session(connection(handshake_seen=False))  # the capture began mid-connection
    session.send(SERVER, reply(200, b"who asked?"))
    session.send(CLIENT, post("/unanswered", b"q"))
    session.fin(CLIENT)
    session.close()
    orphan, unanswered = session.recorder.exchanges
    assert orphan.request is None and orphan.flags == {"orphan-response"}
    assert orphan.response.body_sha256 == sha(b"who asked?")
    assert unanswered.response is None and unanswered.flags == {"no-response"}
    assert unanswered.request.target == "/unanswered" and not unanswered.request.partial


def test_responses_recorded_before_their_requests_pair_by_stream_order() -> None:
    """The server's clock runs behind the client's: its answers reach the assembler first. The
    HEAD answer's Content-Length announces no body, which only its request's method tells."""
    session = Session()
    session.send(SERVER, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + reply(200, b"body!"))
    session.send(SERVER, reply(404, b"extra"))  # answers no request: an orphan at the end
    session.send(CLIENT, b"HEAD /reply HTTP/1.1\r\nHost: h\r\n\r\n")
    session.send(CLIENT, b"GET /reply HTTP/1.1\r\nHost: h\r\n\r\n")
    session.close()
    head, get, orphan = session.recorder.exchanges
    assert (head.request.method, head.response.status, head.response.body_length) == ("HEAD", 200, 0)
    assert (get.request.method, get.response.body_sha256) == ("GET", sha(b"body!"))
    assert head.flags == get.flags == set()
    assert orphan.request is None and orphan.flags == {"orphan-response"} and orphan.response.status == 404
    assert head.response.first_frame == 1 and get.response.stream_offset == 38


def test_a_request_lost_in_a_gap_leaves_its_response_an_orphan() -> None:
    session = Session()
    session.gap(CLIENT, 300)  # a whole request
    session.send(SERVER, reply(200, b"first"))
    session.send(CLIENT, post("/second", b"q"))
    session.send(SERVER, reply(200, b"second"))
    session.close()
    orphan, second = session.recorder.exchanges
    assert orphan.request is None and "orphan-response" in orphan.flags
    assert second.request.target == "/second" and second.response.body_sha256 == sha(b"second")


@pytest.mark.parametrize("extra", [b"<html>stored</html>", b"<html>\r\nstored\r\n</html>\r\n", b"OK\n" * 9000])
@pytest.mark.parametrize("split", [False, True])
def test_extra_bytes_after_an_empty_answer_cost_no_later_answer(extra: bytes, split: bool) -> None:
    session = Session()
    for index in range(4):
        session.send(CLIENT, post(f"/f{index}", b"q"))
    answers = [reply(200 + index, b"") for index in range(4)]
    stream = answers[0] + extra + b"".join(answers[1:])
    pieces = [stream[i:i + 7] for i in range(0, len(stream), 7)] if split else [stream]
    frames = [session.send(SERVER, piece) for piece in pieces]
    session.close()
    exchanges = session.recorder.exchanges
    assert [(e.request.target, e.response.status) for e in exchanges] == [
        ("/f0", 200), ("/f1", 201), ("/f2", 202), ("/f3", 203)]
    assert all(not e.flags for e in exchanges)
    after = exchanges[1].response
    assert after.extra_before == len(extra) and after.stream_offset == len(answers[0]) + len(extra)
    first_extra = frames[len(answers[0]) // 7] if split else frames[0]
    assert after.extra_frame == first_extra
    assert [e.response.extra_before for e in exchanges] == [0, len(extra), 0, 0]
    assert not session.assembler.problems


def test_extra_bytes_before_the_end_of_a_connection_are_a_problem() -> None:
    session = Session()
    session.send(CLIENT, post("/f0", b"q"))
    session.send(SERVER, reply(200, b"") + b"trailing junk")
    session.close()
    [exchange] = session.recorder.exchanges
    assert exchange.response.status == 200 and not exchange.flags
    [problem] = session.assembler.problems
    assert problem.kind == "http-extra-bytes" and "13 bytes" in problem.message and problem.frame == 2


def test_gap_in_body_then_resync_on_next_request() -> None:
    session = Session()
    first_body, second_body = os.urandom(5000), os.urandom(300)
    first, second = post("/frag1", first_body), post("/frag2", second_body)
    session.send(CLIENT, first[:2000])
    session.gap(CLIENT, 4000)  # the rest of the first request and the start of the second
    lost = len(first) - 2000
    junk = os.urandom(700).replace(b"\n", b"")  # the second request's body, its head lost
    session.send(CLIENT, junk + second)
    session.send(SERVER, reply(200) + reply(200))
    one, two = session.recorder.exchanges
    assert one.flags == {"gap", "partial"}
    assert one.request.partial and one.request.body_sha256 is None
    assert one.request.body_length == 2000 - len(first) + len(first_body)
    assert two.request.target == "/frag2" and not two.request.partial
    assert two.request.body_sha256 == sha(second_body)
    assert two.request.stream_offset == 2000 + 4000 + len(junk)
    assert two.flags == {"gap"}  # a whole request may have been lost: pairing is suspect
    assert lost < 4000


def test_gap_inside_known_length_body_keeps_the_message() -> None:
    session = Session()
    body = b"a" * 3000
    request = post("/frag", body)
    session.send(CLIENT, request[:1000])
    session.gap(CLIENT, 1000)
    session.send(CLIENT, request[2000:] + post("/next", b""))
    session.send(SERVER, reply(200) + reply(200))
    one, two = session.recorder.exchanges
    assert one.flags == {"gap", "partial"} and one.request.body_length == len(body) - 1000
    assert two.flags == set() and two.request.body_sha256 == sha(b"")


def test_truncated_response_at_close_is_partial() -> None:
    session = Session()
    session.send(CLIENT, post("/x", b""))
    session.send(SERVER, reply(200, b"0123456789")[:-4])
    session.close()
    [exchange] = session.recorder.exchanges
    assert exchange.flags == {"partial"} and exchange.response.body_length == 6


def test_response_until_close_ended_by_reset_is_partial() -> None:
    session = Session()
    session.send(CLIENT, post("/x", b""))
    session.send(SERVER, b"HTTP/1.0 200 OK\r\n\r\nstreamed")
    session.assembler.on_rst(session.conn, SERVER, 99, 0)
    session.close()
    [exchange] = session.recorder.exchanges
    assert exchange.flags == {"partial"} and exchange.response.body_length == 8


def test_response_until_close_ended_by_fin() -> None:
    session = Session()
    session.send(CLIENT, post("/x", b""))
    session.send(SERVER, b"HTTP/1.0 200 OK\r\n\r\nstreamed")
    session.fin(SERVER)
    [exchange] = session.recorder.exchanges
    assert not exchange.flags and exchange.response.body_sha256 == sha(b"streamed")


def test_overlap_conflict_flags_the_message_being_parsed() -> None:
    session = Session()
    request = post("/c", b"12345678")
    session.send(CLIENT, request[:-4])
    session.assembler.on_conflict(session.conn, CLIENT, len(request) - 6, 2, session.frame)
    session.send(CLIENT, request[-4:] + post("/d", b""))
    session.send(SERVER, reply(200) + reply(200))
    assert [e.flags for e in session.recorder.exchanges] == [{"overlap-conflict"}, set()]


def test_bits_post_one_mebibyte_sha256() -> None:
    session = Session()
    body = os.urandom(1 << 20)
    request = post("/big", body)
    for start in range(0, len(request), 65483):
        session.send(CLIENT, request[start:start + 65483])
    session.send(SERVER, reply(200))
    [exchange] = session.recorder.exchanges
    assert exchange.request.body_length == 1 << 20
    assert exchange.request.body_sha256 == sha(body)
    assert session.recorder.body_of(exchange.request) == body


@pytest.mark.parametrize("chunked", [False, True])
def test_body_blocks_after_a_gap_lie_at_their_body_offset(chunked: bool) -> None:
    session = Session()
    body = bytes(range(200)) * 50
    if chunked:
        head = b"BITS_POST /g HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
        wire = head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    else:
        head = post("/g", b"")[:-len(b"Content-Length: 0\r\n\r\n")] + b"Content-Length: %d\r\n\r\n" % len(body)
        wire = head + body
    start = wire.index(body)
    session.send(CLIENT, wire[:start + 3000])
    session.gap(CLIENT, 1000)
    session.send(CLIENT, wire[start + 4000:])
    session.send(SERVER, reply(200))
    [exchange] = session.recorder.exchanges
    assert exchange.request.partial and exchange.request.body_length == len(body) - 1000
    assert session.recorder.body_of(exchange.request) == body[:3000] + bytes(1000) + body[4000:]


def test_midstream_connection_starts_at_the_first_message() -> None:
    session = Session(connection(handshake_seen=False))
    session.send(CLIENT, os.urandom(2000).replace(b"\n", b"") + b"\r\n" + post("/seen", b"x"))
    session.send(SERVER, b"tail of an earlier body" + reply(200))
    assert session.assembler.problems == []
    [exchange] = session.recorder.exchanges
    assert exchange.request.target == "/seen" and exchange.response.status == 200


def test_parse_errors_become_problems_with_their_place() -> None:
    session = Session(connection(id=7))
    session.send(CLIENT, b"this is not http\r\n" + post("/ok", b""))
    session.send(SERVER, reply(200))
    [problem] = session.assembler.problems
    assert (problem.kind, problem.connection, problem.frame, problem.offset) == (
        "http-parse-error", 7, 1, 0)
    assert [e.request.target for e in session.recorder.exchanges] == ["/ok"]


def test_index_is_global_across_connections() -> None:
    recorder = Recorder()
    assembler = ExchangeAssembler(recorder.exchange)
    a = Session(connection(id=0), assembler, recorder)
    b = Session(connection(id=1), assembler, recorder)
    a.send(CLIENT, post("/a", b""))
    b.send(CLIENT, post("/b", b""))
    b.send(SERVER, reply(200))
    a.send(SERVER, reply(200))
    assert [(e.index, e.connection.id) for e in recorder.exchanges] == [(0, 1), (1, 0)]


def test_exchange_to_json() -> None:
    conn = connection(id=3, client=(bytes.fromhex("20010db8" + "00" * 11 + "01"), 50123),
                             server=(bytes([127, 0, 0, 1]), 8080))
    session = Session(conn)
    session.send(CLIENT, b"BITS_POST /x HTTP/1.1\r\nBITS-Packet-Type: Ping\r\nContent-Length: 0\r\n\r\n")
    session.send(SERVER, b"HTTP/1.1 100 Continue\r\n\r\n")
    session.send(SERVER, reply(200))
    session.send(CLIENT, post("/y", b"z"))
    session.close()
    records = [json.loads(json.dumps(exchange_to_json(e))) for e in session.recorder.exchanges]
    first, second = records
    assert (first["index"], first["connection"]) == (0, 3)
    assert (first["client"], first["server"]) == ("[2001:db8::1]:50123", "127.0.0.1:8080")
    request = first["request"]
    assert (request["method"], request["target"], request["version"]) == (
        "BITS_POST", "/x", "HTTP/1.1")
    assert request["headers"] == [["BITS-Packet-Type", "Ping"], ["Content-Length", "0"]]
    assert request["body_length"] == 0 and request["body_sha256"] == sha(b"")
    assert (request["first_frame"], request["last_frame"]) == (1, 1)
    ts = session.conn.last_ts_ns - (session.frame - 1) * 1_000_500  # frame 1's timestamp
    assert request["first_epoch"] == ts / 1e9
    assert request["first_time"] == "2023-11-14T22:13:20.001000Z"
    assert first["response"]["status"] == 200 and first["response"]["reason"] == "OK"
    assert [m["status"] for m in first["informational"]] == [100]
    assert first["flags"] == []
    assert second["response"] is None and second["flags"] == ["no-response"]


def test_overlap_conflict_is_put_on_the_exchange_whose_bytes_it_touched() -> None:
    session = Session()
    first, second = post("/1", b"a" * 50), post("/2", b"b" * 50)
    session.send(CLIENT, first + second[:30])
    session.send(SERVER, reply(200)[:5])  # the first response has begun: nothing emitted yet
    on_conflict = session.assembler.on_conflict
    on_conflict(session.conn, CLIENT, len(first) - 10, 4, session.frame)  # in the first request
    on_conflict(session.conn, CLIENT, len(first) + 20, 4, session.frame)  # in the second's head
    session.send(CLIENT, second[30:])
    on_conflict(session.conn, CLIENT, len(first + second) + 5, 4, session.frame)  # still to come
    session.send(SERVER, reply(200)[5:] + reply(200))
    assert [e.flags for e in session.recorder.exchanges] == [{"overlap-conflict"}] * 2
    on_conflict(session.conn, CLIENT, 3, 1, session.frame)  # in an exchange already emitted
    session.send(CLIENT, post("/3", b""))
    session.send(SERVER, reply(200))
    assert session.recorder.exchanges[2].flags == {"overlap-conflict"}  # the "still to come" one
    [problem] = session.assembler.problems
    assert (problem.kind, problem.offset, problem.connection) == ("overlap-conflict", 3, 0)


def test_first_index_continues_the_numbering() -> None:
    recorder = Recorder()
    session = Session(assembler=ExchangeAssembler(recorder.exchange, first_index=41),
                      recorder=recorder)
    session.send(CLIENT, post("/a", b"") + post("/b", b""))
    session.send(SERVER, reply(200) + reply(200))
    assert [e.index for e in recorder.exchanges] == [41, 42]
    assert session.assembler.next_index == 43


def assemble_capture(name: str | Path, on_body=None) -> tuple[list[Exchange], ExchangeAssembler]:
    """A real capture (a corpus name or a path) through reader, decoder, TCP reassembler and
    the assembler."""
    exchanges: list[Exchange] = []
    assembler = ExchangeAssembler(exchanges.append, on_body)
    decoder, reassembler = Decoder(), TcpReassembler(assembler)
    for frame in CaptureReader(CAPTURES / name):
        segment = decoder.decode(frame)
        if segment is not None:
            reassembler.feed(segment)
    reassembler.finish()
    return exchanges, assembler


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_exchange_and_response_counts(name: str) -> None:
    exchanges, assembler = assemble_capture(name)
    expected = EXPECTED[name]
    assert len(exchanges) == expected["exchanges"]
    assert sum(e.response is not None for e in exchanges) == expected["responses"]
    assert len({e.connection.id for e in exchanges}) == expected["connections"]
    assert assembler.problems == []
    assert [e.index for e in exchanges] == list(range(len(exchanges)))


@pytest.mark.parametrize("name", ["single-fragment.pcap", "clean-multi-fragment.pcap",
                                  "ipv6.pcap"])
def test_corpus_fragment_bodies_rebuild_the_uploaded_file(name: str) -> None:
    [session] = EXPECTED[name]["sessions"]
    received = Recorder()
    exchanges, _ = assemble_capture(name, received.body)
    file = bytearray(session["total"])
    for exchange in exchanges:
        value = exchange.request.headers.get(Header.CONTENT_RANGE)
        if value is None:
            continue
        span = parse_content_range(value)
        body = received.body_of(exchange.request)
        assert exchange.request.body_sha256 == sha(body) and len(body) == span.length
        file[span.first:span.last + 1] = body
    assert sha(bytes(file)) == session["sha256"]


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
@pytest.mark.parametrize("name", ["upload-reply.pcap", "connection-cut-resume.pcap"])
def test_corpus_responses_match_tshark(name: str) -> None:
    port = EXPECTED[name]["server_port"]
    lines = subprocess.run(
        ["tshark", "-r", str(CAPTURES / name), "-d", f"tcp.port=={port},http", "-Y",
         "http.response", "-T", "fields", "-e", "tcp.stream", "-e", "frame.number",
         "-e", "http.response.code", "-e", "http.content_length"],
        capture_output=True, text=True, check=True).stdout.split()
    theirs = sorted(tuple(int(v) for v in lines[i:i + 4]) for i in range(0, len(lines), 4))
    exchanges, _ = assemble_capture(name)
    ours = sorted((e.connection.id, e.response.last_frame, e.response.status,
                   int(e.response.headers.get("Content-Length")))
                  for e in exchanges if e.response is not None)
    assert ours == theirs


@pytest.mark.skipif(shutil.which("editcap") is None, reason="editcap not installed")
def test_corpus_capture_with_a_lost_segment(tmp_path: Path) -> None:
    """clean-multi-fragment.pcap with one body segment of a fragment deleted by editcap."""
    name = "clean-multi-fragment.pcap"
    [session] = EXPECTED[name]["sessions"]
    exchanges, _ = assemble_capture(name)
    victim = exchanges[2].request  # the second fragment
    decoder = Decoder()
    body_frames = [segment.frame for segment in map(decoder.decode, CaptureReader(CAPTURES / name))
                   if segment is not None and segment.dport == EXPECTED[name]["server_port"]
                   and segment.payload and victim.first_frame < segment.frame < victim.last_frame]
    lost = body_frames[len(body_frames) // 2]
    damaged = tmp_path / name
    subprocess.run(["editcap", str(CAPTURES / name), str(damaged), str(lost)], check=True,
                   capture_output=True)
    exchanges_after, _ = assemble_capture(damaged)
    assert len(exchanges_after) == len(exchanges)
    flagged = [e for e in exchanges_after if e.flags]
    assert [e.index for e in flagged] == [2] and flagged[0].flags == {"gap", "partial"}
    hit = flagged[0].request
    assert hit.partial and hit.body_sha256 is None and hit.body_length < victim.body_length
    assert flagged[0].response.status == 200
    for before, after in zip(exchanges, exchanges_after):
        if after.index != 2:
            assert after.request.body_sha256 == before.request.body_sha256
