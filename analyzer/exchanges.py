"""Requests paired with responses per TCP connection: the Exchange records.

`ExchangeAssembler` is the `StreamSink` the TCP reassembler feeds. Per connection it runs one
request parser (client→server) and one response parser (server→client), tells the response
parser each request's method in order, and pairs final responses with requests first in,
first out (HTTP/1.1 answers in request order). Request body bytes stream through `on_body`
in blocks of BODY_BLOCK (the last one at the message's end, before its exchange is emitted),
each with its offset in the body: bytes lost in a capture gap are skipped, never shifted into,
so a block after a gap lies where it belongs (a block never spans a gap). Response bodies are
only hashed: what a client uploads is what consumers store or replay. Only lengths and SHA-256
digests are kept.

Pairing goes by stream order alone, never by timestamps: on a connection whose handshake was
seen, a response that reaches the assembler before its request (the two directions recorded on
clocks apart) is held by the response parser until the request comes (`await_requests`), so it
pairs with it, framed by its method. After a gap in the client's stream that may have swallowed
whole requests, responses are no longer held: one whose request was lost is an orphan.

A server that writes bytes its framing did not announce (a body after `Content-Length: 0`)
costs no answer: the parser skips them to the next status line, and the response after them
carries their count and frame (`HttpMessage.extra_before`, `extra_frame`); extra bytes before
the end of a connection become a Problem.

An Exchange is emitted when its response has ended and its request has ended too (a server
may answer before the request body is complete). At connection close, requests still
waiting are emitted with the flag "no-response".

Flags:
- "partial": a message of the exchange lacks bytes (gap, truncation, broken framing).
- "gap": a capture gap touched one of its messages, or came just before one of them in the
  same direction (a request lost whole in a gap shifts the first-in first-out pairing after it).
- "overlap-conflict": a retransmission with different bytes overlapped one of its messages
  (found by stream offset among the exchanges not yet emitted; a conflict in bytes not yet
  parsed is put on the message being parsed, or else the next one, in that direction; a
  conflict in an exchange already emitted becomes a Problem instead).
- "no-response": the connection closed before a response.
- "orphan-response": a response with no request before it (request lost or capture began).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from bitstrace.analyzer.clock import iso
from bitstrace.analyzer.decode import format_endpoint, split_frame
from bitstrace.analyzer.http import (
    NO_HEADERS,
    BodyChunk,
    Event,
    ExtraBytes,
    Headers,
    HttpParser,
    MessageEnd,
    ParseError,
    RequestHead,
    ResponseHead,
    start_line_role,
)
from bitstrace.analyzer.problems import Problem, ProblemLog
from bitstrace.analyzer.tcp import CLIENT, SERVER, Connection
from bitstrace.analyzer.tls import TlsConnection, TlsDirection, TlsFacts, TlsKeys, is_client_hello, looks_like_tls

#: Body bytes are handed to `on_body` in blocks of about this size (a copy of each payload, but
#: one consumer call and one hash update per ~45 packets instead of one per packet, and no view
#: of a capture chunk escapes to a consumer that might keep it). Bounded: one block per
#: connection. Bodies nobody streams are hashed packet by packet: no copy at all.
BODY_BLOCK = 64 * 1024
_EMPTY_SHA256 = hashlib.sha256().hexdigest()


@dataclass(eq=False)
class HttpMessage:
    """One request or response head with its body's length and digest."""

    is_request: bool
    method: str | None  # requests only
    target: str | None  # requests only
    version: str
    status: int | None  # responses only
    reason: str | None  # responses only
    headers: Headers
    body_length: int = 0  # set, like the digest, when the message ends
    body_sha256: str | None = None  # hex; None while parsing and when partial
    first_frame: int = 0  # the frames that carried the first and last byte
    last_frame: int = 0
    first_ts_ns: int = 0
    last_ts_ns: int = 0
    partial: bool = False
    stream_offset: int = 0  # offset of the first byte in its direction's stream
    trailers: Headers = field(default_factory=Headers)
    first_capture: int = 0  # index of the capture file first_frame / last_frame number a frame of
    last_capture: int = 0   # (runs over several rotated files; 0 for one file)
    # responses: bytes skipped just before this one, after the previous response had ended
    # (they belong to no message), and the frame (of capture file extra_capture) of the first
    extra_before: int = 0
    extra_frame: int = 0
    extra_capture: int = 0


