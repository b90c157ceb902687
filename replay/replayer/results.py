"""What a replay did: per request (`Outcome`), per session (`SessionResult`) and in all
(`ReplayResult`), and the `Fault` that stops a session."""

from __future__ import annotations

import os
import statistics
import sys
import traceback
from dataclasses import dataclass, field
from typing import Protocol

from bitstrace.replay.replayer.compare import AckSummary, Difference
from bitstrace.replay.replayer.plan import PlannedRequest, PlannedSession, RequestStore

#: Set to 1 to get the traceback of an unexpected error in a session on stderr.
DEBUG_ENV = "BITSTRACE_DEBUG"


class Outcome:
    """One request of the replay: what was (or would have been) sent and what came back.

    A replay keeps one per request until its report is written, so it holds the captured
    request it stands for by its place in the plan's store (`captured` reads it back), and
    its label is shared with every other outcome of the same label."""

    __slots__ = ("label", "_captured", "_store", "sent", "live", "fault", "note", "due_s",
                 "sent_s", "bytes_sent", "differences")

    def __init__(self, label: str, captured: PlannedRequest | None = None,
                 store: RequestStore | None = None, *, note: str | None = None) -> None:
        self.label = sys.intern(label)
        # The captured request, or its index in `store` (None: made up, not captured).
        self._captured: PlannedRequest | int | None = captured
        if captured is not None and store is not None and captured.index >= 0:
            self._captured = captured.index
        self._store = store
        self.sent = False  # it went out (answered, or cut short by a fault after connecting)
        self.live: AckSummary | None = None
        self.fault: str | None = None
        self.note = note
        self.due_s: float | None = None  # when it should have gone, seconds after the start
        self.sent_s: float | None = None
        self.bytes_sent = 0
        self.differences: list[Difference] = NO_DIFFERENCES

    @property
    def captured(self) -> PlannedRequest | None:
        """The captured request it stands for; None if made up."""
        if isinstance(self._captured, int):
            assert self._store is not None
            return self._store.load(self._captured)
        return self._captured

    @property
    def pacing_error_s(self) -> float | None:
        if self.due_s is None or self.sent_s is None:
            return None
        return self.sent_s - self.due_s

    def __repr__(self) -> str:
        return f"Outcome({self.label!r}, sent={self.sent}, live={self.live}, fault={self.fault!r})"


#: The differences of an outcome with none (shared, never changed: outcomes are given a new
#: list when they differ).
NO_DIFFERENCES: list[Difference] = []


@dataclass
class SessionResult:
    key: str  # PlannedSession.key
    captured_id: str  # the captured session id (the key when the session had none)
    generation: int = 0  # PlannedSession.generation
    live_ids: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fault: str | None = None  # why the session stopped early
    started_s: float | None = None
    ended_s: float | None = None

    @property
    def differences(self) -> int:
        return sum(1 for o in self.outcomes if o.differences)


@dataclass
class ReplayResult:
    target: str
    mode: str
    speed: float
    sessions: list[SessionResult]
    interrupted: bool = False  # stopped by the user (Ctrl-C); the sessions hold what was done

    @property
    def faults(self) -> int:
        return sum(1 for s in self.sessions if s.fault)

    @property
    def differences(self) -> int:
        return sum(s.differences for s in self.sessions)

    def median_pacing_error_s(self) -> float | None:
        errors = [abs(o.pacing_error_s) for s in self.sessions for o in s.outcomes
                  if o.pacing_error_s is not None]
        return statistics.median(errors) if errors else None


def result_of(session: PlannedSession) -> SessionResult:
    return SessionResult(session.key, session.session_id or session.key, session.generation)


class Observer(Protocol):
    """Told of a replay's progress as it goes (the command line's progress display)."""

    def on_session_start(self, session: PlannedSession) -> None: ...
    def on_bytes(self, session: PlannedSession, count: int) -> None: ...
    def on_session_end(self, session: PlannedSession, result: SessionResult) -> None: ...


class Fault(Exception):
    """A failure that stops a session, phrased for the user. `reached_server` is False when
    the request never left (no connection)."""

    def __init__(self, message: str, reached_server: bool = True) -> None:
        super().__init__(message)
        self.reached_server = reached_server


def unexpected_fault(exc: Exception) -> str:
    """A fault message for an error the replay did not foresee (a bug): its type and message;
    the traceback on stderr only when BITSTRACE_DEBUG=1."""
    if os.environ.get(DEBUG_ENV) == "1":
        traceback.print_exception(exc)
    return f"unexpected error: {type(exc).__name__}: {exc}"

