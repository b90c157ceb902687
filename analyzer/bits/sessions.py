"""BITS sessions keyed by the id the Create-Session ack issues, followed across connections.

`SessionTracker.on_exchange` takes every Exchange as the pipeline emits it (and returns the BITS
packet it made); `sessions()` gives the sessions as filed, for a reader that only groups packets
(the replay planner); `finish` walks each session's packets in the order the client sent them
through the state table (machine.py), adds the checks that need a session's history (ranges,
offsets, timing, hosts) or several sessions (duplicate-create, session-recreated), and gives
each session its delivery verdict (docs/protocol.md section 9):

- delivered: the final fragment drew 200 with N = TOTAL and no Cancel was sent before it;
- not-delivered: cancelled before the final fragment, closed incomplete, Create refused, the
  server forgot the session (BG_E_SESSION_NOT_FOUND), or the last answer was a 4xx refusal;
- unknown: the capture ends first, or began after the final fragment.

Times of acks are compared with times of requests only on one clock: `finish` measures the skew
between the capture's two directions (skew.py) and the walk moves each ack's time onto the
client's clock before comparing (`_SessionWalk.ack_ns`); the order of a session's packets is the
order of its requests. So a skew between the directions changes timings, never the walk's
states, verdicts or anomalies.
"""

from __future__ import annotations

import enum
import heapq
import math
import posixpath
from operator import attrgetter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable
from urllib.parse import unquote, urljoin, urlsplit

from bitstrace.analyzer.authority import host_name
from bitstrace.analyzer.bits import protocol as p
from bitstrace.analyzer.bits.catalogue import Anomaly, anomaly, frame_name
from bitstrace.analyzer.bits.machine import Answer, Sent, State, answer, sent, step
from bitstrace.analyzer.bits.packets import AUTH_CHALLENGES, BitsPacket, Classified, Download, classify
from bitstrace.analyzer.bits.protocol import PacketType, session_key
from bitstrace.analyzer.bits.skew import NO_SKEW, ClockSkew, SkewMeter

if TYPE_CHECKING:
    from bitstrace.analyzer.bits.extract import ExtractedEntity, Extractor

NS = 1_000_000_000
DEFAULT_STALL_AFTER_S = 300  # the client's response timer (docs/protocol.md 5.2.6)
DEFAULT_JOINED_WINDOW_S = 300  # "the first minutes of the capture"
DEFAULT_NO_PROGRESS_AFTER = 3  # resends or 416s in a row without the offset advancing


class Verdict(str, enum.Enum):
    DELIVERED = "delivered"
    NOT_DELIVERED = "not-delivered"
    UNKNOWN = "unknown"


@dataclass
class Session:
    id: str | None  # as the Create ack issued it (or as first seen); None for a refused Create
    key: str
    client: str
    client_ip: str
    server: str
    host: str | None
    url: str
    content_name: str | None = None
    protocol: str | None = None
    user_agent: str | None = None
    state: State = State.CREATING
    verdict: Verdict = Verdict.UNKNOWN
    verdict_reason: str = ""
    before_capture: bool = False
    reply_url: str | None = None
    host_id: str | None = None
    total: int | None = None
    acknowledged: int = 0  # high-water mark of the received offsets the server acknowledged
    bytes_sent: int = 0
    first_ns: int = 0
    last_ns: int = 0
    connections: list[int] = field(default_factory=list)
    packets: list[BitsPacket] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    entity: "ExtractedEntity | None" = None
    completed_ns: int | None = None  # final fragment acknowledged
    ended_ns: int | None = None  # closed, cancelled, expired or refused
    not_found_ns: int | None = None  # first BG_E_SESSION_NOT_FOUND answer
    generation: int = 0  # how many earlier sessions had this id (servers that derive ids reuse them)
    capture_points: list[str] = field(default_factory=list)  # directories its packets were captured in

    @property
    def created(self) -> bool:
        return bool(self.packets) and self.packets[0].packet_type is PacketType.CREATE_SESSION

    @property
    def fragments(self) -> list[BitsPacket]:
        """The Fragment packets, in the order the client sent them (once `finish` ran)."""
        return [pkt for pkt in self.packets if pkt.packet_type is PacketType.FRAGMENT]

    @property
    def fragment_count(self) -> int:
        """How many Fragment packets: a session walked in a partitioned run's unit keeps only
        the packets the cross-session checks read, and the count (analyzer/partition.py)."""
        return len(self.fragments)

    @property
    def url_key(self) -> tuple[str, str | None, str]:
        return (self.client_ip, host_name(self.host), self.url)

    def flag(self, code: str, message: str, packets: list[BitsPacket] | tuple[BitsPacket, ...] = (),
             timestamps: tuple[int, ...] = ()) -> None:
        frames = [f for pkt in packets for f in pkt.frames]
        captures: list[int | None] = [c for pkt in packets for c in pkt.captures]
        times = list(timestamps) or [t for pkt in packets for t in pkt.timestamps]
        self.anomalies.append(anomaly(
            code, message, session_id=self.id, frames=frames, captures=captures, timestamps=times,
            connection=packets[-1].connection if packets else None,
        ))


