"""Capture-file builders for tests: pcap, pcapng and gzip from scapy packets (or raw bytes).

pcap: `pcap_bytes([(ts_ns, packet), ...], link_type=..., byte_order="<" | ">", nanosecond=...)`.
pcapng: concatenate blocks: `shb()`, `idb(link_type, tsresol=..., tsoffset=...)`, `epb(...)`,
`spb(...)`, `opb(...)`, `block(type, body)` (any other block), each in the byte order of its
section. `write(path, data, compress=True)` writes it, gzip-compressed if asked.
Packets longer than `snaplen` are cut, keeping their wire length, as a capturing tool would.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterable

import construct as cs

from scapy.packet import Packet

Packetish = Packet | bytes


def raw(packet: Packetish) -> bytes:
    return bytes(packet)


def pcap_bytes(records: Iterable[tuple[int, Packetish]], link_type: int = 1, byte_order: str = "<",
               nanosecond: bool = False, snaplen: int = 262144) -> bytes:
    magic = 0xA1B23C4D if nanosecond else 0xA1B2C3D4
    per_second = 1_000_000_000 if nanosecond else 1_000_000
    out = [struct.pack(byte_order + "IHHiIII", magic, 2, 4, 0, 0, snaplen, link_type)]
    for ts_ns, packet in records:
        data = raw(packet)
        seconds, rest = divmod(ts_ns, 1_000_000_000)
        fraction = rest * per_second // 1_000_000_000
        captured = data[:snaplen]
        out.append(struct.pack(byte_order + "IIII", seconds, fraction, len(captured), len(data)))
        out.append(captured)
    return b"".join(out)


def _option_list(byte_order: str) -> cs.Construct:
    int16 = cs.Int16ul if byte_order == "<" else cs.Int16ub
    return cs.GreedyRange(cs.Struct(
        "code" / int16,
        "length" / cs.Rebuild(int16, cs.len_(cs.this.value)),
        "value" / cs.Bytes(cs.this.length),
        cs.Padding(-cs.this.length % 4),
    ))


def options(byte_order: str, pairs: Iterable[tuple[int, bytes]]) -> bytes:
    items = [dict(code=code, value=value) for code, value in pairs]
    if not items:
        return b""
    items.append(dict(code=0, value=b""))
    return _option_list(byte_order).build(items)


def block(block_type: int, body: bytes, byte_order: str = "<") -> bytes:
    body += b"\0" * (-len(body) % 4)
    length = len(body) + 12
    return struct.pack(byte_order + "II", block_type, length) + body + struct.pack(byte_order + "I", length)


def shb(byte_order: str = "<") -> bytes:
    body = struct.pack(byte_order + "IHHq", 0x1A2B3C4D, 1, 0, -1)
    body += options(byte_order, [(4, b"bitstrace tests")])  # shb_userappl
    return block(0x0A0D0D0A, body, byte_order)


def idb(link_type: int, byte_order: str = "<", snaplen: int = 0, tsresol: int | None = None,
        tsoffset: int | None = None) -> bytes:
    pairs = [(2, b"eth-test")]  # if_name
    if tsresol is not None:
        pairs.append((9, bytes([tsresol])))
    if tsoffset is not None:
        pairs.append((14, struct.pack(byte_order + "q", tsoffset)))
    return block(1, struct.pack(byte_order + "HHI", link_type, 0, snaplen) + options(byte_order, pairs), byte_order)


def epb(interface: int, ts_units: int, packet: Packetish, byte_order: str = "<", snaplen: int | None = None) -> bytes:
    data = raw(packet)
    captured = data[:snaplen] if snaplen is not None else data
    body = struct.pack(byte_order + "IIIII", interface, ts_units >> 32, ts_units & 0xFFFFFFFF,
                       len(captured), len(data))
    body += captured + b"\0" * (-len(captured) % 4) + options(byte_order, [(1, b"a comment")])
    return block(6, body, byte_order)


def opb(interface: int, ts_units: int, packet: Packetish, byte_order: str = "<") -> bytes:
    data = raw(packet)
    body = struct.pack(byte_order + "HHIIII", interface, 0, ts_units >> 32, ts_units & 0xFFFFFFFF,
                       len(data), len(data))
    return block(2, body + data, byte_order)


def spb(packet: Packetish, byte_order: str = "<", snaplen: int | None = None) -> bytes:
    data = raw(packet)
    captured = data[:snaplen] if snaplen is not None else data
    return block(3, struct.pack(byte_order + "I", len(data)) + captured, byte_order)


def write(path: str | os.PathLike, data: bytes, compress: bool = False) -> str:
    with open(path, "wb") as out:
        out.write(gzip.compress(data) if compress else data)
    return os.fspath(path)
