"""Decoder on crafted frames of every supported link type, IP variant and kind of damage."""

from __future__ import annotations

import io
import shutil
import socket
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (
    ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting,
    fragment6,
)
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet

from tests.support import craft
from bitstrace.analyzer import decode as decode_module
from bitstrace.analyzer.capture import CaptureReader, Frame
from bitstrace.analyzer.decode import ACK, FIN, PSH, SYN, Decoder, Segment, format_addr

T0 = 1_700_000_000_000_000_000
V4 = dict(src="192.0.2.1", dst="198.51.100.7")
V6 = dict(src="2001:db8::1", dst="2001:db8:ffff::2")
PAYLOAD = b"BITS_POST /upload HTTP/1.1\r\n" * 3


def tcp(payload: bytes = PAYLOAD, **fields) -> TCP:
    fields = dict(sport=49152, dport=8080, seq=0x89ABCDEF, ack=12345, flags="PA", window=1024) | fields
    return TCP(**fields) / payload


def ether() -> Ether:
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def expected(packet: Packet, number: int = 1, ts_ns: int = T0, missing: int = 0, cut: int | None = None) -> tuple:
    ip = packet[IPv6] if IPv6 in packet else packet[IP]
    family = socket.AF_INET6 if IPv6 in packet else socket.AF_INET
    segment = packet[TCP]
    payload = bytes(segment.payload)
    return (number, ts_ns, socket.inet_pton(family, ip.src), segment.sport, socket.inet_pton(family, ip.dst),
            segment.dport, segment.seq, segment.ack, int(segment.flags), segment.window,
            payload if cut is None else payload[:cut], missing)


def as_tuple(segment: Segment) -> tuple:
    return tuple(segment[:-2]) + (bytes(segment.payload), segment.missing)


def decode_one(link_type: int, data: bytes | Packet, decoder: Decoder | None = None, number: int = 1,
               ts_ns: int = T0, orig_len: int | None = None) -> Segment | None:
    data = bytes(data)
    decoder = decoder or Decoder("test.pcap")
    return decoder.decode(Frame(number, ts_ns, link_type, memoryview(data), len(data) if orig_len is None else orig_len))


def null_header(family: int, byte_order: str) -> bytes:
    return struct.pack(byte_order + "I", family)


IPV4 = IP(**V4) / tcp()
IPV6 = IPv6(**V6) / tcp(flags="S", seq=1)
IPV4_OPTIONS = IP(**V4, options=[b"\x01\x01\x01\x00", b"\x07\x07\x04" + b"\0" * 4]) / tcp()
LINK_CASES = {  # name: (link type, frame, the IP packet inside)
    "ethernet-ipv4-options": (1, ether() / IPV4_OPTIONS, IPV4_OPTIONS),
    "ethernet-ipv6": (1, ether() / IPV6, IPV6),
    "vlan": (1, ether() / Dot1Q(vlan=7) / IPV4, IPV4),
    "qinq-88a8": (1, ether() / Dot1AD(vlan=100) / Dot1Q(vlan=7) / IPV4, IPV4),
    "qinq-9100": (1, bytes(ether())[:12] + b"\x91\x00\x00\x64\x81\x00" + bytes(Dot1Q(vlan=7) / IPV6), IPV6),
    "sll": (113, CookedLinux(proto=0x0800) / IPV4, IPV4),
    "sll-vlan": (113, CookedLinux(proto=0x8100) / Dot1Q(vlan=3) / IPV6, IPV6),
    "sll2": (276, CookedLinuxV2(proto=0x86DD) / IPV6, IPV6),
    "raw-101": (101, IPV4, IPV4),
    "raw-12": (12, IPV6, IPV6),
    "raw-14": (14, IPV4, IPV4),
    "ipv4-228": (228, IPV4, IPV4),
    "ipv6-229": (229, IPV6, IPV6),
    "null-le-inet": (0, null_header(2, "<") + bytes(IPV4), IPV4),
    "null-be-inet": (0, null_header(2, ">") + bytes(IPV4), IPV4),
    **{f"null-{order}-inet6-{family}": (0, null_header(family, order) + bytes(IPV6), IPV6)
       for family in (24, 28, 30) for order in "<>"},
    "loop-inet": (108, null_header(2, ">") + bytes(IPV4), IPV4),
    "loop-inet6": (108, null_header(24, ">") + bytes(IPV6), IPV6),
}


@pytest.mark.parametrize("case", LINK_CASES)
def test_link_types(case):
    link_type, data, inner = LINK_CASES[case]
    decoder = Decoder("t")
    segment = decode_one(link_type, data, decoder)
    assert segment is not None, decoder.problems
    assert as_tuple(segment) == expected(inner)
    assert decoder.stats["tcp"] == 1 and decoder.stats["malformed"] == 0 and not decoder.problems