def exchange_times(exchange: Any) -> list[int | None]:
    """The times an exchange shows: what bounds the capture when no file says."""
    times = [exchange.connection.first_ts_ns]
    for message in (exchange.request, exchange.response):
        if message is not None:
            times += (message.first_ts_ns, message.last_ts_ns)
    return times


@dataclass
class BitsSummary:
    sessions: list[Session]
    downloads: list[Download]
    anomalies: list[Anomaly]  # those that belong to no session
    counts: dict[str, int]
    clock_skew: dict[int, ClockSkew] = field(default_factory=dict)  # by capture file index, where seen


class SessionTracker:
    """Collects BITS packets per session; `finish()` analyses them. One tracker per analysis."""

    def __init__(
        self,
        extractor: "Extractor | None" = None,
        *,
        stall_after_s: float = DEFAULT_STALL_AFTER_S,
        joined_window_s: float = DEFAULT_JOINED_WINDOW_S,
        no_progress_after: int = DEFAULT_NO_PROGRESS_AFTER,
        several_captures: bool = False,
    ) -> None:
        self.extractor = extractor
        self.several_captures = several_captures  # messages then name frames `capture:frame`
        self.stall_after_ns = int(stall_after_s * NS)
        self.joined_window_ns = int(joined_window_s * NS)
        self.no_progress_after = no_progress_after
        self._sessions: list[Session] = []
        self._open: dict[str, Session] = {}
        self._downloads: list[Download] = []
        self._loose: list[Anomaly] = []
        self._stray: list[BitsPacket] = []
        self._counts = {"http_exchanges": 0, "bits_exchanges": 0, "other_http": 0, "downloads": 0}
        self._first_ns: int | None = None
        self._last_ns: int | None = None
        self._skew = SkewMeter()
        self.clock_skew: dict[int, ClockSkew] = self._skew.skews  # by capture file index, where seen

    def on_exchange(self, exchange: Any) -> BitsPacket | None:
        """File one Exchange. Returns the BITS packet it made (filed in a session, or set aside
        as a Ping, a challenged or unanswered Create, or a request without a session id), None
        for a download or other HTTP."""
        return self.file_classified(classify(exchange), exchange_times(exchange))

    def file_classified(self, found: Classified, times: list[int | None]) -> BitsPacket | None:
        """on_exchange after `classify`: a partitioned run classifies in its units and files
        their results here, in the order one process would have met the exchanges."""
        self._counts["http_exchanges"] += 1
        self._see_times(times)
        self._loose.extend(found.anomalies)
        if found.download is not None:
            self._counts["downloads"] += 1
            self._downloads.append(found.download)
        packet = found.packet
        if packet is None:
            if found.download is None:
                self._counts["other_http"] += 1
            return None
        self._counts["bits_exchanges"] += 1
        self._skew.observe(packet)
        if self.extractor is not None and packet.packet_type is PacketType.FRAGMENT:
            self.extractor.settle(packet)
        self._file(packet)
        return packet

    def sessions(self) -> list[Session]:
        """The sessions filed so far, in the order they began, unanalysed: each has its key, id,
        generation, client, server, URL and packets (in filing order), which is all a reader
        that only groups needs (the replay planner); the rest of each session is filled in, and
        its packets put in send order, by `finish`, which such a reader can skip."""
        return list(self._sessions)

    def ack_ns(self, pkt: BitsPacket) -> int | None:
        """When `pkt`'s ack was stamped, on the clock of the client's stamps (skew removed)."""
        if pkt.acked_ns is None:
            return None
        return self.clock_skew.get(pkt.request_capture, NO_SKEW).client_ns(pkt.acked_ns)

    def request_frame_name(self, pkt: BitsPacket) -> str:
        return frame_name(pkt.request_capture, pkt.request_frame, self.several_captures)

    def response_frame_name(self, pkt: BitsPacket) -> str:
        """The ack's frame, or the request's when the capture lacks the ack."""
        if pkt.response_frame is None:
            return self.request_frame_name(pkt)
        return frame_name(pkt.response_capture, pkt.response_frame, self.several_captures)

    def _see_times(self, times: list[int | None]) -> None:
        known = [ts for ts in times if ts is not None]
        if not known:
            return
        first, last = min(known), max(known)
        if self._first_ns is None or first < self._first_ns:
            self._first_ns = first
        if self._last_ns is None or last > self._last_ns:
            self._last_ns = last

    def _file(self, pkt: BitsPacket) -> None:
        if pkt.packet_type is PacketType.CREATE_SESSION:
            if pkt.succeeded and pkt.ack_session_id:
                session = self._new_session(pkt.ack_session_id, pkt)
                previous = self._open.get(session.key)
                if previous is not None:  # the server issued this id again
                    session.generation = previous.generation + 1
                    if self.extractor is not None:
                        self.extractor.session_reissued(session.key)
                self._open[session.key] = session
            elif pkt.answered and pkt.status not in AUTH_CHALLENGES:
                self._new_session(None, pkt, key=f"refused-create@{self.request_frame_name(pkt)}")
            else:
                self._stray.append(pkt)
                return
            self._sessions[-1].packets.append(pkt)
            return
        if pkt.session_id is None:
            self._stray.append(pkt)
            return
        key = session_key(pkt.session_id)
        found = self._open.get(key)
        session = found if found is not None else self._new_session(pkt.session_id, pkt)
        self._open[key] = session
        session.packets.append(pkt)

    def _new_session(self, session_id: str | None, pkt: BitsPacket, key: str | None = None) -> Session:
        session = Session(
            id=session_id, key=key or session_key(session_id or ""), client=pkt.client,
            client_ip=pkt.client_ip, server=pkt.server, host=pkt.host, url=pkt.target,
        )
        self._sessions.append(session)
        return session

    def walk(self, sessions: list[Session], capture_start_ns: int, capture_end_ns: int) -> None:
        """Walk each of `sessions` (filed here) through the state table, with the checks of one
        session's history: `finish` walks them all; a partitioned run's unit walks its own."""
        for session in sessions:
            _SessionWalk(self, session, capture_start_ns, capture_end_ns).run()

    def finish(self, capture_start_ns: int | None = None, capture_end_ns: int | None = None, *,
               joined: Callable[[list[Session]], list[Session]] | None = None) -> BitsSummary:
        """Analyse every session. Capture bounds default to the earliest/latest time seen.
        `joined` (a partitioned run's merge) takes the sessions walked here and returns them
        with the sessions walked elsewhere, in the order they began: the checks across sessions,
        the extracted files and the report then see them all."""
        start = capture_start_ns if capture_start_ns is not None else (self._first_ns or 0)
        end = capture_end_ns if capture_end_ns is not None else (self._last_ns or 0)
        self.walk(self._sessions, start, end)
        sessions = self._sessions if joined is None else joined(self._sessions)
        _cross_session_checks(sessions, self._downloads, self.request_frame_name)
        if self.extractor is not None:
            self._attach_entities(sessions)
        for session in sessions:
            session.anomalies = _dedup(session.anomalies)
        stray_anomalies = [a for pkt in self._stray for a in pkt.anomalies] + _stray_fingerprints(self._stray)
        return BitsSummary(
            sessions=sessions, downloads=self._downloads,
            anomalies=_dedup(self._loose + stray_anomalies),
            counts=dict(self._counts), clock_skew=self.clock_skew,
        )

    def _attach_entities(self, sessions: list[Session]) -> None:
        assert self.extractor is not None
        names = {(s.key, s.generation): (s.id or s.key, s.content_name) for s in sessions if s.id is not None}
        entities = self.extractor.finish(names)
        for session in sessions:
            entity = entities.get((session.key, session.generation))
            if entity is not None:
                session.entity = entity
                session.anomalies.extend(entity.anomalies)


