"""Captured BITS sessions → the ordered requests to replay, with timing and connection boundaries.

Planning reads the captures once through the analyzer's pipeline, in the order given, as one
capture (rotated files: connections and sessions cross file boundaries, and connections are
numbered across the files, as bits-analyze reads them). Request bodies are spooled to one
temporary file (in $TMPDIR) as they pass, never held whole in memory; a planned request points
into it. Only `BITS_POST` requests (in any letter case, as the analyzer counts them) are
planned: an upload-reply's GET of its reply, or BITS headers on another method, are not
replayed.

The sessions are the analyzer's own (analyzer.bits.sessions.SessionTracker): the same keys,
and an id the server issued again starts a new session (a new generation), as in the report.
The tracker sets some requests aside (a Ping, a Create challenged for credentials or left
unanswered); a faithful replay must still send them, on the connection and at the time the
client did, so each joins the session of the next request on its TCP connection that has one
(a Ping opens a connection for the session that follows), or failing that the previous one; a
connection with none at all forms its own group, named `connection-N`.

The planned requests themselves go to the same temporary file (marshalled, as they are made):
in memory the plan keeps, per request, only where it lies there and what ordering and
grouping need, so a capture of 100,000 requests plans in a few MB beyond what the analyzer's
own session tracker takes while reading. `PlannedSession.requests` reads a session's requests
back on each call (the replay reads them once per session and lets them go when it is done).
"""

from __future__ import annotations

import marshal
import os
import tempfile
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator, Sequence

from bitstrace.analyzer.basic_auth import AUTHORIZATION, auth_scheme
from bitstrace.analyzer.bits.packets import is_bits_method
from bitstrace.analyzer.bits.protocol import ContentRange, Header, PacketType, same_id
from bitstrace.analyzer.bits.sessions import Session, SessionTracker
from bitstrace.analyzer.http import Headers
from bitstrace.analyzer.pipeline import read_exchanges
from bitstrace.analyzer.problems import Problem
from bitstrace.replay.replayer.compare import AckSummary, summarize_ack

if TYPE_CHECKING:
    from bitstrace.analyzer.exchanges import Exchange, HttpMessage
    from bitstrace.analyzer.tcp import Connection

SPOOL_CHUNK = 1 << 16
#: Small appends are written out in batches of about this size: many small bodies (1 KiB
#: fragments) would otherwise cost a system call each. Appends of SPOOL_CHUNK or more (the
#: assembler's blocks of large bodies) are written at once, not copied into a batch.
SPOOL_BATCH = 1 << 20