@pytest.mark.parametrize("extensions", [
    IPv6ExtHdrHopByHop(),
    IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=["2001:db8::9"]) / IPv6ExtHdrDestOpt(),
    IPv6ExtHdrDestOpt() / IPv6ExtHdrFragment(offset=0, m=0, id=5),  # an atomic fragment
])
def test_ipv6_extension_headers(extensions):
    packet = IPv6(**V6) / extensions / tcp()
    segment = decode_one(229, packet)
    assert as_tuple(segment) == expected(packet)


def test_flags_and_payload_view():
    decoder = Decoder()
    packet = ether() / IP(**V4) / tcp(flags="FA", payload=b"")
    segment = decode_one(1, packet, decoder)
    assert segment.flags == FIN | ACK and segment.payload.nbytes == 0
    data = bytes(ether() / IP(**V4) / tcp(flags="SP"))
    frame = Frame(3, T0, 1, memoryview(data), len(data))
    segment = decoder.decode(frame)
    assert segment.flags == SYN | PSH
    assert segment.payload.obj is data  # a view into the frame, not a copy


def test_ethernet_padding_is_not_payload():
    packet = ether() / IP(**V4) / tcp(payload=b"", flags="A")
    padded = bytes(packet) + b"\0" * (60 - len(packet))
    segment = decode_one(1, padded)
    assert bytes(segment.payload) == b"" and segment.missing == 0


@pytest.mark.parametrize("packet", [ether() / IP(**V4) / tcp(), ether() / IPv6(**V6) / IPv6ExtHdrHopByHop() / tcp()])
def test_snaplen_cut(packet):
    data = bytes(packet)
    cut = len(data) - 30
    decoder = Decoder()
    segment = decode_one(1, data[:cut], decoder, orig_len=len(data))
    header = len(data) - len(PAYLOAD)
    assert as_tuple(segment) == expected(packet, missing=30, cut=cut - header)
    assert decoder.stats["cut_segments"] == 1


def test_ipv4_length_zero_from_segmentation_offload():
    data = bytearray(bytes(ether() / IP(**V4) / tcp()))
    struct.pack_into("!H", data, 14 + 2, 0)
    segment = decode_one(1, bytes(data))
    assert bytes(segment.payload) == PAYLOAD and segment.missing == 0


def frames_of(packets: list, link_type: int = 1, first_number: int = 1, step_ns: int = 1000) -> list[Frame]:
    return [Frame(first_number + i, T0 + i * step_ns, link_type, memoryview(bytes(p)), len(p))
            for i, p in enumerate(packets)]


def test_ipv4_fragments_out_of_order():
    datagram = IP(**V4, id=4242) / tcp(payload=bytes(range(256)) * 12)
    pieces = fragment(datagram, fragsize=800)
    assert len(pieces) == 4
    order = [2, 0, 3, 1]
    decoder = Decoder()
    frames = frames_of([ether() / pieces[i] for i in order])
    results = [decoder.decode(frame) for frame in frames]
    assert results[:3] == [None, None, None]
    assert as_tuple(results[3]) == expected(datagram, number=4, ts_ns=T0 + 3000)
    assert decoder.stats["ip_fragments"] == 4 and decoder.stats["reassembled_datagrams"] == 1
    assert decoder.stats["tcp"] == 1 and not decoder.problems


