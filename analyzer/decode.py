"""Frames → TCP Segments: link layer, IPv4/IPv6 (fragments reassembled), TCP header.

This is the per-packet loop: headers are read with precompiled structs straight from the
frame's memoryview, and a Segment's payload is a view into the frame, never a copy. Only IP
fragments are copied, because they must outlive their frames until the datagram is whole.
Everything that is not TCP over IP is counted in `stats` and skipped; damaged headers are
counted and reported as bounded Problems (the first few per kind).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import NamedTuple

from bitstrace.analyzer.authority import format_authority
from bitstrace.analyzer.capture import (
    LINKTYPE_ETHERNET, LINKTYPE_IPV4, LINKTYPE_IPV6, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2,
    LINKTYPE_LOOP, LINKTYPE_NULL, LINKTYPE_RAW, Frame, FrameFields, new_frame,
)
from bitstrace.analyzer.problems import Problem, ProblemLog

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

#: Incomplete IP datagrams kept at once, and how long one may wait for its missing fragments
#: (Linux's ipfrag_time); older or excess ones are dropped with a Problem.
MAX_PENDING_DATAGRAMS = 1024
FRAGMENT_TIMEOUT_NS = 30 * 1_000_000_000

_ETHERTYPE_IPV4, _ETHERTYPE_IPV6 = 0x0800, 0x86DD
_VLAN_TAGS = frozenset((0x8100, 0x88A8, 0x9100))  # 802.1Q, 802.1ad (QinQ), old QinQ
_ETHERTYPE_VERSION = {_ETHERTYPE_IPV4: 4, _ETHERTYPE_IPV6: 6}
# BSD loopback address families: AF_INET is 2 everywhere, AF_INET6 differs per BSD.
_LOOPBACK_FAMILY_VERSION = {2: 4, 24: 6, 28: 6, 30: 6}
_RAW_IP_LINK_TYPES = frozenset((LINKTYPE_RAW, 12, 14))  # DLT_RAW as some BSDs numbered it
_PROTO_TCP = 6
# IPv6 extension headers sized (length + 1) * 8, and AH sized (length + 2) * 4.
_IPV6_EXTENSIONS = frozenset((0, 43, 60, 135, 139, 140))
_IPV6_AH, _IPV6_FRAGMENT = 51, 44

_unpack_ethertype = struct.Struct("!H").unpack_from
_unpack_ipv4 = struct.Struct("!BxHHHxB2x4s4s").unpack_from   # version/IHL, total length, id, flags/offset, proto, src, dst
_unpack_ipv6 = struct.Struct("!4xHB1x16s16s").unpack_from     # payload length, next header, src, dst
_unpack_ipv6_extension = struct.Struct("!BB").unpack_from      # next header, length
_unpack_ipv6_fragment_header = struct.Struct("!BxHI").unpack_from  # next header, offset/flags, id
_unpack_tcp = struct.Struct("!HHIIBBH").unpack_from           # ports, seq, ack, data offset, flags, window
_unpack_family = struct.Struct("<I").unpack_from
# Ethernet, IPv4 and TCP headers in one go, for the fast path: ethertype, version/IHL, total
# length, flags/fragment offset, protocol, src, dst, then the TCP fields as _unpack_tcp reads them.
_unpack_ether_ipv4_tcp = struct.Struct("!12xHBxH2xHxB2x4s4sHHIIBBH").unpack_from
_ETHER_IPV4_TCP_MIN = 14 + 20 + 20


#: A run over several capture files numbers its segments `file index * CAPTURE_FRAME_SPAN + frame
#: number`, so one TCP and HTTP pipeline spans them all and each frame still names its file.
CAPTURE_FRAME_SPAN = 1 << 40


def split_frame(frame: int) -> tuple[int, int]:
    """(file index, frame number in that file) of a Segment's frame."""
    return divmod(frame, CAPTURE_FRAME_SPAN)


class Segment(NamedTuple):
    frame: int  # the frame number; see CAPTURE_FRAME_SPAN for runs over several files
    ts_ns: int
    src: bytes
    sport: int
    dst: bytes
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: memoryview
    missing: int


