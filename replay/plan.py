"""Captured BITS sessions → the ordered requests to replay, with timing and connection boundaries.

Planning reads the capture once through the analyzer's pipeline. Request bodies are spooled to
one temporary file (in $TMPDIR) as they pass, never held whole in memory; a planned request
points into it. Only `BITS_POST` requests (in any letter case, as the analyzer counts them) are
planned: an upload-reply's GET of its reply, or BITS headers on another method, are not replayed.

Sessions are keyed by the session id the Create ack issued or the request carried. A request
with no id of its own (Ping, a Create that drew no id) belongs to the session of the next
request on the same TCP connection that has one (a Ping opens a connection for the session
that follows), or failing that the previous one; a connection with no id at all forms its own
group, named `connection-F.N` (file F, connection N).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Iterable, Iterator

from analyzer.bits.packets import is_bits_method, session_key
from analyzer.bits.protocol import (
    ContentRange,
    Header,
    PacketType,
    parse_content_range,
    same_id,
)
from analyzer.pipeline import read_exchanges
from analyzer.problems import Problem
from replay.compare import AckSummary, summarize

if TYPE_CHECKING:
    from analyzer.exchanges import Exchange, HttpMessage
    from analyzer.tcp import Connection

SPOOL_CHUNK = 1 << 16


class BodySpool:
    """Request bodies appended to one anonymous temporary file; read back in chunks."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="bits-replay-")
        self._size = 0

    def append(self, data: bytes | memoryview) -> int:
        """Write `data` at the end; returns its offset in the spool."""
        offset = self._size
        view = memoryview(data)
        while view:
            written = os.pwrite(self._file.fileno(), view, self._size)
            view = view[written:]
            self._size += written
        return offset

    def read(self, body: "Body", skip: int = 0, take: int | None = None,
             chunk: int = SPOOL_CHUNK) -> Iterator[bytes]:
        """Bytes skip..skip+take of a body, in chunks (pread: safe from several threads)."""
        remaining = body.length - skip if take is None else take
        for start, length in body.extents:
            if skip >= length:
                skip -= length
                continue
            position, end = start + skip, start + min(length, skip + remaining)
            skip = 0
            while position < end:
                data = os.pread(self._file.fileno(), min(chunk, end - position), position)
                if not data:
                    raise OSError(f"body spool ends at {position}, expected {end}")
                position += len(data)
                remaining -= len(data)
                yield data
            if remaining <= 0:
                return

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True, slots=True)
class Body:
    """A request body in the spool: its (offset, length) extents there, in order (bodies of
    connections that overlap in time interleave in the spool). `complete` is False when the
    capture lost some of it."""

    extents: tuple[tuple[int, int], ...]
    length: int
    complete: bool
    sha256: str | None


@dataclass(slots=True)
class PlannedRequest:
    """One captured BITS request, exactly as it went on the wire, and the ack it drew."""

    exchange: int  # Exchange.index in its capture file
    file: int  # which capture file (0-based, in the order given)
    connection: int  # captured TCP connection id (tcp.stream) in that file
    frame: int
    ts_ns: int  # when the request began
    done_ts_ns: int  # when its answer ended (the request's end when there was none)
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    packet_type: PacketType | None
    packet_type_raw: str | None
    session_id: str | None  # the BITS-Session-Id it carried
    range: ContentRange | None
    body: Body | None
    response: AckSummary | None  # None: no answer in the capture

    @property
    def connection_key(self) -> tuple[int, int]:
        return (self.file, self.connection)

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers if k.lower() == lowered), None)

    @property
    def label(self) -> str:
        kind = self.packet_type.value if self.packet_type else (self.packet_type_raw or "?")
        return f"{kind} {self.range}" if self.range else kind


@dataclass
class PlannedSession:
    key: str  # captured session id, or `connection-N` for requests that never had one
    requests: list[PlannedRequest] = field(default_factory=list)
    # Fragments captured whole, in capture order, and the first of them at each start offset.
    _whole: list[PlannedRequest] | None = field(default=None, repr=False, compare=False)
    _by_start: dict[int, PlannedRequest] = field(default_factory=dict, repr=False, compare=False)

    @property
    def first_ts_ns(self) -> int:
        return self.requests[0].ts_ns

    @property
    def done_ts_ns(self) -> int:
        return max(r.done_ts_ns for r in self.requests)

    @property
    def body_bytes(self) -> int:
        return sum(r.body.length for r in self.requests if r.body)

    def entity_piece(self, first: int, last: int) -> list[tuple[Body, int, int]] | None:
        """Where the captured fragments hold bytes first..last of the file: (body, skip, take)
        pieces in order, or None if some byte was never captured whole. Where fragments
        overlap, one that starts at the wanted byte is taken, else the first captured."""
        if self._whole is None:
            self._whole = [r for r in self.requests if r.range and r.body and r.body.complete
                           and r.body.length == r.range.length]
            for request in self._whole:
                self._by_start.setdefault(request.range.first, request)
        pieces: list[tuple[Body, int, int]] = []
        position = first
        while position <= last:
            source = self._by_start.get(position) or next(
                (r for r in self._whole if r.range.first <= position <= r.range.last), None)
            if source is None:
                return None
            take = min(last, source.range.last) - position + 1
            pieces.append((source.body, position - source.range.first, take))
            position += take
        return pieces


@dataclass
class Plan:
    sessions: list[PlannedSession]
    spool: BodySpool
    problems: list[Problem]
    complete: bool  # every capture was read to its end

    @property
    def first_ts_ns(self) -> int:
        return min((s.first_ts_ns for s in self.sessions), default=0)

    def close(self) -> None:
        self.spool.close()

    def __enter__(self) -> "Plan":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _SpoolingBody:
    extents: list[list[int]] = field(default_factory=list)
    length: int = 0
    digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)


