"""The session state machine as seen from the wire: one table, walked by `step`.

Modelled on h11's _state.py: every transition is a row of `TRANSITIONS`, keyed by
(state, event) where an event is (what the client sent, how the server answered); the value is
the next state and the anomaly code the transition raises (None: legal). The code around it
only classifies packets into events and walks the table.

States follow docs/protocol.md 5.1 as the wire shows them: the server's INIT is CREATING,
RECEIVE_FRAGMENTS is RECEIVING, NOTIFY+WAIT_FOR_CLOSE is COMPLETE (the final fragment drew
200 with N = TOTAL), COMPLETE is CLOSED, CANCEL is CANCELLED. Three states exist only for an
observer: JOINED (first seen mid-session, history unknown), EXPIRED (the server answered
BG_E_SESSION_NOT_FOUND) and REFUSED (the Create-Session itself failed).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from bitstrace.analyzer.bits import protocol as p
from bitstrace.analyzer.bits.packets import AUTH_CHALLENGES, RESYNC, BitsPacket
from bitstrace.analyzer.bits.protocol import PacketType


class State(str, enum.Enum):
    CREATING = "creating"
    JOINED = "joined"
    RECEIVING = "receiving"
    COMPLETE = "complete"
    CLOSED = "closed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REFUSED = "refused"

    @property
    def server_state(self) -> str | None:
        """The matching server state of docs/protocol.md 5.1 (None: the server holds no session)."""
        return _SERVER_STATES[self]


_SERVER_STATES: dict[State, str | None] = {
    State.CREATING: "INIT",
    State.JOINED: "RECEIVE_FRAGMENTS",
    State.RECEIVING: "RECEIVE_FRAGMENTS",
    State.COMPLETE: "WAIT_FOR_CLOSE",
    State.CLOSED: "COMPLETE",
    State.CANCELLED: "CANCEL",
    State.EXPIRED: "EXPIRED",
    State.REFUSED: None,
}


class Sent(enum.Enum):
    CREATE = "Create-Session"
    FRAGMENT = "Fragment"
    FINAL_RESEND = "exact resend of the final fragment"
    CLOSE = "Close-Session"
    CANCEL = "Cancel-Session"
    PING = "Ping"


class Answer(enum.Enum):
    ACKED = "acknowledged"  # 200/201 (for a fragment: N < TOTAL)
    COMPLETED = "completed"  # fragment 200 with N == TOTAL
    RESYNC = "416"
    CHALLENGED = "401/407"
    NOT_FOUND = "session not found"  # BG_E_SESSION_NOT_FOUND
    REFUSED = "refused"  # any other failure
    UNANSWERED = "no answer"


class Transition(NamedTuple):
    next: State
    anomaly: str | None = None


ALL = frozenset(Answer)
ENDED = (State.CLOSED, State.CANCELLED)

# (state, what was sent, answers) -> transition; expanded into TRANSITIONS below.
# A row names a set of answers so the table stays readable; the expansion checks that no
# (state, sent, answer) appears twice.
_ROWS: list[tuple[State, Sent, frozenset[Answer], Transition]] = [
    # CREATING: a Create-Session waiting for its ack (only refused Creates stay visible here)
    (State.CREATING, Sent.CREATE, frozenset({Answer.ACKED}), Transition(State.RECEIVING)),
    (State.CREATING, Sent.CREATE, frozenset({Answer.CHALLENGED, Answer.UNANSWERED}), Transition(State.CREATING)),
    (State.CREATING, Sent.CREATE, ALL - {Answer.ACKED, Answer.CHALLENGED, Answer.UNANSWERED}, Transition(State.REFUSED)),
]
for _state in (State.RECEIVING, State.JOINED, State.EXPIRED):
    _ROWS += [
        (_state, Sent.FRAGMENT, frozenset({Answer.ACKED, Answer.RESYNC}), Transition(State.RECEIVING)),
        (_state, Sent.FRAGMENT, frozenset({Answer.COMPLETED}), Transition(State.COMPLETE)),
        (_state, Sent.FRAGMENT, frozenset({Answer.NOT_FOUND}), Transition(State.EXPIRED)),
        (_state, Sent.FRAGMENT, frozenset({Answer.CHALLENGED, Answer.REFUSED, Answer.UNANSWERED}), Transition(_state)),
        (_state, Sent.PING, ALL, Transition(_state)),
        (_state, Sent.CANCEL, frozenset({Answer.ACKED}), Transition(State.CANCELLED)),
        (_state, Sent.CANCEL, frozenset({Answer.NOT_FOUND}), Transition(State.EXPIRED)),
        (_state, Sent.CANCEL, ALL - {Answer.ACKED, Answer.NOT_FOUND}, Transition(_state)),
    ]
_ROWS += [
    # Closing before every byte was acknowledged: the server throws the partial file away.
    (State.RECEIVING, Sent.CLOSE, frozenset({Answer.ACKED}), Transition(State.CLOSED, "close-incomplete")),
    (State.RECEIVING, Sent.CLOSE, frozenset({Answer.NOT_FOUND}), Transition(State.EXPIRED, "close-incomplete")),
    (State.RECEIVING, Sent.CLOSE, ALL - {Answer.ACKED, Answer.NOT_FOUND}, Transition(State.RECEIVING, "close-incomplete")),
    # A session joined mid-way may have completed before the capture began: no verdict on its Close.
    (State.JOINED, Sent.CLOSE, frozenset({Answer.ACKED}), Transition(State.CLOSED)),
    (State.JOINED, Sent.CLOSE, frozenset({Answer.NOT_FOUND}), Transition(State.EXPIRED)),
    (State.JOINED, Sent.CLOSE, ALL - {Answer.ACKED, Answer.NOT_FOUND}, Transition(State.JOINED)),
    # The client closes after the server forgot the session: nothing left to report.
    (State.EXPIRED, Sent.CLOSE, ALL, Transition(State.EXPIRED)),
    # COMPLETE (WAIT_FOR_CLOSE): only an exact resend of the final fragment is normal (lost ack).
    (State.COMPLETE, Sent.FINAL_RESEND, ALL - {Answer.NOT_FOUND}, Transition(State.COMPLETE)),
    (State.COMPLETE, Sent.FINAL_RESEND, frozenset({Answer.NOT_FOUND}), Transition(State.EXPIRED)),
    (State.COMPLETE, Sent.FRAGMENT, ALL - {Answer.NOT_FOUND}, Transition(State.COMPLETE, "fragment-after-complete")),
    (State.COMPLETE, Sent.FRAGMENT, frozenset({Answer.NOT_FOUND}), Transition(State.EXPIRED, "fragment-after-complete")),
    (State.COMPLETE, Sent.PING, ALL, Transition(State.COMPLETE)),
    (State.COMPLETE, Sent.CLOSE, frozenset({Answer.ACKED}), Transition(State.CLOSED)),
    (State.COMPLETE, Sent.CLOSE, frozenset({Answer.NOT_FOUND}), Transition(State.EXPIRED)),
    (State.COMPLETE, Sent.CLOSE, ALL - {Answer.ACKED, Answer.NOT_FOUND}, Transition(State.COMPLETE)),
    (State.COMPLETE, Sent.CANCEL, frozenset({Answer.ACKED}), Transition(State.CANCELLED, "cancel-after-complete")),
    (State.COMPLETE, Sent.CANCEL, ALL - {Answer.ACKED}, Transition(State.COMPLETE, "cancel-after-complete")),
]
for _state in ENDED:
    _after = "fragment-after-close" if _state is State.CLOSED else "fragment-after-cancel"
    _ROWS += [
        (_state, Sent.FRAGMENT, ALL, Transition(_state, _after)),
        (_state, Sent.FINAL_RESEND, ALL, Transition(_state, _after)),
        (_state, Sent.CLOSE, ALL, Transition(_state, "packet-after-end")),
        (_state, Sent.CANCEL, ALL, Transition(_state, "packet-after-end")),
        (_state, Sent.PING, ALL, Transition(_state, "packet-after-end")),
    ]


def _expand(rows: list[tuple[State, Sent, frozenset[Answer], Transition]]) -> dict[tuple[State, Sent, Answer], Transition]:
    table: dict[tuple[State, Sent, Answer], Transition] = {}
    for state, sent, answers, transition in rows:
        for answer in answers:
            key = (state, sent, answer)
            if key in table:
                raise AssertionError(f"transition {key} defined twice")
            table[key] = transition
    return table


TRANSITIONS: dict[tuple[State, Sent, Answer], Transition] = _expand(_ROWS)

_SENT_BY_TYPE = {
    PacketType.CREATE_SESSION: Sent.CREATE,
    PacketType.FRAGMENT: Sent.FRAGMENT,
    PacketType.CLOSE_SESSION: Sent.CLOSE,
    PacketType.CANCEL_SESSION: Sent.CANCEL,
    PacketType.PING: Sent.PING,
}


def sent(packet: BitsPacket, state: State, final_range: p.ContentRange | None) -> Sent | None:
    """What the client sent, as an event; None for a packet the machine does not follow."""
    kind = _SENT_BY_TYPE.get(packet.packet_type) if packet.packet_type else None
    if kind is Sent.FRAGMENT and state is State.COMPLETE and packet.content_range == final_range:
        return Sent.FINAL_RESEND
    return kind


def answer(packet: BitsPacket) -> Answer:
    """How the server answered, as an event."""
    if not packet.answered:
        return Answer.UNANSWERED
    if packet.session_not_found:
        return Answer.NOT_FOUND
    if packet.succeeded:
        return Answer.COMPLETED if packet.is_final_ack else Answer.ACKED
    if packet.status == RESYNC:
        return Answer.RESYNC
    if packet.status in AUTH_CHALLENGES:
        return Answer.CHALLENGED
    return Answer.REFUSED


def step(state: State, event_sent: Sent, event_answer: Answer) -> Transition:
    """The table's transition; a (state, event) the table lacks leaves the state unchanged."""
    found = TRANSITIONS.get((state, event_sent, event_answer))
    return found if found is not None else Transition(state)