#: on_body(connection, request, block, offset of the block in the body)
BodyConsumer = Callable[[Connection, HttpMessage, "bytes | bytearray | memoryview", int], None]


@dataclass(eq=False)
class Exchange:
    index: int  # global, increasing in emission order
    connection: Connection
    request: HttpMessage | None
    response: HttpMessage | None
    informational: list[HttpMessage] = field(default_factory=list)  # 1xx before the response
    flags: set[str] = field(default_factory=set)


class _Pending:
    """An exchange under construction."""

    __slots__ = ("request", "response", "informational", "flags", "request_done",
                 "response_done")

    def __init__(self, request: HttpMessage | None) -> None:
        self.request = request
        self.response: HttpMessage | None = None
        self.informational: list[HttpMessage] = []
        self.flags: set[str] = set()
        self.request_done = request is None
        self.response_done = False


class _Direction:
    """Parsing state of one direction of one connection."""

    __slots__ = ("parser", "on_body", "current", "message", "digest", "unsent", "unsent_offset",
                 "mark_next", "extra")

    def __init__(self, parser: HttpParser | TlsDirection, on_body: BodyConsumer | None) -> None:
        self.parser = parser
        self.on_body = on_body  # None: this direction's bodies are only hashed
        self.current: _Pending | None = None  # the exchange of the message being parsed
        self.message: HttpMessage | None = None  # the message being parsed
        self.digest: Any = None  # hashlib sha256 of its body so far, None before its first byte
        self.unsent = bytearray()  # body bytes not yet handed to on_body
        self.unsent_offset = 0  # where in the body they begin
        self.mark_next: set[str] = set()  # flags for the next message in this direction
        self.extra: ExtraBytes | None = None  # extra bytes waiting for the response after them


class _ConnectionState:
    __slots__ = ("directions", "waiting", "open", "aborted", "roles_provisional", "tls")

    def __init__(self, midstream: bool, on_body: BodyConsumer | None) -> None:
        # Mid-stream, the first responses may answer requests sent before the capture began:
        # those are orphans, so responses are held for their requests only from the handshake.
        self.directions = (_Direction(HttpParser("request", start_midstream=midstream), on_body),
                           _Direction(HttpParser("response", start_midstream=midstream,
                                                 await_requests=not midstream), None))
        self.waiting: deque[_Pending] = deque()  # requests whose final response has not begun
        self.open: list[_Pending] = []  # every exchange not yet emitted, oldest first
        self.aborted = False
        # Mid-stream, the reassembler guessed client and server; the first start line decides.
        self.roles_provisional = midstream
        self.tls: TlsConnection | None = None

    def swap_roles(self, frame: int, ts_ns: int) -> None:
        """The connection's roles were swapped before any message was found: each stream's bytes
        so far were scanned by the wrong parser, so new parsers start where the streams are."""
        old_request, old_response = self.directions
        new = []
        roles: tuple[tuple[Literal["request", "response"], _Direction, BodyConsumer | None], ...] = (
            ("request", old_response, old_request.on_body), ("response", old_request, None))
        for role, old, on_body in roles:
            parser = HttpParser(role, start_midstream=True)
            parser.gap(old.parser.position, frame, ts_ns)  # nothing to parse before here
            side = _Direction(parser, on_body)
            side.mark_next = old.mark_next
            new.append(side)
        self.directions = (new[0], new[1])