class _Planner:
    """Consumes the pipeline's exchanges and body chunks."""

    def __init__(self, spool: BodySpool) -> None:
        self.spool = spool
        self.file = 0
        self.bodies: dict[tuple[int, int], _SpoolingBody] = {}  # by (connection, stream offset)
        self.requests: list[PlannedRequest] = []
        self.strings: dict[tuple[str, str], tuple[str, str]] = {}

    def on_body(self, connection: Connection, head: HttpMessage, chunk: bytes | memoryview,
                body_offset: int) -> None:
        """Spools the bytes as seen: a body with bytes lost in a gap is partial, so never
        replayed as complete, and `body_offset` is not needed to place them."""
        if not head.is_request or not is_bits_method(head.method):
            return
        entry = self.bodies.setdefault((connection.id, head.stream_offset), _SpoolingBody())
        offset = self.spool.append(chunk)
        if entry.extents and entry.extents[-1][0] + entry.extents[-1][1] == offset:
            entry.extents[-1][1] += len(chunk)
        else:
            entry.extents.append([offset, len(chunk)])
        entry.length += len(chunk)
        entry.digest.update(chunk)

    def on_exchange(self, exchange: Exchange) -> None:
        request = exchange.request
        if request is None or not is_bits_method(request.method):
            return
        shared = self.strings.setdefault
        # Names and most values repeat request after request: keep one copy of each.
        headers = [shared((name, value), (name, value)) for name, value in request.headers]
        type_raw = request.headers.get(Header.PACKET_TYPE)
        packet_type = PacketType.parse(type_raw)
        range_text = request.headers.get(Header.CONTENT_RANGE)
        response = exchange.response
        self.requests.append(PlannedRequest(
            exchange=exchange.index,
            file=self.file,
            connection=exchange.connection.id,
            frame=request.first_frame,
            ts_ns=request.first_ts_ns,
            done_ts_ns=response.last_ts_ns if response else request.last_ts_ns,
            method=request.method,
            target=request.target,
            version=request.version,
            headers=headers,
            packet_type=packet_type,
            packet_type_raw=type_raw,
            session_id=request.headers.get(Header.SESSION_ID),
            range=parse_content_range(range_text) if range_text is not None else None,
            body=self._body(exchange.connection.id, request),
            response=summarize(response.status, response.headers.get) if response else None,
        ))

    def _body(self, connection: int, request: HttpMessage) -> Body | None:
        entry = self.bodies.pop((connection, request.stream_offset), None)
        if entry is None:
            if request.body_length or request.partial:
                return Body((), 0, False, None)
            return None
        complete = not request.partial and entry.length == request.body_length
        return Body(tuple((o, n) for o, n in entry.extents), entry.length, complete,
                    entry.digest.hexdigest() if complete else None)


def _session_of(request: PlannedRequest) -> str | None:
    if request.packet_type is PacketType.CREATE_SESSION:
        return request.response.session_id if request.response else None
    return request.session_id


def group_sessions(requests: list[PlannedRequest]) -> list[PlannedSession]:
    """Requests → sessions (see the module docstring), each in capture order; sessions ordered
    by their first request.

    Not analyzer.bits.sessions.SessionTracker, on purpose: the tracker sets id-less Pings and
    challenged Creates aside as strays, but a faithful replay must send them, on the connection
    and at the time the client did, so they join the session they opened the connection for.
    Ids are keyed alike (packets.session_key). A server re-issuing an id it issued before gets
    one replayed session here where the tracker counts generations."""
    keys: list[str | None] = [_session_of(r) for r in requests]
    by_connection: dict[tuple[int, int], list[int]] = {}
    for i, request in enumerate(requests):
        by_connection.setdefault(request.connection_key, []).append(i)
    for (file, connection), indices in by_connection.items():
        following: str | None = None
        for i in reversed(indices):
            if keys[i] is None:
                keys[i] = following
            else:
                following = keys[i]
        previous: str | None = None
        for i in indices:
            if keys[i] is None:
                keys[i] = previous or f"connection-{file}.{connection}"
            previous = keys[i]
    sessions: dict[str, PlannedSession] = {}  # by session_key: the first spelling seen names it
    for key, request in zip(keys, requests):
        session = sessions.get(session_key(key))
        if session is None:
            session = sessions[session_key(key)] = PlannedSession(key)
        session.requests.append(request)
    return sorted(sessions.values(), key=lambda s: (s.first_ts_ns, s.requests[0].file,
                                                   s.requests[0].exchange))


def build_plan(
    sources: Iterable[str | os.PathLike | BinaryIO],
    sessions: Iterable[str] | None = None,
) -> Plan:
    """Read the captures and plan the replay of the selected sessions (all when None).

    Unknown selected ids are reported as problems of kind `unknown-session-selected`.
    """
    spool = BodySpool()
    planner = _Planner(spool)
    problems: list[Problem] = []
    complete = True
    try:
        # One file at a time, so that connection ids (numbered per file) are told apart.
        for planner.file, source in enumerate(sources):
            result = read_exchanges([source], planner.on_exchange, planner.on_body)
            problems.extend(result.problems)
            complete = complete and result.complete
    except BaseException:
        spool.close()
        raise
    planner.requests.sort(key=lambda r: (r.ts_ns, r.file, r.exchange))
    grouped = group_sessions(planner.requests)
    if sessions is not None:
        wanted = list(sessions)
        chosen = [s for s in grouped if any(same_id(s.key, w) for w in wanted)]
        for w in wanted:
            if not any(same_id(s.key, w) for s in grouped):
                problems.append(Problem("unknown-session-selected",
                                        f"no session {w} in the capture"))
        grouped = chosen
    return Plan(grouped, spool, problems, complete)