def _stray_fingerprints(stray: list[BitsPacket]) -> list[Anomaly]:
    """client-fingerprint for BITS packets outside any session: once per client and User-Agent."""
    first_seen: dict[tuple[str, str | None], BitsPacket] = {}
    for pkt in stray:
        if not (pkt.user_agent or "").startswith(p.USER_AGENT_PREFIX):
            first_seen.setdefault((pkt.client_ip, pkt.user_agent), pkt)
    return [anomaly("client-fingerprint", f"{pkt.label} from {pkt.client_ip} with User-Agent {pkt.user_agent or '(none)'!r}, "
                    f"not {p.USER_AGENT_PREFIX}…", frames=pkt.frames, captures=pkt.captures, timestamps=pkt.timestamps,
                    connection=pkt.connection)
            for pkt in first_seen.values()]


def _dedup(anomalies: list[Anomaly]) -> list[Anomaly]:
    seen: set[tuple[str, tuple[tuple[int, int], ...], str]] = set()
    kept = []
    for item in sorted(anomalies, key=lambda a: (a.timestamps[:1] or (0,), a.places)):
        key = (item.code, item.places, item.message if item.code != "resend-conflict" else "")
        if key not in seen:
            seen.add(key)
            kept.append(item)
    return kept


_TRANSITION_MESSAGES = {
    "fragment-after-cancel": "{label} sent after the session was cancelled (frame {end_frame})",
    "fragment-after-close": "{label} sent after Close-Session was acknowledged (frame {end_frame})",
    "cancel-after-complete": "Cancel-Session after the final fragment was acknowledged (frame {complete_frame}): the upload may already be in place",
    "packet-after-end": "{label} sent after the session ended ({state}, frame {end_frame})",
    "close-incomplete": "Close-Session with {acked} of {total} bytes acknowledged: the server discards the partial upload",
    "fragment-after-complete": "{label} sent after all {total} bytes were acknowledged (frame {complete_frame})",
}