class ExchangeAssembler:
    """A StreamSink turning both directions of each connection into Exchange records."""

    def __init__(self, on_exchange: Callable[[Exchange], None],
                 on_body: BodyConsumer | None = None, first_index: int = 0,
                 tls_keys: TlsKeys | None = None) -> None:
        """`on_body(connection, request, block, body_offset)`: each block of each request body
        (the request's length and digest are filled in at its end). `first_index`: the index of
        the first Exchange (to number on across capture files, pass the previous assembler's
        `next_index`). `tls_keys`: connections whose first bytes are TLS records go through
        the TLS layer with these keys (without it they are parsed as HTTP)."""
        self._on_exchange = on_exchange
        self._on_body = on_body
        self._connections: dict[int, _ConnectionState] = {}
        self.next_index = first_index
        self.problems = ProblemLog()  # the first few of each kind; all are counted
        #: Names of the capture files of the run, by index: what Problems name as their file.
        self.captures: list[str] = []
        self.tls_keys = tls_keys
        #: The TLS facts of every TLS connection closed so far, in closing order.
        self.tls_connections: list[TlsFacts] = []
        self._tls_resumption: dict[bytes, bytes] = {}  # TLS 1.2 master secrets across connections

    # -- StreamSink ----------------------------------------------------------------------

    def on_open(self, conn: Connection) -> None:
        """Nothing yet: the parsers are made at the first stream event, when the reassembler
        knows whether the connection's handshake was seen (else the capture began mid-stream)."""

    def on_data(self, conn: Connection, direction: int, data: bytes | memoryview, frame: int,
                ts_ns: int) -> None:
        state = self._connections.get(conn.id)
        if state is None:
            state, direction = self._first_data(conn, direction, data)
        if state.roles_provisional:
            direction = self._settle_roles(conn, state, direction, data, frame, ts_ns)
        side = state.directions[direction]
        if side.parser.feed_body(data, frame, ts_ns):  # the bulk of a body: no events needed
            self._body(conn, side, data)
        else:
            events = side.parser.feed(data, frame, ts_ns)
            if events:  # most TLS segments complete no record
                self._handle(conn, state, side, events)

    def on_gap(self, conn: Connection, direction: int, size: int, frame: int, ts_ns: int) -> None:
        self._mark(conn, direction, "gap")
        state = self._state(conn)
        side = state.directions[direction]
        if side.unsent:
            self._send_body(conn, side)
        self._handle(conn, state, side, side.parser.gap(size, frame, ts_ns))
        if side.message is not None:  # the parser kept its place in the body
            side.unsent_offset = side.parser.body_offset
        if not side.parser.in_message:  # whole messages may have been lost: pairing is suspect
            side.mark_next.add("gap")
            if direction == CLIENT:  # a response whose request was lost must not wait for the next
                server = state.directions[SERVER]
                self._handle(conn, state, server, server.parser.release())

    def on_conflict(self, conn: Connection, direction: int, offset: int, size: int,
                    frame: int) -> None:
        state = self._state(conn)
        if state.tls is not None:  # TCP offsets are not those of the decrypted stream
            self._mark(conn, direction, "overlap-conflict")
            return
        side = state.directions[direction]
        if offset >= side.parser.position:  # bytes still to come
            self._mark(conn, direction, "overlap-conflict")
            return
        head_start = side.parser.message_start
        if side.message is None and head_start is not None and offset >= head_start:
            side.mark_next.add("overlap-conflict")  # in the head being read
            return
        owner, owner_start = None, -1
        for pending in state.open:
            messages = ([pending.request] if direction == CLIENT
                        else [*pending.informational, pending.response])
            for message in messages:
                if message is not None and owner_start < message.stream_offset <= offset:
                    owner, owner_start = pending, message.stream_offset
        if owner is not None:
            owner.flags.add("overlap-conflict")
        else:
            self._add_problem(Problem(
                "overlap-conflict", f"retransmitted bytes differ ({size} bytes) in an exchange "
                "already reported or between messages", frame=frame, offset=offset,
                connection=conn.id))

    def on_fin(self, conn: Connection, direction: int, frame: int, ts_ns: int) -> None:
        state = self._state(conn)
        side = state.directions[direction]
        self._handle(conn, state, side, side.parser.eof(frame, ts_ns))

    def on_rst(self, conn: Connection, direction: int, frame: int, ts_ns: int) -> None:
        self._state(conn).aborted = True

    def on_close(self, conn: Connection) -> None:
        state = self._connections.get(conn.id)
        if state is None:
            return
        for side in state.directions:
            self._handle(conn, state, side, side.parser.release())  # no request is to come
            self._handle(conn, state, side,
                         side.parser.eof(conn.last_frame, conn.last_ts_ns, clean=not state.aborted))
            if side.extra is not None:
                self._add_problem(Problem(
                    "http-extra-bytes", f"{side.extra.size} bytes after the last response belong "
                    "to no message", frame=side.extra.frame, offset=side.extra.offset,
                    connection=conn.id))
        for pending in state.open:
            if pending.request is not None and pending.response is None:
                pending.flags.add("no-response")
            self._emit(conn, pending)
        del self._connections[conn.id]
        if state.tls is not None:
            state.tls.finish()
            self.tls_connections.append(state.tls.facts)

    # -- internals ----------------------------------------------------------------------

    def _state(self, conn: Connection) -> _ConnectionState:
        state = self._connections.get(conn.id)
        if state is None:
            state = _ConnectionState(not conn.handshake_seen, self._on_body)
            self._connections[conn.id] = state
        return state

    def _first_data(self, conn: Connection, direction: int,
                    data: bytes | memoryview) -> tuple[_ConnectionState, int]:
        """The state of a connection whose first event is `data`: TLS when its first bytes are
        a TLS record (whatever the port), else HTTP. Returns it with the direction of `data`
        (a ClientHello tells a mid-stream connection's client)."""
        if self.tls_keys is None or not looks_like_tls(data):
            return self._state(conn), direction
        hello = is_client_hello(data)
        if hello and direction == SERVER and not conn.handshake_seen:
            conn.swap_roles()
            direction = CLIENT
        state = _ConnectionState(not hello, self._on_body)
        state.roles_provisional = False
        facts = TlsFacts(conn.id, conn.client, conn.server, conn.first_frame)
        tls = TlsConnection(facts, self.tls_keys, self._tls_resumption, self._add_problem, hello)
        request, response = state.directions
        assert isinstance(request.parser, HttpParser) and isinstance(response.parser, HttpParser)
        request.parser, response.parser = tls.attach(request.parser, response.parser)
        tls.peer_events = lambda side, events: self._handle(conn, state, state.directions[side], events)
        state.tls = tls
        self._connections[conn.id] = state
        return state, direction

    def _settle_roles(self, conn: Connection, state: _ConnectionState, direction: int,
                      data: bytes | memoryview, frame: int, ts_ns: int) -> int:
        """A mid-stream connection's data at `direction` begins with a start line: it says
        which side is the client. Swaps the roles when the guess was wrong; returns the
        direction of `data` under the settled roles."""
        role = start_line_role(data)
        if role is None or conn.handshake_seen:  # a late SYN fixed the roles meanwhile
            return direction
        state.roles_provisional = False
        if (role == "request") == (direction == CLIENT):
            return direction
        conn.swap_roles()
        state.swap_roles(frame, ts_ns)
        return SERVER if direction == CLIENT else CLIENT

    def _mark(self, conn: Connection, direction: int, flag: str) -> None:
        side = self._state(conn).directions[direction]
        if side.current is not None:
            side.current.flags.add(flag)
        else:
            side.mark_next.add(flag)

    def _handle(self, conn: Connection, state: _ConnectionState, side: _Direction,
                events: list[Event]) -> None:
        for event in events:
            if type(event) is BodyChunk:
                self._body(conn, side, event.data)
            elif type(event) is MessageEnd:
                self._message_end(conn, state, side, event)
            elif type(event) is RequestHead:
                self._request_head(conn, state, side, event)
            elif type(event) is ResponseHead:
                self._response_head(state, side, event)
            elif type(event) is ExtraBytes:
                side.extra = event
            elif type(event) is ParseError:
                self._add_problem(Problem("http-parse-error", event.message, frame=event.frame,
                                          offset=event.offset, connection=conn.id))

    def _body(self, conn: Connection, side: _Direction, data: bytes | memoryview) -> None:
        if side.on_body is not None:
            side.unsent += data
            if len(side.unsent) >= BODY_BLOCK:
                self._send_body(conn, side)
        elif side.digest is not None:  # once per packet of a large body: kept to one test
            side.digest.update(data)
        else:  # the digest is made at the first body byte: most responses have none
            side.digest = hashlib.sha256(data)

    def _send_body(self, conn: Connection, side: _Direction) -> None:
        block, side.unsent = side.unsent, bytearray()  # the consumer may keep the block
        if side.digest is not None:
            side.digest.update(block)
        else:
            side.digest = hashlib.sha256(block)
        assert side.on_body is not None and side.message is not None  # bodies of a message are sent
        side.on_body(conn, side.message, block, side.unsent_offset)
        side.unsent_offset += len(block)

    def _start(self, side: _Direction, pending: _Pending, message: HttpMessage) -> None:
        side.current = pending
        side.message = message
        side.unsent_offset = 0
        if side.mark_next:
            pending.flags |= side.mark_next
            side.mark_next = set()

    def _request_head(self, conn: Connection, state: _ConnectionState, side: _Direction,
                      head: RequestHead) -> None:
        state.roles_provisional = False
        capture, frame = split_frame(head.frame)
        message = HttpMessage(True, head.method, head.target, head.version, None, None,
                              head.headers, first_frame=frame, first_ts_ns=head.ts_ns,
                              stream_offset=head.offset, trailers=NO_HEADERS,
                              first_capture=capture)
        pending = _Pending(message)
        state.waiting.append(pending)
        state.open.append(pending)
        self._start(side, pending, message)
        server = state.directions[SERVER]
        held = server.parser.expect_response_to(head.method)
        if held:  # the response came first: it pairs now
            self._handle(conn, state, server, held)

    def _response_head(self, state: _ConnectionState, side: _Direction,
                       head: ResponseHead) -> None:
        state.roles_provisional = False
        capture, frame = split_frame(head.frame)
        message = HttpMessage(False, None, None, head.version, head.status, head.reason,
                              head.headers, first_frame=frame, first_ts_ns=head.ts_ns,
                              stream_offset=head.offset, trailers=NO_HEADERS,
                              first_capture=capture)
        if side.extra is not None:
            message.extra_before = side.extra.size
            message.extra_capture, message.extra_frame = split_frame(side.extra.frame)
            side.extra = None
        if state.waiting:
            pending = state.waiting[0]
        else:  # nothing asked for it: an orphan, whose 1xx responses gather on it too
            pending = _Pending(None)
            pending.flags.add("orphan-response")
            state.waiting.append(pending)
            state.open.append(pending)
        if head.informational:
            pending.informational.append(message)
        else:
            state.waiting.popleft()
            pending.response = message
        self._start(side, pending, message)

    def _message_end(self, conn: Connection, state: _ConnectionState, side: _Direction,
                     end: MessageEnd) -> None:
        if side.unsent:
            self._send_body(conn, side)
        message, pending = side.message, side.current
        assert message is not None and pending is not None  # a message ends after its head
        message.last_capture, message.last_frame = split_frame(end.frame)
        message.last_ts_ns = end.ts_ns
        message.body_length = end.body_length
        message.partial = end.partial
        message.trailers = end.trailers
        if end.partial:
            pending.flags.add("partial")
        else:
            message.body_sha256 = _EMPTY_SHA256 if side.digest is None else side.digest.hexdigest()
        side.current = side.message = side.digest = None
        if message.is_request:
            pending.request_done = True
        elif message is pending.response:
            pending.response_done = True
        if pending.request_done and pending.response_done:
            state.open.remove(pending)
            self._emit(conn, pending)

    def _emit(self, conn: Connection, pending: _Pending) -> None:
        exchange = Exchange(self.next_index, conn, pending.request, pending.response,
                            pending.informational, pending.flags)
        self.next_index += 1
        self._on_exchange(exchange)

    def _add_problem(self, problem: Problem) -> None:
        capture, frame = split_frame(problem.frame or 0)
        file = self.captures[capture] if capture < len(self.captures) else None
        self.problems.report(replace(problem, frame=frame, file=file))


