"""replay.replayer.plan: captured exchanges → sessions of ordered requests with bodies in the spool.

The captures here are crafted TCP conversations (real IPv4/TCP packets through the whole
analyzer pipeline), so these tests do not depend on the corpus in captures/. `Conversation` is
also used by the other replay tests.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tests.support import craft
from bitstrace.analyzer.bits.protocol import PROTOCOL_GUID, PacketType
from bitstrace.analyzer.bits.sessions import Session, SessionTracker
from bitstrace.analyzer.pipeline import read_exchanges
from bitstrace.replay.replayer.plan import SPOOL_BATCH, SpooledBody, BodySpool, build_plan

SERVER_PORT = 8080
MSS = 1400


@dataclass
class _Tcp:
    port: int
    seq: list[int] = field(default_factory=lambda: [1000, 500000])  # client, server
    fin_sent: bool = False


class Conversation:
    """HTTP messages on crafted TCP connections to 127.0.0.1:8080, written as a pcap.

    `send(conn, direction, data, ts_ms, drop=...)` appends a message (0 = client→server);
    a connection's handshake is written before its first message and FINs by `write`.
    `drop` leaves one segment of the message out, as a capture with loss would.
    """

    def __init__(self) -> None:
        self.records: list[tuple[int, bytes]] = []
        self.connections: dict[int, _Tcp] = {}
        self.last_ns = 0

    def _packet(self, ts_ns: int, tcp: _Tcp, direction: int, flags: str, payload: bytes = b"",
                record: bool = True) -> None:
        src, dst = (tcp.port, SERVER_PORT) if direction == 0 else (SERVER_PORT, tcp.port)
        seq, ack = tcp.seq[direction], tcp.seq[1 - direction]
        packet = (Ether() / IP(src="127.0.0.1", dst="127.0.0.1")
                  / TCP(sport=src, dport=dst, seq=seq, ack=ack if "S" not in flags or "A" in flags else 0,
                        flags=flags) / payload)
        if record:
            self.records.append((ts_ns, bytes(packet)))
        tcp.seq[direction] += len(payload) + (1 if ("S" in flags or "F" in flags) else 0)
        self.last_ns = max(self.last_ns, ts_ns)

    def send(self, conn: int, direction: int, data: bytes, ts_ms: float, drop: int | None = None) -> None:
        ts_ns = 1_700_000_000_000_000_000 + int(ts_ms * 1e6)
        tcp = self.connections.get(conn)
        if tcp is None:
            tcp = self.connections[conn] = _Tcp(40000 + conn)
            self._packet(ts_ns - 3000, tcp, 0, "S")
            self._packet(ts_ns - 2000, tcp, 1, "SA")
            self._packet(ts_ns - 1000, tcp, 0, "A")
        for number, start in enumerate(range(0, len(data), MSS)):
            self._packet(ts_ns + number, tcp, direction, "PA", data[start:start + MSS],
                         record=number != drop)

    def write(self, path: Path) -> Path:
        for tcp in self.connections.values():
            self._packet(self.last_ns + 1000, tcp, 0, "FA")
            self._packet(self.last_ns + 2000, tcp, 1, "FA")
        craft.write(path, craft.pcap_bytes(sorted(self.records, key=lambda r: r[0])))
        return path


def request(packet: str, target: str = "/up/file.bin", session: str | None = None,
            body: bytes = b"", content_range: str | None = None, extra: str = "") -> bytes:
    lines = [f"BITS_POST {target} HTTP/1.1", "Host: origin.example:8080",
             "User-Agent: Microsoft BITS/7.8", f"BITS-Packet-Type: {packet}"]
    if packet == "Create-Session":
        lines.append(f"BITS-Supported-Protocols: {PROTOCOL_GUID}")
    if session:
        lines.append(f"BITS-Session-Id: {session}")
    if content_range:
        lines.append(f"Content-Range: {content_range}")
    if extra:
        lines.append(extra)
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def ack(status: int = 200, session: str | None = None, received: int | None = None,
        error: str | None = None, reason: str = "OK") -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}", "BITS-Packet-Type: Ack"]
    if session:
        lines.append(f"BITS-Session-Id: {session}")
    if received is not None:
        lines.append(f"BITS-Received-Content-Range: {received}")
    if error:
        lines += [f"BITS-Error-Code: {error}", "BITS-Error-Context: 0x5"]
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


SID_A = "{11111111-1111-1111-1111-111111111111}"
SID_B = "{22222222-2222-2222-2222-222222222222}"


def upload(conv: Conversation, conn: int, sid: str, data: bytes, size: int, start_ms: float,
           step_ms: float = 10.0, target: str = "/up/file.bin", close: bool = True) -> float:
    """A whole clean upload (Ping, Create, fragments, Close) on one connection, as the
    reference server answers it; returns the time after the last packet."""
    t = start_ms
    conv.send(conn, 0, request("Ping", target), t)
    conv.send(conn, 1, ack(), t + 1)
    t += step_ms
    conv.send(conn, 0, request("Create-Session", target), t)
    conv.send(conn, 1, ack(session=sid), t + 1)
    for first in range(0, len(data), size):
        t += step_ms
        chunk = data[first:first + size]
        conv.send(conn, 0, request("Fragment", target, sid, chunk,
                                   f"bytes {first}-{first + len(chunk) - 1}/{len(data)}"), t)
        conv.send(conn, 1, ack(session=sid, received=first + len(chunk)), t + 1)
    if close:
        t += step_ms
        conv.send(conn, 0, request("Close-Session", target, sid), t)
        conv.send(conn, 1, ack(session=sid), t + 1)
    return t + step_ms


def payload(size: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(size)


def read_body(plan, body) -> bytes:
    return b"".join(plan.spool.read(body))


def test_two_overlapping_sessions_are_planned_apart_with_their_bodies(tmp_path: Path) -> None:
    conv = Conversation()
    a, b = payload(9000, 1), payload(7000, 2)
    # Interleaved in time on two connections: bodies interleave in the spool.
    upload(conv, 0, SID_A, a, 3000, start_ms=0, step_ms=10)
    upload(conv, 1, SID_B, b, 3500, start_ms=5, step_ms=10, target="/up/other.bin")
    with build_plan([conv.write(tmp_path / "two.pcap")]) as plan:
        assert plan.complete and not plan.problems
        assert [s.key for s in plan.sessions] == [SID_A, SID_B]
        first, second = plan.sessions
        assert [r.label for r in first.requests] == [
            "Ping", "Create-Session", "Fragment bytes 0-2999/9000", "Fragment bytes 3000-5999/9000",
            "Fragment bytes 6000-8999/9000", "Close-Session"]
        assert {r.connection for r in first.requests} == {0}
        assert {r.connection for r in second.requests} == {1}
        assert all(r.ts_ns < q.ts_ns for r, q in zip(first.requests, first.requests[1:]))
        assert b"".join(read_body(plan, r.body) for r in first.requests if r.body) == a
        assert b"".join(read_body(plan, r.body) for r in second.requests if r.body) == b
        fragment = first.requests[3]
        assert fragment.body.sha256 == hashlib.sha256(a[3000:6000]).hexdigest()
        assert fragment.response.received == 6000 and fragment.response.status == 200
        assert first.requests[1].response.session_id == SID_A
        assert fragment.header("host") == "origin.example:8080"
        assert first.body_bytes == len(a)


def test_session_selection_and_unknown_ids(tmp_path: Path) -> None:
    conv = Conversation()
    upload(conv, 0, SID_A, payload(100, 1), 100, start_ms=0)
    upload(conv, 1, SID_B, payload(100, 2), 100, start_ms=100)
    path = conv.write(tmp_path / "sel.pcap")
    with build_plan([path], [SID_B.lower()]) as plan:
        assert [s.key for s in plan.sessions] == [SID_B]
    with build_plan([path], ["{nope}"]) as plan:
        assert plan.sessions == []
        assert [p.kind for p in plan.problems] == ["unknown-session-selected"]


def test_lost_segment_makes_the_body_incomplete(tmp_path: Path) -> None:
    conv = Conversation()
    data = payload(5000, 3)
    conv.send(0, 0, request("Create-Session"), 0)
    conv.send(0, 1, ack(session=SID_A), 1)
    conv.send(0, 0, request("Fragment", session=SID_A, body=data,
                            content_range="bytes 0-4999/5000"), 10, drop=2)
    conv.send(0, 1, ack(session=SID_A, received=5000), 11)
    with build_plan([conv.write(tmp_path / "lossy.pcap")]) as plan:
        fragment = plan.sessions[0].requests[1]
        assert fragment.packet_type is PacketType.FRAGMENT
        assert not fragment.body.complete and fragment.body.sha256 is None
        assert plan.sessions[0].entity_piece(0, 10) is None


def test_entity_pieces_span_fragments_and_resends(tmp_path: Path) -> None:
    conv = Conversation()
    data = payload(3000, 4)
    upload(conv, 0, SID_A, data, 1000, start_ms=0, close=False)
    with build_plan([conv.write(tmp_path / "pieces.pcap")]) as plan:
        session = plan.sessions[0]
        pieces = session.entity_piece(500, 2499)
        assert [(skip, take) for _, skip, take in pieces] == [(500, 500), (0, 1000), (0, 500)]
        assert b"".join(b"".join(plan.spool.read(body, skip, take))
                        for body, skip, take in pieces) == data[500:2500]
        assert session.entity_piece(2500, 3000) is None  # byte 3000 is past the file


def analyzer_sessions(paths: list[Path]) -> list[Session]:
    tracker = SessionTracker()
    read_exchanges(paths, tracker.on_exchange)
    return tracker.finish().sessions


def test_requests_the_analyzer_sets_aside_join_the_session_on_their_connection(tmp_path: Path) -> None:
    conv = Conversation()
    conv.send(0, 0, request("Ping"), 0)
    conv.send(0, 1, ack(), 1)
    conv.send(1, 0, request("Ping"), 2)  # a connection that never carries a session
    conv.send(1, 1, ack(), 3)
    conv.send(0, 0, request("Create-Session"), 10)
    conv.send(0, 1, ack(401, reason="Unauthorized"), 11)  # challenged: the analyzer sets it aside
    conv.send(0, 0, request("Create-Session", extra="Authorization: Basic dTpw"), 20)
    conv.send(0, 1, ack(session=SID_A), 21)
    conv.send(0, 0, request("Close-Session", session=SID_A), 30)
    conv.send(0, 1, ack(session=SID_A), 31)
    conv.send(0, 0, request("Ping"), 40)  # after the last session: joins the previous one
    conv.send(0, 1, ack(), 41)
    conv.send(2, 0, request("Ping"), 50)
    conv.send(2, 1, ack(), 51)
    conv.send(2, 0, request("Create-Session"), 60)
    conv.send(2, 1, ack(400, error="0x80070057", reason="Bad Request"), 61)  # refused: no id
    path = conv.write(tmp_path / "ids.pcap")
    refused = next(s for s in analyzer_sessions([path]) if s.id is None)
    with build_plan([path]) as plan:
        assert [s.key for s in plan.sessions] == [SID_A, "connection-1", refused.key]
        assert [r.label for r in plan.sessions[0].requests] == [
            "Ping", "Create-Session", "Create-Session", "Close-Session", "Ping"]
        assert [r.label for r in plan.sessions[2].requests] == ["Ping", "Create-Session"]
        assert plan.sessions[2].session_id is None
        answer = plan.sessions[2].requests[1].response
        assert answer.status == 400 and answer.error_code == 0x80070057 and answer.error_context == 5


def test_an_id_the_server_issues_again_is_a_second_session_as_in_the_analyzer(tmp_path: Path) -> None:
    """A server that derives session ids issues one again after the first session closed: the
    analyzer counts two generations, and so does the plan (it once merged them into one)."""
    conv = Conversation()
    first, second = payload(3000, 6), payload(2000, 7)
    upload(conv, 0, SID_A, first, 1000, start_ms=0)
    upload(conv, 1, SID_A.upper(), second, 1000, start_ms=500, target="/up/again.bin")
    path = conv.write(tmp_path / "reissued.pcap")
    analyzed = analyzer_sessions([path])
    assert [(s.id, s.generation) for s in analyzed] == [(SID_A, 0), (SID_A.upper(), 1)]
    with build_plan([path]) as plan:
        assert [(s.session_id, s.generation) for s in plan.sessions] == [
            (s.id, s.generation) for s in analyzed]
        assert [s.key for s in plan.sessions] == [SID_A, f"{SID_A.upper()} (generation 2)"]
        for session, data, connection in zip(plan.sessions, (first, second), (0, 1)):
            assert [r.label for r in session.requests][1:2] + [r.label for r in session.requests][-1:] == [
                "Create-Session", "Close-Session"]
            assert {r.connection for r in session.requests} == {connection}
            assert b"".join(read_body(plan, r.body) for r in session.requests if r.body) == data
        with build_plan([path], [SID_A]) as selected:  # an id selects every session that had it
            assert [s.key for s in selected.sessions] == [s.key for s in plan.sessions]


def test_rotated_files_are_read_as_one_capture(tmp_path: Path) -> None:
    """Split mid-fragment, as a rotating capture does: the connection and the fragment's body
    cross the file boundary whole, and connections are numbered across the files."""
    conv = Conversation()
    data = payload(9000, 5)
    upload(conv, 0, SID_A, data, 4500, start_ms=0)
    conv.send(1, 0, request("Ping"), 100)
    conv.send(1, 1, ack(), 101)
    conv.write(tmp_path / "whole.pcap")
    records = sorted(conv.records, key=lambda r: r[0])
    fragment_start = next(i for i, (_, packet) in enumerate(records) if b"Fragment" in packet)
    cut = fragment_start + 2  # inside the first fragment's body
    paths = [craft.write(tmp_path / name, craft.pcap_bytes(part)) for name, part in
             (("1.pcap", records[:cut]), ("2.pcap", records[cut:]))]
    with build_plan(paths) as plan:
        assert plan.complete and not plan.problems
        session, alone = plan.sessions
        fragment = session.requests[2]
        assert fragment.label == "Fragment bytes 0-4499/9000" and fragment.file == 0
        assert fragment.body.complete and read_body(plan, fragment.body) == data[:4500]
        assert {r.connection for r in session.requests} == {0}
        assert [r.file for r in session.requests][-1] == 1
        assert (alone.key, alone.requests[0].connection, alone.requests[0].file) == ("connection-1", 1, 1)


def test_unreadable_capture_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    with build_plan([tmp_path / "missing.pcap"]) as plan:
        assert plan.sessions == [] and not plan.complete
        assert plan.problems and plan.problems[0].fatal
    assert not os.path.exists(tmp_path / "missing.pcap")


def test_lowercase_bits_post_is_planned_as_the_analyzer_counts_it(tmp_path: Path) -> None:
    from bitstrace.analyzer.bits.packets import classify

    conv = Conversation()
    data = payload(2000, 5)
    conv.send(0, 0, request("Create-Session").replace(b"BITS_POST", b"bits_post", 1), 0)
    conv.send(0, 1, ack(session=SID_A), 1)
    conv.send(0, 0, request("Fragment", session=SID_A, body=data,
                            content_range="bytes 0-1999/2000").replace(b"BITS_POST", b"bits_post", 1), 10)
    conv.send(0, 1, ack(session=SID_A, received=2000), 11)
    path = conv.write(tmp_path / "lower.pcap")
    packets = []
    read_exchanges([path], lambda exchange: packets.append(classify(exchange).packet))
    assert [p.label for p in packets] == ["Create-Session", "Fragment bytes 0-1999/2000"]
    with build_plan([path]) as plan:
        (session,) = plan.sessions
        assert [r.label for r in session.requests] == [p.label for p in packets]
        assert session.requests[1].method == "bits_post"  # sent as captured
        assert read_body(plan, session.requests[1].body) == data


def test_acks_are_read_alike_by_analyzer_replay_and_client(tmp_path: Path) -> None:
    """One ack parser: headers that are empty, padded or given under both error-header names
    give the same fields in the analyzer's packets, the replay's captured summaries and the
    client's responses."""
    from bitstrace.analyzer.bits.packets import classify
    from bitstrace.analyzer.http import Headers
    from bitstrace.replay.client import Response

    odd_acks = [
        [f"BITS-Session-Id:   {SID_A}  ", "BITS-Host-Id:  ", "BITS-Received-Content-Range: 10"],
        ["BITS-Error-Code: ", "BITS-Error: 0x8020001F", "BITS-Error-Context: 0x5"],
        ["BITS-Error-Code: 0x80070057", "BITS-Error: 0x8020001F", "BITS-Host-Id:  host.example "],
        ["BITS-Received-Content-Range: ten", "BITS-Error-Context: 5"],
    ]
    conv = Conversation()
    heads = []
    for number, lines in enumerate(odd_acks):
        head = ["HTTP/1.1 500 Internal Server Error", "BITS-Packet-Type: Ack", *lines,
                "Content-Length: 0"]
        heads.append(head)
        conv.send(0, 0, request("Close-Session", session=SID_A), number * 10)
        conv.send(0, 1, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1"), number * 10 + 1)
    path = conv.write(tmp_path / "acks.pcap")
    packets = []
    read_exchanges([path], lambda exchange: packets.append(classify(exchange).packet))
    with build_plan([path]) as plan:
        summaries = [r.response for r in plan.sessions[0].requests]
    for head, packet, summary in zip(heads, packets, summaries, strict=True):
        pairs = tuple(tuple(part.strip() for part in line.split(":", 1)) for line in head[1:])
        response = Response("HTTP/1.1", 500, "Internal Server Error", Headers(pairs))
        analyzer = (packet.ack_session_id, packet.host_id, packet.received_offset,
                    packet.error_code, packet.error_context)
        assert (summary.session_id, summary.host_id, summary.received, summary.error_code,
                summary.error_context) == analyzer
        assert (response.session_id, response.host_id, response.received_offset,
                response.error_code, response.error_context) == analyzer


def test_refused_creates_in_several_files_keep_the_analyzers_keys(tmp_path: Path) -> None:
    """Two rotated files, each with a refused Create at frame 4: bits-analyze names them
    `refused-create@1:4` and `refused-create@2:4`; the plan once called both `refused-create@4`,
    so selecting one replayed both."""
    from bitstrace.analyzer.analysis import analyze

    paths = []
    for number in range(2):
        conv = Conversation()
        conv.send(number, 0, request("Create-Session"), 100 * number)
        conv.send(number, 1, ack(400, error="0x80070057", reason="Bad Request"), 100 * number + 1)
        paths.append(conv.write(tmp_path / f"{number}.pcap"))
    keys = [s.key for s in analyze(paths).bits.sessions]
    assert keys == ["refused-create@1:4", "refused-create@2:4"]
    with build_plan(paths) as plan:
        assert [s.key for s in plan.sessions] == keys
    with build_plan(paths, [keys[1]]) as plan:
        assert [(s.key, s.requests[0].file) for s in plan.sessions] == [(keys[1], 1)]


def test_spool_reads_what_it_holds_back_and_what_it_wrote() -> None:
    """Small appends are written in batches, large ones at once: bodies still held back,
    written with a batch, or written alone all read back whole, in any order."""
    spool = BodySpool()

    def add(data: bytes) -> SpooledBody:
        return SpooledBody(((spool.append(data), len(data)),), len(data), True, None)

    try:
        first = os.urandom(1000)
        bodies = {add(first): first}
        assert b"".join(spool.read(next(iter(bodies)))) == first  # read while held back
        for size in (4000,) * (SPOOL_BATCH // 4000 + 5) + (SPOOL_BATCH + 12345, 3, 70_000, 5):
            data = os.urandom(size)
            bodies[add(data)] = data
        large = next(body for body in bodies if body.length > SPOOL_BATCH)
        assert b"".join(spool.read(large, 10, 5000, chunk=777)) == bodies[large][10:5010]
        assert [b"".join(spool.read(body)) for body in reversed(bodies)] == list(reversed(bodies.values()))
    finally:
        spool.close()
