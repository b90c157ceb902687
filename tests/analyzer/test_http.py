"""The sans-I/O HTTP/1.1 parser: framing, splitting, gaps and garbage."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitstrace.analyzer import http
from bitstrace.analyzer.http import (
    MAX_CHUNK_LINE,
    MAX_HEAD,
    BodyChunk,
    Headers,
    HttpParser,
    MessageEnd,
    ParseError,
    RequestHead,
    ResponseHead,
)


def feed_pieces(parser: HttpParser, pieces: list[bytes]) -> list:
    """Feed each piece as its own frame (numbered from 1) and collect the events."""
    events = []
    for number, piece in enumerate(pieces, start=1):
        events += parser.feed(piece, number, number * 1000)
    return events


def normalise(events: list) -> list:
    """Events with adjacent body chunks merged and frame data dropped, for comparing splits."""
    out: list = []
    for event in events:
        if isinstance(event, BodyChunk):
            if out and out[-1][0] == "body":
                out[-1] = ("body", out[-1][1] + bytes(event.data))
            else:
                out.append(("body", bytes(event.data)))
        elif isinstance(event, RequestHead):
            out.append(("request", event.method, event.target, event.version,
                        event.headers.items(), event.offset))
        elif isinstance(event, ResponseHead):
            out.append(("response", event.version, event.status, event.reason,
                        event.headers.items(), event.offset))
        elif isinstance(event, MessageEnd):
            out.append(("end", event.body_length, event.partial, event.trailers.items()))
        else:
            out.append(("error", event.message, event.offset))
    return out


def bodies(events: list) -> list[bytes]:
    """The body of every message, in order."""
    result, current = [], bytearray()
    for event in events:
        if isinstance(event, BodyChunk):
            current += event.data
        elif isinstance(event, MessageEnd):
            result.append(bytes(current))
            current.clear()
    return result


def kinds(events: list) -> list[str]:
    return [type(event).__name__ for event in events]


CHUNKED_REQUEST = (
    b"PUT /chunked HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n"
    b"Content-Length: 999\r\n\r\n"
    b"5;name=value;x=\"q\"\r\nhello\r\n"
    b"1A\r\nabcdefghijklmnopqrstuvwxyz\r\n"
    b"0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
)
MIXED_STREAM = (
    b"BITS_POST /upload/file.bin HTTP/1.1\r\nBITS-Packet-Type: Fragment\r\n"
    b"content-length: 11\r\nX-Folded: first\r\n\t second\r\n\r\nhello world"
    + CHUNKED_REQUEST
    + b"\r\nGET http://proxy.example/abs?q=1 HTTP/1.0\r\n\r\n"
    + b"propPatch * HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
)


def test_headers_keep_order_and_case_and_look_up_case_insensitively() -> None:
    headers = Headers([("Content-Length", "5"), ("X-A", "1"), ("x-a", "2")])
    assert headers.get("CONTENT-LENGTH") == "5"
    assert headers.get("x-A") == "1"
    assert headers.get_all("X-a") == ["1", "2"]
    assert headers.get("missing") is None
    assert "content-length" in headers and "nope" not in headers
    assert list(headers) == [("Content-Length", "5"), ("X-A", "1"), ("x-a", "2")]
    assert len(headers) == 3


_NAMES = st.sampled_from(["Content-Length", "content-length", "CONTENT-LENGTH", "X-A", "x-a",
                          "BITS-Session-Id", "Caf\xe9", "CAF\xc9", "\xdf"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_NAMES, st.text(max_size=3)), max_size=8), _NAMES)
def test_header_lookups_are_the_first_and_every_value_in_wire_order(fields, name) -> None:
    """get/get_all/in/by_name as a scan of the fields would answer, repeated names in any case
    included; the fields themselves stay as given."""
    headers = Headers(fields)
    matching = [value for field, value in fields if field.lower() == name.lower()]
    assert headers.get(name) == (matching[0] if matching else None)
    assert headers.get(name, "default") == (matching[0] if matching else "default")
    assert headers.get_all(name) == matching
    assert (name in headers) == bool(matching)
    assert headers.by_name.get(name.lower()) == (matching[0] if matching else None)
    assert list(headers) == fields and headers.items() == fields and len(headers) == len(fields)
    assert headers == Headers(fields) and headers != Headers(fields[::-1] + [("Z", "")])


_FIELD_LINES = st.one_of(
    st.tuples(_NAMES, st.sampled_from([":", " :", ": "]), st.sampled_from(["1", " 2 ", "", "v\xa0"]))
    .map("".join),
    st.sampled_from([" folded", "\tmore ", "no colon", ":no name"]))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_FIELD_LINES, st.sampled_from(["\r\n", "\n"])), max_size=8), st.booleans())
def test_parsed_heads_index_their_fields_as_a_scan_would(lines, whole) -> None:
    """by_name/get/get_all of a parsed head (repeated names in any case, folded values, lines
    seen before) answer as a scan of its fields, read whole or byte by byte."""
    head = ("GET / HTTP/1.1\r\n" + "".join(map("".join, lines)) + "\r\n").encode("latin-1")
    pieces = [head] if whole else [head[i:i + 1] for i in range(len(head))]
    [request] = [e for e in feed_pieces(HttpParser("request"), pieces) if isinstance(e, RequestHead)]
    headers = request.headers
    fields = headers.items()
    assert headers.by_name == {name.lower(): value for name, value in reversed(fields)}
    for name in {name for name, _ in fields} | {"X-A"}:
        matching = [value for field, value in fields if field.lower() == name.lower()]
        assert headers.get_all(name) == matching
        assert headers.get(name) == (matching[0] if matching else None) == headers.get(name.lower())


def test_parsed_headers_look_up_as_built_ones() -> None:
    head = b"GET / HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\nCaf\xe9: 3\r\nX-A: 4\r\n\r\n"
    headers = HttpParser("request").feed(head, 1, 0)[0].headers
    assert headers == Headers([("X-A", "1"), ("x-a", "2"), ("Caf\xe9", "3"), ("X-A", "4")])
    assert headers.get_all("X-a") == ["1", "2", "4"] and headers.get("CAF\xc9") == "3"
    assert headers.by_name == {"x-a": "1", "caf\xe9": "3"}


def test_lines_seen_before_parse_as_the_first_time() -> None:
    """Start and header lines seen in earlier heads are not parsed again: the events are those
    of a first reading, and a line that a later head continues (obs-fold) is continued there
    only."""
    plain = b"BITS_POST /u HTTP/1.1\r\nX-Id: {a} \r\nContent-Length: 1\r\n\r\nx"
    folded = b"BITS_POST /u HTTP/1.1\r\nX-Id: {a} \r\n  more\r\nContent-Length: 0\r\n\r\n"
    stream = plain + folded + plain
    events = HttpParser("request").feed(stream, 1, 0)
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [h.headers.get("x-id") for h in heads] == ["{a}", "{a} more", "{a}"]
    assert bodies(events) == [b"x", b"", b"x"]
    assert normalise(HttpParser("request").feed(stream, 1, 0)) == normalise(events)
    responses = HttpParser("response").feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" * 2
                                            + b"HTTP/1.1 200  OK \r\nContent-Length: 0\r\n\r\n", 1, 0)
    assert [(e.status, e.reason) for e in responses if isinstance(e, ResponseHead)] == [(200, "OK")] * 3


def test_endless_distinct_and_long_lines_parse_alike() -> None:
    """More distinct lines than are kept, and lines too long to keep, read as any others; what
    is kept stays bounded."""
    long_value = "v" * 3000
    stream = b"".join(f"GET /{n} HTTP/1.1\r\nX-N: {n}\r\nX-Long: {long_value}{n}\r\n\r\n".encode()
                      for n in range(6000))
    heads = [e for e in HttpParser("request").feed(stream, 1, 0) if isinstance(e, RequestHead)]
    assert [(h.target, h.headers.get("x-n"), h.headers.get("x-long")) for h in heads] == [
        (f"/{n}", str(n), f"{long_value}{n}") for n in range(6000)]
    for kept in (http._KNOWN_FIELDS, *http._KNOWN_START_LINES.values()):
        assert len(kept) <= http._MAX_KNOWN_LINES and max(map(len, kept)) <= http._MAX_KNOWN_LINE


def test_content_length_request_and_latin1_values() -> None:
    events = HttpParser("request").feed(
        b"BITS_POST /a%20b HTTP/1.1\r\nContent-Name: caf\xe9.txt\r\nContent-Length: 4\r\n\r\nbody",
        7, 70)
    assert kinds(events) == ["RequestHead", "BodyChunk", "MessageEnd"]
    head = events[0]
    assert (head.method, head.target, head.version) == ("BITS_POST", "/a%20b", "HTTP/1.1")
    assert head.headers.get("content-name") == "café.txt"
    assert (head.frame, head.ts_ns, head.offset) == (7, 70, 0)
    assert bytes(events[1].data) == b"body"
    assert events[2] == MessageEnd(7, 70, 4, False)


def test_mixed_stream_methods_targets_versions_and_folding() -> None:
    events = HttpParser("request").feed(MIXED_STREAM, 1, 0)
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [(h.method, h.target, h.version) for h in heads] == [
        ("BITS_POST", "/upload/file.bin", "HTTP/1.1"),
        ("PUT", "/chunked", "HTTP/1.1"),
        ("GET", "http://proxy.example/abs?q=1", "HTTP/1.0"),
        ("propPatch", "*", "HTTP/1.1"),
    ]
    assert heads[0].headers.get("X-Folded") == "first second"
    assert heads[1].offset == MIXED_STREAM.index(b"PUT")
    assert bodies(events) == [b"hello world", b"hello" + b"abcdefghijklmnopqrstuvwxyz", b"", b""]
    assert not [e for e in events if isinstance(e, ParseError)]


def test_chunked_wins_over_content_length_and_keeps_trailers() -> None:
    events = HttpParser("request").feed(CHUNKED_REQUEST, 1, 0)
    end = events[-1]
    assert isinstance(end, MessageEnd) and not end.partial
    assert end.body_length == 31
    assert end.trailers.items() == [("X-Checksum", "abc"), ("X-Other", "1")]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_split_gives_the_same_events(data: st.DataObject) -> None:
    stream = MIXED_STREAM
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=40)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    whole = HttpParser("request").feed(stream, 1, 0)
    assert normalise(feed_pieces(HttpParser("request"), pieces)) == normalise(whole)


RESPONSE_STREAM = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 77\r\n\r\n"  # answers HEAD: no body
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nwiki\r\n0\r\n\r\n"
    b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"
    b"HTTP/1.0 200 OK\r\nServer: old\r\n\r\nuntil the end\r\nHTTP/1.1 200 OK\r\n\r\n"
)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_split_of_responses_gives_the_same_events(data: st.DataObject) -> None:
    def run(pieces: list[bytes]) -> list:
        parser = HttpParser("response")
        for method in ("HEAD", "GET", "GET", "GET"):
            parser.expect_response_to(method)
        return normalise(feed_pieces(parser, pieces) + parser.eof(999, 0))

    stream = RESPONSE_STREAM
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=40)))
    whole = run([stream])
    assert run([stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]) == whole
    assert [e[2] for e in whole if e[0] == "response"] == [100, 200, 200, 204, 200]
    assert [e[1] for e in whole if e[0] == "body"] == [
        b"wiki", b"until the end\r\nHTTP/1.1 200 OK\r\n\r\n"]


ODD_HEADS = [  # each read whole from one feed, then byte by byte through the buffered path
    b"GET /a HTTP/1.1\r\n\r\n",
    b"GET /b HTTP/1.0\n\n",
    b"GET /c HTTP/1.1\r\nX-A: 1\nX-B:2\r\n\r\n",
    b"GET /d HTTP/1.1\r\nX-Fold: a\r\n\t b \r\n\r\n",
    b"GET /e HTTP/1.1\r\n folded first\r\nNo colon\r\n:x\r\nName : v \r\nX-CR: a\rb\r\n\r\n",
    b"GET  /f  HTTP/1.1  \r\n\r\n",
    b"GET /g HTTP/1.1\r\nContent-Length: 3, 3\r\nX:\xa0v\xa0\r\n\r\nabc",
    b"get /h http/1.1\r\n\r\nGET /i HTTP/1.1\r\n\r\n",
    b"GET /j HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET /k HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nxyz",
    b"X" * 20000 + b" /long HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\n\r\n",
    b"GET /big HTTP/1.1\r\n" + b"X-Filler: " + b"a" * (MAX_HEAD - 40) + b"\r\n\r\nGET /z HTTP/1.1\r\n\r\n",
]


@pytest.mark.parametrize("head", ODD_HEADS, ids=range(len(ODD_HEADS)))
def test_a_head_read_whole_gives_what_the_buffered_path_gives(head: bytes) -> None:
    whole = HttpParser("request")
    by_byte = HttpParser("request")
    expected = normalise(feed_pieces(by_byte, [head[i:i + 1] for i in range(len(head))])
                         + by_byte.eof(0, 0))
    assert normalise(whole.feed(head, 1, 0) + whole.eof(0, 0)) == expected


BAD_CHUNK_LINE_STREAM = (
    b"PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nnot a size\r\n"
    b"PUT /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * (MAX_CHUNK_LINE + 8)
)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_a_bad_chunk_size_line_is_reported_where_it_begins_in_any_split(data: st.DataObject) -> None:
    stream = BAD_CHUNK_LINE_STREAM
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=40)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    errors = [e for e in feed_pieces(HttpParser("request"), pieces) if isinstance(e, ParseError)]
    assert [e.offset for e in errors] == [stream.index(b"not a size"),
                                          stream.index(b"1" * MAX_CHUNK_LINE)]


def test_chunked_split_at_every_byte_boundary() -> None:
    expected = normalise(HttpParser("request").feed(CHUNKED_REQUEST, 1, 0))
    for cut in range(1, len(CHUNKED_REQUEST)):
        pieces = [CHUNKED_REQUEST[:cut], CHUNKED_REQUEST[cut:]]
        assert normalise(feed_pieces(HttpParser("request"), pieces)) == expected, cut
    one_byte_each = [CHUNKED_REQUEST[i:i + 1] for i in range(len(CHUNKED_REQUEST))]
    assert normalise(feed_pieces(HttpParser("request"), one_byte_each)) == expected


def test_first_and_last_frame_are_those_carrying_first_and_last_byte() -> None:
    message = b"POST /x HTTP/1.1\r\nContent-Length: 6\r\n\r\nabcdef"
    pieces = [b"\r\n", message[:5], message[5:30], message[30:-2], message[-2:]]
    events = feed_pieces(HttpParser("request"), pieces)
    head, end = events[0], events[-1]
    assert (head.frame, head.offset) == (2, 2)
    assert (end.frame, end.ts_ns) == (5, 5000)


def test_response_read_until_close() -> None:
    parser = HttpParser("response")
    parser.expect_response_to("GET")
    events = parser.feed(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\npart one,", 1, 10)
    events += parser.feed(b" part two", 2, 20)
    assert kinds(events) == ["ResponseHead", "BodyChunk", "BodyChunk"]
    closing = parser.eof(3, 30)
    assert closing == [MessageEnd(2, 20, 18, False)]
    assert bodies(events + closing) == [b"part one, part two"]
    assert parser.eof(4, 40) == []


def test_response_until_close_ended_by_reset_is_partial() -> None:
    parser = HttpParser("response")
    parser.feed(b"HTTP/1.1 200 OK\r\n\r\nabc", 1, 0)
    assert parser.eof(2, 0, clean=False)[0].partial


def test_bodiless_responses_head_204_304() -> None:
    parser = HttpParser("response")
    for method in ("HEAD", "GET", "GET", "GET"):
        parser.expect_response_to(method)
    stream = (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
              b"HTTP/1.1 204 No Content\r\n\r\n"
              b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nxyz")
    events = parser.feed(stream, 1, 0)
    assert [e.status for e in events if isinstance(e, ResponseHead)] == [200, 204, 304, 200]
    assert bodies(events) == [b"", b"", b"", b"xyz"]
    assert not [e for e in events if isinstance(e, ParseError)]


def test_100_continue_does_not_consume_the_pending_method() -> None:
    parser = HttpParser("response")
    parser.expect_response_to("HEAD")
    parser.expect_response_to("POST")
    events = parser.feed(b"HTTP/1.1 100 Continue\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
                         b"HTTP/1.1 100 Continue\r\n\r\n"
                         b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", 1, 0)
    heads = [e for e in events if isinstance(e, ResponseHead)]
    assert [(h.status, h.informational) for h in heads] == [
        (100, True), (200, False), (100, True), (201, False)]
    assert bodies(events) == [b"", b"", b"", b"ok"]  # the HEAD answer's length is not a body


def test_pipelined_requests_then_responses() -> None:
    requests = b"".join(
        b"BITS_POST /u HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        for body in (b"one", b"", b"three"))
    request_parser = HttpParser("request")
    events = request_parser.feed(requests, 1, 0)
    methods = [e.method for e in events if isinstance(e, RequestHead)]
    assert bodies(events) == [b"one", b"", b"three"]
    response_parser = HttpParser("response")
    for method in methods:
        response_parser.expect_response_to(method)
    responses = b"".join(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % i for i in range(3))
    assert bodies(response_parser.feed(responses, 2, 0)) == [b"0", b"1", b"2"]


def test_bits_post_with_one_mebibyte_body_is_passed_through_unaccumulated() -> None:
    body = os.urandom(1 << 20)
    head = b"BITS_POST /big HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
    stream = head + body
    pieces = [stream[i:i + 65483] for i in range(0, len(stream), 65483)]
    parser = HttpParser("request")
    events = []
    for number, piece in enumerate(pieces, start=1):
        new = parser.feed(piece, number, 0)
        chunks = [e for e in new if isinstance(e, BodyChunk)]
        assert all(chunk.data.obj is piece for chunk in chunks)  # slices, not copies
        assert len(parser._buf) <= len(head)
        events += new
    digest = hashlib.sha256()
    for event in events:
        if isinstance(event, BodyChunk):
            digest.update(event.data)
    assert digest.hexdigest() == hashlib.sha256(body).hexdigest()
    assert events[-1] == MessageEnd(len(pieces), 0, len(body), False)


def test_gap_in_body_keeps_framing_and_marks_partial() -> None:
    head = b"POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\n"
    parser = HttpParser("request")
    events = parser.feed(head + b"abc", 1, 0)
    events += parser.gap(4, 2, 0)
    events += parser.feed(b"hijPOST /b HTTP/1.1\r\nContent-Length: 1\r\n\r\nz", 3, 0)
    ends = [e for e in events if isinstance(e, MessageEnd)]
    assert [(e.body_length, e.partial, e.frame) for e in ends] == [(6, True, 3), (1, False, 3)]
    assert [e.offset for e in events if isinstance(e, RequestHead)] == [0, len(head) + 10]


def test_gap_past_body_end_resyncs_on_next_request() -> None:
    first = b"BITS_POST /a HTTP/1.1\r\nContent-Length: 100\r\n\r\n"
    parser = HttpParser("request")
    events = parser.feed(first + b"x" * 40, 1, 0)
    events += parser.gap(5000, 2, 0)
    # The gap swallowed the rest of the body and part of something; then body junk, then a request.
    events += parser.feed(b"\x00junk\nmore junk\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n", 3, 0)
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == ["/a", "/next"]
    ends = [e for e in events if isinstance(e, MessageEnd)]
    assert [(e.body_length, e.partial) for e in ends] == [(40, True), (0, False)]
    assert heads[1].offset == len(first) + 40 + 5000 + len(b"\x00junk\nmore junk\r\n")


def test_resync_finds_a_start_line_split_across_feeds() -> None:
    parser = HttpParser("response")
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab", 1, 0)
    events += parser.gap(100, 2, 0)
    events += parser.feed(b"junk\nHTTP/1.1 4", 3, 0)
    events += parser.feed(b"04 Not Found\r\nContent-Length: 0\r\n\r\n", 4, 0)
    heads = [e for e in events if isinstance(e, ResponseHead)]
    assert [(h.status, h.frame) for h in heads] == [(200, 1), (404, 3)]
    assert [e.partial for e in events if isinstance(e, MessageEnd)] == [True, False]


def test_resync_finds_a_request_glued_to_binary_junk() -> None:
    first = b"BITS_POST /a HTTP/1.1\r\nContent-Length: 900\r\n\r\n"
    parser = HttpParser("request")
    parser.feed(first, 1, 0)
    parser.gap(5000, 2, 0)
    junk = bytes(range(256)).replace(b"\n", b"").replace(b" ", b"") + b"xyz"
    request = b"BITS_POST /u/f.bin HTTP/1.1\r\nContent-Length: 2\r\n\r\nok"
    events = parser.feed(junk + request[:20], 3, 0) + parser.feed(request[20:], 4, 0)
    [head] = [e for e in events if isinstance(e, RequestHead)]
    assert (head.method, head.target, head.frame) == ("BITS_POST", "/u/f.bin", 3)
    assert head.offset == len(first) + 5000 + len(junk)
    assert bodies(events) == [b"ok"]
    assert not [e for e in events if isinstance(e, ParseError)]


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from([b"GET", b"propfind", b"BITS_POST", b"M-SEARCH"]),
       st.data())
def test_resync_after_gap_finds_the_next_request_in_any_split(
        junk: bytes, method: bytes, data: st.DataObject) -> None:
    junk = junk.replace(b"HTTP/1.", b"")
    request = method + b" /next HTTP/1.1\r\nContent-Length: 1\r\n\r\nz"
    stream = junk + b"\n" + request
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=20)))
    parser = HttpParser("request")
    parser.gap(10, 1, 0)
    events = feed_pieces(parser, [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])])
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [(h.method, h.offset) for h in heads][-1:] == [(method.decode(), 10 + len(junk) + 1)]
    assert bodies(events)[-1:] == [b"z"]


def test_message_right_after_a_gap_is_found() -> None:
    parser = HttpParser("request")
    parser.feed(b"GET /a HTTP/1.1\r\n\r\n", 1, 0)
    events = parser.gap(1460, 2, 0) + parser.feed(b"GET /c HTTP/1.1\r\n\r\n", 3, 0)
    assert [e.target for e in events if isinstance(e, RequestHead)] == ["/c"]


def test_midstream_start_skips_to_the_first_message_without_errors() -> None:
    parser = HttpParser("request", start_midstream=True)
    events = parser.feed(os.urandom(3000).replace(b"\n", b"") + b"\r\nGET / HTTP/1.1\r\n\r\n", 1, 0)
    assert kinds(events) == ["RequestHead", "MessageEnd"]


def test_oversized_header_block_is_an_error_and_resyncs() -> None:
    parser = HttpParser("request")
    huge = b"GET /h HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 1000 + b"\r\n"
    events = parser.feed(huge, 1, 0)
    for number in range(2, 2 + MAX_HEAD // 1000 + 2):
        events += parser.feed(b"X-More: " + b"b" * 1000 + b"\r\n", number, 0)
        assert len(parser._buf) <= MAX_HEAD + 1
    events += parser.feed(b"\r\nGET /ok HTTP/1.1\r\n\r\n", 99, 0)
    errors = [e for e in events if isinstance(e, ParseError)]
    assert len(errors) == 1 and "header block longer" in errors[0].message
    assert [e.target for e in events if isinstance(e, RequestHead)] == ["/ok"]


def test_bad_framing_is_reported_not_raised() -> None:
    parser = HttpParser("request")
    events = parser.feed(b"POST /a HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\nhello\n"
                         b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
                         b"GET /c HTTP/1.1\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\n\r\n"
                         b"GET /d HTTP/2.0\r\n\r\n"
                         b"GET /e HTTP/1.1\r\n\r\n", 1, 0)
    assert [e.target for e in events if isinstance(e, RequestHead)] == ["/a", "/b", "/c", "/e"]
    messages = [e.message for e in events if isinstance(e, ParseError)]
    assert "invalid Content-Length" in messages[0]
    assert "invalid chunk size" in messages[1]
    # After that error the parser is resynchronising: the HTTP/2.0 line is skipped silently.
    assert len(messages) == 3 and "not a request line" in messages[2]
    assert [e.partial for e in events if isinstance(e, MessageEnd)] == [True, True, False, False]


@pytest.mark.parametrize("lengths, body", [
    (["3"], b"abc"), (["003"], b"abc"), ([" 3 ,3"], b"abc"), (["3", "3, 3"], b"abc"), (["0"], b""),
    (["3", "4"], None), (["3, 4"], None), (["+3"], None), (["\xb3"], None), (["-1"], None),
    (["1" * 21], None), ([""], None), (["3", ""], None)])
def test_content_length_values(lengths: list[str], body: bytes | None) -> None:
    """Every comma-separated value of every Content-Length field must be the same decimal
    number (ASCII digits only: "\xb3" is a digit to str.isdigit); read twice, to cover a value
    seen before."""
    head = "POST /a HTTP/1.1\r\n" + "".join(f"Content-Length: {v}\r\n" for v in lengths) + "\r\n"
    for _ in range(2):
        events = HttpParser("request").feed(head.encode("latin-1") + b"abc", 1, 0)
        if body is None:
            assert [e.message for e in events if isinstance(e, ParseError)] == [
                f"invalid Content-Length: {[v.strip(' ') for v in lengths]}"]
        else:
            assert bodies(events) == [body] and not [e for e in events if isinstance(e, ParseError)]


def test_truncated_message_at_eof_is_partial() -> None:
    parser = HttpParser("request")
    parser.feed(b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc", 1, 0)
    assert parser.eof(2, 0) == [MessageEnd(1, 0, 3, True)]
    parser.feed(b"GET / HTT", 3, 0)
    assert kinds(parser.eof(4, 0)) == ["ParseError"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"\r\n", b"\n\n", b"0\r\n", b"HTTP/1.1 200 OK\r\n", b"GET / HTTP/1.1\r\n",
                     b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n",
                     b"Content-Length: -1\r\n", b"ffffffff\r\n", b" folded\r\n"])),
    max_size=30), st.sampled_from(["request", "response"]), st.lists(st.integers(0, 50)))
def test_garbage_never_raises(pieces: list[bytes], role: str, gaps: list[int]) -> None:
    parser = HttpParser(role, start_midstream=bool(gaps and gaps[0] % 2))
    for number, piece in enumerate(pieces, start=1):
        parser.expect_response_to("GET")
        for event in parser.feed(piece, number, 0):
            assert isinstance(event, (RequestHead, ResponseHead, BodyChunk, MessageEnd,
                                      ParseError))
        if number < len(gaps):
            parser.gap(gaps[number], number, 0)
        assert len(parser._buf) <= MAX_HEAD + 1
    parser.eof(len(pieces) + 1, 0)
