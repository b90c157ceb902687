"""TCP reassembly: segments in, per-direction ordered byte streams out (data, gap, conflict, fin, rst).

Each connection has two directions (CLIENT: client→server, SERVER: server→client), each
reassembled on its own. A direction's stream offset 0 is the byte after the ISN when the SYN
(or the SYN-ACK that acknowledges it) was seen, else the lowest sequence number seen
(mid-stream start). Until a SYN or SYN-ACK settles it, a direction's bytes are held, not
delivered (the SYN may be recorded after them, or earlier bytes after later ones): for
`reorder_window`, until the peer sends data acknowledging all that is held (the answer is then
delivered after what it answers: while one direction is held, each of the other's packets is
looked at), or until a cap is reached. Sequence numbers are compared
modulo 2^32 relative to the next expected byte, so streams cross the 32-bit wrap freely.

Policies, all chosen to keep the stream going rather than stall it:
- Overlaps keep the first copy seen; where a later copy differs, `on_conflict` names the span
  from its first to its last differing byte. Overlaps with bytes already delivered are checked
  against the last `history` delivered payloads (older retransmissions go unchecked). These are
  copies: a view would keep its whole 64 KiB capture chunk alive (for every idle connection),
  so memory is bounded by the count times the segment size.
- A 0/1-byte segment at next-1 is a keep-alive (or Linux zero-window probe): ignored, never a
  conflict. A 1-byte zero-window probe at next is ordinary data; its retransmission is identical.
- Holes become gaps (`on_gap` with their size, at the current position) only when their bytes
  can no longer come: the capture cut the payload (`Segment.missing`), out-of-order data
  exceeds `max_buffer` for the direction (or the budget over all connections, below), the
  connection is over, the input ends, or `reorder_window` of capture time has passed since the
  first evidence of bytes past the hole (data, the FIN, an ACK, a RST) was seen. SPAN ports,
  mergecap'd two-tap captures and multi-queue NICs record frames out of order and one
  direction's clock ahead of the other's, so an ACK for unseen bytes is no evidence of loss
  before then; what the peer acknowledged and never showed up is counted lost when the hole is
  declared (the ACK gives its size).
- A RST ends the connection, but when bytes known to exist (buffered past a hole, acknowledged
  by the peer, or before the RST's own sequence number) are still missing, the connection waits
  for them as a hole waits: the RST is recorded before its last data in reordered captures.
  Data past what was known at the RST is dropped, as after a close.
- Memory: each direction buffers at most `max_buffer` out-of-order bytes in `_MAX_CHUNKS` runs
  and keeps its last `history` payloads; over all connections, out-of-order bytes and histories
  together stay within `max_buffered`. Past it the histories of the connections silent longest
  go first (they only check retransmissions), then the oldest holes give way, each a located
  Problem ("reassembly-budget") in `problems`.
- FIN is delivered in order at its position; data past it is dropped and counted. The
  connection closes when both FINs are through, or at a RST once nothing known is missing
  (buffered data is flushed first; `on_rst` comes where the streams end).
- Connection ids follow tshark's tcp.stream: a new id on a 4-tuple's first packet, and when a
  SYN (without ACK) carries an ISN other than that side's recorded base (port reuse). A SYN
  retransmitted with the same ISN, even after a RST, stays in its connection, as in tshark.
  A closed connection is kept for `CLOSED_LINGER_NS` of capture time after its last packet
  (TIME_WAIT at its longest), then dropped; its 4-tuple stays known with only each side's ISN,
  because tshark never forgets one: a later packet on it (a stray ACK, the SYN resent) still
  counts as that connection and is dropped, and only a SYN with another ISN opens a new one.
  Keeps memory nearly flat over a long capture of many short connections, ids as tshark's.
  One exception, where tshark's id follows the recording order rather than the connection: a
  SYN from a side that sent none yet, on a connection younger than `reorder_window`, whose ISN
  lies before what was seen of that side (its data or the peer's ACKs were recorded first), is
  that connection's own SYN, not a new connection.
- Roles: the SYN sender is the client, the SYN-ACK sender the server, even when the SYN or
  SYN-ACK is recorded after the first packets (as long as no byte was delivered). Mid-stream the roles are
  a provisional guess (the side with the lower port is the server; on equal ports, the first
  packet's receiver) that the sink, which can read the application data, may correct with
  `Connection.swap_roles` (servers often listen on high ports).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from heapq import heappop, heappush
from itertools import count
from typing import TYPE_CHECKING, Protocol

from bitstrace.analyzer.problems import Problem, ProblemLog

if TYPE_CHECKING:
    from bitstrace.analyzer.decode import Segment

CLIENT = 0
SERVER = 1

FIN = 0x01
SYN = 0x02
RST = 0x04
ACK = 0x10

_SEQ_MASK = 0xFFFFFFFF
_SEQ_SPAN = 1 << 32
_SEQ_HALF = 1 << 31
# RFC 7323 caps a scaled window at 2^30: no sender has more in flight, so an ACK further ahead
# than that, or data starting further ahead, is not of this connection's sequence space.
_MAX_WINDOW = 1 << 30
_SLOW_FLAGS = FIN | SYN | RST
#: How long, in capture time, a hole waits for its bytes once bytes past it were seen.
REORDER_WINDOW_NS = 2 * 1_000_000_000
#: Out-of-order bytes plus retransmission history held over all connections, by default.
MAX_BUFFERED = 512 << 20
# ACK evidence is kept as (offset, first seen) marks, one per this fraction of the window: a
# hole may be declared up to 1/8 of the window early, and a skewed capture's stream of ACKs
# ahead of the data costs a few marks, not one per ACK.
_MARKS_PER_WINDOW = 8
#: How long a closed connection is kept, in capture time after its last packet: TIME_WAIT at
#: its longest, 2 MSL (RFC 9293). Its 4-tuple stays known after that (see the module doc).
CLOSED_LINGER_NS = 240 * 1_000_000_000
# Buffered runs per direction; past it, like past max_buffer, the oldest hole becomes a gap
# (keeps sorted-list inserts cheap against captures of many tiny scattered segments).
_MAX_CHUNKS = 1 << 13


class Connection:
    """One TCP connection, both directions. Counters are per direction: index CLIENT / SERVER."""

    __slots__ = (
        "id", "client", "server", "first_frame", "first_ts_ns", "last_frame", "last_ts_ns",
        "handshake_seen", "closed", "gaps", "gap_bytes", "conflicts", "conflict_bytes",
        "keepalives", "after_fin_bytes", "out_of_window", "rst", "_halves",
    )

    def __init__(self, id: int, client: tuple[bytes, int], server: tuple[bytes, int],
                 frame: int, ts_ns: int) -> None:
        self.id = id
        self.client = client
        self.server = server
        self.first_frame = self.last_frame = frame
        self.first_ts_ns = self.last_ts_ns = ts_ns
        self.handshake_seen = False  # a SYN or SYN-ACK of this connection was seen
        self.closed = False
        self.gaps = [0, 0]
        self.gap_bytes = [0, 0]
        self.conflicts = [0, 0]
        self.conflict_bytes = [0, 0]
        self.keepalives = [0, 0]  # 1-byte keep-alives ignored
        self.after_fin_bytes = [0, 0]  # data bytes past the FIN, dropped
        self.out_of_window = [0, 0]  # segments whose data starts beyond any possible window
        # The RST (its sender's half, frame, time) while the connection waits for missing bytes.
        self.rst: tuple[_Half, int, int] | None = None
        self._halves: tuple[_Half, _Half] = ()  # type: ignore[assignment]  # set by the reassembler

    def swap_roles(self) -> None:
        """Make the client the server and back: for a mid-stream connection whose data shows
        the provisional roles wrong. Directions, counters and stream positions follow; events
        from then on carry the new directions."""
        self.client, self.server = self.server, self.client
        for name in _TOTALS:
            getattr(self, name).reverse()
        to_client, to_server = self._halves
        to_server.direction, to_client.direction = CLIENT, SERVER
        self._halves = (to_server, to_client)

    def position(self, direction: int) -> int:
        """Current stream offset of `direction`: bytes delivered plus bytes declared missing."""
        return self._halves[direction].offset

    @property
    def data_bytes(self) -> tuple[int, int]:
        """Bytes delivered through on_data, per direction."""
        return (self._halves[0].offset - self.gap_bytes[0], self._halves[1].offset - self.gap_bytes[1])

    def __repr__(self) -> str:
        return f"Connection(id={self.id}, client={self.client!r}, server={self.server!r})"


class StreamSink(Protocol):
    def on_open(self, conn: Connection) -> None: ...

    def on_data(self, conn: Connection, direction: int, data: bytes | memoryview,
                frame: int, ts_ns: int) -> None: ...

    def on_gap(self, conn: Connection, direction: int, size: int, frame: int, ts_ns: int) -> None: ...

    def on_conflict(self, conn: Connection, direction: int, offset: int, size: int,
                    frame: int) -> None: ...

    def on_fin(self, conn: Connection, direction: int, frame: int, ts_ns: int) -> None: ...

    def on_rst(self, conn: Connection, direction: int, frame: int, ts_ns: int) -> None: ...

    def on_close(self, conn: Connection) -> None: ...


class _Half:
    """Reassembly state of one direction.

    `expect` equals `next_seq` while an in-order segment may go straight to the sink (synced, no
    buffered data, no FIN seen, open); otherwise -1, which no sequence number equals.
    Buffered out-of-order data is kept in `starts`/`chunks`: sorted, non-overlapping, all at or
    past `offset`, with `seen` the capture time each run's first byte came. `history` holds the
    most recently delivered payloads, ending at `offset`.
    """

    __slots__ = (
        "conn", "direction", "peer", "synced", "from_syn", "wire_base", "next_seq", "expect", "offset",
        "starts", "chunks", "seen", "buffered", "fin_offset", "fin_seen", "fin_done", "history",
        "acked_to", "ack_marks", "queued", "anchored", "tentative_since", "syn_isn",
    )

    def __init__(self, conn: Connection, direction: int, history: int) -> None:
        self.conn = conn
        self.direction = direction
        self.peer: _Half = self
        self.synced = False
        self.from_syn = False  # synced by its own SYN without ACK: the side that opened
        self.wire_base: int | None = None  # tshark's base_seq: decides port reuse
        self.next_seq = 0
        self.expect = -1
        self.offset = 0
        self.starts: list[int] = []
        self.chunks: list[bytearray] = []
        self.seen: list[int] = []
        self.buffered = 0
        self.fin_offset: int | None = None
        self.fin_seen = 0  # capture time the FIN was first seen
        self.fin_done = False
        self.history: deque[bytes] = deque(maxlen=history)  # _NO_HISTORY once closed
        # The stream is known to reach this offset (the peer acknowledged it, or a RST's sequence
        # number says so); `ack_marks` holds [offset, first seen] steps of it past `offset`.
        self.acked_to = 0
        self.ack_marks: deque[list[int]] = deque()
        self.queued = False  # has an entry in the reassembler's deadline heap
        # Where offset 0 is, is settled (anchored) by a SYN or SYN-ACK. Without one the stream
        # is held, not delivered, from `tentative_since` for the reordering window: a SYN
        # recorded late, or earlier bytes recorded after later ones, may still move offset 0.
        self.anchored = False
        self.tentative_since = 0
        self.syn_isn: int | None = None  # the ISN of this side's SYN (or SYN-ACK), once seen

    def sync(self, seq: int) -> None:
        self.synced = True
        self.next_seq = self.expect = seq

    def offset_of(self, seq: int) -> int:
        delta = (seq - self.next_seq) & _SEQ_MASK
        if delta >= _SEQ_HALF:
            delta -= _SEQ_SPAN
        return self.offset + delta

    def refresh(self) -> None:
        # While the peer holds its stream (offset 0 unsettled), this one takes the slow path,
        # which lets the peer's stream go before an answer to it: the exchange layer sees the
        # two directions in the capture's order.
        peer = self.peer
        fast = (self.synced and self.anchored and not self.starts and self.fin_offset is None
                and self.conn.rst is None and (peer.anchored or not peer.synced))
        self.expect = self.next_seq if fast else -1

    def missing_bytes(self) -> bool:
        """Whether bytes known to exist past `offset` are still to come."""
        if not self.synced:
            return False
        end = self.acked_to if self.fin_offset is None else self.fin_offset  # nothing is data past a FIN
        return bool(self.starts) or end > self.offset


class TcpReassembler:
    """Feeds `sink` the in-order streams of every TCP connection in a capture."""

    def __init__(self, sink: StreamSink, max_buffer: int = 8 << 20, history: int = 64,
                 reorder_window: float = REORDER_WINDOW_NS / 1e9, max_buffered: int = MAX_BUFFERED) -> None:
        """`reorder_window` in seconds of capture time; `max_buffered` in bytes over all
        connections (out-of-order data and retransmission history)."""
        if history < 1:
            raise ValueError("history must keep at least one payload")
        self._sink = sink
        self._on_data = sink.on_data
        self._max_buffer = max_buffer
        self._history = history
        self._window = int(reorder_window * 1e9)
        self._mark_span = self._window // _MARKS_PER_WINDOW
        self._max_buffered = max_buffered
        self._buffered_held = 0  # out-of-order bytes over all connections
        # The budget less the out-of-order bytes and the retransmission histories of all
        # connections. For the histories it counts what was appended, not what each deque lets
        # go (that keeps the per-packet path to one subtraction), so it only underestimates; it
        # is made exact whenever it goes below 0, about once per budget of data delivered.
        self._room = max_buffered
        self._now = -1 << 62  # the latest capture time seen on the slow path
        # (check time, tie-breaker, half): when to look whether a half's hole has waited long enough.
        self._deadlines: list[tuple[int, int, _Half]] = []
        self._tie = count()
        self.problems = ProblemLog()
        self.file: str | None = None  # the capture being read, for problems
        self._halves: dict[tuple[bytes, int, bytes, int], _Half] = {}
        self._open: dict[int, Connection] = {}
        # Closed connections until forgotten, with their last packet's time when queued.
        self._closed: deque[tuple[int, Connection]] = deque()
        # The 4-tuples of forgotten connections, each direction's with its wire_base (tshark's
        # base_seq): what decides whether a later SYN opens a new connection.
        self._forgotten: dict[tuple[bytes, int, bytes, int], int | None] = {}
        self._closed_totals = dict.fromkeys(_TOTALS, 0)
        self.connection_count = 0

    @property
    def stats(self) -> dict[str, int]:
        """Totals over all connections so far: connections, gaps, gap_bytes, conflicts, ..."""
        totals = dict(self._closed_totals)
        for conn in self._open.values():
            _add_totals(totals, conn)
        return {"connections": self.connection_count, **totals}

    def feed(self, segment: Segment) -> None:
        self.receive(*segment)

    def receive(self, frame: int, ts_ns: int, src: bytes, sport: int, dst: bytes, dport: int, seq: int,
                ack: int, flags: int, window: int, payload: memoryview, missing: int) -> None:
        """feed() with the Segment's fields as arguments: the per-packet loop (Decoder.decode_into)
        calls this without making a Segment."""
        half = self._halves.get((src, sport, dst, dport))
        if (half is None or flags & _SLOW_FLAGS or missing or not half.synced
                or payload and seq != half.expect):
            self._receive_slow(half, frame, ts_ns, src, sport, dst, dport, seq, ack, flags, payload, missing)
            return
        conn = half.conn
        conn.last_frame = frame
        conn.last_ts_ns = ts_ns
        peer = half.peer
        if ack != peer.next_seq and flags & ACK:
            if peer.synced:
                ahead = (ack - peer.next_seq) & _SEQ_MASK
                if ahead <= _MAX_WINDOW:
                    self._acknowledged_unseen(peer, ahead, frame, ts_ns)
            elif peer.wire_base is None:
                peer.wire_base = (ack - 1) & _SEQ_MASK
        if payload:
            size = len(payload)
            half.offset += size
            half.next_seq = half.expect = (half.expect + size) & _SEQ_MASK
            half.history.append(bytes(payload))  # a copy: a view would pin its capture chunk
            self._room -= size
            if self._room < 0:
                self._relieve(frame)
            self._on_data(conn, half.direction, payload, frame, ts_ns)

    def finish(self) -> None:
        """Flush every open connection (holes before buffered data become gaps), then close it."""
        for conn in list(self._open.values()):
            self._close(conn, conn.last_frame, conn.last_ts_ns)
        self._deadlines.clear()

    # -- the slow path: everything but an in-order data segment or a plain ACK --

    def _receive_slow(self, half: _Half | None, frame: int, ts_ns: int, src: bytes, sport: int, dst: bytes,
                      dport: int, seq: int, ack: int, flags: int, payload: memoryview, missing: int) -> None:
        if ts_ns > self._now:
            self._now = ts_ns
            if self._deadlines and self._deadlines[0][0] < ts_ns:
                self._expire(ts_ns)
                half = self._halves.get((src, sport, dst, dport))  # an expired hole may have closed it
        if half is None:
            if self._forgotten and self._of_forgotten(src, sport, dst, dport, seq, ack, flags):
                return
            half = self._new_connection(src, sport, dst, dport, flags, frame, ts_ns)
        elif (flags & (SYN | ACK) == SYN and half.wire_base is not None and seq != half.wire_base
              and not self._late_syn(half, seq, ts_ns)):
            if not half.conn.closed:
                self._close(half.conn, frame, ts_ns)
            half = self._new_connection(src, sport, dst, dport, flags, frame, ts_ns)
        conn = half.conn
        conn.last_frame = frame
        conn.last_ts_ns = ts_ns
        peer = half.peer
        if half.wire_base is None:
            half.wire_base = seq if flags & SYN else (seq - 1) & _SEQ_MASK
        if flags & ACK and peer.wire_base is None:
            peer.wire_base = (ack - 1) & _SEQ_MASK
        if conn.closed:
            return
        if flags & SYN:
            sender = SERVER if flags & ACK else CLIENT
            if not conn.handshake_seen and half.direction != sender and not (
                    conn.position(CLIENT) or conn.position(SERVER)):
                conn.swap_roles()  # the SYN (or SYN-ACK) was recorded after the first packets
            conn.handshake_seen = True
            if half.syn_isn is None:
                half.syn_isn = half.wire_base = seq
            seq = (seq + 1) & _SEQ_MASK
            if not half.anchored:
                self._anchor_at(half, seq, frame, ts_ns)
                half.from_syn = not flags & ACK
            if flags & ACK and not peer.anchored:
                self._anchor_at(peer, ack, frame, ts_ns)  # the SYN-ACK tells where the client's stream starts
        elif peer.from_syn and not half.synced and peer.offset == 0 and not (
                flags & ACK and (ack == peer.next_seq or (payload or flags & FIN) and (
                    ack - peer.next_seq) & _SEQ_MASK <= _MAX_WINDOW)):
            # The SYN awaits its SYN-ACK: a bare ACK of anything else answers another
            # incarnation of this 4-tuple (a TIME_WAIT challenge ACK) and is not part of this
            # connection. Data acknowledging bytes ahead is the answer recorded before the
            # SYN-ACK: held until the SYN-ACK settles where it starts.
            conn.out_of_window[half.direction] += 1
            return
        elif flags & RST and half.from_syn and not peer.synced and half.offset == 0:
            # Still in SYN-SENT: this RST refuses such an unacceptable ACK; it ends nothing.
            conn.out_of_window[half.direction] += 1
            return
        if flags & ACK and peer.synced:
            ahead = (ack - peer.next_seq) & _SEQ_MASK
            if ahead and ahead <= _MAX_WINDOW:
                self._acknowledged_unseen(peer, ahead, frame, ts_ns)
            if not peer.anchored and payload and peer.starts and (
                    peer.offset_of(ack) >= peer.starts[-1] + len(peer.chunks[-1])):
                # The peer answers all that is held: the conversation is under way, and its
                # start is as seen (a capture begun mid-stream); deliver before the answer.
                self._anchor_at_lowest(peer, frame, ts_ns)
        if flags & RST:
            if flags & ACK and not peer.synced and peer.wire_base is not None:
                # The RST acknowledges bytes of a side not yet seen: they were recorded after it.
                base = (peer.wire_base + 1) & _SEQ_MASK
                ahead = (ack - base) & _SEQ_MASK
                if 0 < ahead <= _MAX_WINDOW:
                    peer.sync(base)
                    peer.expect = -1
                    peer.tentative_since = self._now
                    self._mark_known(peer, ahead, ts_ns)
            if conn.rst is None:
                self._reset(half, seq, frame, ts_ns)
            return
        if not half.synced:
            half.sync(seq)
            half.expect = peer.expect = -1
            half.tentative_since = self._now
            self._schedule(half)
        size = len(payload)
        start = half.offset_of(seq)
        if start - half.offset > _MAX_WINDOW:
            conn.out_of_window[half.direction] += 1
            return
        if conn.rst is not None:  # only what was known to exist at the RST may still come
            end = max(half.acked_to, half.starts[-1] + len(half.chunks[-1]) if half.starts else half.offset)
            if start + size > end:
                if start >= end:
                    self._end_reset(conn, frame, ts_ns)
                    return
                payload = payload[:end - start]
                size = len(payload)
                missing = 0
        if size <= 1 and not missing and start == half.offset - 1 and not flags & (SYN | FIN):
            if size:
                conn.keepalives[half.direction] += 1
        elif size or missing:
            if size:
                self._accept(half, start, payload, frame, ts_ns)
            if missing and half.offset >= start + size:
                self._advance_to(half, start + size + missing, frame, ts_ns)
        if flags & FIN and half.fin_offset is None:
            self._set_fin(half, start + size + missing)
        self._settle(half, frame, ts_ns)
        if not conn.closed:
            if half.starts or half.fin_offset is not None and not half.fin_done:
                self._schedule(half)
            if conn.rst is not None:
                self._end_reset(conn, frame, ts_ns)

    def _of_forgotten(self, src: bytes, sport: int, dst: bytes, dport: int, seq: int, ack: int, flags: int) -> bool:
        """Whether a packet belongs to a forgotten connection, as tshark decides: anything on its
        4-tuple but a SYN with another ISN; it is then dropped like any packet of a closed
        connection. Otherwise the 4-tuple is free for the new connection."""
        forgotten = self._forgotten
        key, reverse = (src, sport, dst, dport), (dst, dport, src, sport)
        if key not in forgotten:
            return False
        base = forgotten[key]
        if flags & (SYN | ACK) == SYN and base is not None and seq != base:
            del forgotten[key], forgotten[reverse]
            return False
        if base is None:  # as _receive_slow records it for a known connection
            forgotten[key] = seq if flags & SYN else (seq - 1) & _SEQ_MASK
        if flags & ACK and forgotten[reverse] is None:
            forgotten[reverse] = (ack - 1) & _SEQ_MASK
        return True

    def _new_connection(self, src: bytes, sport: int, dst: bytes, dport: int, flags: int, frame: int,
                        ts_ns: int) -> _Half:
        sender = (src, sport)
        receiver = (dst, dport)
        if flags & (SYN | ACK) == SYN:
            sender_is_client = True
        elif flags & (SYN | ACK) == SYN | ACK:
            sender_is_client = False
        else:
            sender_is_client = sport >= dport
        client, server = (sender, receiver) if sender_is_client else (receiver, sender)
        conn = Connection(self.connection_count, client, server, frame, ts_ns)
        self.connection_count += 1
        to_server, to_client = _Half(conn, CLIENT, self._history), _Half(conn, SERVER, self._history)
        to_server.peer, to_client.peer = to_client, to_server
        conn._halves = (to_server, to_client)
        self._halves[client + server] = to_server
        self._halves[server + client] = to_client
        self._open[conn.id] = conn
        self._sink.on_open(conn)
        return to_server if sender_is_client else to_client

    def _accept(self, half: _Half, start: int, data: bytes | memoryview, frame: int, ts_ns: int) -> None:
        """Take `data` found at stream offset `start`: deliver what is next, buffer what is ahead."""
        if not half.anchored:  # held until offset 0 is settled, wherever it falls
            self._store(half, start, data, frame)
            if (half.buffered > self._max_buffer or len(half.starts) > _MAX_CHUNKS
                    or self._room < 0):
                self._anchor_at_lowest(half, frame, ts_ns)
            else:
                return
        end = start + len(data)
        offset = half.offset
        if start < offset:
            _check_history(self._sink, half, start, data[:min(end, offset) - start], frame)
            if end <= offset:
                return
            data = data[offset - start:]
            start = offset
        fin = half.fin_offset
        if fin is not None and end > fin:
            half.conn.after_fin_bytes[half.direction] += end - max(start, fin)
            if start >= fin:
                return
            data = data[:fin - start]
            end = fin
        if start == offset:
            direct_end = min(end, half.starts[0]) if half.starts else end
            if direct_end > start:
                if direct_end < end:
                    self._deliver(half, data[:direct_end - start], frame, ts_ns)
                    data = data[direct_end - start:]
                    start = direct_end
                else:
                    self._deliver(half, data, frame, ts_ns)
                    self._drain(half, frame, ts_ns)
                    return
        self._store(half, start, data, frame)
        self._drain(half, frame, ts_ns)
        while half.buffered > self._max_buffer or len(half.starts) > _MAX_CHUNKS:
            self._gap(half, half.starts[0] - half.offset, frame, ts_ns)
            self._drain(half, frame, ts_ns)
        if self._room < 0:
            self._relieve(frame)

    def _store(self, half: _Half, start: int, data: bytes | memoryview, frame: int) -> None:
        """Buffer the parts of `data` not yet held; where held, keep the first copy and compare."""
        starts, chunks = half.starts, half.chunks
        end = start + len(data)
        index = max(bisect_right(starts, start) - 1, 0)
        new: list[tuple[int, bytes | memoryview]] = []
        position = start
        while index < len(starts) and starts[index] < end:
            chunk_start = starts[index]
            chunk = chunks[index]
            chunk_end = chunk_start + len(chunk)
            index += 1
            if chunk_end <= position:
                continue
            if chunk_start > position:
                new.append((position, data[position - start:chunk_start - start]))
                position = chunk_start
            overlap_end = min(chunk_end, end)
            _compare(self._sink, half, position,
                     memoryview(chunk)[position - chunk_start:overlap_end - chunk_start],
                     data[position - start:overlap_end - start], frame)
            position = overlap_end
        if position < end:
            new.append((position, data[position - start:]))
        seen = half.seen
        now = self._now
        for piece_start, piece in new:
            half.buffered += len(piece)
            self._buffered_held += len(piece)
            self._room -= len(piece)
            at = bisect_left(starts, piece_start)
            if at and starts[at - 1] + len(chunks[at - 1]) == piece_start:
                at -= 1
                chunks[at] += piece  # data arriving in order after a hole: one growing chunk
            else:
                starts.insert(at, piece_start)
                chunks.insert(at, bytearray(piece))
                seen.insert(at, now)
            if at + 1 < len(starts) and starts[at + 1] == starts[at] + len(chunks[at]):
                chunks[at] += chunks.pop(at + 1)
                del starts[at + 1]
                seen[at] = min(seen[at], seen.pop(at + 1))

    def _deliver(self, half: _Half, data: bytes | memoryview, frame: int, ts_ns: int) -> None:
        size = len(data)
        half.offset += size
        half.next_seq = (half.next_seq + size) & _SEQ_MASK
        half.history.append(bytes(data))  # a copy: a view would pin its capture chunk
        self._room -= size
        self._on_data(half.conn, half.direction, data, frame, ts_ns)

    def _drain(self, half: _Half, frame: int, ts_ns: int) -> None:
        starts, chunks = half.starts, half.chunks
        while starts and starts[0] == half.offset:
            del starts[0]
            del half.seen[0]
            chunk = chunks.pop(0)
            half.buffered -= len(chunk)
            self._buffered_held -= len(chunk)
            self._room += len(chunk)
            self._deliver(half, memoryview(chunk), frame, ts_ns)

    def _gap(self, half: _Half, size: int, frame: int, ts_ns: int) -> None:
        conn = half.conn
        conn.gaps[half.direction] += 1
        conn.gap_bytes[half.direction] += size
        half.offset += size
        half.next_seq = (half.next_seq + size) & _SEQ_MASK
        self._drop_history(half)  # history is contiguous up to offset by construction
        self._sink.on_gap(conn, half.direction, size, frame, ts_ns)

    def _drop_history(self, half: _Half) -> None:
        history = half.history
        if history:
            self._room += sum(map(len, history))
            history.clear()

    def _advance_to(self, half: _Half, target: int, frame: int, ts_ns: int) -> None:
        """Move the stream to `target`: deliver buffered data, declare each hole a gap."""
        starts = half.starts
        while half.offset < target:
            if starts and starts[0] == half.offset:
                self._drain(half, frame, ts_ns)
            else:
                hole_end = min(starts[0], target) if starts else target
                self._gap(half, hole_end - half.offset, frame, ts_ns)
        self._drain(half, frame, ts_ns)

    def _acknowledged_unseen(self, half: _Half, ahead: int, frame: int, ts_ns: int) -> None:
        """The peer acknowledged `ahead` bytes past what we delivered: evidence that they exist,
        to wait for (see the module doc), and to count lost if they never come."""
        target = half.offset + ahead
        if half.fin_offset is not None:
            target = min(target, half.fin_offset)  # the FIN takes a sequence number, not a byte
        self._mark_known(half, target, ts_ns)

    def _mark_known(self, half: _Half, target: int, ts_ns: int) -> None:
        """Record that `half`'s stream reaches `target`, first seen at capture time `ts_ns`."""
        if target <= half.acked_to or target <= half.offset:
            return
        half.acked_to = target
        now = max(self._now, ts_ns)
        marks = half.ack_marks
        if marks and now - marks[-1][1] < self._mark_span:
            marks[-1][0] = target
        else:
            marks.append([target, now])
        if not half.queued:
            self._queue(half, now + self._window)

    def _hole_since(self, half: _Half) -> int | None:
        """The capture time of the earliest evidence of bytes past `half`'s position still
        missing, or None when nothing is missing."""
        if not half.synced:
            return None
        if not half.anchored:
            return half.tentative_since
        offset = half.offset
        marks = half.ack_marks
        while marks and marks[0][0] <= offset:
            marks.popleft()
        since = min(half.seen) if half.seen else None
        if marks and (since is None or marks[0][1] < since):
            since = marks[0][1]
        if half.fin_offset is not None and half.fin_offset > offset and (since is None or half.fin_seen < since):
            since = half.fin_seen
        return since

    def _queue(self, half: _Half, when: int) -> None:
        half.queued = True
        heappush(self._deadlines, (when, next(self._tie), half))

    def _schedule(self, half: _Half) -> None:
        """Make sure `half` is looked at when its oldest hole has waited the window out."""
        if not half.queued:
            since = self._hole_since(half)
            if since is not None:
                self._queue(half, since + self._window)

    def _next_due(self) -> tuple[int, _Half, int] | None:
        """The first queued direction that still has a hole: (when it was queued for, it, when
        its oldest hole's window ends); None when the queue is empty."""
        deadlines, window = self._deadlines, self._window
        while deadlines:
            when, _, half = heappop(deadlines)
            half.queued = False
            if half.conn.closed:
                continue
            since = self._hole_since(half)
            if since is not None:
                return when, half, since + window
        return None

    def _expire(self, now: int) -> None:
        """Declare lost every hole whose bytes have not come within the window."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] < now:
            due = self._next_due()
            if due is None:
                break
            _, half, ends = due
            if ends >= now:
                self._queue(half, ends)
                continue
            self._give_way(half, half.conn.last_frame, half.conn.last_ts_ns)

    def _give_way(self, half: _Half, frame: int, ts_ns: int) -> None:
        """Declare `half`'s first hole lost and deliver what follows it (for a stream whose
        offset 0 is still open: settle it at the lowest byte seen)."""
        if not half.anchored:
            self._anchor_at_lowest(half, frame, ts_ns)
        elif half.starts:
            target = half.starts[0]
        else:
            target = half.acked_to if half.fin_offset is None else half.fin_offset
        if target > half.offset:
            self._advance_to(half, target, frame, ts_ns)
        self._settle(half, frame, ts_ns)
        conn = half.conn
        if not conn.closed:
            self._schedule(half)
            if conn.rst is not None:
                self._end_reset(conn, frame, ts_ns)

    def _relieve(self, frame: int) -> None:
        """Bring what all connections hold back within `max_buffered`: first the histories of
        the connections silent longest, then the oldest holes, each a located problem."""
        budget = self._max_buffered
        history = sum(len(payload) for conn in self._open.values() for half in conn._halves
                      for payload in half.history)
        self._room = budget - self._buffered_held - history
        if history and self._room < 0:
            # Down to 3/4 of the budget, so that a capture of many busy connections sorts them
            # once per quarter of the budget, not at every packet.
            holders = sorted((half for conn in self._open.values() for half in conn._halves if half.history),
                             key=lambda half: half.conn.last_ts_ns)
            for half in holders:
                if self._room >= budget // 4:
                    break
                self._drop_history(half)
        waiting = []
        while self._room < 0 and (due := self._next_due()) is not None:
            when, half, ends = due
            conn = half.conn
            if ends != when:  # queued early: its true place comes later
                self._queue(half, ends)
                continue
            if not half.buffered and half.anchored:  # a hole with nothing behind it holds no memory
                waiting.append(half)
                continue
            size = half.starts[0] - half.offset if half.anchored else 0
            self.problems.report(Problem(
                "reassembly-budget",
                f"{budget - self._room} bytes held for reassembly over all connections, "
                f"past the budget of {budget}: the oldest hole, {size} bytes, is declared lost",
                file=self.file, frame=frame, offset=half.offset, connection=conn.id))
            self._give_way(half, frame, conn.last_ts_ns)
            self._drop_history(half)  # what the hole let through would only move into the history
        for half in waiting:
            self._schedule(half)

    def _late_syn(self, half: _Half, seq: int, ts_ns: int) -> bool:
        """Whether a SYN with an ISN other than the recorded base is this connection's own,
        recorded after its first packets: this side sent no SYN yet, the connection is young
        and open, and what was seen of this side lies at or after the SYN's ISN."""
        conn = half.conn
        return (half.syn_isn is None and not conn.closed and ts_ns - conn.first_ts_ns <= self._window
                and half.wire_base is not None and (half.wire_base - seq) & _SEQ_MASK <= _MAX_WINDOW)

    def _anchor_at(self, half: _Half, seq: int, frame: int, ts_ns: int) -> None:
        """Settle `half`'s offset 0 at sequence number `seq` (the byte after its ISN)."""
        if not half.synced:
            half.sync(seq)
            half.anchored = True
            half.refresh()
            return
        self._rebase(half, half.offset_of(seq))
        half.anchored = True
        self._after_anchor(half, frame, ts_ns)

    def _anchor_at_lowest(self, half: _Half, frame: int, ts_ns: int, deliver: bool = True) -> None:
        """No SYN came: offset 0 is the lowest byte seen (mid-stream start)."""
        if half.starts and half.starts[0] < half.offset:
            self._rebase(half, half.starts[0])
        half.anchored = True
        if deliver:
            self._after_anchor(half, frame, ts_ns)

    def _rebase(self, half: _Half, base: int) -> None:
        """Renumber a held stream so that `base` becomes offset 0; bytes before it are dropped."""
        half.next_seq = (half.next_seq + base - half.offset) & _SEQ_MASK
        shift = base - half.offset
        if shift:
            half.starts = [start - shift for start in half.starts]
            half.acked_to = max(half.acked_to - shift, 0)
            for mark in half.ack_marks:
                mark[0] -= shift
            if half.fin_offset is not None:
                half.fin_offset -= shift
        starts, chunks = half.starts, half.chunks
        while starts and starts[0] < half.offset:  # before the ISN: not this stream's bytes
            head = min(half.offset - starts[0], len(chunks[0]))
            half.buffered -= head
            self._buffered_held -= head
            self._room += head
            if head == len(chunks[0]):
                del starts[0], chunks[0], half.seen[0]
            else:
                del chunks[0][:head]
                starts[0] += head

    def _after_anchor(self, half: _Half, frame: int, ts_ns: int) -> None:
        half.peer.refresh()
        self._drain(half, frame, ts_ns)
        while half.buffered > self._max_buffer or len(half.starts) > _MAX_CHUNKS:
            self._gap(half, half.starts[0] - half.offset, frame, ts_ns)
            self._drain(half, frame, ts_ns)
        self._settle(half, frame, ts_ns)
        if not half.conn.closed:
            self._schedule(half)

    def _reset(self, half: _Half, seq: int, frame: int, ts_ns: int) -> None:
        """A RST from `half`'s side: close, or, while known bytes are missing, wait for them."""
        conn = half.conn
        if half.synced:
            end = half.offset_of(seq)
            if half.offset < end <= half.offset + _MAX_WINDOW:
                self._mark_known(half, end, ts_ns)  # data before the RST is still to come
        conn.rst = (half, frame, ts_ns)
        for side in conn._halves:
            side.refresh()
            self._schedule(side)
        self._end_reset(conn, frame, ts_ns)

    def _end_reset(self, conn: Connection, frame: int, ts_ns: int) -> None:
        """Close a reset connection once nothing known is missing in either direction."""
        to_server, to_client = conn._halves
        if not (to_server.missing_bytes() or to_client.missing_bytes()):
            self._close(conn, frame, ts_ns)

    def _set_fin(self, half: _Half, fin_offset: int) -> None:
        if fin_offset < half.offset:
            return  # a FIN inside data already delivered is not this stream's end
        half.fin_offset = fin_offset
        half.fin_seen = self._now
        starts, chunks = half.starts, half.chunks
        while starts and starts[-1] + len(chunks[-1]) > fin_offset:
            chunk_start = starts[-1]
            keep = max(fin_offset - chunk_start, 0)
            chunk = chunks.pop()
            starts.pop()
            seen = half.seen.pop()
            half.buffered -= len(chunk) - keep
            self._buffered_held -= len(chunk) - keep
            self._room += len(chunk) - keep
            half.conn.after_fin_bytes[half.direction] += len(chunk) - keep
            if keep:
                starts.append(chunk_start)
                chunks.append(chunk[:keep])
                half.seen.append(seen)
                break

    def _settle(self, half: _Half, frame: int, ts_ns: int) -> None:
        """After a change to `half`: pass its FIN if reached; close when both FINs are through."""
        if half.fin_offset == half.offset and not half.fin_done and half.anchored:
            half.fin_done = True
            self._sink.on_fin(half.conn, half.direction, frame, ts_ns)
            if half.peer.fin_done:
                self._close(half.conn, frame, ts_ns)
                return
        half.refresh()

    def _close(self, conn: Connection, frame: int, ts_ns: int) -> None:
        if conn.rst is not None:  # the RST is passed on where the stream ends
            rst_half, rst_frame, rst_ts = conn.rst
            self._sink.on_rst(conn, rst_half.direction, rst_frame, rst_ts)
        conn.closed = True
        for half in conn._halves:
            if half.synced and not half.anchored:
                self._anchor_at_lowest(half, frame, ts_ns, deliver=False)  # the flush delivers
            if half.synced:
                end = half.starts[-1] + len(half.chunks[-1]) if half.starts else half.offset
                acked = half.acked_to if half.fin_offset is None else min(half.acked_to, half.fin_offset)
                self._advance_to(half, max(end, half.fin_offset or 0, acked), frame, ts_ns)
                if half.fin_offset == half.offset and not half.fin_done:
                    half.fin_done = True
                    self._sink.on_fin(conn, half.direction, frame, ts_ns)
            half.synced = False
            half.expect = -1
            self._drop_history(half)
            half.history = _NO_HISTORY  # a closed connection takes no more data; its 4-tuple stays known
            half.ack_marks.clear()
        del self._open[conn.id]
        _add_totals(self._closed_totals, conn)
        self._sink.on_close(conn)
        self._closed.append((conn.last_ts_ns, conn))
        self._forget_closed(ts_ns)

    def _forget_closed(self, now_ns: int) -> None:
        """Drop connections closed and silent for CLOSED_LINGER_NS; keep their 4-tuples."""
        closed = self._closed
        while closed and now_ns - closed[0][0] > CLOSED_LINGER_NS:
            _, conn = closed.popleft()
            if now_ns - conn.last_ts_ns <= CLOSED_LINGER_NS:  # late packets came: queued again,
                closed.append((conn.last_ts_ns, conn))      # not holding up the ones behind it
                continue
            for key, half in ((conn.client + conn.server, conn._halves[CLIENT]),
                              (conn.server + conn.client, conn._halves[SERVER])):
                if self._halves.get(key) is half:  # not yet taken over by a new connection
                    del self._halves[key]
                    self._forgotten[key] = half.wire_base


