"""The one per-packet loop: capture → frames → segments → streams → HTTP exchanges.

Everything above this module works per message. Each capture file gets its own decoder and
reassembler (a connection never spans two files); exchanges of all files flow to one consumer
in file order, so BITS sessions can span rotated captures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import chain
from typing import BinaryIO, Callable, Iterable

from analyzer.capture import CaptureReader
from analyzer.decode import Decoder
from analyzer.exchanges import Exchange, ExchangeAssembler, HttpMessage
from analyzer.problems import Problem
from analyzer.tcp import Connection, TcpReassembler

ExchangeConsumer = Callable[[Exchange], None]
BodyConsumer = Callable[[Connection, HttpMessage, "bytes | memoryview", int], None]  # chunk, body offset
ProgressHook = Callable[[str, int, int | None], None]  # (file, bytes read, file size or None)


@dataclass
class CaptureStats:
    """What one capture file held, for the report's capture statistics."""

    file: str
    format: str = ""
    frames: int = 0
    bytes_read: int = 0
    first_ts_ns: int | None = None
    last_ts_ns: int | None = None
    complete: bool = True
    decoder: dict[str, int] = field(default_factory=dict)
    tcp: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    exchanges: int = 0


@dataclass
class RunResult:
    captures: list[CaptureStats] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(c.complete for c in self.captures)


def _display_name(source: str | os.PathLike | BinaryIO) -> str:
    if isinstance(source, (str, os.PathLike)):
        return "<stdin>" if str(source) == "-" else os.fspath(source)
    return getattr(source, "name", "<stream>")  # file objects: their name if they have one


def _file_size(source: str | os.PathLike | BinaryIO) -> int | None:
    if isinstance(source, (str, os.PathLike)) and str(source) != "-":
        try:
            return os.path.getsize(source)
        except OSError:
            return None
    return None


PROGRESS_EVERY = 1 << 14  # frames between progress callbacks: keeps the hook off the hot path


def read_exchanges(
    sources: Iterable[str | os.PathLike | BinaryIO],
    on_exchange: ExchangeConsumer,
    on_body: BodyConsumer | None = None,
    progress: ProgressHook | None = None,
) -> RunResult:
    """Run every capture through the pipeline, calling `on_exchange` for each HTTP exchange."""
    result = RunResult()
    next_index = 0  # exchange numbers stay unique across the files of one run
    for source in sources:
        name = _display_name(source)
        stats = CaptureStats(file=name)
        result.captures.append(stats)
        reader = CaptureReader(source, name=name)
        counted = _counting(on_exchange, stats)
        assembler = ExchangeAssembler(counted, on_body, first_index=next_index)
        decoder = Decoder(file=name)
        reassembler = TcpReassembler(assembler)
        size = _file_size(source)
        decode, feed = decoder.decode, reassembler.feed
        frames = iter(reader)
        frame = next(frames, None)
        if frame is not None:
            stats.first_ts_ns = frame.ts_ns
            frames = chain((frame,), frames)
        for frame in frames:
            segment = decode(frame)
            if segment is not None:
                feed(segment)
            if progress is not None and frame.number % PROGRESS_EVERY == 0:
                progress(name, reader.bytes_read, size)
        decoder.finish()
        reassembler.finish()
        if frame is not None:
            stats.frames = frame.number
            stats.last_ts_ns = frame.ts_ns
        stats.format = reader.format
        stats.bytes_read = reader.bytes_read
        stats.complete = stats.complete and reader.complete
        stats.decoder = dict(decoder.stats)
        stats.tcp = reassembler.stats
        stats.connections = reassembler.connection_count
        result.problems.extend(reader.problems)
        result.problems.extend(decoder.problems)
        result.problems.extend(assembler.problems)
        next_index = assembler.next_index
        if progress is not None:
            progress(name, reader.bytes_read, size)
    return result


def _counting(on_exchange: ExchangeConsumer, stats: CaptureStats) -> ExchangeConsumer:
    def counted(exchange: Exchange) -> None:
        stats.exchanges += 1
        on_exchange(exchange)

    return counted
