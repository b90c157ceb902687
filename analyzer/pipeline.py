"""The per-packet pipeline: capture → frames → segments → streams → HTTP exchanges.

The loop over the packets is Decoder.decode_into: it takes the capture's records and hands each
TCP segment's fields to TcpReassembler.receive, which calls the exchange assembler with stream
data. Everything above this module works per message. The capture files of a run are read in the
order given as one capture: one TCP reassembler and one exchange assembler see them all, so
connections, messages and BITS sessions span rotated captures. Frame numbers stay those of
their file; the messages say which file (`HttpMessage.first_capture`, `last_capture`, indices
into `RunResult.captures`). Each file has its own decoder (an IP datagram is not reassembled
across files) and its own statistics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import chain, islice
from typing import BinaryIO, Callable, Iterable

from bitstrace.analyzer.capture import SECRETS_TLS_KEYLOG, CaptureReader, Frame
from bitstrace.analyzer.decode import Decoder, SegmentFilter, format_endpoint, split_frame
from bitstrace.analyzer.exchanges import BodyConsumer, Exchange, ExchangeAssembler, first_message
from bitstrace.analyzer.problems import Problem
from bitstrace.analyzer.selection import FrameSelection
from bitstrace.analyzer.tcp import MAX_BUFFERED, REORDER_WINDOW_NS, StreamSink, TcpReassembler
from bitstrace.analyzer.tls import TlsFacts, TlsKeys, undecrypted_summary

ExchangeConsumer = Callable[[Exchange], object]  # what it returns is not used
ProgressHook = Callable[[str, int, int | None], None]  # (file, bytes read, file size or None)


@dataclass
class CaptureStats:
    """What one capture file held, for the report's capture statistics."""

    file: str
    format: str | None = ""  # None: the file was not recognised as a capture
    frames: int = 0
    bytes_read: int = 0
    first_ts_ns: int | None = None
    last_ts_ns: int | None = None
    complete: bool = True
    decoder: dict[str, int] = field(default_factory=dict)
    tcp: dict[str, int] = field(default_factory=dict)
    connections: int = 0
    exchanges: int = 0
    capture_point: str | None = None  # the directory it was found in (analyzer/sources.py)
    tls: list[TlsFacts] = field(default_factory=list)  # TLS connections first seen in this file


