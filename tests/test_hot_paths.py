"""The per-packet fast paths (issue 6) give exactly what the general paths give."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from analyzer.capture import LINKTYPE_ETHERNET, CaptureReader
from analyzer.decode import Decoder
from analyzer.exchanges import BODY_BLOCK
from analyzer.http import BodyChunk, HttpParser
from analyzer.pipeline import read_exchanges

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
CORPUS = sorted(p for p in CAPTURES.iterdir() if p.suffix in (".pcap", ".pcapng"))


@pytest.mark.parametrize("capture", CORPUS, ids=[p.name for p in CORPUS])
def test_decode_fast_path_equals_the_general_ipv4_path(capture: Path) -> None:
    fast, general = Decoder(), Decoder()
    compared = 0
    for frame in CaptureReader(capture):
        data = bytes(frame.data)
        if frame.link_type != LINKTYPE_ETHERNET or data[12:14] != b"\x08\x00":
            continue
        ours = fast.decode(frame)
        theirs = general._ipv4(frame, memoryview(data), 14)
        assert (ours is None) == (theirs is None), frame.number
        if ours is not None:
            assert ours._replace(payload=bytes(ours.payload)) == theirs._replace(payload=bytes(theirs.payload))
            compared += 1
    assert compared or capture.name == "ipv6.pcap"


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
    from analyzer.decode import ACK, PSH, SYN, Segment
    from analyzer.exchanges import ExchangeAssembler
    from analyzer.tcp import TcpReassembler

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
