"""What the three command lines share: exit statuses, standard output that went away, and the
argument types with one wording for a bad value."""

from __future__ import annotations

import argparse
import enum
import math
import os
from typing import Callable, TextIO

from rich.console import Console


class Exit(enum.IntEnum):
    """Exit statuses, one scheme for bits-analyze, bits-replay and bits-server."""

    OK = 0
    #: a threshold the user set was reached: `--fail-on` anomalies, `--fail-on-diff` differences
    FINDINGS = 1
    #: a bad option, an unusable output, target or root, a selected session that does not exist
    USAGE = 2
    #: some input could not be read completely, or a fault stopped part of the work
    INCOMPLETE = 3
    #: Ctrl-C: what was done so far is reported
    INTERRUPTED = 130


#: Longest timeout option: longer waits overflow the platform's time_t.
MAX_TIMEOUT_S = 10 * 365 * 86400.0


def discard_further_output(stream: TextIO) -> None:
    """The reader of `stream` went away (`| head`) or its disk is full: what is still buffered,
    and flushed at exit, goes to /dev/null instead of failing again in Python's flush at exit."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class OutputConsole(Console):
    """rich exits with status 1 on a broken pipe; here it is the reader's choice, not an error."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where there is one to show: not for flags, nor for options unset by default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _number(text: str, convert: Callable[[str], float], kind: str) -> float:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {kind}") from None


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """A whole number from `low` (to `high`)."""
    def parse(text: str) -> int:
        value = int(_number(text, int, "whole number"))
        if high is None and value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {low}")
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not in {low}..{high}")
        return value
    return parse


def seconds(most: float = MAX_TIMEOUT_S) -> Callable[[str], float]:
    """A duration: more than 0 and at most `most` seconds."""
    def parse(text: str) -> float:
        value = _number(text, float, "number")
        if not 0 < value <= most:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 and at most {most:g}")
        return value
    return parse


def finite(low: float) -> Callable[[str], float]:
    """A finite number, `low` or more."""
    def parse(text: str) -> float:
        value = _number(text, float, "number")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {low:g} or more")
        return value
    return parse


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size(low: int) -> Callable[[str], int]:
    """A size in bytes, `low` or more: a whole number with an optional binary unit (`64M`,
    `2G`, `512KiB`; K, M, G, T are 1024-based)."""
    def parse(text: str) -> int:
        number = text.strip().lower().removesuffix("ib").removesuffix("b")
        unit = number[-1:] if number[-1:] in _SIZE_UNITS and number[-1:].isalpha() else ""
        value = int(_number(number[:len(number) - len(unit)] or "x", int, "size (e.g. 512M)")) * _SIZE_UNITS[unit]
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {low} bytes")
        return value
    return parse


def credentials(text: str) -> tuple[str, str]:
    """USER:PASSWORD for HTTP Basic; the password may hold colons, the user may not."""
    user, colon, password = text.partition(":")
    if not colon or not user:
        raise argparse.ArgumentTypeError("expected USER:PASSWORD")
    return user, password


def distinct_sources(sources: list[str], err: TextIO, program: str) -> list[str]:
    """The captures named, each once: a file named twice (under any path) is read once, with a
    warning, since reading it twice would show every session twice. Order is kept."""
    kept: list[str] = []
    seen: dict[tuple[int, int], str] = {}
    for source in sources:
        if source == "-":
            if "-" in kept:
                print(f"{program}: standard input is named twice; it is read once", file=err)
                continue
            kept.append(source)
            continue
        try:
            status = os.stat(source)
        except OSError:  # the reader names the problem with its place
            kept.append(source)
            continue
        identity = (status.st_dev, status.st_ino)
        if identity in seen:
            print(f"{program}: {source} is named twice (as {seen[identity]}); it is read once", file=err)
            continue
        seen[identity] = source
        kept.append(source)
    return kept


class SessionChoiceError(ValueError):
    """`--session` names no session, or several."""


#: Candidates listed when a --session prefix is unknown or ambiguous.
MAX_CANDIDATES = 20


def _bare(session_id: str) -> str:
    return session_id.strip().strip("{}").upper()


def choose_session(wanted: str, known: list[str]) -> str:
    """The one session id in `known` that `wanted` names: the whole id or any prefix of it,
    braces optional, any case (as people type ids read from the text report)."""
    prefix = _bare(wanted)
    distinct = list(dict.fromkeys(known))
    matches = [session_id for session_id in distinct if _bare(session_id).startswith(prefix)] if prefix else []
    exact = [session_id for session_id in matches if _bare(session_id) == prefix]
    if len(exact) == 1 or len(matches) == 1:
        return (exact or matches)[0]

    def listed(ids: list[str]) -> str:
        more = len(ids) - MAX_CANDIDATES
        return ", ".join(ids[:MAX_CANDIDATES]) + (f" and {more} more" if more > 0 else "")

    if matches:
        raise SessionChoiceError(f"--session {wanted} matches {len(matches)} sessions: {listed(matches)}")
    if not distinct:
        raise SessionChoiceError(f"no session {wanted}: the captures hold no BITS session")
    raise SessionChoiceError(f"no session {wanted} in the captures; they hold {listed(distinct)}")
