"""TCP reassembly: unit cases for each rule, properties over reorderings, and tshark's stream ids."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitstrace.analyzer.capture import CaptureReader
from bitstrace.analyzer.decode import Decoder, Segment
from bitstrace.analyzer.tcp import (
    ACK, CLIENT, CLOSED_LINGER_NS, FIN, REORDER_WINDOW_NS, RST, SERVER, SYN, Connection, TcpReassembler,
)

PSH = 0x08
MASK = 0xFFFFFFFF


class RecordingSink:
    """Keeps every event in order, and each direction's bytes with gaps marked."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.streams: dict[tuple[int, int], bytearray] = defaultdict(bytearray)
        self.conns: dict[int, Connection] = {}

    def on_open(self, conn: Connection) -> None:
        self.conns[conn.id] = conn
        self.events.append(("open", conn.id))

    def on_data(self, conn, direction, data, frame, ts_ns) -> None:
        self.streams[(conn.id, direction)] += data
        self.events.append(("data", conn.id, direction, bytes(data), frame))

    def on_gap(self, conn, direction, size, frame, ts_ns) -> None:
        self.streams[(conn.id, direction)] += b"?" * size
        self.events.append(("gap", conn.id, direction, size))

    def on_conflict(self, conn, direction, offset, size, frame) -> None:
        self.events.append(("conflict", conn.id, direction, offset, size))

    def on_fin(self, conn, direction, frame, ts_ns) -> None:
        self.events.append(("fin", conn.id, direction))

    def on_rst(self, conn, direction, frame, ts_ns) -> None:
        self.events.append(("rst", conn.id, direction))

    def on_close(self, conn) -> None:
        self.events.append(("close", conn.id))

    def kinds(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]


class CountingSink(RecordingSink):
    """Counts stream lengths instead of keeping bytes: random gaps can be a gigabyte."""

    def __init__(self) -> None:
        super().__init__()
        self.lengths: dict[tuple[int, int], int] = defaultdict(int)

    def on_data(self, conn, direction, data, frame, ts_ns) -> None:
        self.lengths[(conn.id, direction)] += len(data)

    def on_gap(self, conn, direction, size, frame, ts_ns) -> None:
        self.lengths[(conn.id, direction)] += size


CLIENT_IP = bytes([10, 0, 0, 1])
SERVER_IP = bytes([10, 0, 0, 2])


class Flow:
    """Crafts segments of one connection by stream offset (offset 0 = byte after the ISN)."""

    def __init__(self, client_isn: int = 1000, server_isn: int = 5000,
                 cport: int = 50000, sport: int = 80) -> None:
        self.cisn, self.sisn = client_isn, server_isn
        self.cport, self.sport = cport, sport
        self.frame = 0
        self.clock_ns = 0  # added to every timestamp: moves the flow on in capture time

    def _segment(self, from_client: bool, seq: int, ack: int, flags: int,
                 data: bytes, missing: int) -> Segment:
        self.frame += 1
        ends = ((CLIENT_IP, self.cport), (SERVER_IP, self.sport))
        (src, sport), (dst, dport) = ends if from_client else ends[::-1]
        return Segment(self.frame, self.clock_ns + self.frame * 1000, src, sport, dst, dport, seq & MASK, ack & MASK,
                       flags, 65535, memoryview(data), missing)

    def syn(self) -> Segment:
        return self._segment(True, self.cisn, 0, SYN, b"", 0)

    def synack(self) -> Segment:
        return self._segment(False, self.sisn, self.cisn + 1, SYN | ACK, b"", 0)

    def c(self, offset: int, data: bytes = b"", flags: int = ACK | PSH, ack: int = 0,
          missing: int = 0) -> Segment:
        return self._segment(True, self.cisn + 1 + offset, self.sisn + 1 + ack, flags, data, missing)

    def s(self, offset: int, data: bytes = b"", flags: int = ACK | PSH, ack: int = 0,
          missing: int = 0) -> Segment:
        return self._segment(False, self.sisn + 1 + offset, self.cisn + 1 + ack, flags, data, missing)

    def handshake(self) -> list[Segment]:
        return [self.syn(), self.synack(), self.c(0, flags=ACK)]


def run(segments, max_buffer: int = 8 << 20) -> tuple[RecordingSink, TcpReassembler]:
    sink = RecordingSink()
    reassembler = TcpReassembler(sink, max_buffer=max_buffer)
    for segment in segments:
        reassembler.feed(segment)
    reassembler.finish()
    return sink, reassembler


# -- starting a connection --

def test_handshake_start_sets_roles_offsets_and_both_directions():
    f = Flow()
    sink, r = run(f.handshake() + [f.c(0, b"GET / HTTP/1.1\r\n\r\n"), f.s(0, b"HTTP/1.1 200 OK\r\n", ack=18)])
    conn = sink.conns[0]
    assert (conn.client, conn.server) == ((CLIENT_IP, 50000), (SERVER_IP, 80))
    assert conn.handshake_seen and conn.first_frame == 1 and conn.last_frame == 5
    assert bytes(sink.streams[(0, CLIENT)]) == b"GET / HTTP/1.1\r\n\r\n"
    assert bytes(sink.streams[(0, SERVER)]) == b"HTTP/1.1 200 OK\r\n"
    assert conn.data_bytes == (18, 17)
    assert sink.events[0] == ("open", 0) and sink.events[-1] == ("close", 0)
    assert r.connection_count == 1