class _SessionWalk:
    """One pass over a session's packets in send order."""

    def __init__(self, tracker: SessionTracker, session: Session, capture_start: int, capture_end: int) -> None:
        self.tracker = tracker
        self.session = session
        self.capture_start = capture_start
        self.capture_end = capture_end
        self.packets = sorted(session.packets, key=lambda pkt: (pkt.sent_ns, pkt.request_capture, pkt.request_frame))
        session.packets = self.packets
        self.expected: int | None = None  # offset the server last asked for
        self.tentative: int | None = None  # E+1 of a fragment whose ack the capture lacks
        self.last_ack: int | None = None
        self.final_range: p.ContentRange | None = None
        self.complete_frame: str | None = None  # as messages name it
        self.end_frame: str | None = None
        self.cancelled_first = False  # a Cancel-Session was sent before the final fragment was acknowledged
        # with no skew measured, an ack's time is its stamp: read it at C speed
        self.ack_ns: Callable[[BitsPacket], int | None] = (tracker.ack_ns if tracker.clock_skew
                                                           else attrgetter("acked_ns"))
        # requests that raised the high-water mark: (sent, acknowledged, new offset)
        self.progress_ns: list[tuple[int, int, int]] = []
        self.stuck = 0
        self.stuck_flagged = False
        self.stuck_unanswered = 0  # of `stuck`: fragments at the acknowledged offset that drew no answer
        self.seen_bodies: dict[tuple[int, int], tuple[bytes, BitsPacket]] = {}
        # How far from offset 0 the fragments sent so far cover the file without a hole (what the
        # server can have received), and the spans sent beyond a hole, as (first, end) pairs.
        self.sent_prefix = 0
        self.sent_beyond: list[tuple[int, int]] = []
        self.capture_lost = False  # a capture gap may have swallowed requests: what was sent is unknown
        self.close_incomplete = False
        self.too_large: Anomaly | None = None  # waiting for the client's next, smaller fragment
        self.too_large_size = 0

    def run(self) -> None:
        s = self.session
        if not self.packets:
            return
        first = self.packets[0]
        s.first_ns = first.sent_ns
        s.last_ns = max(max(pkt.sent_ns, self.ack_ns(pkt) or 0) for pkt in self.packets)
        s.connections = sorted({pkt.connection for pkt in self.packets})
        s.user_agent = next((pkt.user_agent for pkt in self.packets if pkt.user_agent), None)
        s.content_name = next((pkt.content_name for pkt in self.packets if pkt.content_name), None)
        state = State.CREATING if s.created else State.JOINED
        if s.created:
            self.expected = 0
            s.protocol = first.protocol
            s.host_id = first.host_id
            self.progress_ns.append((first.sent_ns, self.ack_ns(first) or first.sent_ns, 0))
        else:
            self._joined(first)
        for pkt in self.packets:
            s.anomalies.extend(pkt.anomalies)
            self.capture_lost = self.capture_lost or "gap" in pkt.flags
            event_sent = sent(pkt, state, self.final_range)
            if event_sent is None:
                continue
            event_answer = answer(pkt)
            if pkt.packet_type is PacketType.FRAGMENT:
                self._fragment(pkt, event_sent, event_answer)
            if pkt.packet_type is PacketType.CANCEL_SESSION and s.completed_ns is None:
                self.cancelled_first = True
            transition = step(state, event_sent, event_answer)
            if transition.anomaly:
                if transition.anomaly == "close-incomplete":
                    self.close_incomplete = True
                s.flag(transition.anomaly, _TRANSITION_MESSAGES[transition.anomaly].format(
                    label=pkt.label, end_frame=self.end_frame, complete_frame=self.complete_frame,
                    state=state.value, acked=s.acknowledged, total=s.total if s.total is not None else "?",
                ), [pkt])
            if event_answer is Answer.COMPLETED and s.completed_ns is None:
                s.completed_ns = self.ack_ns(pkt)
                self.final_range = pkt.content_range
                self.complete_frame = self.tracker.response_frame_name(pkt)
            if event_answer is Answer.NOT_FOUND and s.not_found_ns is None:
                s.not_found_ns = self.ack_ns(pkt)
            if transition.next is not state and transition.next in (State.CLOSED, State.CANCELLED, State.EXPIRED, State.REFUSED):
                s.ended_ns = self.ack_ns(pkt) or pkt.sent_ns
                self.end_frame = self.tracker.response_frame_name(pkt)
            state = transition.next
        s.state = state
        self._concurrency()
        self._identity()
        self._hosts()
        self._reply_url()
        self._stalls()
        if state in (State.RECEIVING, State.JOINED, State.COMPLETE):
            s.flag("never-finished", f"capture ends with the session {state.value}, {s.acknowledged} of "
                   f"{s.total if s.total is not None else '?'} bytes acknowledged, neither closed nor cancelled",
                   [self.packets[-1]])
        self._verdict()

    def _joined(self, first: BitsPacket) -> None:
        s = self.session
        if first.packet_type is PacketType.FRAGMENT and first.sent_ns - self.capture_start <= self.tracker.joined_window_ns:
            s.before_capture = True
            s.flag("session-before-capture", f"session {s.id} first appears with {first.label} "
                   f"{(first.sent_ns - self.capture_start) / NS:.1f} s into the capture, no Create-Session seen", [first])
        else:
            s.flag("unknown-session", f"{first.label} for session {s.id}, which no Create-Session ack in the capture issued", [first])
        if s.id is not None and not p.is_guid(s.id):
            s.flag("nonstandard-id", f"session id {s.id[:120]!r} not in {{8-4-4-4-12}} form", [first])

    def _fragment(self, pkt: BitsPacket, event_sent: Sent, event_answer: Answer) -> None:
        s = self.session
        rng = pkt.content_range
        s.bytes_sent += pkt.body_length
        if rng is None:
            return
        self._shrink(pkt, rng)
        if s.total is None:
            s.total = rng.total
        elif rng.total != s.total:
            s.flag("total-changed", f"{pkt.label} gives TOTAL {rng.total}; the session's TOTAL is {s.total}", [pkt])
        if self.tracker.extractor is None:  # with an extractor, bytes are compared one by one
            self._same_range_resend(pkt, rng)
        self._sent(pkt, rng)
        resend = False
        if self.expected is not None and event_sent is Sent.FRAGMENT:
            if rng.first > self.expected and rng.first != self.tentative:
                s.flag("range-gap", f"{pkt.label} starts past the acknowledged offset {self.expected}", [pkt])
            elif rng.first < self.expected:
                resend = True
                s.flag("range-resend", f"{pkt.label} starts before the acknowledged offset {self.expected}", [pkt])
        unanswered_again = (event_answer is Answer.UNANSWERED and event_sent is Sent.FRAGMENT
                            and self.expected is not None and rng.first == self.expected)
        self.tentative = rng.last + 1 if event_answer is Answer.UNANSWERED else None
        offset = pkt.received_offset
        if (offset is not None and self.sent_prefix < offset <= rng.total and not self.capture_lost
                and event_answer in (Answer.ACKED, Answer.COMPLETED) and s.created):
            s.flag("ack-beyond-sent", f"HTTP {pkt.status} ack to {pkt.label} acknowledges offset {offset}, but the "
                   f"fragments sent so far hold bytes 0-{self.sent_prefix - 1} without a hole: the server "
                   f"acknowledged bytes {self.sent_prefix}-{offset - 1} it cannot have received", [pkt])
        if event_answer in (Answer.ACKED, Answer.COMPLETED, Answer.RESYNC) and offset is not None and offset <= rng.total:
            if self.last_ack is not None and offset < self.last_ack:
                s.flag("ack-regressed", f"acknowledged offset went back from {self.last_ack} to {offset} on {pkt.label}", [pkt])
            self.last_ack = self.expected = offset
            if offset > s.acknowledged or (offset == 0 and not self.progress_ns):
                s.acknowledged = max(s.acknowledged, offset)
                self.progress_ns.append((pkt.sent_ns, self.ack_ns(pkt) or pkt.sent_ns, offset))
                self.stuck, self.stuck_flagged, self.stuck_unanswered = 0, False, 0
                return
        if event_sent is Sent.FRAGMENT and (resend or unanswered_again or event_answer is Answer.RESYNC):
            self.stuck += 1
            self.stuck_unanswered += unanswered_again
            if self.stuck >= self.tracker.no_progress_after and not self.stuck_flagged:
                self.stuck_flagged = True
                what = "resends or 416s"
                if self.stuck_unanswered:
                    what = f"resends, 416s or unanswered sends at the acknowledged offset ({self.stuck_unanswered} unanswered)"
                s.flag("no-progress", f"{self.stuck} {what} in a row without the offset advancing past "
                       f"{s.acknowledged} (last: {pkt.label})", [pkt])

    def _sent(self, pkt: BitsPacket, rng: p.ContentRange) -> None:
        """Add the fragment's bytes on the wire to what the server can have received: its body as
        seen (all of its range when the capture, not the client, lost some of it)."""
        first, length = rng.first, rng.length
        end = first + (length if "gap" in pkt.flags or pkt.body_length > length else pkt.body_length)
        if first > self.sent_prefix:
            if end > first:
                self.sent_beyond.append((first, end))
            return
        if end > self.sent_prefix:
            self.sent_prefix = end
        if self.sent_beyond:
            self.sent_beyond.sort()
            while self.sent_beyond and self.sent_beyond[0][0] <= self.sent_prefix:
                self.sent_prefix = max(self.sent_prefix, self.sent_beyond.pop(0)[1])

    def _shrink(self, pkt: BitsPacket, rng: p.ContentRange) -> None:
        """fragment-too-large also tells what the client sent next (it should shrink)."""
        if self.too_large is not None:
            verb = "shrank" if rng.length < self.too_large_size else "did not shrink"
            self.too_large.message += (f"; the client {verb} its next fragment to {rng.length} bytes "
                                       f"(frame {self.tracker.request_frame_name(pkt)})")
            places = sorted({*self.too_large.places, (pkt.request_capture, pkt.request_frame)})
            self.too_large.captures = tuple(capture for capture, _ in places)
            self.too_large.frames = tuple(frame for _, frame in places)
            self.too_large = None
        found = next((a for a in pkt.anomalies if a.code == "fragment-too-large"), None) if pkt.anomalies else None
        if found is not None:
            self.too_large, self.too_large_size = found, rng.length

    def _same_range_resend(self, pkt: BitsPacket, rng: p.ContentRange) -> None:
        """Exact resends whose body hash differs: byte-level overlaps are extract.py's job."""
        if pkt.body_digest is None:
            return
        key = (rng.first, rng.last)
        earlier = self.seen_bodies.get(key)
        if earlier is None:
            self.seen_bodies[key] = (pkt.body_digest, pkt)
        elif earlier[0] != pkt.body_digest:
            self.session.flag("resend-conflict", f"resent {rng} differs from the copy first sent in frame {self.tracker.request_frame_name(earlier[1])}",
                        [earlier[1], pkt])

    def _concurrency(self) -> None:
        for before, after in zip(self.packets, self.packets[1:]):
            acked = self.ack_ns(before)
            if acked is not None and after.sent_ns < acked:
                self.session.flag("concurrent-requests", f"{after.label} (connection {after.connection}) sent before "
                            f"{before.label} (connection {before.connection}) was acknowledged", [before, after])

    def _identity(self) -> None:
        s = self.session
        odd_agents = sorted({pkt.user_agent or "(none)" for pkt in self.packets
                             if not (pkt.user_agent or "").startswith(p.USER_AGENT_PREFIX)})
        if odd_agents:
            culprit = next(pkt for pkt in self.packets if not (pkt.user_agent or "").startswith(p.USER_AGENT_PREFIX))
            s.flag("client-fingerprint", f"User-Agent {', '.join(map(repr, odd_agents))} is not {p.USER_AGENT_PREFIX}…", [culprit])
        odd_sizes = [pkt for pkt in self.packets if pkt.content_range is not None
                     and pkt.content_range.last + 1 != pkt.content_range.total
                     and not p.MIN_FRAGMENT <= pkt.content_range.length <= p.MAX_FRAGMENT]
        if odd_sizes:
            sizes = sorted({pkt.content_range.length for pkt in odd_sizes if pkt.content_range})
            s.flag("client-fingerprint", f"{len(odd_sizes)} non-final fragment(s) outside {p.MIN_FRAGMENT}-{p.MAX_FRAGMENT} bytes "
                   f"(sizes {', '.join(map(str, sizes[:5]))})", [odd_sizes[0]])

    def _hosts(self) -> None:
        s = self.session
        if not s.created or s.host_id is None:
            return
        create = self.packets[0]
        origin = host_name(create.host)
        target = s.host_id.strip("[]").lower()
        timeout = create.fallback_timeout_s
        timer_start = self.ack_ns(create) or create.sent_ns
        redirected = ignored = False
        for pkt in self.packets[1:]:
            dest = host_name(pkt.host)
            if dest == target or pkt.server_ip == target:
                if pkt.answered:
                    timer_start = self.ack_ns(pkt) or pkt.sent_ns
                if not redirected and dest != origin:
                    redirected = True
                    s.flag("host-redirect", f"Create ack gave BITS-Host-Id {s.host_id}; {pkt.label} goes to {pkt.host} ({pkt.server})", [pkt])
            elif dest == origin and not ignored:
                waited = pkt.sent_ns - timer_start
                if timeout is None or waited < timeout * NS:
                    ignored = True
                    limit = "no fallback timeout (infinite)" if timeout is None else f"fallback timeout {timeout} s"
                    s.flag("host-id-ignored", f"{pkt.label} goes to origin host {pkt.host} {waited / NS:.1f} s after "
                           f"BITS-Host-Id {s.host_id} ({limit})", [pkt])

    def _reply_url(self) -> None:
        s = self.session
        finals = [pkt for pkt in self.packets if pkt.is_final_ack]
        s.reply_url = next((pkt.reply_url for pkt in finals if pkt.reply_url), None)
        if s.reply_url is None:
            return
        for pkt in finals:
            if not pkt.reply_url:
                s.flag("reply-url-misplaced", f"final ack to {pkt.label} lacks the BITS-Reply-URL an earlier final ack gave", [pkt])

    def _stalls(self) -> None:
        s = self.session
        if s.state in (State.REFUSED, State.CREATING) or not self.progress_ns:
            return
        # Quiet time runs from one advance's ack to the start of the request that made the next
        # one: sending a big fragment slowly is progress, waiting for nothing is not.
        stop = s.completed_ns or s.ended_ns or self.capture_end
        quiet = [(done, started, offset) for (_, done, offset), (started, _, _) in zip(self.progress_ns, self.progress_ns[1:])]
        _, done, offset = self.progress_ns[-1]
        quiet.append((done, stop, offset))
        for a, b, offset in quiet:
            if b - a > self.tracker.stall_after_ns:
                s.flag("stalled", f"no progress for {(b - a) / NS:.0f} s at offset {offset} "
                       f"(threshold {self.tracker.stall_after_ns / NS:.0f} s)", timestamps=(a, b))

    def _verdict(self) -> None:
        s = self.session
        last = self.packets[-1]
        if s.completed_ns is not None and not self.cancelled_first:
            s.verdict, s.verdict_reason = Verdict.DELIVERED, f"final fragment acknowledged (frame {self.complete_frame})"
        elif self.cancelled_first:
            s.verdict, s.verdict_reason = Verdict.NOT_DELIVERED, "cancelled before the final fragment was acknowledged"
        elif s.state is State.CLOSED and self.close_incomplete:
            s.verdict, s.verdict_reason = Verdict.NOT_DELIVERED, f"closed with {s.acknowledged} of {s.total} bytes acknowledged"
        elif s.state is State.REFUSED:
            s.verdict, s.verdict_reason = Verdict.NOT_DELIVERED, f"Create-Session refused with HTTP {last.status}"
        elif s.state is State.EXPIRED:
            s.verdict, s.verdict_reason = Verdict.NOT_DELIVERED, "the server no longer knew the session (BG_E_SESSION_NOT_FOUND)"
        elif last.status is not None and 400 <= last.status < 500 and last.status not in (*AUTH_CHALLENGES, 413, 416):
            s.verdict, s.verdict_reason = Verdict.NOT_DELIVERED, f"refused: HTTP {last.status} to the last {last.label}"
        elif s.state is State.CLOSED:
            s.verdict, s.verdict_reason = Verdict.UNKNOWN, "the capture began after the final fragment"
        else:
            s.verdict, s.verdict_reason = Verdict.UNKNOWN, "the capture ends before the final fragment was acknowledged"