def first_message(exchange: Exchange) -> HttpMessage:
    """The message of `exchange` that began first: its request, else its first response."""
    first = exchange.request or (exchange.informational[0] if exchange.informational else exchange.response)
    assert first is not None  # an exchange holds a message
    return first


def message_to_json(message: HttpMessage, captures: Sequence[str] | None = None) -> dict[str, Any]:
    """One message as the `request`/`response` object of `exchange_to_json`."""
    record: dict[str, Any] = (
        {"method": message.method, "target": message.target, "version": message.version}
        if message.is_request else
        {"version": message.version, "status": message.status, "reason": message.reason})
    record.update(
        headers=[[name, value] for name, value in message.headers],
        trailers=[[name, value] for name, value in message.trailers],
        body_length=message.body_length,
        body_sha256=message.body_sha256,
        partial=message.partial,
        stream_offset=message.stream_offset,
        first_frame=message.first_frame,
        last_frame=message.last_frame,
        first_time=iso(message.first_ts_ns),
        first_epoch=message.first_ts_ns / 1e9,
        last_time=iso(message.last_ts_ns),
        last_epoch=message.last_ts_ns / 1e9,
    )
    if captures is not None:
        record.update(first_capture=captures[message.first_capture],
                      last_capture=captures[message.last_capture])
    return record


