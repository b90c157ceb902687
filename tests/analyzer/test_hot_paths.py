"""The per-packet fast paths (issue 6) give exactly what the general paths give."""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from bitstrace.analyzer.capture import LINKTYPE_ETHERNET, CaptureReader, Frame
from bitstrace.analyzer.decode import Decoder, Segment
from bitstrace.analyzer.exchanges import BODY_BLOCK
from bitstrace.analyzer.http import BodyChunk, HttpParser
from bitstrace.analyzer.pipeline import read_exchanges
from tests.support import REPO

CAPTURES = REPO / "captures"
CORPUS = sorted(p for p in CAPTURES.iterdir() if p.suffix in (".pcap", ".pcapng"))


def _segments_both_ways(records: list[tuple]) -> tuple[Decoder, list, Decoder, list]:
    """The per-packet loop's segments (fast path and all), and decode()'s, frame by frame."""
    fast, general = Decoder("x.pcap"), Decoder("x.pcap")
    received: list[Segment] = []
    fast.decode_into(records, lambda *fields: received.append(Segment(*fields)))
    decoded = [s for s in map(general.decode, (Frame(*r) for r in records)) if s is not None]
    return fast, [s._replace(payload=bytes(s.payload)) for s in received], general, \
        [s._replace(payload=bytes(s.payload)) for s in decoded]


@pytest.mark.parametrize("capture", CORPUS, ids=[p.name for p in CORPUS])
def test_decode_into_gives_what_decode_gives(capture: Path) -> None:
    records = list(CaptureReader(capture).records())
    fast, ours, general, theirs = _segments_both_ways(records)
    assert ours == theirs and ours
    assert fast.stats == general.stats and list(fast.problems) == list(general.problems)


_IPV4_TCP = bytes.fromhex(  # Ethernet, IPv4 (no options), TCP with 12 option bytes, 4 payload bytes
    "0200000000020200000000010800" "45000038abcd4000400600007f0000017f000001"
    "c0001f9000000064000000c8801801f500000000" "0101080a0000000100000002" "42495453")


@settings(max_examples=500, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(_IPV4_TCP) - 1), st.integers(0, 255)), max_size=4),
       cut=st.integers(0, 12), padding=st.integers(0, 8), orig_extra=st.integers(-2, 4))
def test_fast_path_takes_only_what_decode_decodes_the_same(edits, cut, padding, orig_extra) -> None:
    """Header bytes changed anywhere (type, version, lengths, fragment bits, data offset), the
    frame cut short or padded, the wire length off: the fast path never decides otherwise than
    decode()."""
    data = bytearray(_IPV4_TCP + bytes(padding))
    for offset, value in edits:
        data[offset] = value
    data = bytes(data[:len(data) - cut])
    records = [(n, 1000 * n, LINKTYPE_ETHERNET, memoryview(data), len(data) + orig_extra) for n in (1, 2)]
    fast, ours, general, theirs = _segments_both_ways(records)
    assert ours == theirs
    assert fast.stats == general.stats and list(fast.problems) == list(general.problems)


MASK = 0xFFFFFFFF