def _cross_session_checks(sessions: list[Session], downloads: list[Download],
                          frame_of: Callable[[BitsPacket], str]) -> None:
    """duplicate-create and session-recreated: sessions of one client for one URL, in time order."""
    by_url: dict[tuple[str, str | None, str], list[Session]] = {}
    for s in sorted((s for s in sessions if s.id is not None or s.created), key=lambda s: s.first_ns):
        by_url.setdefault(s.url_key, []).append(s)
    for group in by_url.values():
        created = [s for s in group if s.created]
        still_open: list[tuple[float, int, Session]] = []  # heap by the time each session ended
        for i, s in enumerate(created):
            while still_open and still_open[0][0] <= s.first_ns:
                heapq.heappop(still_open)
            if still_open:
                other = still_open[0][2]
                s.flag("duplicate-create", f"second Create-Session from {s.client_ip} for {s.url} while session "
                       f"{other.id} (created frame {frame_of(other.packets[0])}) is still open"
                       + (f", with {len(still_open) - 1} more" if len(still_open) > 1 else ""), [s.packets[0]])
            if s.state is not State.REFUSED:
                ends = [t for t in (s.ended_ns, s.not_found_ns) if t is not None]
                heapq.heappush(still_open, (min(ends) if ends else math.inf, i, s))
        for gone in group:
            if gone.not_found_ns is None:
                continue
            successor = next((s for s in created if s.first_ns >= gone.not_found_ns), None)
            if successor is not None:
                successor.flag("session-recreated", f"new session {successor.id} for {successor.url} after session "
                               f"{gone.id} drew BG_E_SESSION_NOT_FOUND", [successor.packets[0]])
    _reply_fetched_after_close(sessions, downloads)
    _link_reply_fetches(sessions, downloads)