_NO_HISTORY: deque[bytes] = deque(maxlen=0)  # shared by every closed direction, never appended to

_TOTALS = ("gaps", "gap_bytes", "conflicts", "conflict_bytes", "keepalives", "after_fin_bytes",
           "out_of_window")


def _add_totals(totals: dict[str, int], conn: Connection) -> None:
    for name in _TOTALS:
        counts = getattr(conn, name)
        totals[name] += counts[0] + counts[1]


def _check_history(sink: StreamSink, half: _Half, start: int, data: bytes | memoryview, frame: int) -> None:
    """Compare a retransmission of delivered bytes with the copies still in the history."""
    end = start + len(data)
    piece_end = half.offset
    overlaps = []
    for piece in reversed(half.history):
        piece_start = piece_end - len(piece)
        low, high = max(start, piece_start), min(end, piece_end)
        if low < high:
            overlaps.append((low, memoryview(piece)[low - piece_start:high - piece_start]))
        if piece_start <= start:
            break
        piece_end = piece_start
    for low, kept in reversed(overlaps):  # report in stream order
        _compare(sink, half, low, kept, data[low - start:low - start + len(kept)], frame)


def _compare(sink: StreamSink, half: _Half, offset: int, kept: memoryview,
             other: bytes | memoryview, frame: int) -> None:
    if kept == other:
        return
    first = _first_difference(kept, other)
    last = _last_difference(kept, other)
    size = last - first + 1
    conn = half.conn
    conn.conflicts[half.direction] += 1
    conn.conflict_bytes[half.direction] += size
    sink.on_conflict(conn, half.direction, offset + first, size, frame)


def _first_difference(a: memoryview, b: bytes | memoryview) -> int:
    """The first index where `a` and `b` (of one length, known to differ) differ."""
    return _bisect_difference(a, b, from_end=False)


def _last_difference(a: memoryview, b: bytes | memoryview) -> int:
    """The last index where `a` and `b` (of one length, known to differ) differ."""
    return _bisect_difference(a, b, from_end=True)


def _bisect_difference(a: memoryview, b: bytes | memoryview, from_end: bool) -> int:
    # Slices compare in C: halving the part known to hold the difference takes log2(n) of them.
    low, high = 0, len(a)  # the difference sought lies in [low, high); the rest on its side agrees
    while high - low > 1:
        middle = (low + high) // 2
        if from_end:
            if a[middle:high] == b[middle:high]:
                high = middle
            else:
                low = middle
        elif a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low