@st.composite
def _ethernet_frames(draw) -> tuple[bytes, int]:
    """Ethernet frames of every shape the decoder knows, most fields as the fast path takes them
    and some off, each way: VLAN tags, IPv4 with options or a bad IHL, IPv6 with a hop-by-hop
    header, fragments, total or payload lengths off (0: segmentation offload), TCP data offsets
    0-15, the frame padded, cut by the snapshot length, or its wire length off."""
    rng = draw(st.randoms(use_true_random=False))

    def usually(common, *others):  # hypothesis favours odd values by itself; this keeps most frames usual
        return common if rng.random() < 0.75 else rng.choice(others)

    tags = usually((), (0x8100,), (0x88A8, 0x8100), (0x9100,))
    ipv6 = usually(False, True)
    ethertype = usually(0x86DD if ipv6 else 0x0800, 0x0806, 0x86DD, 0x0800)
    ethernet = bytes(12) + b"".join(struct.pack("!HH", tag, 7) for tag in tags) + struct.pack("!H", ethertype)
    data_offset = usually(5, 8, 15, 4, 0)
    tcp = (struct.pack("!HHIIBBH", 49152, 80, draw(st.integers(0, MASK)), 1, data_offset << 4,
                       draw(st.integers(0, 0xFF)), 1000) + bytes(4 + max(0, data_offset * 4 - 20))
           + draw(st.binary(max_size=24)))
    if ipv6:
        hop_by_hop = draw(st.booleans())
        body = (bytes([6, 0]) + bytes(6) if hop_by_hop else b"") + tcp
        length = max(0, len(body) + usually(0, -1, 1, -30, 30)) & 0xFFFF
        ip = struct.pack("!IHBB16s16s", 6 << 28, length, 0 if hop_by_hop else 6, 64, bytes(15) + b"\1",
                         bytes(15) + b"\2") + body
    else:
        ihl = usually(5, 6, 15, 4, 0)
        options = bytes(max(0, ihl * 4 - 20))
        total = 20 + len(options) + len(tcp)
        total = max(0, total + usually(0, -1, 1, -20, 10, -total))
        ip = struct.pack("!BBHHHBBH4s4s", usually(4, 6) << 4 | ihl, 0, total, 1, usually(0x4000, 0, 0x2000, 1, 0x8000),
                         64, usually(6, 17), 0, bytes([127, 0, 0, 1]), bytes([127, 0, 0, 2])) + options + tcp
    frame = ethernet + ip + bytes(usually(0, 6, 20))
    frame = frame[:len(frame) - usually(0, 1, 4, 30)]
    return frame, len(frame) + usually(0, -1, 1, 40)



@settings(max_examples=300, deadline=None)
@given(frames=st.lists(_ethernet_frames(), min_size=1, max_size=3))
def test_decode_into_equals_decode_on_frames_of_every_shape(frames) -> None:
    records = [(n, 1000 * n, LINKTYPE_ETHERNET, memoryview(data), orig_len)
               for n, (data, orig_len) in enumerate(frames, 1)]
    fast, ours, general, theirs = _segments_both_ways(records)
    assert ours == theirs
    assert fast.stats == general.stats and list(fast.problems) == list(general.problems)


def _events(parser: HttpParser, pieces: list[bytes], use_feed_body: bool) -> tuple[list, bytes]:
    """Events without body chunks, and the body bytes, for `pieces` fed one by one."""
    events, body = [], bytearray()
    for number, piece in enumerate(pieces, 1):
        if use_feed_body and parser.feed_body(piece, number, number * 10):
            body += piece
            continue
        for event in parser.feed(piece, number, number * 10):
            if type(event) is BodyChunk:
                body += event.data
            else:
                events.append(event)
    return events, bytes(body)


