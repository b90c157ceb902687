"""Sans-I/O HTTP/1.1 parser: the bytes of one TCP direction in, message events out.

One `HttpParser` per direction ("request" for client→server, "response" for server→client).
It never performs I/O and never raises on bad input: problems become `ParseError` events and
the parser resynchronises on the next message start.

Why it is shaped this way:
- Body bytes are the bulk of BITS traffic (fragments of MiBs), so they leave as `BodyChunk`
  slices (memoryviews) of the buffer given to `feed` - no copy, no per-byte Python work. A
  consumer that keeps a chunk beyond the call must copy it.
- Only a message head is buffered, only when it spans feeds (the usual head, wholly in one
  packet, is parsed straight from it), and only up to `MAX_HEAD` bytes.
- Captures lose bytes: after `gap()` a message whose length is known keeps its framing (and
  ends `partial`); otherwise it ends `partial` at once and the parser scans forward for the
  next start line (`TOKEN SP target SP HTTP/1.x` or `HTTP/1.x NNN`), at the start of a line or
  right after the gap.

- A server may write more than it announced (a body after `Content-Length: 0`): bytes after a
  complete response that do not begin a status line are skipped up to the next `HTTP/1.x NNN`
  and reported as one `ExtraBytes` event (their count, where they began), so the answers after
  them keep their places.
- A response's framing depends on its request's method (HEAD), and with the two directions
  recorded on clocks apart a response can reach the parser before its request. With
  `await_requests`, a final response that arrives when no request method is pending is held
  (its head and what follows, up to `MAX_HELD` bytes) until `expect_response_to` names the
  method; `expect_response_to` then returns the events of what was held. A gap, the end of the
  stream, `release()` or the cap lets it go framed without a method (an orphan).

Framing follows RFC 9112 section 6.3: Transfer-Encoding (final coding chunked) wins over
Content-Length; a response without either is read until the connection closes; requests
without either have no body; responses to HEAD, 1xx, 204 and 304 have no body. 1xx responses
are informational and do not consume the pending request method.
"""

from __future__ import annotations

import functools
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, NamedTuple

MAX_HEAD = 64 * 1024  # a header (or trailer) block longer than this is an error
MAX_START_LINE = 16 * 1024  # BITS URLs reach 2,200 chars; leave room for proxies' absolute form
MAX_CHUNK_LINE = 4 * 1024  # chunk size plus extensions
#: Bytes held after a response that came before its request (await_requests): what the server
#: can send within a clock skew before the request shows up. Past it the response is framed
#: without its method.
MAX_HELD = 1024 * 1024

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# Heads are matched as text decoded latin-1 (byte for character, so the patterns match as they
# would on the bytes); the bytes spellings serve start_line_role, which sees raw bytes.
_REQUEST_LINE_TEXT = re.compile(r"(" + _TOKEN + r") +([^\r\n]+?) +(HTTP/1\.[0-9]) *\r?\n")
_STATUS_LINE_TEXT = re.compile(r"(HTTP/1\.[0-9]) +([0-9]{3})(?:[ \t]([^\r\n]*))?\r?\n")
_START_LINE = {"request": _REQUEST_LINE_TEXT, "response": _STATUS_LINE_TEXT}
_REQUEST_LINE = re.compile(_REQUEST_LINE_TEXT.pattern.encode("ascii"))
_STATUS_LINE = re.compile(_STATUS_LINE_TEXT.pattern.encode("ascii"))
_REQUEST_ANCHOR = re.compile(rb" HTTP/1\.[0-9] *\r?\n")
_STATUS_ANCHOR = re.compile(rb"HTTP/1\.[0-9] [0-9]{3}")
_TOKEN_AT_END = re.compile(_TOKEN.encode("ascii") + rb"\Z")
_MAX_METHOD = 64
#: Methods recognised when resynchronising inside junk: registered HTTP and WebDAV methods, BITS.
_KNOWN_METHODS = (b"BITS_POST", b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT",
                  b"OPTIONS", b"TRACE", b"PATCH", b"PROPFIND", b"PROPPATCH", b"MKCOL", b"COPY",
                  b"MOVE", b"LOCK", b"UNLOCK", b"SEARCH", b"REPORT")