def exchange_to_json(exchange: Exchange, captures: Sequence[str] | None = None) -> dict[str, Any]:
    """The JSON Lines record of one exchange, as `bits-analyze --http` writes it.

    `captures`: the names of the run's capture files, given when there are several; the
    record and its messages then say which file their frame numbers count in.

    Fields:
      capture       (several files only) the file of the exchange's first frame
      index         int, global exchange number, increasing in emission order
      connection    int, TCP connection id (the numbering of tshark's tcp.stream)
      client        "ip:port" of the side that opened the connection ("[v6]:port" for IPv6);
                    when the capture missed the handshake, the side that sent requests
      server        "ip:port" likewise
      request       message object, or null for an orphan response
      response      message object, or null when none was seen
      informational list of message objects: 1xx responses before the final response
      flags         sorted list, from "gap", "no-response", "orphan-response",
                    "overlap-conflict", "partial" (see analyzer/exchanges.py)
    Message object:
      method, target       requests: method token and request-target as sent
      status, reason       responses: status code (int) and reason phrase
      version              "HTTP/1.1" or "HTTP/1.0"
      headers              [[name, value], ...] in wire order, raw case, values latin-1
      trailers             the same for trailer fields of a chunked body ([] if none)
      body_length          body bytes seen (de-chunked; bytes lost in gaps not counted)
      body_sha256          hex SHA-256 of the body, null when the message is partial
      partial              true when bytes of the message are missing
      stream_offset        offset of its first byte in its direction's TCP stream
      first_frame, last_frame  capture frame numbers carrying its first and last byte
      first_time, last_time    their timestamps, ISO 8601 UTC with microseconds
                               ("2026-01-31T12:00:00.123456Z")
      first_epoch, last_epoch  the same as float seconds since the Unix epoch
      first_capture, last_capture  (several files only) the files of first_frame and last_frame
    """
    conn = exchange.connection
    where = {} if captures is None else {"capture": captures[first_message(exchange).first_capture]}
    return {
        **where,
        "index": exchange.index,
        "connection": conn.id,
        "client": format_endpoint(*conn.client),
        "server": format_endpoint(*conn.server),
        "request": None if exchange.request is None else message_to_json(exchange.request, captures),
        "response": None if exchange.response is None else message_to_json(exchange.response, captures),
        "informational": [message_to_json(m, captures) for m in exchange.informational],
        "flags": sorted(exchange.flags),
    }