@dataclass
class RunResult:
    captures: list[CaptureStats] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every capture read to its end, and every TLS connection in them decrypted."""
        return all(c.complete and all(t.decrypted for t in c.tls) for c in self.captures)


def display_name(source: str | os.PathLike[str] | BinaryIO) -> str:
    """How problems and reports name a capture source."""
    if isinstance(source, (str, os.PathLike)):
        return "<stdin>" if str(source) == "-" else os.fspath(source)
    return getattr(source, "name", "<stream>")  # file objects: their name if they have one


def _file_size(source: str | os.PathLike[str] | BinaryIO) -> int | None:
    if isinstance(source, (str, os.PathLike)) and str(source) != "-":
        try:
            return os.path.getsize(source)
        except OSError:
            return None
    return None


PROGRESS_EVERY = 1 << 14  # frames between progress callbacks: the per-packet loop runs in batches of it


def read_exchanges(
    sources: Iterable[str | os.PathLike[str] | BinaryIO],
    on_exchange: ExchangeConsumer,
    on_body: BodyConsumer | None = None,
    progress: ProgressHook | None = None,
    selection: FrameSelection | None = None,
    *,
    keep: SegmentFilter | None = None,
    first_capture: int = 0,
    tap: Callable[[StreamSink], StreamSink] | None = None,
    before_finish: Callable[[], None] | None = None,
    reorder_window: float = REORDER_WINDOW_NS / 1e9,
    max_buffered: int = MAX_BUFFERED,
    tls_keys: TlsKeys | None = None,
) -> RunResult:
    """Run the captures, in order, through one pipeline, calling `on_exchange` for each HTTP
    exchange. `selection` keeps only some frames (a filter, a time range, a count).
    `reorder_window` (seconds of capture time) and `max_buffered` (bytes) are the TCP
    reassembler's: how long a hole waits for late data, and what all connections may hold.
    TLS connections are decrypted with `tls_keys` and the secrets the captures themselves hold
    (pcapng Decryption Secrets Blocks).

    The hooks of a partitioned run (analyzer/partition.py): `keep` passes on only some
    connections' segments (Decoder), `first_capture` is the index of the first source among
    all the run's files (frames and messages name their file by it), `tap` wraps the stream
    sink the reassembler feeds (to see every connection open), `before_finish` is called when
    the last frame is read, before the connections still open are flushed."""
    result = RunResult()
    keys = tls_keys if tls_keys is not None else TlsKeys()
    assembler = ExchangeAssembler(_counting(on_exchange, result.captures, first_capture), on_body, tls_keys=keys)
    assembler.captures.extend([""] * first_capture)  # other units' files: never named here
    reassembler = TcpReassembler(assembler if tap is None else tap(assembler),
                                 reorder_window=reorder_window, max_buffered=max_buffered)
    tcp_before = reassembler.stats  # totals when the current file began
    stats = None
    for index, source in enumerate(sources):
        name = display_name(source)
        stats = CaptureStats(file=name)
        result.captures.append(stats)
        assembler.captures.append(name)
        reader = CaptureReader(source, name=name, on_secrets=_secrets_into(keys, result.problems))
        reassembler.file = name
        decoder = Decoder(file=name, capture=first_capture + index, keep=keep)
        size = _file_size(source)
        records = reader.records() if selection is None else selection.apply(reader.records())
        unfilterable = dict(selection.unfilterable) if selection is not None else {}
        first = next(records, None)
        last = None
        if first is not None:
            stats.first_ts_ns = Frame(*first).ts_ns
            records = chain((first,), records)
        while batch_last := decoder.decode_into(islice(records, PROGRESS_EVERY), reassembler.receive):
            last = batch_last
            if progress is not None:
                progress(name, reader.bytes_read, size)
        decoder.finish()
        if last is not None:
            stats.frames = last.number
            stats.last_ts_ns = last.ts_ns
        stats.format = reader.format
        stats.bytes_read = reader.bytes_read
        stats.complete = stats.complete and reader.complete
        stats.decoder = dict(decoder.stats)
        stats.tcp = _since(reassembler.stats, tcp_before)
        stats.connections = stats.tcp["connections"]  # first seen in this file
        result.problems.extend(reader.problems)
        result.problems.extend(decoder.problems)
        if selection is not None:
            result.problems.extend(
                Problem("filter-not-applicable", f"frames of link type {link_type} left out: {why}", file=name)
                for link_type, why in selection.unfilterable.items() if link_type not in unfilterable)
        if progress is not None:
            progress(name, reader.bytes_read, size)
        last_before, tcp_before = tcp_before, reassembler.stats
    if before_finish is not None:
        before_finish()
    reassembler.finish()
    if stats is not None:  # what is still missing at the end of the run counts in the last file
        stats.tcp = _since(reassembler.stats, last_before)
    result.problems.extend(reassembler.problems)
    result.problems.extend(assembler.problems)
    _tls_report(assembler.tls_connections, result)
    result.problems.extend(keys.problems)
    return result


def _secrets_into(keys: TlsKeys, problems: list[Problem]) -> Callable[[int, bytes, str], None]:
    def add(kind: int, secrets: bytes, where: str) -> None:
        if kind == SECRETS_TLS_KEYLOG:
            keys.add_keylog(secrets, where)
        else:
            problems.append(Problem("unknown-secrets", f"{where}: secrets of type 0x{kind:08X} are not "
                                    "TLS key log lines; skipped"))
    return add


def _tls_report(connections: list[TlsFacts], result: RunResult) -> None:
    """Each TLS connection to the capture of its first frame; one problem per capture and
    (server, SNI, reason) for those that could not be decrypted."""
    for facts in sorted(connections, key=lambda f: f.connection):
        capture = split_frame(facts.first_frame)[0]
        result.captures[min(capture, len(result.captures) - 1)].tls.append(facts)
    for stats in result.captures:
        for sentence in undecrypted_summary(stats.tls, format_endpoint):
            result.problems.append(Problem("tls-undecrypted", sentence, file=stats.file))


def _since(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: value - before[key] for key, value in now.items()}


def _counting(on_exchange: ExchangeConsumer, captures: list[CaptureStats],
              first_capture: int) -> Callable[[Exchange], None]:
    def counted(exchange: Exchange) -> None:
        captures[first_message(exchange).first_capture - first_capture].exchanges += 1
        on_exchange(exchange)

    return counted
