"""The replay's progress on the terminal: sessions done and in flight, body bytes sent."""

from __future__ import annotations

import contextlib
from typing import Iterator, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from bitstrace.replay.replayer.plan import Plan, PlannedSession
from bitstrace.replay.replayer.results import SessionResult


class _ProgressObserver:
    """Sessions done and bytes sent, on a rich progress display."""

    def __init__(self, progress: Progress, plan: Plan) -> None:
        self.progress = progress
        self.in_flight = 0
        self.sessions = progress.add_task("sessions done", total=len(plan.sessions))
        self.bytes = progress.add_task("body bytes sent",
                                       total=sum(s.body_bytes for s in plan.sessions))

    def on_session_start(self, session: PlannedSession) -> None:
        self.in_flight += 1
        self._describe()

    def on_bytes(self, session: PlannedSession, count: int) -> None:
        self.progress.advance(self.bytes, count)

    def on_session_end(self, session: PlannedSession, result: SessionResult) -> None:
        self.in_flight -= 1
        self.progress.advance(self.sessions)
        self._describe()

    def _describe(self) -> None:
        self.progress.update(self.sessions, description=f"sessions done ({self.in_flight} in flight)")


@contextlib.contextmanager
def progress_display(enabled: bool, plan: Plan, err: TextIO) -> Iterator[_ProgressObserver | None]:
    if not enabled or not err.isatty():
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=Console(file=err), transient=True) as progress:
        yield _ProgressObserver(progress, plan)