#: Where the per-packet loop hands a Segment's fields, as arguments: TcpReassembler.receive.
SegmentReceiver = Callable[[int, int, bytes, int, bytes, int, int, int, int, int, memoryview, int], None]
#: A partition filter on a segment's (frame, src, sport, dst, dport), asked before `receive`:
#: a unit of a partitioned run passes on only its own connections (analyzer/partition.py).
SegmentFilter = Callable[[int, bytes, int, bytes, int], bool]


# The BITS layer formats the endpoints of every packet, and a capture holds few distinct ones:
# the caches spare the ipaddress module's cost per call and stay bounded on a scan of many hosts.
@lru_cache(maxsize=1 << 12)
def format_addr(addr: bytes) -> str:
    """`192.0.2.1` / `2001:db8::1`."""
    return str(ipaddress.ip_address(addr))


@lru_cache(maxsize=1 << 12)
def format_endpoint(addr: bytes, port: int) -> str:
    """`ip:port`, with IPv6 in brackets: `[::1]:8080`."""
    return format_authority(format_addr(addr), port)


class _Datagram:
    """An IP datagram waiting for its fragments."""

    __slots__ = ("first_ts_ns", "first_frame", "pieces", "total", "protocol")

    def __init__(self, ts_ns: int, frame: int) -> None:
        self.first_ts_ns = ts_ns
        self.first_frame = frame
        self.pieces: list[tuple[int, bytes]] = []
        self.total: int | None = None   # known once the last fragment arrived
        self.protocol: int | None = None  # known once the first fragment arrived

    def add(self, offset: int, data: bytes, last: bool) -> bytes | None:
        """Add one fragment; return the whole payload when nothing is missing any more."""
        self.pieces.append((offset, data))
        if last:
            self.total = offset + len(data)
        if self.total is None:
            return None
        covered = 0
        for start, piece in sorted(self.pieces):
            if start > covered:
                return None
            covered = max(covered, start + len(piece))
        if covered < self.total:
            return None
        whole = bytearray(self.total)
        # Later copies first, so that where fragments overlap the first copy received wins.
        for start, piece in reversed(self.pieces):
            whole[start:start + len(piece)] = piece[:max(0, self.total - start)]
        return bytes(whole)