def test_in_order_data_is_passed_through_without_copy():
    f = Flow()
    payload = bytearray(b"abc")
    segment = f.c(0, bytes(payload))
    seen = []

    class Sink(RecordingSink):
        def on_data(self, conn, direction, data, frame, ts_ns):
            seen.append(data)

    r = TcpReassembler(Sink())
    for s in f.handshake() + [segment]:
        r.feed(s)
    assert seen[0] is segment.payload


def test_mid_stream_start_takes_lower_port_as_server_and_first_seq_as_offset_zero():
    f = Flow(cport=50123, sport=8080)
    sink, _ = run([f.s(300, b"world", ack=700), f.c(700, b"hello", ack=305), f.c(705, b"!", ack=305)])
    conn = sink.conns[0]
    assert conn.server == (SERVER_IP, 8080) and conn.client == (CLIENT_IP, 50123)
    assert not conn.handshake_seen
    assert bytes(sink.streams[(0, CLIENT)]) == b"hello!"
    assert bytes(sink.streams[(0, SERVER)]) == b"world"
    assert not sink.kinds("gap")


def test_syn_ack_first_starts_client_stream_at_its_ack():
    f = Flow()
    sink, _ = run([f.synack(), f.c(5, b"later", flags=ACK), f.c(0, b"first")])
    assert sink.conns[0].client == (CLIENT_IP, 50000)
    assert bytes(sink.streams[(0, CLIENT)]) == b"firstlater"


# -- sequence numbers --

def test_stream_crosses_the_32_bit_wrap():
    f = Flow(client_isn=MASK - 5)
    data = bytes(range(40))
    sink, _ = run(f.handshake() + [f.c(i, data[i:i + 4]) for i in range(0, 40, 4)])
    assert bytes(sink.streams[(0, CLIENT)]) == data
    assert not sink.kinds("gap") and not sink.kinds("conflict")


def test_out_of_order_segments_are_buffered_and_delivered_in_order():
    f = Flow()
    sink, _ = run(f.handshake() + [f.c(8, b"ijkl"), f.c(4, b"efgh"), f.c(0, b"abcd")])
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdefghijkl"
    data = sink.kinds("data")
    assert [e[3] for e in data] == [b"abcd", b"efghijkl"]  # buffered runs are joined
    assert {e[4] for e in data} == {6}  # delivered when the hole closed


# -- retransmissions and overlaps --

def test_exact_retransmission_is_silent():
    f = Flow()
    sink, r = run(f.handshake() + [f.c(0, b"abcd"), f.c(0, b"abcd"), f.c(4, b"ef")])
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdef"
    assert not sink.kinds("conflict") and not sink.kinds("gap")


def test_partial_overlap_with_same_bytes_is_silent():
    f = Flow()
    sink, _ = run(f.handshake() + [f.c(0, b"abcd"), f.c(2, b"cdefgh"), f.c(6, b"ghij")])
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdefghij"
    assert not sink.kinds("conflict")


def test_conflicting_overlap_with_delivered_data_keeps_first_copy():
    f = Flow()
    sink, r = run(f.handshake() + [f.c(0, b"abcdef"), f.c(2, b"cXYfgh")])
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdefgh"
    assert sink.kinds("conflict") == [("conflict", 0, CLIENT, 3, 2)]
    assert sink.conns[0].conflicts == [1, 0] and r.stats["conflict_bytes"] == 2


def test_conflicting_overlap_with_buffered_data_keeps_first_copy():
    f = Flow()
    sink, _ = run(f.handshake() + [f.c(4, b"efgh"), f.c(0, b"abcdEFgh"), f.c(8, b"ij")])
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdefghij"
    assert sink.kinds("conflict") == [("conflict", 0, CLIENT, 4, 2)]


def test_in_order_segment_overlapping_buffered_data_keeps_the_buffered_copy():
    f = Flow()
    sink, _ = run(f.handshake() + [f.c(3, b"DEF"), f.c(0, b"abcdefg")])
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcDEFg"
    assert sink.kinds("conflict") == [("conflict", 0, CLIENT, 3, 3)]


def test_retransmissions_older_than_the_history_go_unchecked():
    f = Flow()
    sink = RecordingSink()
    r = TcpReassembler(sink, history=2)
    for s in f.handshake() + [f.c(0, b"aa"), f.c(2, b"bb"), f.c(4, b"cc"), f.c(0, b"XXXX"), f.c(3, b"YY")]:
        r.feed(s)
    # "aa" has left the history; each remaining delivered piece is compared on its own
    assert sink.kinds("conflict") == [("conflict", 0, CLIENT, 2, 2), ("conflict", 0, CLIENT, 3, 1),
                                      ("conflict", 0, CLIENT, 4, 1)]


# -- probes --

def test_keepalives_are_neither_data_nor_conflict():
    f = Flow()
    sink, _ = run(f.handshake() + [f.c(0, b"abcd"), f.c(3, b"", flags=ACK), f.c(3, b"\x00", flags=ACK),
                                   f.c(4, b"ef")])
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdef"
    assert not sink.kinds("conflict") and not sink.kinds("gap")
    assert sink.conns[0].keepalives == [1, 0]


def test_zero_window_probe_byte_and_its_retransmission():
    f = Flow()
    sink, _ = run(f.handshake() + [f.c(0, b"abcd"), f.c(4, b"e"), f.c(4, b"e"), f.c(4, b"efgh")])
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdefgh"
    assert not sink.kinds("conflict") and not sink.kinds("gap")