_LF = re.compile(rb"\n")
_BLOCK_END = re.compile(rb"\n\r?\n")  # the empty line ending a header or trailer block
_CHUNK_SIZE = re.compile(rb"[ \t]*([0-9A-Fa-f]+)[ \t]*(?:;[^\r\n]*)?\r?\n")
_DIGITS = re.compile(r"[0-9]{1,20}")  # bounded: int() refuses over 4,300 digits
_NO_BODY_STATUS = frozenset({204, 304})
_ASCII_SPACE = " \t\n\r\x0b\x0c"  # what bytes.strip() strips
# Start lines and header lines already parsed, shared by all parsers: the heads of one client
# or server repeat most lines message after message (target, session id, agent, host), so a
# line seen before costs one lookup, and what it holds are the same string objects each time,
# whose hashes later lookups (the BITS layer's caches) find already made. A field line parses
# the same wherever it stands (continuation lines, which depend on the line before, are never
# kept). Bounded in count and line length; cleared when full, so endless distinct lines cost a
# miss each, never unbounded memory.
_KNOWN_START_LINES: dict[str, dict[str, tuple[Any, ...]]] = {"request": {}, "response": {}}
_KNOWN_FIELDS: dict[str, tuple[tuple[str, str], str]] = {}  # line -> (field, lowercased name)
# Strict parsers keep their own: a line the lenient reading accepts may be an error to them.
_KNOWN_STRICT_FIELDS: dict[str, tuple[tuple[str, str], str]] = {}
_FIELD_NAME = re.compile(_TOKEN)
_MAX_KNOWN_LINES = 4096
_MAX_KNOWN_LINE = 256  # so each kind of line kept holds at most ~3 MB


def _raw(line: str) -> str:
    """A header line as the bytes repr the error messages show (`b'...'`, first 80 bytes)."""
    return repr(line[:80].encode("latin-1"))