class Decoder:
    """Decode frames one at a time; `decode` returns a Segment for TCP and None otherwise."""

    def __init__(self, file: str | None = None, capture: int = 0, keep: SegmentFilter | None = None) -> None:
        """`capture`: this file's index in a run over several files (numbers the segments).
        `keep`: only segments it accepts reach `receive`; every frame is still decoded and
        counted, so the statistics and problems are those of the whole file."""
        self.file = file
        self.keep = keep
        self._frame_base = capture * CAPTURE_FRAME_SPAN
        self.stats: dict[str, int] = dict.fromkeys((
            "frames", "tcp", "non_ip", "non_tcp", "ip_fragments", "reassembled_datagrams",
            "fragments_dropped", "malformed", "unknown_link_type", "cut_segments"), 0)
        self.problems: ProblemLog = ProblemLog()
        self._unknown_link_types: set[int] = set()
        self._pending: dict[tuple[object, ...], _Datagram] = {}

    def _problem(self, kind: str, message: str, frame: int) -> None:
        self.problems.report(Problem(kind, message, file=self.file, frame=frame))

    def _malformed(self, kind: str, message: str, frame: int) -> None:
        self.stats["malformed"] += 1
        self._problem(kind, message, frame)

    def decode_into(self, records: Iterable[FrameFields], receive: SegmentReceiver) -> Frame | None:
        """Decode each record (a Frame's fields, as CaptureReader.records() yields them) and pass
        the fields of each TCP Segment to `receive` (TcpReassembler.receive); return the last
        frame, or None if there was none.

        This is the per-packet loop. Its fast path takes the shape of nearly every frame:
        Ethernet, IPv4 without options, not a fragment, TCP with a sane header, all captured;
        it makes neither a Frame nor a Segment. Anything else (or anything odd) goes to
        `decode`, which decides and reports exactly, and gives the same for what the fast path
        takes (tests/analyzer/test_hot_paths.py holds them to it).
        """
        frame_base = self._frame_base
        decode = self.decode
        keep = self.keep
        fast = 0
        record = None
        for record in records:
            number, ts_ns, link_type, data, orig_len = record
            if link_type == LINKTYPE_ETHERNET and len(data) >= _ETHER_IPV4_TCP_MIN:
                (ethertype, version_ihl, total, fragment, protocol, src, dst,
                 sport, dport, seq, ack, data_offset, flags, window) = _unpack_ether_ipv4_tcp(data, 0)
                start = 34 + (data_offset >> 4) * 4
                end = 14 + total
                if (ethertype == _ETHERTYPE_IPV4 and version_ihl == 0x45 and protocol == _PROTO_TCP
                        and not fragment & 0x3FFF and 54 <= start <= end <= len(data) and end <= orig_len):
                    fast += 1
                    if keep is None or keep(frame_base + number, src, sport, dst, dport):
                        receive(frame_base + number, ts_ns, src, sport, dst, dport, seq, ack, flags, window,
                                data[start:end], 0)
                    continue
            segment = decode(new_frame(record))
            if segment is not None and (keep is None or keep(segment.frame, segment.src, segment.sport,
                                                             segment.dst, segment.dport)):
                receive(*segment)
        self.stats["frames"] += fast
        self.stats["tcp"] += fast
        return None if record is None else new_frame(record)

    def decode(self, frame: Frame) -> Segment | None:
        """One frame's TCP Segment, or None (counted in `stats`, damage reported in `problems`)."""
        self.stats["frames"] += 1
        data = frame.data
        if type(data) is not memoryview:
            data = memoryview(data)
        link_type = frame.link_type
        try:
            if link_type == LINKTYPE_ETHERNET:
                offset = 14
                ethertype = _unpack_ethertype(data, 12)[0]
                while ethertype in _VLAN_TAGS:
                    ethertype = _unpack_ethertype(data, offset + 2)[0]
                    offset += 4
                version = _ETHERTYPE_VERSION.get(ethertype, 0)
            else:
                version, offset = self._link(link_type, data, frame.number)
        except (struct.error, IndexError):
            self._malformed("truncated-link-header", "frame too short for its link-layer header", frame.number)
            return None
        if version == 4:
            return self._ipv4(frame, data, offset)
        if version == 6:
            return self._ipv6(frame, data, offset)
        if version == 0:
            self.stats["non_ip"] += 1
        return None

    def _link(self, link_type: int, data: memoryview, number: int) -> tuple[int, int]:
        """(IP version or 0 for non-IP or -1 for an unknown link type, offset of the IP header)."""
        if link_type in _RAW_IP_LINK_TYPES:
            return data[0] >> 4, 0
        if link_type == LINKTYPE_LINUX_SLL2:
            ethertype, offset = _unpack_ethertype(data, 0)[0], 20
        elif link_type == LINKTYPE_LINUX_SLL:
            ethertype, offset = _unpack_ethertype(data, 14)[0], 16
        elif link_type == LINKTYPE_NULL or link_type == LINKTYPE_LOOP:
            family = _unpack_family(data, 0)[0]
            if family > 0xFFFF:  # written in the other byte order
                family = int.from_bytes(data[:4], "big")
            return _LOOPBACK_FAMILY_VERSION.get(family, 0), 4
        elif link_type == LINKTYPE_IPV4:
            return 4, 0
        elif link_type == LINKTYPE_IPV6:
            return 6, 0
        else:
            self.stats["unknown_link_type"] += 1
            if link_type not in self._unknown_link_types:
                self._unknown_link_types.add(link_type)
                self._problem("unknown-link-type", f"link type {link_type} is not decoded; its frames are skipped",
                              number)
            return -1, 0
        while ethertype in _VLAN_TAGS:
            ethertype = _unpack_ethertype(data, offset + 2)[0]
            offset += 4
        return _ETHERTYPE_VERSION.get(ethertype, 0), offset

    def _ipv4(self, frame: Frame, data: memoryview, offset: int) -> Segment | None:
        size = len(data)
        if size - offset < 20:
            self._malformed("truncated-ip", "IPv4 header cut short", frame.number)
            return None
        version_ihl, total, ident, fragment, protocol, src, dst = _unpack_ipv4(data, offset)
        header = (version_ihl & 0x0F) * 4
        if total == 0:  # segmentation offload on the capturing host leaves the length unset
            total = size - offset
        if version_ihl >> 4 != 4 or header < 20 or total < header or offset + total > frame.orig_len:
            self._malformed("malformed-ip", f"bad IPv4 header (version/IHL {version_ihl:#04x}, "
                            f"total length {total})", frame.number)
            return None
        if offset + header > size:
            self._malformed("truncated-ip", "IPv4 header cut short", frame.number)
            return None
        if fragment & 0x3FFF:  # more-fragments flag or a fragment offset
            self.stats["ip_fragments"] += 1
            if protocol != _PROTO_TCP:
                self.stats["non_tcp"] += 1
                return None
            end = offset + total
            if end > size:
                self._cut_fragment(frame)
                return None
            datagram = self._reassemble(frame, (4, src, dst, protocol, ident), (fragment & 0x1FFF) * 8,
                                        data[offset + header:end], not fragment & 0x2000, protocol)
            if datagram is None:
                return None
            whole, _protocol = datagram
            return self._tcp(frame, memoryview(whole), 0, len(whole), len(whole), src, dst)
        if protocol != _PROTO_TCP:
            self.stats["non_tcp"] += 1
            return None
        end = offset + total
        return self._tcp(frame, data, offset + header, end, end if end < size else size, src, dst)

    def _ipv6(self, frame: Frame, data: memoryview, offset: int) -> Segment | None:
        size = len(data)
        if size - offset < 40:
            self._malformed("truncated-ip", "IPv6 header cut short", frame.number)
            return None
        if data[offset] >> 4 != 6:
            self._malformed("malformed-ip", f"bad IPv6 version {data[offset] >> 4}", frame.number)
            return None
        length, next_header, src, dst = _unpack_ipv6(data, offset)
        offset += 40
        end = offset + length if length else size  # length 0: a jumbogram; trust the capture
        if end > frame.orig_len:
            self._malformed("malformed-ip", f"IPv6 payload length {length} runs past the packet", frame.number)
            return None
        return self._ipv6_payload(frame, next_header, data, offset, end, end if end < size else size, src, dst)

    def _ipv6_payload(self, frame: Frame, next_header: int, data: memoryview, offset: int, end: int,
                      captured_end: int, src: bytes, dst: bytes) -> Segment | None:
        """Walk the extension headers from `offset` (in a frame or a reassembled datagram) to TCP."""
        try:
            while next_header != _PROTO_TCP:
                if next_header in _IPV6_EXTENSIONS:
                    next_header, extension = _unpack_ipv6_extension(data, offset)
                    offset += (extension + 1) * 8
                elif next_header == _IPV6_AH:
                    next_header, extension = _unpack_ipv6_extension(data, offset)
                    offset += (extension + 2) * 4
                elif next_header == _IPV6_FRAGMENT:
                    next_header, fragment, ident = _unpack_ipv6_fragment_header(data, offset)
                    offset += 8
                    if fragment & 0xFFF9:  # not an atomic fragment (offset 0, no more fragments)
                        return self._ipv6_fragment(frame, next_header, fragment, ident, data, offset, end, src, dst)
                else:  # ICMPv6, UDP, ESP, no next header...
                    self.stats["non_tcp"] += 1
                    return None
                if offset > captured_end:
                    raise struct.error
        except struct.error:
            self._malformed("truncated-ip", "IPv6 extension headers run past the captured data", frame.number)
            return None
        return self._tcp(frame, data, offset, end, captured_end, src, dst)

    def _ipv6_fragment(self, frame: Frame, next_header: int, fragment: int, ident: int, data: memoryview,
                       offset: int, end: int, src: bytes, dst: bytes) -> Segment | None:
        self.stats["ip_fragments"] += 1
        if end > len(data):
            self._cut_fragment(frame)
            return None
        datagram = self._reassemble(frame, (6, src, dst, ident), fragment & 0xFFF8, data[offset:end],
                                    not fragment & 1, next_header if fragment & 0xFFF8 == 0 else None)
        if datagram is None:
            return None
        whole, protocol = datagram
        return self._ipv6_payload(frame, protocol, memoryview(whole), 0, len(whole), len(whole), src, dst)

    def _cut_fragment(self, frame: Frame) -> None:
        self.stats["fragments_dropped"] += 1
        self._problem("fragment-cut", "IP fragment cut by the snapshot length; its datagram cannot be "
                      "rebuilt", frame.number)

    def _reassemble(self, frame: Frame, key: tuple[object, ...], offset: int, piece: memoryview, last: bool,
                    protocol: int | None) -> tuple[bytes, int] | None:
        """Add a fragment; return (payload, protocol) once its datagram is whole."""
        pending = self._pending
        self._expire(frame)
        datagram = pending.get(key)
        if datagram is None:
            datagram = pending[key] = _Datagram(frame.ts_ns, frame.number)
        if protocol is not None:
            datagram.protocol = protocol
        if offset + len(piece) > 65535:
            del pending[key]
            self._malformed("malformed-ip", "IP fragment reaches past 65535 bytes", frame.number)
            return None
        whole = datagram.add(offset, bytes(piece), last)
        if whole is None:
            return None
        del pending[key]
        self.stats["reassembled_datagrams"] += 1
        if datagram.protocol is None:  # the first fragment names the protocol; none came
            return None
        return whole, datagram.protocol

    def _expire(self, frame: Frame) -> None:
        pending = self._pending
        while pending:
            key, oldest = next(iter(pending.items()))
            if frame.ts_ns - oldest.first_ts_ns > FRAGMENT_TIMEOUT_NS:
                why = f"was not completed within {FRAGMENT_TIMEOUT_NS // 1_000_000_000} s"
            elif len(pending) >= MAX_PENDING_DATAGRAMS:
                why = f"was dropped: more than {MAX_PENDING_DATAGRAMS} datagrams were incomplete"
            else:
                return
            del pending[key]
            self._drop(oldest, why)

    def _drop(self, datagram: _Datagram, why: str) -> None:
        self.stats["fragments_dropped"] += len(datagram.pieces)
        self._problem("fragments-dropped", f"IP datagram first seen in frame {datagram.first_frame} {why} "
                      f"({len(datagram.pieces)} fragments dropped)", datagram.first_frame)

    def finish(self) -> None:
        """Report datagrams still waiting for fragments when the capture ends."""
        for datagram in self._pending.values():
            self._drop(datagram, "never got all its fragments")
        self._pending.clear()

    def _tcp(self, frame: Frame, data: memoryview, offset: int, end: int, captured_end: int, src: bytes,
             dst: bytes) -> Segment | None:
        if captured_end - offset < 20:
            self._malformed("truncated-tcp" if end - offset >= 20 else "malformed-tcp",
                            "TCP header cut short", frame.number)
            return None
        sport, dport, seq, ack, data_offset, flags, window = _unpack_tcp(data, offset)
        header = (data_offset >> 4) * 4
        if header < 20 or offset + header > end:
            self._malformed("malformed-tcp", f"bad TCP data offset {header}", frame.number)
            return None
        start = offset + header
        if start > captured_end:
            self._malformed("truncated-tcp", "TCP options cut short by the snapshot length", frame.number)
            return None
        self.stats["tcp"] += 1
        missing = end - captured_end
        if missing:
            self.stats["cut_segments"] += 1
        return Segment(self._frame_base + frame.number, frame.ts_ns, src, sport, dst, dport, seq, ack, flags,
                       window, data[start:captured_end], missing)