def test_overlapping_fragments_keep_the_first_copy():
    body = bytes(tcp(payload=b"A" * 64))
    altered = body[:24] + b"B" * (len(body) - 24)

    def piece(offset: int, data: bytes, more: bool) -> Packet:
        return ether() / IP(**V4, id=7, proto=6, flags="MF" if more else 0, frag=offset // 8) / data

    frames = frames_of([piece(0, body[:40], True), piece(16, altered[16:48], True), piece(48, body[48:], False)])
    decoder = Decoder()
    segments = [decoder.decode(f) for f in frames]
    assert segments[:2] == [None, None]
    # Bytes 16-40 came first from the first fragment, bytes 40-48 only from the altered one.
    assert bytes(segments[2].payload) == (body[:40] + altered[40:48] + body[48:])[20:]


def test_incomplete_datagrams_are_dropped_after_timeout_and_at_finish():
    lost = fragment(IP(**V4, id=1) / tcp(payload=b"x" * 2000), fragsize=1000)
    late = fragment(IP(**V4, id=2) / tcp(payload=b"y" * 2000), fragsize=1000)
    decoder = Decoder("f.pcap")
    decoder.decode(frames_of([ether() / lost[0]])[0])
    # Another datagram's first fragment, 31 s later: the first datagram has expired.
    decoder.decode(frames_of([ether() / late[0]], first_number=2, step_ns=0)[0]._replace(ts_ns=T0 + 31 * 10**9))
    assert [(p.kind, p.frame) for p in decoder.problems] == [("fragments-dropped", 1)]
    decoder.finish()
    assert [(p.kind, p.frame) for p in decoder.problems] == [("fragments-dropped", 1), ("fragments-dropped", 2)]
    assert decoder.stats["fragments_dropped"] == 2 and decoder.stats["reassembled_datagrams"] == 0


def test_pending_datagrams_are_bounded(monkeypatch):
    monkeypatch.setattr(decode_module, "MAX_PENDING_DATAGRAMS", 3)
    decoder = Decoder()
    firsts = [fragment(IP(**V4, id=n) / tcp(payload=b"z" * 100), fragsize=64)[0] for n in range(5)]
    for frame in frames_of([ether() / f for f in firsts]):
        decoder.decode(frame)
    assert [p.frame for p in decoder.problems] == [1, 2]
    assert "more than 3" in decoder.problems[0].message


def test_ipv6_fragments():
    datagram = IPv6(**V6) / IPv6ExtHdrFragment(id=99) / tcp(payload=b"q" * 3000)
    pieces = fragment6(datagram, 1280)
    decoder = Decoder()
    frames = frames_of([ether() / p for p in reversed(pieces)])
    results = [decoder.decode(f) for f in frames]
    assert results[:-1] == [None] * (len(pieces) - 1)
    assert as_tuple(results[-1]) == expected(IPv6(**V6) / tcp(payload=b"q" * 3000), number=len(pieces),
                                             ts_ns=T0 + (len(pieces) - 1) * 1000)


def test_non_ip_and_non_tcp_are_counted():
    decoder = Decoder()
    packets = [ether() / ARP(), ether() / IP(**V4) / UDP() / b"dns", ether() / IP(**V4) / ICMP(),
               ether() / IPv6(**V6) / ICMPv6EchoRequest(), ether() / IPv6(**V6) / IPv6ExtHdrDestOpt() / UDP(),
               ether() / IPv6(**V6, nh=59), ether() / fragment(IP(**V4) / UDP() / (b"u" * 100), 64)[0]]
    assert [decoder.decode(f) for f in frames_of(packets)] == [None] * 7
    counted = {key: decoder.stats[key] for key in ("frames", "non_ip", "non_tcp", "malformed", "tcp")}
    assert counted == dict(frames=7, non_ip=1, non_tcp=6, malformed=0, tcp=0)
    assert not decoder.problems


def test_unknown_link_type_is_one_problem_per_link_type():
    decoder = Decoder("x.pcap")
    for frame in frames_of([IPV4] * 50, link_type=147) + frames_of([IPV4] * 5, link_type=148):
        assert decoder.decode(frame) is None
    assert decoder.stats["unknown_link_type"] == 55
    assert [(p.kind, p.frame, p.file) for p in decoder.problems] == [
        ("unknown-link-type", 1, "x.pcap"), ("unknown-link-type", 1, "x.pcap")]


def set_bytes(packet: Packet, offset: int, value: bytes) -> bytes:
    data = bytearray(bytes(packet))
    data[offset:offset + len(value)] = value
    return bytes(data)


IP4 = ether() / IP(**V4) / tcp()
MALFORMED = {
    "ihl-below-5": (set_bytes(IP4, 14, b"\x44"), "malformed-ip"),
    "ipv4-version-6": (set_bytes(IP4, 14, b"\x65"), "malformed-ip"),
    "total-length-past-packet": (set_bytes(IP4, 16, b"\x40\x00"), "malformed-ip"),
    "total-below-header": (set_bytes(IP4, 16, b"\x00\x10"), "malformed-ip"),
    "tcp-data-offset-below-5": (set_bytes(IP4, 14 + 20 + 12, b"\x40"), "malformed-tcp"),
    "tcp-data-offset-past-end": (set_bytes(ether() / IP(**V4) / tcp(payload=b""), 14 + 20 + 12, b"\xf0"),
                                 "malformed-tcp"),
    "ipv6-payload-past-packet": (set_bytes(ether() / IPV6, 14 + 4, b"\x40\x00"), "malformed-ip"),
    "ipv6-extension-past-end": (set_bytes(ether() / IPv6(**V6) / IPv6ExtHdrDestOpt() / tcp(payload=b""),
                                          14 + 41, b"\xff"), "truncated-ip"),
    "ethernet-cut": (bytes(IP4)[:13], "truncated-link-header"),
    "ipv4-cut": (bytes(IP4)[:30], "truncated-ip"),
    "tcp-header-missing": (bytes(ether() / IP(**V4, proto=6)), "malformed-tcp"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_headers(case):
    data, kind = MALFORMED[case]
    decoder = Decoder("m.pcap")
    assert decode_one(1, data, decoder, number=9) is None
    assert decoder.stats["malformed"] == 1
    assert [(p.kind, p.frame, p.file) for p in decoder.problems] == [(kind, 9, "m.pcap")]


def test_problems_are_bounded():
    decoder = Decoder()
    bad = MALFORMED["ihl-below-5"][0]
    for frame in frames_of([bad] * 1000):
        decoder.decode(frame)
    assert decoder.stats["malformed"] == 1000
    assert len(decoder.problems) == decoder.problems.limit + 1
    assert decoder.problems.counts == {"malformed-ip": 1000}


def test_format_addr():
    assert format_addr(socket.inet_pton(socket.AF_INET, "192.0.2.1")) == "192.0.2.1"
    assert format_addr(socket.inet_pton(socket.AF_INET6, "2001:db8::1")) == "2001:db8::1"


def test_through_the_reader_with_two_interfaces():
    packets = [ether() / IPV4, CookedLinuxV2(proto=0x86DD) / IPV6, ether() / ARP()]
    data = (craft.shb() + craft.idb(1, tsresol=9) + craft.idb(276)
            + craft.epb(0, T0 + 5, packets[0]) + craft.epb(1, T0 // 1000 + 7, packets[1]) + craft.epb(0, 0, packets[2]))
    decoder = Decoder()
    segments = [decoder.decode(frame) for frame in CaptureReader(io.BytesIO(data))]
    assert as_tuple(segments[0]) == expected(IPV4, number=1, ts_ns=T0 + 5)
    assert as_tuple(segments[1]) == expected(IPV6, number=2, ts_ns=T0 + 7000)
    assert segments[2] is None and decoder.stats["non_ip"] == 1


@pytest.mark.skipif(not shutil.which("tshark"), reason="needs tshark")
def test_agrees_with_tshark(tmp_path):
    datagram = IP(**V4, id=77) / tcp(payload=b"F" * 1800, sport=50000)
    packets = ([ether() / IP(**V4) / tcp(seq=n * 1000, sport=40000 + n) for n in range(5)]
               + [ether() / Dot1Q(vlan=2) / IPv6(**V6) / IPv6ExtHdrHopByHop() / tcp(payload=b"v6")]
               + [ether() / p for p in reversed(fragment(datagram, 1000))] + [ether() / ARP()])
    path = craft.write(tmp_path / "t.pcap", craft.pcap_bytes([(T0 + n, p) for n, p in enumerate(packets)]))
    fields = ["frame.number", "tcp.srcport", "tcp.dstport", "tcp.seq_raw", "tcp.ack_raw", "tcp.len"]
    out = subprocess.run(["tshark", "-r", path, "-Y", "tcp", "-T", "fields"] + sum((["-e", f] for f in fields), []),
                         capture_output=True, text=True, check=True).stdout
    expected_rows = [tuple(int(v) for v in line.split("\t")) for line in out.splitlines()]
    decoder = Decoder()
    segments = [s for s in map(decoder.decode, CaptureReader(path)) if s]
    assert [(s.frame, s.sport, s.dport, s.seq, s.ack, len(s.payload)) for s in segments] == expected_rows
    assert len(expected_rows) == 7


LINK_TYPES = [0, 1, 12, 14, 101, 108, 113, 228, 229, 276]


@settings(max_examples=300, deadline=None)
@given(link_type=st.sampled_from(LINK_TYPES),
       prefix=st.sampled_from([b"", b"\x02\0\0\0", bytes(ether() / IP())[:14], bytes(ether() / IPv6())[:14],
                               bytes(ether() / IP(**V4) / TCP())[:34], bytes(ether() / IP(**V4, flags="MF") / TCP())[:34],
                               bytes(ether() / IPv6(**V6, nh=44, plen=64))[:54]]),
       body=st.binary(max_size=120), orig_extra=st.integers(0, 100))
def test_random_frames_never_raise(link_type, prefix, body, orig_extra):
    """Random bytes, alone or after valid link and IP headers, make a Segment, None, or a Problem."""
    decoder = Decoder()
    data = prefix + body
    for number in range(1, 3):  # twice, so that fragments can meet
        result = decoder.decode(Frame(number, T0, link_type, memoryview(data), len(data) + orig_extra))
        assert result is None or isinstance(result, Segment)
    decoder.finish()