class Headers:
    """Header fields in wire order, names in their raw case, values decoded latin-1.

    Iterating yields (name, value) pairs; lookups are case-insensitive.
    `by_name` maps each lowercased name to its first value (read it, never change it): the
    index `get` uses, made once per head, for consumers that look names up lowercased once.
    """

    __slots__ = ("_fields", "by_name")

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields = list(fields)
        self.by_name = _first_values(self._fields)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of `name` (any case), or `default`."""
        return self.by_name.get(name.lower(), default)

    def get_all(self, name: str) -> list[str]:
        """Every value of `name` (any case), in wire order."""
        name = name.lower()
        if name not in self.by_name:
            return []
        if len(self.by_name) == len(self._fields):  # no name repeats
            return [self.by_name[name]]
        return [value for field, value in self._fields if field.lower() == name]

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._fields == other._fields

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"


def _remember(known: dict[str, Any], line: str, parsed: tuple[Any, ...]) -> None:
    if len(line) <= _MAX_KNOWN_LINE:
        if len(known) >= _MAX_KNOWN_LINES:
            known.clear()
        known[line] = parsed


def _first_values(fields: list[tuple[str, str]]) -> dict[str, str]:
    """Lowercased name -> first value; one entry per field when no name repeats."""
    # reversed, so that the first of a repeated name is the value left in the dict
    return {name.lower(): value for name, value in reversed(fields)}


def _headers(fields: list[tuple[str, str]], by_name: dict[str, str]) -> Headers:
    """Headers over a list and its index the parser made for it alone (no copies)."""
    headers = object.__new__(Headers)
    headers._fields = fields
    headers.by_name = by_name
    return headers


NO_HEADERS = Headers()


class RequestHead(NamedTuple):
    method: str
    target: str
    version: str  # "HTTP/1.1"
    headers: Headers
    frame: int  # the frame that carried the first byte of the message
    ts_ns: int
    offset: int  # stream offset of the first byte of the message


class ResponseHead(NamedTuple):
    version: str
    status: int
    reason: str
    headers: Headers
    frame: int
    ts_ns: int
    offset: int

    @property
    def informational(self) -> bool:
        return 100 <= self.status < 200


class BodyChunk(NamedTuple):
    data: memoryview  # de-chunked body bytes, a slice of the buffer given to feed()
    frame: int
    ts_ns: int


class MessageEnd(NamedTuple):
    frame: int  # the frame that carried the last byte of the message
    ts_ns: int
    body_length: int  # body bytes delivered as BodyChunks (bytes lost in gaps not counted)
    partial: bool  # bytes are missing: gap, truncation or broken framing
    trailers: Headers = NO_HEADERS  # chunked trailer fields


class ExtraBytes(NamedTuple):
    """Bytes after a complete response that begin no message (a body its framing did not
    announce); the next response begins right after them."""

    size: int
    offset: int  # stream offset of the first extra byte
    frame: int  # the frame that carried it


class ParseError(NamedTuple):
    message: str
    offset: int  # stream offset where the problem was found
    frame: int


Event = RequestHead | ResponseHead | BodyChunk | MessageEnd | ExtraBytes | ParseError
# The events made for every message are built as plain tuples of their class: a NamedTuple's
# own constructor is a Python function, and this is the hot path.
_new_event = tuple.__new__
_Handler = Callable[[memoryview, int, int, list[Event]], int]


class HttpParser:
    """Parses one direction of an HTTP/1.x connection. See the module docstring."""

    # per-message state, set by _reset_message
    _head_seen: bool
    _partial: bool
    _body_length: int
    _body_skipped: int
    _remaining: int
    _first: tuple[int, int, int]
    _last: tuple[int, int]
    _at_line_start: bool
    _carry_first: tuple[int, int, int]

    def __init__(self, role: Literal["request", "response"], start_midstream: bool = False,
                 await_requests: bool = False, strict: bool = False) -> None:
        """`start_midstream`: the capture began inside the connection, so the first bytes may be
        the middle of a message: look for a start line instead of reporting garbage.
        `await_requests` (response role): hold a final response that no `expect_response_to`
        announced until one does (see the module docstring).
        `strict`: for a server reading requests (RFC 9112 5.1, 5.2), where a lenient reading is
        a smuggling risk: whitespace before a field's colon, a field name that is not a token
        and obsolete line folding are ParseErrors, not read as a capture parser reads them."""
        if role not in _START_LINE:
            raise ValueError(f"role must be 'request' or 'response', not {role!r}")
        self.role = role
        self.strict = strict
        self._known_fields = _KNOWN_STRICT_FIELDS if strict else _KNOWN_FIELDS
        self._start_re = _START_LINE[role]
        self._known_start_lines = _KNOWN_START_LINES[role]
        self._pending_methods: deque[str] = deque()
        self._base = 0  # stream offset of the first byte of the buffer being fed
        self._frame = 0
        self._ts = 0
        self._buf = bytearray()  # the head being read, or a line being scanned
        self._state: _Handler = self._idle
        self._await_requests = await_requests and role == "response"
        # A held response: its head's fields and frames, and the bytes fed after it as
        # (bytes, frame, ts, stream offset of their first byte).
        self._held_head: tuple[Any, ...] | None = None
        self._held: list[tuple[bytes, int, int, int]] = []
        self._held_size = 0
        self._eof_pending: tuple[int, int, bool] | None = None  # an end that came while holding
        # (stream offset, frame) of the first byte after a complete response that began no
        # status line: the start of extra bytes, reported when the next status line is found.
        self._extra: tuple[int, int] | None = None
        self._after_response = False  # a response has just ended: what follows should be one
        self._reset_message()
        if start_midstream:
            self._start_resync(at_line_start=True)

    # -- public API -----------------------------------------------------------------------

    @property
    def in_message(self) -> bool:
        """True when a message's head has been emitted and its end has not."""
        return self._head_seen

    @property
    def position(self) -> int:
        """Stream offset of the next byte to be fed (gaps included)."""
        return self._base

    @property
    def message_start(self) -> int | None:
        """Stream offset of the message being read (head or body), None between messages."""
        return None if self._state in (self._idle, self._resync) else self._first[2]

    @property
    def body_offset(self) -> int:
        """Offset within the current message's (de-chunked) body of the next body byte, bytes
        lost in gaps included: where the next BodyChunk lies in the body."""
        return self._body_length + self._body_skipped

    def expect_response_to(self, method: str) -> list[Event]:
        """(response role) The next final response answers a request with `method`. Returns the
        events of a response held for it (await_requests), else nothing."""
        self._pending_methods.append(method)
        if self._held_head is None:
            return []
        events: list[Event] = []
        self._release(events)
        if self._held_head is None and self._eof_pending is not None:
            events += self.eof(*self._eof_pending)
        return events

    def release(self) -> list[Event]:
        """Stop holding responses for their requests: a held one is framed without its method
        (an orphan, the caller decides), and later ones are not held."""
        self._await_requests = False
        events: list[Event] = []
        while self._held_head is not None:
            self._release(events)
        if self._eof_pending is not None:
            events += self.eof(*self._eof_pending)
        return events

    def feed(self, data: bytes | bytearray | memoryview, frame: int, ts_ns: int) -> list[Event]:
        """Parse the next bytes of the stream; returns the events they complete."""
        mv = memoryview(data).cast("B")
        self._frame = frame
        self._ts = ts_ns
        events: list[Event] = []
        pos, end = 0, len(mv)
        while pos < end:
            pos = self._state(mv, pos, end, events)
        self._base += end
        return events

    def feed_body(self, data: bytes | bytearray | memoryview, frame: int, ts_ns: int) -> bool:
        """The fast path for the bulk of a body: when every byte of `data` is body data of the
        current message and does not end it, take them and return True; the caller uses `data`
        itself as the one BodyChunk that `feed` would have returned. Otherwise take nothing and
        return False (call `feed`). Saves the event machinery on most packets of a large body."""
        size = len(data)
        if size >= self._remaining:  # also between messages and in heads, where it is 0
            return False
        self._remaining -= size
        self._body_length += size
        self._base += size
        self._last = (frame, ts_ns)
        return True

    def gap(self, size: int, frame: int, ts_ns: int) -> list[Event]:
        """`size` bytes of the stream are missing at the current position."""
        events: list[Event] = []
        while self._held_head is not None:  # what was held may never be answered for
            self._release(events)
        self._frame = frame
        self._ts = ts_ns
        self._extra = None  # what follows the gap is no longer known to follow a response
        self._after_response = False
        state = self._state
        if state in (self._in_body, self._in_chunk_data) and size < self._remaining:
            self._remaining -= size
            self._body_skipped += size
            self._partial = True
        elif state == self._in_body and size == self._remaining:
            self._partial = True
            self._end_message(events)
        elif state == self._until_close:
            self._body_skipped += size
            self._partial = True
        else:
            if self._head_seen:
                self._partial = True
                self._end_message(events)
            elif self._buf and state != self._resync:
                events.append(ParseError(f"message head cut by a {size}-byte gap",
                                         self._base, frame))
            self._start_resync(at_line_start=True)
        self._base += size
        return events

    def eof(self, frame: int, ts_ns: int, clean: bool = True) -> list[Event]:
        """The direction has ended (`clean=False`: by a reset). Idempotent. While a response is
        held for its request (which may still come: the other direction goes on), the end waits
        for it, or for `release`."""
        if self._held_head is not None:
            self._eof_pending = (frame, ts_ns, clean)
            return []
        self._eof_pending = None
        events: list[Event] = []
        self._frame = frame
        self._ts = ts_ns
        if self._after_response and self._state == self._start_line and self._extra is None:
            self._extra = (self._first[2], self._first[0])  # a line that never ended
        if self._extra is not None:
            self._buf.clear()
            start, first_frame = self._extra
            events.append(ExtraBytes(self._base - start, start, first_frame))
            self._extra = None
        if self._state == self._until_close:
            self._partial |= not clean
            self._end_message(events)
        elif self._head_seen:
            self._partial = True
            self._end_message(events)
        elif self._buf and self._state != self._resync:
            events.append(ParseError("stream ended inside a message head", self._base, frame))
        self._buf.clear()
        self._state = self._idle
        return events

    # -- message bookkeeping --------------------------------------------------------------

    def _reset_message(self) -> None:
        self._head_seen = False
        self._partial = False
        self._body_length = 0
        self._body_skipped = 0  # body bytes lost in gaps
        # Bytes left of the Content-Length body or the chunk being read: nonzero only in
        # _in_body and _in_chunk_data, which is what lets feed_body test it alone.
        self._remaining = 0
        self._first = (self._frame, self._ts, self._base)  # frame, ts, offset of first byte
        self._last = (self._frame, self._ts)  # frame, ts of the last byte so far
        # (method, target, version) of a request, (version, status, reason) of a response
        self._start_fields: tuple[Any, ...] | None = None

    def _end_message(self, events: list[Event], trailers: Headers = NO_HEADERS) -> None:
        frame, ts = self._last
        events.append(_new_event(MessageEnd, (frame, ts, self._body_length, self._partial,
                                              trailers)))
        self._reset_message()
        self._buf.clear()
        self._state = self._idle
        self._after_response = self.role == "response"

    def _error(self, events: list[Event], message: str, offset: int, at_line_start: bool) -> None:
        """Report broken framing; end the message in progress and look for the next one."""
        events.append(ParseError(message, offset, self._frame))
        if self._head_seen:
            self._partial = True
            self._end_message(events)
        self._after_response = False
        self._start_resync(at_line_start)

    def _start_resync(self, at_line_start: bool) -> None:
        self._reset_message()
        self._buf.clear()
        self._at_line_start = at_line_start  # the next byte begins a line
        self._carry_first = (self._frame, self._ts, self._base)  # frame, ts, offset of the carry
        self._state = self._resync

    # -- states: each takes (view, pos, end, events) and returns the new pos ---------------

    def _idle(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int:
        # RFC 9112 2.2: ignore empty lines before a start line (clients add one after bodies).
        while pos < end and mv[pos] in b"\r\n":
            pos += 1
        if pos < end:
            self._first = (self._frame, self._ts, self._base + pos)
            self._state = self._start_line
            pos = self._whole_head(mv, pos, end, events)
        return pos

    def _whole_head(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int:
        """The usual case: a valid head wholly inside this feed, parsed straight from the view.
        Returns `pos` unchanged when the head goes on past this feed or is not valid: the
        buffering path (`_start_line`, `_head_fields`) then reads it and reports what is wrong."""
        found = _BLOCK_END.search(mv, pos, min(end, pos + MAX_HEAD + 1))
        if found is None:
            return pos
        head = str(mv[pos:found.end()], "latin-1")
        line_end = head.index("\n") + 1  # the block end begins at the start line's LF or later
        if line_end > MAX_START_LINE + 1:
            return pos
        self._start_fields = self._read_start_line(head[:line_end])
        if self._start_fields is None:
            return pos
        self._last = (self._frame, self._ts)
        self._head_complete(head, line_end, events)
        return pos + len(head)

    def _start_line(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int:
        buf = self._buf
        room = MAX_START_LINE + 1 - len(buf)
        lf = _LF.search(mv, pos, min(end, pos + room))
        if lf is None:
            stop = min(end, pos + room)
            buf += mv[pos:stop]
            self._last = (self._frame, self._ts)
            if len(buf) > MAX_START_LINE:
                if self._after_response:
                    self._skip_extra(events)
                else:
                    self._error(events, f"start line longer than {MAX_START_LINE} bytes",
                                self._first[2], at_line_start=False)
            return stop
        stop = lf.end()
        buf += mv[pos:stop]
        self._last = (self._frame, self._ts)
        self._start_line_complete(events)
        return stop

    def _start_line_complete(self, events: list[Event]) -> None:
        self._start_fields = self._read_start_line(self._buf.decode("latin-1"))
        if self._start_fields is None and self._after_response:
            self._skip_extra(events)
            return
        if self._start_fields is None:
            kind = "request line" if self.role == "request" else "status line"
            self._error(events, f"not a {kind}: {bytes(self._buf[:80])!r}", self._first[2],
                        at_line_start=True)
            return
        self._state = self._head_fields

    def _skip_extra(self, events: list[Event]) -> None:
        """After a complete response, the buffered line is no status line: extra bytes. A status
        line glued to their end (no line feed between) is taken from the buffer; otherwise the
        line is skipped and the status line searched for after it."""
        buf = self._buf
        frame, ts, line_start = self._first
        if self._extra is None:
            self._extra = (line_start, frame)
        found = _STATUS_ANCHOR.search(buf, 1)
        if found is not None and buf.endswith(b"\n"):
            fields = self._read_start_line(buf[found.start():].decode("latin-1"))
            if fields is not None:
                start = line_start + found.start()
                extra_start, extra_frame = self._extra
                events.append(ExtraBytes(start - extra_start, extra_start, extra_frame))
                self._extra = None
                del buf[:found.start()]
                if start >= self._base:  # the status line began in this feed
                    frame, ts = self._frame, self._ts
                self._first = (frame, ts, start)
                self._start_fields = fields
                self._state = self._head_fields
                return
        self._start_resync(at_line_start=buf.endswith(b"\n"))

    def _read_start_line(self, line: str) -> tuple[Any, ...] | None:
        """The fields of a start line (`_start_fields`), or None when it is not one."""
        fields = self._known_start_lines.get(line)
        if fields is None:
            match = self._start_re.fullmatch(line)
            if match is None:
                return None
            if self.role == "request":
                fields = match.groups()
            else:
                version, status, reason = match.groups()
                fields = (version, int(status), (reason or "").strip(_ASCII_SPACE))
            _remember(self._known_start_lines, line, fields)
        return fields

    def _head_fields(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int:
        stop = self._read_block(mv, pos, end, events)
        if stop is None or self._state != self._head_fields:
            return end if stop is None else stop
        head = self._buf.decode("latin-1")
        self._head_complete(head, head.index("\n") + 1, events)
        return stop

    def _read_block(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int | None:
        """Append to the buffer up to the empty line ending a header/trailer block.

        Returns the position after it, or None when the block goes on in the next feed.
        """
        buf = self._buf
        self._last = (self._frame, self._ts)
        # The empty line may straddle the previous feed and this one.
        tail = bytes(buf[-2:])
        seam = _BLOCK_END.search(tail + bytes(mv[pos:pos + 2]))
        if seam is not None and seam.end() > len(tail):
            stop = pos + seam.end() - len(tail)
        else:
            room = MAX_HEAD + 1 - len(buf)
            found = _BLOCK_END.search(mv, pos, min(end, pos + room))
            if found is None:
                stop = min(end, pos + room)
                buf += mv[pos:stop]
                if len(buf) > MAX_HEAD:
                    self._error(events, f"header block longer than {MAX_HEAD} bytes",
                                self._first[2], at_line_start=False)
                    return stop
                return None
            stop = found.end()
        buf += mv[pos:stop]
        return stop

    def _parse_fields(self, text: str, start: int, events: list[Event]) -> Headers:
        """The fields of the header or trailer block that begins at `start` of `text` (decoded
        latin-1: byte for character, so it splits as the bytes would) and runs to its end,
        the empty line included."""
        fields: list[tuple[str, str]] = []
        by_name: dict[str, str] = {}
        folded = False
        known = self._known_fields
        for raw in text[start:].split("\n"):
            entry = known.get(raw)
            if entry is None:
                line = raw.removesuffix("\r")
                if not line:
                    continue
                if line[0] in " \t":  # obs-fold: a continuation of the previous value
                    if fields and not self.strict:
                        name, value = fields[-1]
                        fields[-1] = (name, f"{value} {line.strip(_ASCII_SPACE)}".strip())
                        folded = True
                        continue
                    what = "obsolete line folding" if fields else "continuation line without a field"
                    events.append(ParseError(f"{what}: {_raw(line)}", self._first[2], self._frame))
                    continue
                name, colon, value = line.partition(":")
                if not (name and colon) or (self.strict and not _FIELD_NAME.fullmatch(name)):
                    events.append(ParseError(f"malformed header line: {_raw(line)}",
                                             self._first[2], self._frame))
                    continue
                # Strip only ASCII whitespace, as bytes.strip() would (str.strip() also takes
                # \xa0...).
                name = name.rstrip(_ASCII_SPACE)
                entry = ((name, value.strip(" \t")), name.lower())
                _remember(known, raw, entry)
            field, key = entry
            fields.append(field)
            if key not in by_name:
                by_name[key] = field[1]
        if folded:  # the value continued may be the first of its name
            by_name = _first_values(fields)
        return _headers(fields, by_name)

    def _head_complete(self, head: str, fields_start: int, events: list[Event]) -> None:
        """The head is read: its start line taken, its fields beginning at `fields_start`."""
        headers = self._parse_fields(head, fields_start, events)
        frame, ts, offset = self._first
        self._head_seen = True
        self._buf.clear()
        if self.role == "request":
            method, target, version = self._start_fields or ("", "", "")
            events.append(_new_event(RequestHead,
                                     (method, target, version, headers, frame, ts, offset)))
            self._frame_body(headers, events, request=True, bodiless=False)
            return
        version, status, reason = self._start_fields or ("", 0, "")
        if self._await_requests and not self._pending_methods:
            self._held_head = (version, status, reason, headers, self._first, self._last)
            self._held_size = 0
            self._head_seen = False  # not given out yet
            self._state = self._awaiting_request
            return
        self._response_head(version, status, reason, headers, events)

    def _response_head(self, version: str, status: int, reason: str, headers: Headers,
                       events: list[Event]) -> None:
        frame, ts, offset = self._first
        head = _new_event(ResponseHead, (version, status, reason, headers, frame, ts, offset))
        events.append(head)
        if 100 <= status < 200:  # informational
            self._end_message(events)
            return
        method = self._pending_methods.popleft() if self._pending_methods else None
        self._frame_body(headers, events, request=False,
                         bodiless=method == "HEAD" or status in _NO_BODY_STATUS)

    def _awaiting_request(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int:
        self._held.append((bytes(mv[pos:end]), self._frame, self._ts, self._base + pos))
        self._held_size += end - pos
        if self._held_size > MAX_HELD:
            self._release(events)
        return end

    def _release(self, events: list[Event]) -> None:
        """Frame the held response (with the method now pending, if any) and parse what came
        after it, each piece with its own frame, time and offset."""
        assert self._held_head is not None
        version, status, reason, headers, self._first, self._last = self._held_head
        held = self._held
        self._held_head, self._held, self._held_size = None, [], 0
        self._state = self._idle  # as a head ends; _response_head sets the body's state
        self._head_seen = True
        self._response_head(version, status, reason, headers, events)
        frame, ts, base = self._frame, self._ts, self._base
        for data, self._frame, self._ts, self._base in held:
            mv = memoryview(data)
            pos, end = 0, len(mv)
            while pos < end:
                pos = self._state(mv, pos, end, events)
        self._frame, self._ts, self._base = frame, ts, base

    def _frame_body(self, headers: Headers, events: list[Event], request: bool, bodiless: bool) -> None:
        if bodiless:
            self._end_message(events)
            return
        offset = self._first[2]
        by_name = headers.by_name
        codings: list[str] = []
        if "transfer-encoding" in by_name:
            encodings = ",".join(headers.get_all("transfer-encoding")).split(",")
            codings = [c.strip().lower() for c in encodings if c.strip()]
        if codings:
            if codings[-1] == "chunked":
                self._state = self._chunk_size
            elif request:
                self._error(events, f"request Transfer-Encoding not ending in chunked: "
                            f"{', '.join(codings)}", offset, at_line_start=False)
            else:
                self._state = self._until_close
            return
        if "content-length" in by_name:
            content_lengths = headers.get_all("content-length")
            length = _content_length(",".join(content_lengths))
            if length is None:
                self._error(events, f"invalid Content-Length: {content_lengths}",
                            offset, at_line_start=False)
                return
            self._remaining = length
            if self._remaining:
                self._state = self._in_body
            else:
                self._end_message(events)
        elif request:
            self._end_message(events)
        else:
            self._state = self._until_close

    def _take_body(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int:
        """Pass on what is there of the `_remaining` body bytes; where they stop."""
        stop = min(end, pos + self._remaining)
        events.append(_new_event(BodyChunk, (mv[pos:stop], self._frame, self._ts)))
        self._body_length += stop - pos
        self._remaining -= stop - pos
        self._last = (self._frame, self._ts)
        return stop

    def _in_body(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int:
        stop = self._take_body(mv, pos, end, events)
        if not self._remaining:
            self._end_message(events)
        return stop

    def _until_close(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int:
        events.append(_new_event(BodyChunk, (mv[pos:end], self._frame, self._ts)))
        self._body_length += end - pos
        self._last = (self._frame, self._ts)
        return end

    def _chunk_size(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int:
        buf = self._buf
        self._last = (self._frame, self._ts)
        room = MAX_CHUNK_LINE + 1 - len(buf)
        lf = _LF.search(mv, pos, min(end, pos + room))
        stop = min(end, pos + room) if lf is None else lf.end()
        buf += mv[pos:stop]
        line_start = self._base + stop - len(buf)  # the line may have begun in earlier feeds
        if lf is None:
            if len(buf) > MAX_CHUNK_LINE:
                self._error(events, f"chunk size line longer than {MAX_CHUNK_LINE} bytes",
                            line_start, at_line_start=False)
            return stop
        match = _CHUNK_SIZE.fullmatch(buf)
        if match is None:
            self._error(events, f"invalid chunk size line: {bytes(buf[:80])!r}",
                        line_start, at_line_start=True)
            return stop
        self._remaining = int(match.group(1), 16)
        if self._remaining:
            buf.clear()
            self._state = self._in_chunk_data
        else:
            buf[:] = b"\n"  # so an immediately empty trailer section ends at the next CRLF
            self._state = self._trailers
        return stop

    def _in_chunk_data(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int:
        stop = self._take_body(mv, pos, end, events)
        if not self._remaining:
            self._state = self._chunk_data_end
        return stop

    def _chunk_data_end(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int:
        byte = mv[pos]
        if byte == 0x0A:
            self._buf.clear()
            self._state = self._chunk_size
        elif byte == 0x0D and not self._buf:
            self._buf.append(byte)
        else:
            self._error(events, "chunk data not followed by CRLF", self._base + pos,
                        at_line_start=False)
            return pos
        self._last = (self._frame, self._ts)
        return pos + 1

    def _trailers(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int:
        stop = self._read_block(mv, pos, end, events)
        if stop is None or self._state != self._trailers:
            return end if stop is None else stop
        self._end_message(events, self._parse_fields(self._buf.decode("latin-1"), 0, events))
        return stop

    def _resync(self, mv: memoryview, pos: int, end: int, events: list[Event]) -> int:
        carry = self._buf  # the tail of earlier bytes, which may hold the beginning of a start line
        lead = len(carry)
        window = bytes(carry) + bytes(mv[pos:end]) if lead else mv[pos:end]
        start = self._find_start(window)
        if start is not None:
            if start < lead:
                frame, ts, offset = self._carry_first
                self._first = (frame, ts, offset + start)
                del carry[:start]
                self._state = self._start_line
                self._extra_end(events)
                return pos
            carry.clear()
            self._first = (self._frame, self._ts, self._base + pos + start - lead)
            self._state = self._start_line
            self._extra_end(events)
            return pos + start - lead
        # Keep the bytes after the last line feed: a start line may begin among them.
        keep = max(0, len(window) - MAX_START_LINE)
        last_lf = bytes(window[keep:]).rfind(b"\n")
        if last_lf >= 0:
            keep += last_lf + 1
            self._at_line_start = True
        elif keep:
            self._at_line_start = False
        if keep >= lead:
            self._carry_first = (self._frame, self._ts, self._base + pos + keep - lead)
        else:
            frame, ts, offset = self._carry_first
            self._carry_first = (frame, ts, offset + keep)
        carry[:] = window[keep:]
        return end

    def _extra_end(self, events: list[Event]) -> None:
        """The resynchronisation found a start line: extra bytes, if it began after a response,
        end where it begins."""
        if self._extra is not None:
            extra_start, extra_frame = self._extra
            events.append(ExtraBytes(self._first[2] - extra_start, extra_start, extra_frame))
            self._extra = None

    def _find_start(self, window: bytes | memoryview) -> int | None:
        """Where the first start line in `window` begins; `window` may begin mid-line.

        Found by what cannot be body junk (" HTTP/1.x" ending a line, or "HTTP/1.x NNN"), then
        walked back: the target is the word before it, the method the token before that. A
        method glued to junk ("...xBITS_POST") is cut to the longest known method it ends with.
        """
        if self.role == "response":
            found = _STATUS_ANCHOR.search(window)
            return None if found is None else found.start()
        for anchor in _REQUEST_ANCHOR.finditer(window):
            low = max(0, anchor.start() - MAX_START_LINE)
            line = bytes(window[low:anchor.start()])
            line_feed = line.rfind(b"\n")
            at_line_start = line_feed >= 0 or (low == 0 and self._at_line_start)
            line_begin = low + line_feed + 1
            words = line[line_feed + 1:].rstrip(b" ").rsplit(b" ", 1)
            if len(words) != 2:
                continue
            before = words[0].rstrip(b" ")
            token = _TOKEN_AT_END.search(before[-_MAX_METHOD:])
            if token is None:
                continue
            method = token.group()
            if not (at_line_start and len(method) == len(before)):
                upper = method.upper()
                known = max((m for m in _KNOWN_METHODS if upper.endswith(m)), key=len, default=b"")
                method = method[len(method) - len(known):] if known else method
            return line_begin + len(before) - len(method)
        return None


@functools.lru_cache(maxsize=1024)  # a sender repeats its few lengths
def _content_length(value: str) -> int | None:
    """The length Content-Length `value` (its fields joined by commas) gives: every
    comma-separated number must be the same. None when it gives none."""
    lengths = set(map(str.strip, value.split(",")))
    length = lengths.pop()
    return int(length) if not lengths and _DIGITS.fullmatch(length) else None


def start_line_role(data: bytes | bytearray | memoryview) -> Literal["request", "response"] | None:
    """"request" when `data` begins with a request line, "response" with a status line: which
    side of a connection sent it, for captures that missed the handshake."""
    head = data[:MAX_START_LINE]
    if _STATUS_LINE.match(head):
        return "response"
    if _REQUEST_LINE.match(head):
        return "request"
    return None