# -- FIN, RST, close --

def test_fin_is_delivered_in_order_and_later_data_is_dropped_and_counted():
    f = Flow()
    segments = f.handshake() + [f.c(4, b"ef", flags=ACK | FIN), f.c(0, b"abcd"), f.c(6, b"zz"),
                                f.s(0, b"", flags=ACK | FIN, ack=7)]
    sink, _ = run(segments)
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdef"
    kinds = [e[0] for e in sink.events]
    assert kinds == ["open", "data", "data", "fin", "fin", "close"]
    assert sink.conns[0].after_fin_bytes == [2, 0]
    assert not sink.kinds("gap")


def test_both_fins_close_before_finish_and_late_packets_stay_in_the_connection():
    f = Flow()
    segments = f.handshake() + [f.c(0, b"x", flags=ACK | FIN), f.s(0, flags=ACK | FIN, ack=2),
                                f.c(2, flags=ACK, ack=1), f.c(0, b"x", flags=ACK | FIN)]
    sink = RecordingSink()
    r = TcpReassembler(sink)
    for s in segments:
        r.feed(s)
    assert sink.events[-1] == ("close", 0)
    r.finish()
    assert len(sink.kinds("close")) == 1 and r.connection_count == 1


def test_a_closed_connection_keeps_its_late_packets_after_time_wait():
    """Late packets join their closed connection for CLOSED_LINGER_NS; when a connection closes
    after that, the connection is dropped but its 4-tuple still counts as it (as tshark counts
    it): a stray ACK or its SYN resent opens nothing, a SYN with another ISN a new connection."""
    first, other, third = Flow(cport=40000), Flow(cport=40001), Flow(cport=40002)

    def closing(f: Flow, at_ns: int) -> list[Segment]:
        segments = f.handshake() + [f.c(0, b"x", flags=ACK | FIN), f.s(0, flags=ACK | FIN, ack=2)]
        return [s._replace(ts_ns=at_ns) for s in segments]

    late, resent_syn = first.c(2, flags=ACK, ack=1), first.syn()
    after = 2 * CLOSED_LINGER_NS + 1
    reuse = Flow(cport=40000, client_isn=first.cisn + 7)
    sink, r = run(closing(first, 0) + closing(other, CLOSED_LINGER_NS) + [late._replace(ts_ns=CLOSED_LINGER_NS)]
                  + closing(third, after) + [late._replace(ts_ns=after), resent_syn._replace(ts_ns=after)]
                  + [s._replace(ts_ns=after) for s in reuse.handshake() + [reuse.c(0, b"new")]])
    assert sink.conns[0].last_ts_ns == CLOSED_LINGER_NS  # the ACK within the linger joined connection 0
    assert r.connection_count == 4  # the stray ACK and the resent SYN after it opened nothing
    assert sink.conns[3].client == (CLIENT_IP, 40000) and sink.conns[3].handshake_seen
    assert sink.streams[(3, CLIENT)] == b"new"


def test_a_closed_connection_still_talking_does_not_keep_the_others() -> None:
    """A closed connection whose peer keeps sending (a RST it ignored, keep-alives) stays known;
    the connections that close after it are still dropped once silent for CLOSED_LINGER_NS,
    or memory grows with every connection of the capture."""
    zombie = Flow(cport=39999)
    step = CLOSED_LINGER_NS // 20
    segments = [s._replace(ts_ns=0) for s in zombie.handshake() + [zombie.s(0, flags=RST | ACK)]]
    for n in range(1, 200):
        flow = Flow(cport=40000 + n)
        segments += [s._replace(ts_ns=n * step) for s in flow.handshake()
                     + [flow.c(0, b"x", flags=ACK | FIN), flow.s(0, flags=ACK | FIN, ack=2)]]
        segments.append(zombie.c(0, b"?", ack=0)._replace(ts_ns=n * step))
    sink, r = run(segments)
    assert sink.conns[0].last_ts_ns == 199 * step  # every late packet joined the closed connection
    assert len(r._closed) <= 22  # the last CLOSED_LINGER_NS of closed connections, and the talker


def test_closed_connections_keep_no_history() -> None:
    f = Flow()
    sink, r = run(f.handshake() + [f.c(0, b"abc"), f.c(3, b"", flags=ACK | FIN), f.s(0, flags=ACK | FIN, ack=4)])
    assert all(not half.history and half.history.maxlen == 0 for half in sink.conns[0]._halves)


def test_rst_closes_and_flushes_buffered_data_with_its_hole():
    f = Flow()
    sink, _ = run(f.handshake() + [f.c(0, b"ab"), f.c(4, b"ef"), f.s(0, flags=RST | ACK, ack=2)])
    assert sink.events[-4:] == [("rst", 0, SERVER), ("gap", 0, CLIENT, 2),
                                ("data", 0, CLIENT, b"ef", 6), ("close", 0)]


def test_a_new_syn_after_fin_with_a_new_isn_is_a_new_connection():
    first, second = Flow(client_isn=100), Flow(client_isn=900000)
    second.frame = 10
    segments = first.handshake() + [first.c(0, b"one", flags=ACK | FIN), first.s(0, flags=ACK | FIN, ack=4),
                                    first.c(4, flags=ACK, ack=1)]
    segments += second.handshake() + [second.c(0, b"two")]
    sink, r = run(segments)
    assert r.connection_count == 2
    assert bytes(sink.streams[(0, CLIENT)]) == b"one" and bytes(sink.streams[(1, CLIENT)]) == b"two"
    assert sink.conns[1].first_frame == 11


