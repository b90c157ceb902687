"""HttpParser(strict=True): the server's reading of request heads (RFC 9112 5.1, 5.2).

The lenient reading stays what the analyzer needs (a capture is read as it was sent); the strict
one refuses what could let a server and a proxy frame the same bytes differently.
"""

from __future__ import annotations

import pytest

from bitstrace.analyzer.http import HttpParser, MessageEnd, ParseError, RequestHead

HEAD = b"BITS_POST /up/x.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def events_of(data: bytes, strict: bool, split: int | None = None) -> list:
    parser = HttpParser("request", strict=strict)
    if split is None:
        return parser.feed(data, 1, 0)
    return parser.feed(data[:split], 1, 0) + parser.feed(data[split:], 2, 0)


@pytest.mark.parametrize("line", [b"Transfer-Encoding : chunked", b"Content-Length\t: 0",
                                  b"no colon here", b"Bad Name: x", b"X-\x80: y", b": empty name"])
@pytest.mark.parametrize("split", [None, 5, len(HEAD) + 3])
def test_a_malformed_field_line_is_an_error_when_strict(line: bytes, split: int | None) -> None:
    data = HEAD + line + b"\r\nContent-Length: 0\r\n\r\n"
    strict = events_of(data, strict=True, split=split)
    assert isinstance(strict[0], ParseError) and "malformed header line" in strict[0].message
    lenient = events_of(data, strict=False, split=split)
    # a line the lenient reading can take stays a field there (and the cache of known lines,
    # filled by the lenient reading first, does not let it through the strict one)
    if b":" in line and line.split(b":")[0].strip() and b" " not in line.split(b":")[0].strip():
        assert isinstance(lenient[0], RequestHead)
        again = events_of(data, strict=True, split=split)
        assert isinstance(again[0], ParseError)


@pytest.mark.parametrize("split", [None, len(HEAD) + 10])
def test_obsolete_line_folding_is_an_error_when_strict(split: int | None) -> None:
    data = HEAD + b"X-Folded: one\r\n two\r\nContent-Length: 0\r\n\r\n"
    strict = events_of(data, strict=True, split=split)
    assert isinstance(strict[0], ParseError) and "obsolete line folding" in strict[0].message
    lenient = events_of(data, strict=False, split=split)
    assert isinstance(lenient[0], RequestHead) and lenient[0].headers.get("x-folded") == "one two"


def test_a_well_formed_head_reads_the_same_strict_or_not() -> None:
    data = HEAD + b"BITS-Packet-Type: Ping\r\nContent-Length:   0  \r\n\r\n"
    strict, lenient = events_of(data, strict=True), events_of(data, strict=False)
    assert [type(e) for e in strict] == [RequestHead, MessageEnd]
    assert strict[0].headers == lenient[0].headers
