"""Disordered copies of real captures, keeping every byte: what SPAN ports, TAP aggregators,
multi-queue NICs and mergecap'd two-tap captures make of a clean conversation.

    packets = read_packets("captures/clean-multi-fragment.pcap")
    write_pcap(path, skew(packets, TO_CLIENT, -2_000_000))

Each transformation takes and returns a list of `Packet` (the link-layer frame, its time, and
what its TCP header says) and leaves the input list alone; randomness comes from a seeded
`random.Random`, so a copy is the same at every run. `write_pcap` writes a nanosecond pcap,
`write_two_taps` a pcapng with one interface per direction as two taps merged by time give.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass, replace
from typing import Sequence

from bitstrace.analyzer.capture import CaptureReader
from bitstrace.analyzer.decode import Decoder
from bitstrace.analyzer.pcapng_writer import PcapngWriter

TO_SERVER, TO_CLIENT = 0, 1
SYN, FIN, RST, ACK = 0x02, 0x01, 0x04, 0x10
_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class Packet:
    ts_ns: int
    link_type: int
    data: bytes  # the frame as captured
    direction: int | None = None  # TO_SERVER / TO_CLIENT, None if not a TCP segment
    flags: int = 0
    seq: int = 0
    payload: int = 0  # TCP payload bytes
    stream_offset: int | None = None  # of the payload's first byte, when the SYN was seen

    @property
    def is_data(self) -> bool:
        return self.payload > 0


def read_packets(path: str | os.PathLike[str]) -> list[Packet]:
    """Every frame of a capture, each TCP segment with its direction (the side a SYN went to
    is the server; without a SYN, the lower port) and its stream offset."""
    reader = CaptureReader(os.fspath(path))
    records = list((number, ts, link, bytes(data), orig) for number, ts, link, data, orig in reader.records())
    segments: dict[int, tuple] = {}

    def receive(frame: int, ts_ns: int, src: bytes, sport: int, dst: bytes, dport: int, seq: int, ack: int,
                flags: int, window: int, payload: memoryview, missing: int) -> None:
        segments[frame] = (src, sport, dst, dport, seq, flags, len(payload))

    Decoder().decode_into(iter(records), receive)
    servers = {(dst, dport) for src, sport, dst, dport, seq, flags, size in segments.values()
               if flags & (SYN | ACK) == SYN}
    isn: dict[tuple, int] = {}
    for src, sport, dst, dport, seq, flags, size in segments.values():
        if flags & SYN:
            isn.setdefault((src, sport, dst, dport), seq)
    packets = []
    for number, ts, link, data, _orig in records:
        if number not in segments:
            packets.append(Packet(ts, link, data))
            continue
        src, sport, dst, dport, seq, flags, size = segments[number]
        if (dst, dport) in servers or ((src, sport) not in servers and sport > dport):
            direction = TO_SERVER
        else:
            direction = TO_CLIENT
        base = isn.get((src, sport, dst, dport))
        offset = (seq - base - 1) & _MASK if base is not None and size else None
        packets.append(Packet(ts, link, data, direction, flags, seq, size, offset))
    return packets


# -- transformations --

def skew(packets: Sequence[Packet], direction: int, delta_ns: int) -> list[Packet]:
    """One direction's tap clock `delta_ns` off (negative: behind), merged by time as mergecap
    does (a stable sort, so equal times keep their order)."""
    moved = [replace(p, ts_ns=p.ts_ns + delta_ns) if p.direction == direction else p for p in packets]
    return sorted(moved, key=lambda p: p.ts_ns)


def _bounded_shuffle(items: list[Packet], window: int, rng: random.Random) -> list[Packet]:
    """Each item moves fewer than `window` places."""
    keys = [index + rng.uniform(0, window) for index in range(len(items))]
    return [item for _, item in sorted(zip(keys, items), key=lambda pair: pair[0])]


def shuffle(packets: Sequence[Packet], window: int, seed: int = 1, per_direction: bool = False) -> list[Packet]:
    """Frames shuffled within `window` frames (timestamps stay each frame's own). Per direction:
    each direction's frames move among that direction's places only (the two taps are each in
    order with the other, not with themselves); else everything moves, SYN, FIN and ACKs too."""
    rng = random.Random(seed)
    if not per_direction:
        return _bounded_shuffle(list(packets), window, rng)
    result = list(packets)
    for direction in (TO_SERVER, TO_CLIENT):
        places = [i for i, p in enumerate(packets) if p.direction == direction]
        for place, packet in zip(places, _bounded_shuffle([packets[i] for i in places], window, rng)):
            result[place] = packet
    return result


def displace_handshakes_and_endings(packets: Sequence[Packet], by: int = 3) -> list[Packet]:
    """Every SYN and SYN-ACK recorded `by` frames late, every FIN and RST `by` frames early."""
    result = list(packets)
    for packet in [p for p in packets if p.flags & SYN]:
        at = result.index(packet)
        result.insert(min(at + by, len(result) - 1), result.pop(at))
    for packet in [p for p in packets if p.flags & (FIN | RST)]:
        at = result.index(packet)
        result.insert(max(at - by, 0), result.pop(at))
    return result


def duplicate(packets: Sequence[Packet], fraction: float, later: int = 5, seed: int = 1) -> list[Packet]:
    """`fraction` of the data frames recorded a second time, `later` frames on."""
    rng = random.Random(seed)
    result = list(packets)
    chosen = [p for p in packets if p.is_data and rng.random() < fraction]
    for packet in chosen:
        at = result.index(packet)
        result.insert(min(at + later, len(result)), packet)
    return result


def drop(packets: Sequence[Packet], lost: Sequence[Packet]) -> list[Packet]:
    """The control: these frames truly missing."""
    ids = {id(p) for p in lost}
    return [p for p in packets if id(p) not in ids]


# -- writing --

def write_pcap(path: str | os.PathLike[str], packets: Sequence[Packet]) -> None:
    """A nanosecond-resolution pcap of the packets in list order (all of one link type)."""
    link_types = {p.link_type for p in packets}
    assert len(link_types) == 1, "a pcap has one link type"
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, link_types.pop()))
        for p in packets:
            seconds, nanos = divmod(p.ts_ns, 1_000_000_000)
            out.write(struct.pack("<IIII", seconds, nanos, len(p.data), len(p.data)))
            out.write(p.data)


@dataclass(frozen=True)
class Tap:
    """One tap of a two-tap capture: its VLAN (None: untagged), its timestamp resolution
    (if_tsresol: 6 = microseconds, 9 = nanoseconds) and how far its clock is off."""

    vlan: int | None = None
    tsresol: int = 6
    clock_offset_ns: int = 0


def _tagged(frame: bytes, vlan: int | None) -> bytes:
    if vlan is None:
        return frame
    return frame[:12] + struct.pack(">HH", 0x8100, vlan) + frame[12:]  # 802.1Q after the MACs


def write_two_taps(path: str | os.PathLike[str], packets: Sequence[Packet],
                   to_server: Tap = Tap(vlan=10, tsresol=6, clock_offset_ns=0),
                   to_client: Tap = Tap(vlan=20, tsresol=9, clock_offset_ns=-3_000_000)) -> None:
    """A pcapng of two interfaces, one per direction, as mergecap makes of two taps: each frame
    tagged with its tap's VLAN and timed by its tap's clock at its tap's resolution, then all
    merged by (that) time. Frames that are not TCP go with the client→server tap. Ethernet only."""
    taps = (to_server, to_client)
    stamped = []
    for p in packets:
        assert p.link_type == 1, "VLAN tags are Ethernet's"
        interface = TO_CLIENT if p.direction == TO_CLIENT else TO_SERVER
        tap = taps[interface]
        unit = 10 ** (9 - tap.tsresol)
        stamped.append(((p.ts_ns + tap.clock_offset_ns) // unit * unit, interface, _tagged(p.data, tap.vlan)))
    stamped.sort(key=lambda item: item[0])
    with open(path, "wb") as out:
        writer = PcapngWriter(out)
        writer.section()
        for tap in taps:
            writer.interface(1, 262144, tap.tsresol)
        for ts_ns, interface, frame in stamped:
            writer.packet(interface, ts_ns, frame, len(frame))
