"""Throughput of TcpReassembler.receive (what the per-packet loop calls with each segment's
fields), in segments per second, with a sink that does nothing.

Cases: in-order 1460-byte data segments (the hot path, segments prebuilt so only receive() is
timed), the same with every other segment a pure ACK from the peer, and adjacent pairs swapped
(each second segment buffered and drained: the slow path).

    .venv/bin/python bench/tcp_feed.py [N]
"""

from __future__ import annotations

import sys
import time

from bitstrace.analyzer.decode import Segment
from bitstrace.analyzer.tcp import ACK, SYN, TcpReassembler

CLIENT, SERVER = (bytes([192, 0, 2, 1]), 40000), (bytes([192, 0, 2, 2]), 80)
SIZE = 1460
ISN = 0xFFFF0000  # crosses the 32-bit wrap early on


class NullSink:
    def on_open(self, conn): pass
    def on_data(self, conn, direction, data, frame, ts_ns): pass
    def on_gap(self, conn, direction, size, frame, ts_ns): pass
    def on_conflict(self, conn, direction, offset, size, frame): pass
    def on_fin(self, conn, direction, frame, ts_ns): pass
    def on_rst(self, conn, direction, frame, ts_ns): pass
    def on_close(self, conn): pass


def segment(frame: int, forward: bool, seq: int, ack: int, flags: int, payload: memoryview) -> Segment:
    (src, sport), (dst, dport) = (CLIENT, SERVER) if forward else (SERVER, CLIENT)
    return Segment(frame, frame * 1000, src, sport, dst, dport, seq & 0xFFFFFFFF, ack, flags, 65535,
                   payload, 0)


def build(count: int, with_acks: bool, swapped: bool) -> list[Segment]:
    payload = memoryview(b"x" * SIZE)
    empty = memoryview(b"")
    out = [segment(1, True, ISN, 0, SYN, empty), segment(2, False, 7, ISN + 1, SYN | ACK, empty)]
    data = [segment(3 + i, True, ISN + 1 + i * SIZE, 8, ACK, payload) for i in range(count)]
    if swapped:
        for i in range(0, count - 1, 2):
            data[i], data[i + 1] = data[i + 1], data[i]
    for i, seg in enumerate(data):
        out.append(seg)
        if with_acks:
            out.append(segment(seg.frame, False, 8, (ISN + 1 + (i + 1) * SIZE) & 0xFFFFFFFF, ACK, empty))
    return out


def timed(label: str, segments: list[Segment], repeats: int = 5) -> None:
    """Best of `repeats` runs: the machine is shared, the minimum is the least disturbed."""
    elapsed = float("inf")
    for _ in range(repeats):
        reassembler = TcpReassembler(NullSink())
        receive = reassembler.receive
        start = time.perf_counter()
        for seg in segments:
            receive(*seg)
        reassembler.finish()
        elapsed = min(elapsed, time.perf_counter() - start)
    payload = sum(len(seg.payload) for seg in segments)
    print(f"{label:<36} {len(segments):>9} segments  {len(segments) / elapsed:>11,.0f} segments/s  "
          f"{payload * 8 / elapsed / 1e9:>5.2f} Gbit/s of payload")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    timed("in-order 1460-byte data", build(count, with_acks=False, swapped=False))
    timed("in-order data + peer ACK each", build(count, with_acks=True, swapped=False))
    timed("adjacent pairs swapped (buffered)", build(count, with_acks=False, swapped=True))


if __name__ == "__main__":
    main()
