"""TCP reassembly: segments in, per-direction ordered byte streams out (data, gap, conflict, fin, rst).

Each connection has two directions (CLIENT: client→server, SERVER: server→client), each
reassembled on its own. A direction's stream offset 0 is the byte after the ISN when the SYN
(or the SYN-ACK that acknowledges it) was seen, else the first sequence number seen
(mid-stream start). Sequence numbers are compared modulo 2^32 relative to the next expected
byte, so streams cross the 32-bit wrap freely.

Policies, all chosen to keep the stream going rather than stall it:
- Overlaps keep the first copy seen; where a later copy differs, `on_conflict` names the span
  from its first to its last differing byte. Overlaps with bytes already delivered are checked
  against the last `history` delivered payloads (older retransmissions go unchecked). These are
  copies: a view would keep its whole 64 KiB capture chunk alive (for every idle connection),
  so memory is bounded by the count times the segment size.
- A 0/1-byte segment at next-1 is a keep-alive (or Linux zero-window probe): ignored, never a
  conflict. A 1-byte zero-window probe at next is ordinary data; its retransmission is identical.
- Holes become gaps (`on_gap` with their size, at the current position) when: the capture cut
  the payload (`Segment.missing`), out-of-order data exceeds `max_buffer` for the direction, at
  close, or when bytes the peer acknowledged never showed up. An ACK for unseen bytes does not
  declare them lost at once: SPAN ports, mergecap and multi-queue NICs often record data after
  the ACK that covers it. The acknowledged hole stays pending, and late data fills it, until
  data starting at or past the acknowledged point arrives, the direction's FIN does, the peer
  has acknowledged the unseen bytes `PENDING_ACKS` more times, or the connection closes.
- FIN is delivered in order at its position; data past it is dropped and counted. The
  connection closes when both FINs are through, or at a RST (buffered data is flushed first).
- Connection ids follow tshark's tcp.stream: a new id on a 4-tuple's first packet, and when a
  SYN (without ACK) carries an ISN other than that side's recorded base (port reuse). A SYN
  retransmitted with the same ISN, even after a RST, stays in its connection, as in tshark.
  A closed connection is kept for `CLOSED_LINGER_NS` of capture time after its last packet
  (TIME_WAIT at its longest), then dropped; its 4-tuple stays known with only each side's ISN,
  because tshark never forgets one: a later packet on it (a stray ACK, the SYN resent) still
  counts as that connection and is dropped, and only a SYN with another ISN opens a new one.
  Keeps memory nearly flat over a long capture of many short connections, ids as tshark's.
- Roles: the SYN sender is the client, the SYN-ACK sender the server. Mid-stream the roles are
  a provisional guess (the side with the lower port is the server; on equal ports, the first
  packet's receiver) that the sink, which can read the application data, may correct with
  `Connection.swap_roles` (servers often listen on high ports).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import deque
from typing import TYPE_CHECKING, Protocol

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
#: ACKs for bytes not yet seen after which the bytes count as lost (late data has had its chance).
PENDING_ACKS = 32
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
        "keepalives", "after_fin_bytes", "out_of_window", "_halves",
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
    past `offset`. `history` holds the most recently delivered payloads, ending at `offset`.
    """

    __slots__ = (
        "conn", "direction", "peer", "synced", "from_syn", "wire_base", "next_seq", "expect", "offset",
        "starts", "chunks", "buffered", "fin_offset", "fin_done", "history", "acked_to",
        "unseen_acks",
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
        self.buffered = 0
        self.fin_offset: int | None = None
        self.fin_done = False
        self.history: deque[bytes] | None = deque(maxlen=history)  # None once closed
        # The peer acknowledged up to this offset; bytes below it not yet seen form a pending gap.
        self.acked_to = 0
        self.unseen_acks = 0  # ACKs of the pending gap so far

    def sync(self, seq: int) -> None:
        self.synced = True
        self.next_seq = self.expect = seq

    def offset_of(self, seq: int) -> int:
        delta = (seq - self.next_seq) & _SEQ_MASK
        if delta >= _SEQ_HALF:
            delta -= _SEQ_SPAN
        return self.offset + delta

    def refresh(self) -> None:
        fast = self.synced and not self.starts and self.fin_offset is None
        self.expect = self.next_seq if fast else -1


class TcpReassembler:
    """Feeds `sink` the in-order streams of every TCP connection in a capture."""

    def __init__(self, sink: StreamSink, max_buffer: int = 8 << 20, history: int = 64) -> None:
        self._sink = sink
        self._on_data = sink.on_data
        self._max_buffer = max_buffer
        self._history = history
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
            self._on_data(conn, half.direction, payload, frame, ts_ns)

    def finish(self) -> None:
        """Flush every open connection (holes before buffered data become gaps), then close it."""
        for conn in list(self._open.values()):
            self._close(conn, conn.last_frame, conn.last_ts_ns)

    # -- the slow path: everything but an in-order data segment or a plain ACK --

    def _receive_slow(self, half: _Half | None, frame: int, ts_ns: int, src: bytes, sport: int, dst: bytes,
                      dport: int, seq: int, ack: int, flags: int, payload: memoryview, missing: int) -> None:
        if half is None:
            if self._forgotten and self._of_forgotten(src, sport, dst, dport, seq, ack, flags):
                return
            half = self._new_connection(src, sport, dst, dport, flags, frame, ts_ns)
        elif flags & (SYN | ACK) == SYN and half.wire_base is not None and seq != half.wire_base:
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
            conn.handshake_seen = True
            seq = (seq + 1) & _SEQ_MASK
            if not half.synced:
                half.sync(seq)
                half.from_syn = not flags & ACK
            if flags & ACK and not peer.synced:
                peer.sync(ack)  # the SYN-ACK tells where the client's stream starts
        elif peer.from_syn and not half.synced and peer.offset == 0 and not (
                flags & ACK and ack == peer.next_seq):
            # The SYN awaits its SYN-ACK: an ACK of anything else answers another incarnation
            # of this 4-tuple (a TIME_WAIT challenge ACK) and is not part of this connection.
            conn.out_of_window[half.direction] += 1
            return
        elif flags & RST and half.from_syn and not peer.synced and half.offset == 0:
            # Still in SYN-SENT: this RST refuses such an unacceptable ACK; it ends nothing.
            conn.out_of_window[half.direction] += 1
            return
        if flags & RST:
            self._sink.on_rst(conn, half.direction, frame, ts_ns)
            self._close(conn, frame, ts_ns)
            return
        if flags & ACK:
            if peer.synced:
                ahead = (ack - peer.next_seq) & _SEQ_MASK
                if ahead and ahead <= _MAX_WINDOW:
                    self._acknowledged_unseen(peer, ahead, frame, ts_ns)
            if conn.closed:
                return
        if not half.synced:
            half.sync(seq)
        size = len(payload)
        start = half.offset_of(seq)
        if start - half.offset > _MAX_WINDOW:
            conn.out_of_window[half.direction] += 1
            return
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
        if half.acked_to > half.offset and (start >= half.acked_to or flags & FIN):
            self._declare_pending(half, frame, ts_ns)  # later data or the FIN passed the hole
        self._settle(half, frame, ts_ns)

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
        for piece_start, piece in new:
            half.buffered += len(piece)
            at = bisect_left(starts, piece_start)
            if at and starts[at - 1] + len(chunks[at - 1]) == piece_start:
                at -= 1
                chunks[at] += piece  # data arriving in order after a hole: one growing chunk
            else:
                starts.insert(at, piece_start)
                chunks.insert(at, bytearray(piece))
            if at + 1 < len(starts) and starts[at + 1] == starts[at] + len(chunks[at]):
                chunks[at] += chunks.pop(at + 1)
                del starts[at + 1]

    def _deliver(self, half: _Half, data: bytes | memoryview, frame: int, ts_ns: int) -> None:
        size = len(data)
        half.offset += size
        half.next_seq = (half.next_seq + size) & _SEQ_MASK
        half.history.append(bytes(data))  # a copy: a view would pin its capture chunk
        self._on_data(half.conn, half.direction, data, frame, ts_ns)

    def _drain(self, half: _Half, frame: int, ts_ns: int) -> None:
        starts, chunks = half.starts, half.chunks
        while starts and starts[0] == half.offset:
            del starts[0]
            chunk = chunks.pop(0)
            half.buffered -= len(chunk)
            self._deliver(half, memoryview(chunk), frame, ts_ns)

    def _gap(self, half: _Half, size: int, frame: int, ts_ns: int) -> None:
        conn = half.conn
        conn.gaps[half.direction] += 1
        conn.gap_bytes[half.direction] += size
        half.offset += size
        half.next_seq = (half.next_seq + size) & _SEQ_MASK
        half.history.clear()  # history is contiguous up to offset by construction
        self._sink.on_gap(conn, half.direction, size, frame, ts_ns)

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
        """The peer acknowledged `ahead` bytes past what we delivered: those we lack are a
        pending gap, lost once PENDING_ACKS more ACKs have not brought them."""
        target = half.offset + ahead
        if half.fin_offset is not None:
            target = min(target, half.fin_offset)  # the FIN takes a sequence number, not a byte
        if target <= half.offset:
            return
        if half.acked_to <= half.offset:  # a new hole
            half.unseen_acks = 0
        half.acked_to = max(half.acked_to, target)
        half.unseen_acks += 1
        passed = half.fin_offset is not None or (half.starts and half.starts[-1] >= half.acked_to)
        if passed or half.unseen_acks > PENDING_ACKS:
            self._declare_pending(half, frame, ts_ns)
            self._settle(half, frame, ts_ns)

    def _declare_pending(self, half: _Half, frame: int, ts_ns: int) -> None:
        """The acknowledged bytes still missing were lost: declare them gaps."""
        target = half.acked_to
        if half.fin_offset is not None:
            target = min(target, half.fin_offset)
        if target > half.offset:
            self._advance_to(half, target, frame, ts_ns)

    def _set_fin(self, half: _Half, fin_offset: int) -> None:
        if fin_offset < half.offset:
            return  # a FIN inside data already delivered is not this stream's end
        half.fin_offset = fin_offset
        starts, chunks = half.starts, half.chunks
        while starts and starts[-1] + len(chunks[-1]) > fin_offset:
            chunk_start = starts[-1]
            keep = max(fin_offset - chunk_start, 0)
            chunk = chunks.pop()
            starts.pop()
            half.buffered -= len(chunk) - keep
            half.conn.after_fin_bytes[half.direction] += len(chunk) - keep
            if keep:
                starts.append(chunk_start)
                chunks.append(chunk[:keep])
                break

    def _settle(self, half: _Half, frame: int, ts_ns: int) -> None:
        """After a change to `half`: pass its FIN if reached; close when both FINs are through."""
        if half.fin_offset == half.offset and not half.fin_done:
            half.fin_done = True
            self._sink.on_fin(half.conn, half.direction, frame, ts_ns)
            if half.peer.fin_done:
                self._close(half.conn, frame, ts_ns)
                return
        half.refresh()

    def _close(self, conn: Connection, frame: int, ts_ns: int) -> None:
        conn.closed = True
        for half in conn._halves:
            if half.synced:
                end = half.starts[-1] + len(half.chunks[-1]) if half.starts else half.offset
                acked = half.acked_to if half.fin_offset is None else min(half.acked_to, half.fin_offset)
                self._advance_to(half, max(end, half.fin_offset or 0, acked), frame, ts_ns)
                if half.fin_offset == half.offset and not half.fin_done:
                    half.fin_done = True
                    self._sink.on_fin(conn, half.direction, frame, ts_ns)
            half.synced = False
            half.expect = -1
            half.history = None  # a closed connection takes no more data; its 4-tuple stays known
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
    low, high = 0, len(a)  # a[:low] == b[:low]; a difference lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


def _last_difference(a: memoryview, b: bytes | memoryview) -> int:
    low, high = 0, len(a)  # a[high:] == b[high:]; a difference lies in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        if a[middle:high] == b[middle:high]:
            high = middle
        else:
            low = middle
    return low
