"""Writing pcapng (the pcapng specification, draft-ietf-opsawg-pcapng): section headers,
interface descriptions and enhanced packet blocks, with comments.

The blocks are declared with construct, as the reader declares the options it parses. Every
frame of a capture goes through `packet`, so the enhanced packet block's fixed header is packed
with struct in the same layout as its declaration (tests/analyzer/report/test_annotate.py checks that both
give the same bytes); the blocks that carry options (a comment) are built from the declaration.
Little-endian, as Wireshark and tcpdump write.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import BinaryIO

import construct as cs

BLOCK_SHB, BLOCK_IDB, BLOCK_EPB = 0x0A0D0D0A, 1, 6
OPTION_END, OPTION_COMMENT = 0, 1
OPTION_IF_TSRESOL = 9
BYTE_ORDER_MAGIC = 0x1A2B3C4D
#: Nanosecond timestamps: a pcap's micro- or nanosecond times and any pcapng's convert exactly.
TSRESOL_NS = 9

Option = cs.Struct(
    "code" / cs.Int16ul,
    "length" / cs.Rebuild(cs.Int16ul, cs.len_(cs.this.value)),
    "value" / cs.Bytes(cs.this.length),
    cs.Padding(-cs.this.length % 4),
)
_OPTION_END = Option.build({"code": OPTION_END, "value": b""})


def _block(block_type: int, body: cs.Construct) -> cs.Construct:
    """A block: type, total length, body padded to 32 bits, options, total length again."""
    return cs.Struct(
        "type" / cs.Const(block_type, cs.Int32ul),
        "length" / cs.Rebuild(cs.Int32ul, lambda this: 12 + len(body.build(this.body))),
        "body" / body,
        "length_again" / cs.Rebuild(cs.Int32ul, cs.this.length),
    )


def _with_options(*fields: cs.Construct) -> cs.Construct:
    return cs.Struct(*fields, "options" / cs.GreedyRange(Option))


SectionHeader = _block(BLOCK_SHB, _with_options(
    "magic" / cs.Const(BYTE_ORDER_MAGIC, cs.Int32ul),
    "major" / cs.Const(1, cs.Int16ul),
    "minor" / cs.Const(0, cs.Int16ul),
    "section_length" / cs.Const(-1, cs.Int64sl),  # not given: readers walk the blocks
))
InterfaceDescription = _block(BLOCK_IDB, _with_options(
    "link_type" / cs.Int16ul,
    "reserved" / cs.Const(0, cs.Int16ul),
    "snaplen" / cs.Int32ul,
))
EnhancedPacket = _block(BLOCK_EPB, _with_options(
    "interface" / cs.Int32ul,
    "ts_high" / cs.Int32ul,
    "ts_low" / cs.Int32ul,
    "captured" / cs.Rebuild(cs.Int32ul, cs.len_(cs.this.data)),
    "original" / cs.Int32ul,
    "data" / cs.Bytes(cs.this.captured),
    cs.Padding(-cs.this.captured % 4),
))
#: EnhancedPacket's type, length and fixed fields, for the frames that carry no option.
EPB_HEADER = struct.Struct("<IIIIIII")
_TRAILER = struct.Struct("<I")


def _options(comments: Sequence[str], more: Sequence[dict[str, object]] = ()) -> list[dict[str, object]]:
    options = list(more) + [{"code": OPTION_COMMENT, "value": text.encode("utf-8")} for text in comments]
    return options + [{"code": OPTION_END, "value": b""}] if options else []


class PcapngWriter:
    """Sections, interfaces and packets written in order to `stream`."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self._units_ns: list[int] = []  # by interface of the section: ns per timestamp unit

    @property
    def interfaces(self) -> int:
        return len(self._units_ns)

    def section(self, comments: Sequence[str] = ()) -> None:
        """A new section: the interfaces described before it are forgotten (the format's rule)."""
        self.stream.write(SectionHeader.build({"body": {"options": _options(comments)}}))
        self._units_ns = []

    def interface(self, link_type: int, snaplen: int = 0, tsresol: int = TSRESOL_NS) -> int:
        """Describes an interface whose timestamps count 10**-tsresol seconds (nanoseconds
        unless told); returns its index in the section."""
        option = {"code": OPTION_IF_TSRESOL, "value": bytes([tsresol])}
        self.stream.write(InterfaceDescription.build(
            {"body": {"link_type": link_type, "snaplen": snaplen, "options": _options((), [option])}}))
        self._units_ns.append(10 ** (9 - tsresol))
        return len(self._units_ns) - 1

    def packet(self, interface: int, ts_ns: int, data: bytes | memoryview, original: int,
               comments: Sequence[str] = ()) -> None:
        high, low = divmod(max(ts_ns, 0) // self._units_ns[interface], 1 << 32)
        if comments:
            self.stream.write(EnhancedPacket.build({"body": {
                "interface": interface, "ts_high": high, "ts_low": low, "original": original,
                "data": bytes(data), "options": _options(comments)}}))
            return
        captured = len(data)
        padding = -captured % 4
        length = 32 + captured + padding
        write = self.stream.write
        write(EPB_HEADER.pack(BLOCK_EPB, length, interface, high, low, captured, original))
        write(data)
        write(b"\0" * padding + _TRAILER.pack(length))
