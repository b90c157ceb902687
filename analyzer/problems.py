"""Problems met while reading input: each names its place, and the analysis goes on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the input, located as precisely as the layer that met it can.

    `kind` is a short stable token (e.g. "truncated-record", "unknown-link-type",
    "malformed-ip", "capture-gap"); `message` is the human sentence. `fatal` means reading that
    file stopped there (what came before is still analysed); the exit status reports it.
    """

    kind: str
    message: str
    file: str | None = None
    frame: int | None = None
    offset: int | None = None  # byte offset in the file, or in the stream for stream problems
    connection: int | None = None
    fatal: bool = False

    def __str__(self) -> str:
        place = [p for p in (
            self.file,
            f"frame {self.frame}" if self.frame is not None else None,
            f"stream {self.connection}" if self.connection is not None else None,
            f"offset {self.offset}" if self.offset is not None else None,
        ) if p]
        return f"{': '.join([', '.join(place)] if place else [])}{': ' if place else ''}{self.message}"


PROBLEMS_PER_KIND = 10


class ProblemLog(list[Problem]):
    """A list of Problems that keeps the first few of each kind and only counts the rest.

    When a kind passes its limit, one Problem says so; `counts` holds the full tallies.
    """

    def __init__(self, limit: int = PROBLEMS_PER_KIND) -> None:
        super().__init__()
        self.limit = limit
        self.counts: dict[str, int] = {}

    def report(self, problem: Problem) -> None:
        seen = self.counts.get(problem.kind, 0) + 1
        self.counts[problem.kind] = seen
        if seen <= self.limit or problem.fatal:
            self.append(problem)
        elif seen == self.limit + 1:
            self.append(Problem(
                problem.kind,
                f"more {problem.kind} problems follow; they are only counted",
                file=problem.file, frame=problem.frame, offset=problem.offset))