def test_a_syn_with_another_isn_on_an_open_4_tuple_closes_the_old_connection():
    first, second = Flow(client_isn=100), Flow(client_isn=70000)
    segments = first.handshake() + [first.c(0, b"old"), first.c(10, b"lost-before")]
    second.frame = first.frame
    segments += second.handshake() + [second.c(0, b"new")]
    sink, r = run(segments)
    assert r.connection_count == 2
    close_old = sink.events.index(("close", 0))
    assert sink.events[close_old - 2:close_old + 2] == [
        ("gap", 0, CLIENT, 7), ("data", 0, CLIENT, b"lost-before", 6), ("close", 0), ("open", 1)]
    assert bytes(sink.streams[(1, CLIENT)]) == b"new"


def test_a_retransmitted_syn_with_the_same_isn_after_rst_stays_in_the_connection():
    f = Flow()
    sink, r = run([f.syn(), f._segment(False, 0, f.cisn + 1, RST | ACK, b"", 0), f.syn()])
    assert r.connection_count == 1
    assert [e[0] for e in sink.events] == ["open", "rst", "close"]


def test_challenge_ack_from_time_wait_and_the_rst_it_draws_do_not_end_the_new_connection():
    f = Flow(client_isn=1000)
    challenge = f._segment(False, 777, f.cisn + 1 + 50_000, ACK, b"", 0)  # acks the old incarnation
    answer = f._segment(True, f.cisn + 1 + 50_000, 0, RST, b"", 0)
    sink, r = run([f.syn(), challenge, answer, f.syn(), f.synack(), f.c(0, b"hello")])
    assert r.connection_count == 1
    assert bytes(sink.streams[(0, CLIENT)]) == b"hello"
    assert [e[0] for e in sink.events] == ["open", "data", "close"]
    assert sink.conns[0].out_of_window == [1, 1]


# -- gaps --

def test_lost_segment_becomes_a_gap_at_finish_and_the_stream_goes_on():
    f = Flow()
    sink, r = run(f.handshake() + [f.c(0, b"abc"), f.c(6, b"ghi"), f.c(9, b"jk")])
    assert bytes(sink.streams[(0, CLIENT)]) == b"abc???ghijk"
    assert sink.kinds("gap") == [("gap", 0, CLIENT, 3)]
    assert sink.conns[0].gap_bytes == [3, 0] and sink.conns[0].data_bytes == (8, 0)
    assert sink.conns[0].position(CLIENT) == 11


def test_ack_of_unseen_bytes_and_later_data_wait_the_reordering_window_for_the_hole():
    f = Flow()
    sink = RecordingSink()
    r = TcpReassembler(sink)
    for s in f.handshake() + [f.c(0, b"abc"), f.s(0, flags=ACK, ack=6), f.c(6, b"ghi")]:
        r.feed(s)
    assert bytes(sink.streams[(0, CLIENT)]) == b"abc" and not sink.kinds("gap")
    f.clock_ns = REORDER_WINDOW_NS // 2
    r.feed(f.c(3, b"def"))  # late, within the window: kept
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdefghi" and not sink.kinds("gap")


def test_a_hole_is_declared_lost_once_the_window_has_passed_and_late_data_then_is_dropped():
    f = Flow()
    sink = RecordingSink()
    r = TcpReassembler(sink)
    for s in f.handshake() + [f.c(0, b"abc"), f.s(0, flags=ACK, ack=6), f.c(6, b"ghi")]:
        r.feed(s)
    f.clock_ns = REORDER_WINDOW_NS
    r.feed(f.c(9, b"jk"))  # the window since "ghi" (and the ACK) has passed: "def" is lost
    assert bytes(sink.streams[(0, CLIENT)]) == b"abc???ghijk"
    assert sink.kinds("gap") == [("gap", 0, CLIENT, 3)]
    r.feed(f.c(3, b"def"))
    r.finish()
    assert bytes(sink.streams[(0, CLIENT)]) == b"abc???ghijk"


def test_a_window_passing_on_another_connection_declares_a_silent_hole():
    f, other = Flow(), Flow(cport=50001)
    sink = RecordingSink()
    r = TcpReassembler(sink, reorder_window=0.5)
    for s in f.handshake() + [f.c(0, b"ab"), f.c(4, b"ef")]:
        r.feed(s)
    other.clock_ns = REORDER_WINDOW_NS
    r.feed(other.syn())
    assert sink.kinds("gap") == [("gap", 0, CLIENT, 2)]
    assert bytes(sink.streams[(0, CLIENT)]) == b"ab??ef"


def test_ack_ahead_of_the_data_is_no_evidence_of_loss_within_the_window():
    f = Flow()
    sink = RecordingSink()
    r = TcpReassembler(sink)
    segments = f.handshake() + [f.s(0, flags=ACK, ack=3 * i) for i in range(1, 200)]
    for s in segments:
        r.feed(s)
    for i in range(199):
        r.feed(f.c(3 * i, b"xyz"))
    r.finish()
    assert not sink.kinds("gap") and bytes(sink.streams[(0, CLIENT)]) == b"xyz" * 199


def test_the_fin_before_the_last_data_waits_for_it():
    f = Flow()
    segments = f.handshake() + [f.c(0, b"abc"), f.c(6, flags=ACK | FIN), f.s(0, flags=ACK | FIN, ack=7),
                                f.c(3, b"def"), f.c(7, flags=ACK)]
    sink, _ = run(segments)
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdef" and not sink.kinds("gap")
    assert sink.kinds("fin") == [("fin", 0, SERVER), ("fin", 0, CLIENT)]