def _reply_path(upload_url: str, reply_url: str | None) -> str:
    """The path a reply URL points at; relative ones (even with backslashes) against the upload URL."""
    resolved = urljoin(urlsplit(upload_url).path or "/", (reply_url or "").replace("\\", "/"))
    return posixpath.normpath(unquote(urlsplit(resolved).path)).lower()


def _reply_fetched_after_close(sessions: list[Session], downloads: list[Download]) -> None:
    for s in sessions:
        close = next((pkt for pkt in s.packets if pkt.packet_type is PacketType.CLOSE_SESSION), None)
        if s.reply_url is None or close is None:
            continue
        wanted = _reply_path(s.url, s.reply_url)
        for download in downloads:
            if (download.client_ip == s.client_ip and download.sent_ns > close.sent_ns
                    and _reply_path(s.url, download.target) == wanted):
                s.anomalies.append(anomaly(
                    "reply-url-misplaced", f"reply {download.target} fetched after Close-Session (which deletes it)",
                    session_id=s.id, frames=(download.frame,), captures=(download.capture,), timestamps=(download.sent_ns,),
                    connection=download.connection,
                ))


def _link_reply_fetches(sessions: list[Session], downloads: list[Download]) -> None:
    """Name on each download the upload-reply session whose reply it fetches: same client
    address, the reply URL's path, the latest such session begun before it."""
    replies: dict[str, list[Session]] = {}
    for session in sessions:
        if session.reply_url:
            replies.setdefault(session.client_ip, []).append(session)
    for download in downloads:
        fetched = [s for s in replies.get(download.client_ip, ()) if s.first_ns <= download.sent_ns
                   and _reply_path(s.url, download.target) == _reply_path(s.url, s.reply_url or "")]
        download.reply_of = fetched[-1].id if fetched else None