class BodySpool:
    """Request bodies appended to one anonymous temporary file; read back in chunks.
    Appending is for one thread (the planner); once it is done, any number may read."""

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile(prefix="bits-replay-")
        self._written = 0  # bytes in the file
        self._pending = bytearray()  # appended after those, not yet written

    def append(self, data: bytes | bytearray | memoryview) -> int:
        """Add `data` at the end; returns its offset in the spool."""
        offset = self._written + len(self._pending)
        if len(data) >= SPOOL_CHUNK:
            self.flush()
            self._write(data)
        else:
            self._pending += data
            if len(self._pending) >= SPOOL_BATCH:
                self.flush()
        return offset

    def flush(self) -> None:
        """Write out what `append` holds back (`read` does so itself)."""
        pending, self._pending = self._pending, bytearray()
        self._write(pending)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        done = 0
        with memoryview(data) as view:
            while done < len(view):
                done += os.pwrite(self._file.fileno(), view[done:], self._written + done)
        self._written += done

    def read_at(self, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` (pread: safe from several threads)."""
        if self._pending:
            self.flush()
        data = os.pread(self._file.fileno(), length, offset)
        if len(data) != length:
            raise OSError(f"spool ends before {offset + length}")
        return data

    def read(self, body: "SpooledBody", skip: int = 0, take: int | None = None,
             chunk: int = SPOOL_CHUNK) -> Iterator[bytes]:
        """Bytes skip..skip+take of a body, in chunks (pread: safe from several threads)."""
        if self._pending:
            self.flush()
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
class SpooledBody:
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

    exchange: int  # Exchange.index: unique in the plan
    file: int  # which capture file the request began in (0-based, in the order given)
    connection: int  # captured TCP connection id (tcp.stream), numbered across the files
    frame: int
    ts_ns: int  # when the request began
    done_ts_ns: int  # when its answer ended (the request's end when there was none)
    method: str
    target: str
    version: str
    headers: Sequence[tuple[str, str]]  # the plan's own are tuples
    packet_type: PacketType | None
    packet_type_raw: str | None
    session_id: str | None  # the BITS-Session-Id it carried
    range: ContentRange | None
    body: SpooledBody | None
    response: AckSummary | None  # None: no answer in the capture
    index: int = -1  # its place in the plan's RequestStore; -1 for a request made up live

    def header(self, name: str) -> str | None:
        return Headers(self.headers).get(name)

    @property
    def label(self) -> str:
        kind = self.packet_type.value if self.packet_type else (self.packet_type_raw or "?")
        return f"{kind} {self.range}" if self.range else kind


class RequestStore:
    """Planned requests kept in the spool, each read back by its index. A request is stored
    as a marshal-encoded tuple of its plain fields (marshal writes and reads such tuples
    several times faster than pickle writes and reads the objects)."""

    def __init__(self, spool: BodySpool) -> None:
        self.spool = spool
        self._offsets = array("q")
        self._sizes = array("q")

    def __len__(self) -> int:
        return len(self._offsets)

    def add(self, request: PlannedRequest) -> int:
        request.index = len(self._offsets)
        data = marshal.dumps(_fields_of(request))
        self._offsets.append(self.spool.append(data))
        self._sizes.append(len(data))
        return request.index

    def load(self, index: int) -> PlannedRequest:
        return _request_of(marshal.loads(self.spool.read_at(self._offsets[index], self._sizes[index])))


def _fields_of(r: PlannedRequest) -> tuple[Any, ...]:
    rng, body, ack = r.range, r.body, r.response
    return (
        r.exchange, r.file, r.connection, r.frame, r.ts_ns, r.done_ts_ns, r.method, r.target,
        r.version, tuple(r.headers), r.packet_type.value if r.packet_type else None,
        r.packet_type_raw, r.session_id,
        (rng.first, rng.last, rng.total) if rng else None,
        (body.extents, body.length, body.complete, body.sha256) if body else None,
        (ack.status, ack.packet_type, ack.error_code, ack.error_context, ack.received,
         ack.reply_url, ack.session_id, ack.host_id) if ack else None,
        r.index,
    )


def _request_of(fields: Any) -> PlannedRequest:
    (exchange, file, connection, frame, ts_ns, done_ts_ns, method, target, version, headers,
     packet_type, packet_type_raw, session_id, rng, body, ack, index) = fields
    return PlannedRequest(
        exchange, file, connection, frame, ts_ns, done_ts_ns, method, target, version, headers,
        PacketType(packet_type) if packet_type is not None else None, packet_type_raw,
        session_id, ContentRange(*rng) if rng is not None else None,
        SpooledBody(*body) if body is not None else None,
        AckSummary(*ack) if ack is not None else None, index)


@dataclass
class PlannedSession:
    """One of the analyzer's sessions (or a connection that had none), in capture order.
    Its requests live in the plan's RequestStore: `requests` reads them (all, in order)."""

    # The captured session id, `ID (generation N)` when the server had issued it before, the
    # analyzer's `refused-create@FRAME` (`@CAPTURE:FRAME` with several captures) for a Create
    # that drew no session, or `connection-N`.
    key: str
    session_id: str | None = None  # as the analyzer names the session; None when it has no id
    generation: int = 0  # how many earlier sessions had this id
    store: RequestStore | None = field(default=None, repr=False, compare=False)
    indices: "array[int]" = field(default_factory=lambda: array("q"), repr=False)  # in the store
    connections: "array[int]" = field(default_factory=lambda: array("q"), repr=False)  # per request
    first_ts_ns: int = 0
    done_ts_ns: int = 0
    body_bytes: int = 0  # body bytes of its requests, as captured
    auth_schemes: frozenset[str] = frozenset()  # of the Authorization headers its requests carry
    # Fragments captured whole, in capture order, and the first of them at each start offset.
    _whole: list[PlannedRequest] | None = field(default=None, repr=False, compare=False)
    _by_start: dict[int, PlannedRequest] = field(default_factory=dict, repr=False, compare=False)

    @property
    def requests(self) -> list[PlannedRequest]:
        """Its requests, in capture order, read back from the store (a fresh list each call)."""
        assert self.store is not None
        return [self.store.load(index) for index in self.indices]

    def release(self) -> None:
        """Let go of what `entity_piece` keeps (the session's replay is over)."""
        self._whole = None
        self._by_start = {}

    def entity_piece(self, first: int, last: int,
                     requests: Sequence[PlannedRequest] | None = None) -> list[tuple[SpooledBody, int, int]] | None:
        """Where the captured fragments hold bytes first..last of the file: (body, skip, take)
        pieces in order, or None if some byte was never captured whole. Where fragments
        overlap, one that starts at the wanted byte is taken, else the first captured.
        `requests`: the session's requests when the caller has read them already."""
        if self._whole is None:
            self._whole = [r for r in (requests if requests is not None else self.requests)
                           if r.range and r.body and r.body.complete
                           and r.body.length == r.range.length]
            for request in self._whole:
                assert request.range is not None
                self._by_start.setdefault(request.range.first, request)
        pieces: list[tuple[SpooledBody, int, int]] = []
        position = first
        while position <= last:
            source = self._by_start.get(position) or next(
                (r for r in self._whole if r.range and r.range.first <= position <= r.range.last), None)
            if source is None or source.range is None or source.body is None:
                return None
            take = min(last, source.range.last) - position + 1
            pieces.append((source.body, position - source.range.first, take))
            position += take
        return pieces


@dataclass
class Plan:
    sessions: list[PlannedSession]
    spool: BodySpool  # the request bodies and the planned requests themselves (`store`)
    problems: list[Problem]
    complete: bool  # every capture was read to its end
    store: RequestStore | None = None

    @property
    def first_ts_ns(self) -> int:
        return min((s.first_ts_ns for s in self.sessions), default=0)

    def close(self) -> None:
        self.spool.close()

    def __enter__(self) -> "Plan":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class _SpoolingBody:
    extents: list[list[int]] = field(default_factory=list)
    length: int = 0


class _Planner:
    """Consumes the pipeline's exchanges and body chunks."""

    def __init__(self, spool: BodySpool, several_captures: bool) -> None:
        self.spool = spool
        self.store = RequestStore(spool)
        # The analyzer's sessions, which the plan follows; with several captures their keys
        # name frames `capture:frame`, as bits-analyze does.
        self.tracker: SessionTracker | None = SessionTracker(several_captures=several_captures)
        self.bodies: dict[tuple[int, int], _SpoolingBody] = {}  # by (connection, stream offset)
        # What ordering and grouping need of each stored request, by its index in the store.
        self.ts_ns = array("q")
        self.exchange = array("q")
        self.connection = array("q")
        self.done_ts_ns = array("q")
        self.body_length = array("q")
        self.auth_schemes: dict[int, frozenset[str]] = {}  # of the few requests with credentials

    def on_body(self, connection: Connection, head: HttpMessage, chunk: bytes | bytearray | memoryview,
                body_offset: int) -> None:
        """Spools the bytes as seen: a body with bytes lost in a gap is partial, so never
        replayed as complete, and `body_offset` is not needed to place them."""
        if not head.is_request or not is_bits_method(head.method):
            return
        key = (connection.id, head.stream_offset)
        entry = self.bodies.get(key)
        if entry is None:
            entry = self.bodies[key] = _SpoolingBody()
        size = len(chunk)
        offset = self.spool.append(chunk)
        extents = entry.extents
        if extents and extents[-1][0] + extents[-1][1] == offset:
            extents[-1][1] += size
        else:
            extents.append([offset, size])
        entry.length += size

    def on_exchange(self, exchange: Exchange) -> None:
        # The tracker makes a packet of every BITS_POST: the plan reads the fields it parsed
        # (type, range, ack) from it rather than parsing them again.
        assert self.tracker is not None, "the plan is made"
        packet = self.tracker.on_exchange(exchange)
        request = exchange.request
        if packet is None or request is None or not is_bits_method(request.method):
            return
        session_id = request.headers.get(Header.SESSION_ID)
        response = exchange.response
        planned = PlannedRequest(
            exchange=packet.exchange,
            file=packet.request_capture,
            connection=packet.connection,
            frame=packet.request_frame,
            ts_ns=packet.sent_ns,
            done_ts_ns=response.last_ts_ns if response else request.last_ts_ns,
            method=packet.method,
            target=packet.target,
            version=request.version,
            headers=tuple(request.headers),
            packet_type=packet.packet_type,
            packet_type_raw=packet.type_raw,
            session_id=session_id,  # unstripped, as sent
            range=packet.content_range,
            body=self._body(packet.connection, request),
            response=(summarize_ack(packet.status, packet.ack, packet.received_offset)
                      if packet.status is not None else None),
        )
        index = self.store.add(planned)
        self.ts_ns.append(planned.ts_ns)
        self.exchange.append(planned.exchange)
        self.connection.append(planned.connection)
        self.done_ts_ns.append(planned.done_ts_ns)
        self.body_length.append(planned.body.length if planned.body else 0)
        credentials = request.headers.get_all(AUTHORIZATION)
        if credentials:
            self.auth_schemes[index] = frozenset(map(auth_scheme, credentials))

    def _body(self, connection: int, request: HttpMessage) -> SpooledBody | None:
        entry = self.bodies.pop((connection, request.stream_offset), None)
        if entry is None:
            if request.body_length or request.partial:
                return SpooledBody((), 0, False, None)
            return None
        # The assembler hashed the very bytes it streamed here (request.body_sha256).
        complete = not request.partial and entry.length == request.body_length
        return SpooledBody(tuple((offset, length) for offset, length in entry.extents), entry.length, complete,
                    request.body_sha256 if complete else None)


def _planned(session: Session) -> PlannedSession:
    key = session.key if session.id is None else session.id
    if session.generation:
        key = f"{session.id} (generation {session.generation + 1})"
    return PlannedSession(key, session_id=session.id, generation=session.generation)


def _group(planner: _Planner) -> list[PlannedSession]:
    """The stored requests (taken in capture order) → the analyzer's sessions (the planner's
    tracker's, whose packets name the requests by exchange index), and groups for the requests
    it set aside (see the module docstring). Sessions are ordered by their first request; a
    session none of the requests belongs to (one filed from packets the plan does not hold)
    is left out. The tracker is let go of as soon as its sessions are read: it holds every
    packet, the bulk of what planning takes."""
    ts_ns, exchange, connection = planner.ts_ns, planner.exchange, planner.connection
    # Grouping needs the sessions as filed, not the analysis `finish` would make of them.
    assert planner.tracker is not None, "grouped once"
    sessions = planner.tracker.sessions()
    planner.tracker = None
    owners = [_planned(session) for session in sessions]
    owner = array("q", [-1]) * (max(exchange, default=-1) + 1)  # exchange -> index in owners
    for number, session in enumerate(sessions):
        for packet in session.packets:
            if packet.exchange < len(owner):
                owner[packet.exchange] = number
    del sessions
    # Capture order: by time, ties by exchange (two stable sorts keep the keys plain ints).
    order = sorted(range(len(ts_ns)), key=exchange.__getitem__)
    order.sort(key=ts_ns.__getitem__)
    chosen: list[PlannedSession | None] = [
        owners[owner[exchange[i]]] if owner[exchange[i]] >= 0 else None for i in order]
    by_connection: dict[int, list[int]] = {}
    for position, i in enumerate(order):
        by_connection.setdefault(connection[i], []).append(position)
    for conn, positions in by_connection.items():
        following: PlannedSession | None = None
        for position in reversed(positions):
            if chosen[position] is None:
                chosen[position] = following
            else:
                following = chosen[position]
        previous: PlannedSession | None = None
        for position in positions:
            if chosen[position] is None:
                chosen[position] = previous or PlannedSession(f"connection-{conn}")
            previous = chosen[position]
    grouped: dict[int, PlannedSession] = {}
    schemes: dict[int, set[str]] = {}
    for planned_or_none, i in zip(chosen, order):
        assert planned_or_none is not None
        planned = planned_or_none
        if not planned.indices:
            planned.store = planner.store
            planned.first_ts_ns = ts_ns[i]
            planned.done_ts_ns = planner.done_ts_ns[i]
            grouped[id(planned)] = planned
        planned.indices.append(i)
        planned.connections.append(connection[i])
        planned.done_ts_ns = max(planned.done_ts_ns, planner.done_ts_ns[i])
        planned.body_bytes += planner.body_length[i]
        if i in planner.auth_schemes:
            schemes.setdefault(id(planned), set()).update(planner.auth_schemes[i])
    for key, found in schemes.items():
        grouped[key].auth_schemes = frozenset(found)
    return sorted(grouped.values(), key=lambda s: (s.first_ts_ns, exchange[s.indices[0]]))


def build_plan(
    sources: Iterable[str | os.PathLike[str] | BinaryIO],
    sessions: Iterable[str] | None = None,
) -> Plan:
    """Read the captures and plan the replay of the selected sessions (all when None).

    Unknown selected ids are reported as problems of kind `unknown-session-selected`.
    """
    sources = list(sources)
    spool = BodySpool()
    planner = _Planner(spool, several_captures=len(sources) > 1)
    try:
        result = read_exchanges(sources, planner.on_exchange, planner.on_body)
    except BaseException:
        spool.close()
        raise
    spool.flush()
    problems = list(result.problems)
    grouped = _group(planner)
    if sessions is not None:
        wanted = list(sessions)

        def selected(session: PlannedSession, wanted_id: str) -> bool:
            return any(same_id(name, wanted_id) for name in (session.session_id, session.key) if name)

        chosen = [s for s in grouped if any(selected(s, w) for w in wanted)]
        for w in wanted:
            if not any(selected(s, w) for s in grouped):
                problems.append(Problem("unknown-session-selected",
                                        f"no session {w} in the capture"))
        grouped = chosen
    return Plan(grouped, spool, problems, result.complete, planner.store)