def test_a_fin_after_a_hole_that_never_fills_is_a_gap_at_the_end():
    f = Flow()
    sink, _ = run(f.handshake() + [f.c(0, b"abc"), f.s(0, flags=ACK, ack=6), f.c(6, flags=ACK | FIN)])
    assert sink.kinds("gap") == [("gap", 0, CLIENT, 3)] and sink.kinds("fin") == [("fin", 0, CLIENT)]


def test_a_rst_recorded_before_the_last_data_waits_for_it():
    f = Flow()
    segments = f.handshake() + [f.c(0, b"abc"), f.s(0, flags=RST | ACK, ack=6), f.c(3, b"def"),
                                f.c(6, b"late")]
    sink, _ = run(segments)
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdef" and not sink.kinds("gap")
    assert [e[0] for e in sink.events[-3:]] == ["data", "rst", "close"]


def test_syn_and_syn_ack_recorded_after_the_first_packets_give_the_in_order_roles():
    f = Flow(cport=80, sport=50000)  # the client on the lower port: the guess from ports is wrong
    first_ack = f.c(0, flags=ACK)
    syn, synack = f.syn(), f.synack()
    sink, _ = run([first_ack, synack, syn, f.c(0, b"GET"), f.s(0, b"HTTP", ack=3)])
    conn = sink.conns[0]
    assert conn.client == (CLIENT_IP, 80) and conn.server == (SERVER_IP, 50000)
    assert bytes(sink.streams[(0, CLIENT)]) == b"GET" and bytes(sink.streams[(0, SERVER)]) == b"HTTP"


def test_data_recorded_before_the_syn_still_starts_at_the_byte_after_the_isn():
    f = Flow()
    second, first = f.c(3, b"def"), f.c(0, b"abc")
    syn, synack, ack = f.syn(), f.synack(), f.c(0, flags=ACK)
    sink, r = run([second, ack, first, syn, synack, f.s(0, b"ok", ack=6)])
    assert r.connection_count == 1 and sink.conns[0].handshake_seen
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdef" and bytes(sink.streams[(0, SERVER)]) == b"ok"
    assert not sink.kinds("gap")


def test_a_mid_stream_capture_starts_at_the_lowest_byte_seen_within_the_window():
    f = Flow()
    sink, _ = run([f.c(4, b"efgh"), f.c(0, b"abcd"), f.s(0, b"answer", ack=8), f.c(8, b"ijkl", ack=6)])
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdefghijkl" and bytes(sink.streams[(0, SERVER)]) == b"answer"
    data = [e[2] for e in sink.kinds("data")]
    assert data == [CLIENT, SERVER, CLIENT]  # the held request before its answer, as recorded
    assert not sink.kinds("gap")


def test_a_rst_acknowledging_bytes_of_a_side_not_yet_seen_waits_for_them():
    f = Flow()
    segments = [f.syn(), f.c(0, b"req", flags=ACK | PSH), f.c(3, flags=RST | ACK, ack=5),
                f.synack(), f.s(0, b"reply")]
    sink, _ = run(segments)
    assert bytes(sink.streams[(0, SERVER)]) == b"reply" and not sink.kinds("gap")
    assert [e[0] for e in sink.events[-2:]] == ["rst", "close"]


def test_a_global_budget_gives_way_the_oldest_hole_as_a_located_problem():
    flows = [Flow(cport=40000 + i) for i in range(3)]
    sink = RecordingSink()
    r = TcpReassembler(sink, max_buffered=2000, history=1)
    r.file = "t.pcap"
    for i, f in enumerate(flows):
        for s in f.handshake() + [f.c(0, b"a"), f.c(10, bytes(900))]:
            r.feed(s)
    problems = [p for p in r.problems if p.kind == "reassembly-budget"]
    assert [(p.connection, p.offset, p.file) for p in problems] == [(0, 1, "t.pcap")]
    assert sink.kinds("gap") == [("gap", 0, CLIENT, 9)]
    assert r._room >= 0  # within the budget


def test_ack_covering_the_fin_is_not_a_gap():
    f = Flow()
    sink, _ = run(f.handshake() + [f.c(0, b"ab", flags=ACK | FIN), f.s(0, flags=ACK, ack=3)])
    assert not sink.kinds("gap") and sink.kinds("fin") == [("fin", 0, CLIENT)]


def test_snaplen_cut_payload_is_a_gap_of_the_missing_size():
    f = Flow()
    sink, _ = run(f.handshake() + [f.c(0, b"abcd", missing=6), f.c(10, b"kl")])
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcd??????kl"
    assert sink.events[1:4] == [("data", 0, CLIENT, b"abcd", 4), ("gap", 0, CLIENT, 6),
                                ("data", 0, CLIENT, b"kl", 5)]


def test_buffer_limit_declares_a_gap_up_to_the_earliest_buffered_segment():
    f = Flow()
    segments = f.handshake() + [f.c(0, b"ab")] + [f.c(10 + 4 * i, b"wxyz") for i in range(5)]
    sink = RecordingSink()
    r = TcpReassembler(sink, max_buffer=16)
    for s in segments:
        r.feed(s)
    assert sink.kinds("gap") == [("gap", 0, CLIENT, 8)]
    assert bytes(sink.streams[(0, CLIENT)]) == b"ab" + b"?" * 8 + b"wxyz" * 5