@pytest.mark.parametrize("seed", range(20))
def test_feed_body_takes_what_feed_would_and_never_a_message_end(seed: int) -> None:
    rng = random.Random(seed)
    stream = b""
    for index in range(4):
        body = rng.randbytes(rng.randrange(0, 20_000))
        if index % 2:
            chunks = [body[i:i + 3000] for i in range(0, len(body), 3000)]
            stream += (b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                       + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n")
        else:
            stream += b"BITS_POST /u HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    cuts = sorted(rng.sample(range(1, len(stream)), 60))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert _events(HttpParser("request"), pieces, True) == _events(HttpParser("request"), pieces, False)


def test_feed_body_refuses_the_last_body_byte() -> None:
    parser = HttpParser("request")
    parser.feed(b"BITS_POST /u HTTP/1.1\r\nContent-Length: 10\r\n\r\n", 1, 0)
    assert parser.feed_body(b"123456789", 2, 0)
    assert not parser.feed_body(b"0", 3, 0)  # it ends the message: only feed() may take it
    assert [type(e).__name__ for e in parser.feed(b"0", 3, 0)] == ["BodyChunk", "MessageEnd"]
    assert not parser.feed_body(b"x", 4, 0)  # between messages


def test_header_values_keep_non_ascii_whitespace() -> None:
    events = HttpParser("request").feed(b"GET / HTTP/1.1\r\nX-A: v\xa0\r\nX-B:\t w \r\n\r\n", 1, 0)
    assert list(events[0].headers) == [("X-A", "v\xa0"), ("X-B", "w")]


@pytest.mark.parametrize("split", [False, True])
def test_reasons_keep_non_ascii_whitespace(split: bool) -> None:
    """Only ASCII whitespace is stripped from a reason phrase, as bytes.strip() did before heads
    were decoded as text (str.strip() would also take \\xa0 and \\x85)."""
    head = b"HTTP/1.1 200 \xa0OK\x85 \r\n\r\n"
    parser = HttpParser("response")
    parser.expect_response_to("HEAD")
    pieces = [head[i:i + 1] for i in range(len(head))] if split else [head]
    events = [event for piece in pieces for event in parser.feed(piece, 1, 0)]
    assert events[0].reason == "\xa0OK\x85"


def test_on_body_blocks_carry_every_body_byte_in_order() -> None:
    capture = CAPTURES / "clean-multi-fragment.pcap"
    bodies: dict[int, hashlib._Hash] = {}
    sizes: list[int] = []
    lengths: dict[int, int] = {}

    def on_body(conn, message, block, body_offset) -> None:
        digest = bodies.setdefault(id(message), hashlib.sha256())
        assert body_offset == lengths.get(id(message), 0)  # no gaps: blocks follow each other
        lengths[id(message)] = body_offset + len(block)
        digest.update(block)
        sizes.append(len(block))

    messages = []
    read_exchanges([capture], lambda e: messages.extend(m for m in (e.request, e.response) if m), on_body)
    with_body = [m for m in messages if m.body_length]
    assert with_body and all(bodies[id(m)].hexdigest() == m.body_sha256 for m in with_body)
    assert max(sizes) < BODY_BLOCK + 65536 and len(sizes) < sum(m.body_length for m in with_body) // 1448



def test_nothing_keeps_a_view_of_the_capture_data_after_a_packet() -> None:
    """A view kept past its packet pins the whole read chunk (64 KiB) it points into; a bytearray
    cannot be resized while any view of it lives, which makes a kept view visible."""
    from bitstrace.analyzer.decode import ACK, PSH, SYN, Segment
    from bitstrace.analyzer.exchanges import ExchangeAssembler
    from bitstrace.analyzer.tcp import TcpReassembler

    client, server = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
    head = b"BITS_POST /u HTTP/1.1\r\nContent-Length: 3000\r\n\r\n"
    chunk = bytearray(head + bytes(range(256)) * 12)[:len(head) + 3000]
    exchanges: list = []
    reassembler = TcpReassembler(ExchangeAssembler(exchanges.append, lambda *body_block: None))

    def segment(frame: int, forward: bool, seq: int, ack: int, flags: int, payload: memoryview) -> Segment:
        ends = (client, 40000, server, 80) if forward else (server, 80, client, 40000)
        return Segment(frame, frame, ends[0], ends[1], ends[2], ends[3], seq, ack, flags, 65535, payload, 0)

    empty = memoryview(b"")
    reassembler.feed(segment(1, True, 100, 0, SYN, empty))
    reassembler.feed(segment(2, False, 500, 101, SYN | ACK, empty))
    view = memoryview(chunk)
    for number, start in enumerate(range(0, len(chunk), 1448), 3):  # in order: the fast paths
        reassembler.feed(segment(number, True, 101 + start, 501, ACK | PSH, view[start:start + 1448]))
    del number, start
    view.release()
    chunk.extend(b"x")  # BufferError if the reassembler, parser or assembler kept a view
    reassembler.finish()
    assert exchanges and exchanges[0].request.body_length == 3000
