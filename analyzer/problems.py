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