def test_many_scattered_tiny_segments_are_bounded_too():
    f = Flow()
    scattered = [f.c(2 * i + 2, b"x" + bytes([i % 251])) for i in range(9000)]
    sink = RecordingSink()
    r = TcpReassembler(sink)
    for s in f.handshake() + [f.c(0, b"a")] + scattered:
        r.feed(s)
    assert sink.kinds("gap") == [] and len(sink.kinds("data")) == 1  # they abut: one run
    r.feed(f.c(30_000, b"far"))
    for i in range(9000):
        r.feed(f.c(40_000 + 3 * i, b"yy"))  # 9000 separate runs, past the run limit
    assert sink.kinds("gap")[:2] == [("gap", 0, CLIENT, 1), ("gap", 0, CLIENT, 30_000 - 18_002)]


def test_ack_past_a_hole_delivers_buffered_data_and_gaps_only_the_holes():
    f = Flow()
    segments = f.handshake() + [f.c(0, b"ab"), f.c(4, b"ef"), f.c(8, b"ij"), f.s(0, flags=ACK, ack=12)]
    sink, _ = run(segments)
    assert bytes(sink.streams[(0, CLIENT)]) == b"ab??ef??ij??"
    assert sink.kinds("gap") == [("gap", 0, CLIENT, 2)] * 3


def test_snaplen_cut_out_of_order_segment_leaves_its_tail_a_hole_until_filled():
    f = Flow()
    sink, _ = run(f.handshake() + [f.c(4, b"ef", missing=2), f.c(0, b"abcd"), f.c(6, b"GHij")])
    assert bytes(sink.streams[(0, CLIENT)]) == b"abcdefGHij"
    assert not sink.kinds("gap")


def test_finish_closes_every_open_connection_in_id_order():
    flows = [Flow(cport=40000 + i) for i in range(3)]
    segments = [flows[2].syn(), flows[0].syn(), flows[1].syn()]
    sink, _ = run(segments)
    assert sink.kinds("close") == [("close", 0), ("close", 1), ("close", 2)]
    assert [sink.conns[i].client[1] for i in range(3)] == [40002, 40000, 40001]


def test_stats_sum_over_connections():
    f = Flow()
    _, r = run(f.handshake() + [f.c(0, b"ab"), f.c(4, b"ef"), f.c(0, b"aX")])
    assert r.stats == {"connections": 1, "gaps": 1, "gap_bytes": 2, "conflicts": 1, "conflict_bytes": 1,
                       "keepalives": 0, "after_fin_bytes": 0, "out_of_window": 0}


# -- properties --

@st.composite
def shuffled_stream(draw):
    data = draw(st.binary(min_size=1, max_size=3000))
    isn = draw(st.one_of(st.integers(MASK - 3000, MASK), st.integers(0, MASK)))
    cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=30))) if len(data) > 1 else []
    bounds = [0, *cuts, len(data)]
    pieces = list(zip(bounds, bounds[1:]))
    extra = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 1500)), max_size=15))
    pieces += [(a, min(len(data), a + n)) for a, n in extra]
    order = draw(st.permutations(pieces))
    fin_at = draw(st.integers(0, len(order)))
    return data, isn, order, fin_at


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shuffled_stream())
def test_any_reordering_and_duplication_reassembles_the_original(case):
    data, isn, order, fin_at = case
    f = Flow(client_isn=isn)
    segments = [f.c(a, data[a:b]) for a, b in order]
    segments.insert(fin_at, f.c(len(data), flags=ACK | FIN))
    segments = f.handshake() + segments
    sink, _ = run(segments)
    assert bytes(sink.streams[(0, CLIENT)]) == data
    assert not sink.kinds("gap") and not sink.kinds("conflict")
    assert sink.kinds("fin") == [("fin", 0, CLIENT)]


@st.composite
def both_directions_interleaved(draw):
    """Both directions' data cut into segments (some twice), each segment acknowledging any
    point of the other direction's data, pure ACKs of any point, and both FINs: all in any order
    after the handshake, so ACKs often come before the data they acknowledge."""
    streams = [draw(st.binary(min_size=0, max_size=2000)) for _ in range(2)]
    segments = []
    for side, data in enumerate(streams):
        peer_size = len(streams[1 - side])
        cuts = sorted(draw(st.sets(st.integers(1, len(data) - 1), max_size=20))) if len(data) > 1 else []
        bounds = [0, *cuts, len(data)] if data else []
        pieces = list(zip(bounds, bounds[1:]))
        pieces += draw(st.lists(st.sampled_from(pieces), max_size=5)) if pieces else []
        for a, b in pieces:
            segments.append((side, a, data[a:b], ACK | PSH, draw(st.integers(0, peer_size))))
        for ack in draw(st.lists(st.integers(0, peer_size), max_size=8)):
            segments.append((side, len(data), b"", ACK, ack))
        segments.append((side, len(data), b"", ACK | FIN, draw(st.integers(0, peer_size))))
    return streams, draw(st.permutations(segments))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(both_directions_interleaved())
def test_any_interleaving_of_both_directions_and_their_acks_gives_the_in_order_streams(case):
    (to_server, to_client), segments = case
    f = Flow()
    crafted = [f.c(offset, data, flags=flags, ack=ack) if side == CLIENT else f.s(offset, data, flags=flags, ack=ack)
               for side, offset, data, flags, ack in segments]
    sink, _ = run(f.handshake() + crafted)  # a microsecond a frame: all within the reordering window
    assert bytes(sink.streams[(0, CLIENT)]) == to_server and bytes(sink.streams[(0, SERVER)]) == to_client
    assert not sink.kinds("gap") and not sink.kinds("conflict")
    assert sorted(sink.kinds("fin")) == [("fin", 0, CLIENT), ("fin", 0, SERVER)]
    assert sink.conns[0].closed


@st.composite
def conflicting_copies(draw):
    size = draw(st.integers(2, 400))
    copies = draw(st.lists(
        st.tuples(st.integers(0, size - 2), st.integers(2, 120), st.binary(min_size=120, max_size=120)),
        min_size=1, max_size=12))
    return size, copies


@settings(max_examples=150, deadline=None)
@given(conflicting_copies())
def test_conflicting_overlaps_keep_the_first_copy_and_name_each_difference(case):
    size, copies = case
    segments: list[tuple[int, bytes]] = [(a, body[:min(n, size - a)]) for a, n, body in copies]
    segments = [(a, b) for a, b in segments if len(b) >= 2]  # a 1-byte copy at next-1 is a keep-alive
    fill = bytes(size)
    segments.append((0, fill))  # the last copy covers everything, so no hole stays open
    first: dict[int, int] = {}
    differing: set[int] = set()
    for start, body in segments:
        for i, byte in enumerate(body):
            position = start + i
            if position not in first:
                first[position] = byte
            elif first[position] != byte:
                differing.add(position)
    f = Flow()
    sink, _ = run(f.handshake() + [f.c(a, b) for a, b in segments])
    assert bytes(sink.streams[(0, CLIENT)]) == bytes(first[i] for i in range(size))
    reported: set[int] = set()
    for _, _, _, offset, length in sink.kinds("conflict"):
        assert offset in differing and offset + length - 1 in differing
        reported.update(range(offset, offset + length))
    assert differing <= reported
    assert not sink.kinds("gap")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(
    st.integers(0, 3), st.booleans(), st.integers(0, MASK), st.integers(0, MASK),
    st.integers(0, 0x3F), st.binary(max_size=40), st.integers(0, 3000)), max_size=60),
    st.integers(1, 64))
def test_random_segment_soup_never_raises(soup, max_buffer):
    sink = CountingSink()
    r = TcpReassembler(sink, max_buffer=max_buffer)
    ports = (1000, 1001, 80, 443)
    for frame, (port, forward, seq, ack, flags, body, missing) in enumerate(soup, 1):
        ends = ((CLIENT_IP, ports[port]), (SERVER_IP, 80))
        (src, sp), (dst, dp) = ends if forward else ends[::-1]
        seq = seq if frame % 3 else seq % 4000  # keep some segments near each other
        r.feed(Segment(frame, frame, src, sp, dst, dp, seq, ack, flags, 0, memoryview(body),
                       missing if frame % 5 == 0 else 0))
    r.finish()
    assert [e[1] for e in sink.kinds("open")] == list(range(r.connection_count))
    assert sorted(e[1] for e in sink.kinds("close")) == list(range(r.connection_count))
    for conn in sink.conns.values():
        for direction in (CLIENT, SERVER):
            assert sink.lengths[(conn.id, direction)] == conn.position(direction)


# -- the oracle: tshark's tcp.stream, on crafted and on real loopback captures --

def _frames_to_segments(path: Path) -> list[Segment]:
    decoder = Decoder(file=str(path))
    return [s for s in map(decoder.decode, CaptureReader(path)) if s is not None]


def _tshark_streams(path: Path) -> list[int]:
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "tcp.stream"],
                         capture_output=True, text=True, check=True).stdout.split()
    return [int(x) for x in out]


def _our_streams(segments: list[Segment]) -> tuple[list[int], RecordingSink, TcpReassembler]:
    sink = RecordingSink()
    r = TcpReassembler(sink)
    ours = []
    for segment in segments:
        r.feed(segment)
        ours.append(next(c.id for c in sink.conns.values() if c.last_frame == segment.frame))
    r.finish()
    return ours, sink, r


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_connection_ids_match_tshark_tcp_stream(tmp_path: Path):
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    packets = []

    def add(segs: list[Segment]) -> None:
        for s in segs:
            packets.append(Ether() / IP(src=".".join(map(str, s.src)), dst=".".join(map(str, s.dst)))
                           / TCP(sport=s.sport, dport=s.dport, seq=s.seq, ack=s.ack, flags=s.flags)
                           / bytes(s.payload))

    a, b, c = Flow(cport=40001), Flow(cport=40002, client_isn=MASK - 2), Flow(cport=40003)
    add(a.handshake() + [a.c(0, b"req")])
    add([b.s(10, b"mid-stream"), b.c(3, b"hi", ack=20)])  # no handshake: mid-stream
    add([c.syn(), c._segment(False, 0, c.cisn + 1, RST | ACK, b"", 0), c.syn()])  # refused, retried
    add([a.s(0, b"resp", ack=3), a.c(3, flags=ACK | FIN, ack=4), a.s(4, flags=ACK | FIN, ack=4)])
    reuse = Flow(cport=40001, client_isn=random.Random(7).randrange(1 << 32))
    add(reuse.handshake() + [reuse.c(0, b"again")])
    fresh_isn = Flow(cport=40002, client_isn=12345)  # a SYN with another ISN on an open 4-tuple
    add(fresh_isn.handshake())
    d = Flow(cport=40004)  # opened by a bare RST; then the silent side sends SYNs, twice another ISN
    add([d._segment(True, 99, 0, RST, b"", 0), d.synack(), d.s(0, b"x"),
         d._segment(False, 777, 0, SYN, b"", 0), d._segment(False, 778, 0, SYN, b"", 0)])
    e = Flow(cport=40005)  # the SYN-ACK seen first, then the SYN it answers, then another SYN
    add([e.synack(), e.syn(), e.c(0, b"y"), Flow(cport=40005, client_isn=3).syn()])
    path = tmp_path / "streams.pcap"
    wrpcap(str(path), packets)

    ours, _, r = _our_streams(_frames_to_segments(path))
    assert ours == _tshark_streams(path)
    assert r.connection_count == 10


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_connection_ids_match_tshark_after_minutes_of_silence(tmp_path: Path):
    """tshark never forgets a 4-tuple: packets of a connection closed minutes ago (a stray ACK,
    its SYN resent) stay in its stream, and the connections after them keep their numbers."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    from tests.support.craft import pcap_bytes

    records = []

    def add(segs: list[Segment], at_s: int) -> None:
        for s in segs:
            packet = (Ether() / IP(src=".".join(map(str, s.src)), dst=".".join(map(str, s.dst)))
                      / TCP(sport=s.sport, dport=s.dport, seq=s.seq, ack=s.ack, flags=s.flags) / bytes(s.payload))
            records.append((at_s * 1_000_000_000 + len(records), packet))

    linger_s = CLOSED_LINGER_NS // 1_000_000_000
    flows = [Flow(cport=port) for port in (40000, 40001, 40002, 40003)]
    for at_s, flow in zip((0, linger_s + 10, 2 * linger_s + 20, 3 * linger_s), flows):
        add(flow.handshake() + [flow.c(0, b"x", flags=ACK | FIN), flow.s(0, flags=ACK | FIN, ack=2)], at_s)
        if flow is flows[1]:
            add([flows[0].c(2, flags=ACK, ack=1)], at_s + 1)  # 4-tuple 0 forgotten by now: a stray ACK
        if flow is flows[2]:
            add([flows[0].syn(), flows[1].c(2, flags=RST, ack=1)], at_s + 1)  # SYN resent, stray RST
    path = tmp_path / "silence.pcap"
    path.write_bytes(pcap_bytes(records))

    sink, r = run(_frames_to_segments(path))
    theirs = _tshark_streams(path)
    assert {conn.id: theirs[conn.first_frame - 1] for conn in sink.conns.values()} == {i: i for i in range(4)}
    assert r.connection_count == len(set(theirs)) == 4


def _serve(server: socket.socket, replies: list[bytes], received: list[bytes]) -> None:
    """Each connection: read a length-prefixed request, answer, and close first (server TIME_WAIT)."""
    for reply in replies:
        conn, _ = server.accept()
        with conn:
            size = int.from_bytes(_read_exactly(conn, 8), "big")
            received.append(_read_exactly(conn, size))
            conn.sendall(reply)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


@pytest.mark.needs_root
@pytest.mark.skipif(shutil.which("tcpdump") is None or shutil.which("tshark") is None
                    or os.geteuid() != 0, reason="needs root, tcpdump and tshark")
def test_real_loopback_capture_reassembles_what_was_sent(tmp_path: Path):
    rng = random.Random(11)
    requests = [rng.randbytes(n) for n in (700_000, 3, 150_000)]
    replies = [rng.randbytes(n) for n in (20_000, 400_000, 1)]
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    path = tmp_path / "lo.pcap"
    dump = subprocess.Popen(["tcpdump", "-i", "lo", "-U", "--immediate-mode", "-B", "16384", "-w", str(path),
                             f"tcp port {port}"], stderr=subprocess.PIPE, text=True)
    try:
        while "listening on" not in (line := dump.stderr.readline()):
            assert line, "tcpdump did not start"
        received: list[bytes] = []
        serving = threading.Thread(target=_serve, args=(server, replies, received))
        serving.start()
        client_port = None
        answers: list[bytes] = []
        for request in requests:
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            client.settimeout(10)
            if client_port is not None:
                client.bind(("127.0.0.1", client_port))  # the same 4-tuple again: port reuse
            client.connect(("127.0.0.1", port))
            client_port = client.getsockname()[1]
            client.sendall(len(request).to_bytes(8, "big") + request)
            answer = bytearray()
            while chunk := client.recv(1 << 16):
                answer += chunk
            answers.append(bytes(answer))
            client.close()
        serving.join(10)
        time.sleep(0.2)  # let the last ACKs reach the capture
    finally:
        dump.terminate()
        dump.wait(10)
        server.close()
    assert received == requests and answers == replies

    ours, sink, r = _our_streams(_frames_to_segments(path))
    assert ours == _tshark_streams(path)
    assert r.connection_count == 3
    for index in range(3):
        conn = sink.conns[index]
        assert conn.handshake_seen and conn.client[1] == client_port
        assert bytes(sink.streams[(index, CLIENT)]) == len(requests[index]).to_bytes(8, "big") + requests[index]
        assert bytes(sink.streams[(index, SERVER)]) == replies[index]
    assert r.stats["gaps"] == 0 and r.stats["conflicts"] == 0
    assert sink.kinds("close") == [("close", 0), ("close", 1), ("close", 2)]
