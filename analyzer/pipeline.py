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
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from bitstrace.analyzer.capture import SECRETS_TLS_KEYLOG, CaptureReader, Frame, FrameFields
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
    files = []
    for index, source in enumerate(sources):
        files.append(_File(source, first_capture + index, keep, selection,
                           _secrets_into(keys, result.problems)))
        result.captures.append(files[-1].stats)
        assembler.captures.append(files[-1].name)
    receive = reassembler.receive
    merge = _Merge(files, reassembler)
    for file, bound in merge.runs():
        if bound is None:  # no other file has a packet before this one ends: straight through
            records = file.records if file.ahead is _END else chain((file.ahead,), file.records)
            while batch_last := file.decoder.decode_into(islice(records, PROGRESS_EVERY), receive):
                file.last = batch_last
                if progress is not None:
                    progress(file.name, file.reader.bytes_read, file.size)
            file.ahead = _END
        else:
            upto = _Upto(file.records, bound, file.ahead)
            if batch_last := file.decoder.decode_into(upto, receive):
                file.last = batch_last
            file.ahead = upto.ahead
            if progress is not None:
                progress(file.name, file.reader.bytes_read, file.size)
        if file.ahead is _END:
            file.end(result.problems, progress)
            merge.ended(file)
    if before_finish is not None:
        before_finish()
    reassembler.finish()
    merge.settle()  # what is still missing at the end of the run counts in the file read last
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


_END = object()  # _File.ahead once its records are exhausted


class _File:
    """One capture of a run being read: its reader, decoder and statistics. Frame numbers stay
    its own; `capture` is its index among the run's files."""

    def __init__(self, source: str | os.PathLike[str] | BinaryIO, capture: int, keep: SegmentFilter | None,
                 selection: FrameSelection | None, on_secrets: Callable[[int, bytes, str], None]) -> None:
        self.index = capture
        self.name = display_name(source)
        self.stats = CaptureStats(file=self.name)
        self.reader = CaptureReader(source, name=self.name, on_secrets=on_secrets)
        self.decoder = Decoder(file=self.name, capture=capture, keep=keep)
        self.size = _file_size(source)
        self.selection = selection
        self.unfilterable = dict(selection.unfilterable) if selection is not None else {}
        records = self.reader.records() if selection is None else selection.apply(self.reader.records())
        first = next(records, None)
        self.first_ts_ns = None if first is None else first[1]
        self.stats.first_ts_ns = self.first_ts_ns
        self.records: Iterator[FrameFields] = records
        self.ahead: Any = _END if first is None else first  # the next record, read but not decoded
        self.last: Frame | None = None

    def end(self, problems: list[Problem], progress: ProgressHook | None) -> None:
        self.decoder.finish()
        stats, reader = self.stats, self.reader
        if self.last is not None:
            stats.frames = self.last.number
            stats.last_ts_ns = self.last.ts_ns
        stats.format = reader.format
        stats.bytes_read = reader.bytes_read
        stats.complete = stats.complete and reader.complete
        stats.decoder = dict(self.decoder.stats)
        problems.extend(reader.problems)
        problems.extend(self.decoder.problems)
        selection = self.selection
        if selection is not None:
            problems.extend(
                Problem("filter-not-applicable", f"frames of link type {link_type} left out: {why}", file=self.name)
                for link_type, why in selection.unfilterable.items() if link_type not in self.unfilterable)
        if progress is not None:
            progress(self.name, reader.bytes_read, self.size)


class _Upto:
    """A file's records up to a time (and the record read ahead, first): the run of one file
    while another file's records wait. `ahead` is then the first record past the bound."""

    def __init__(self, records: Iterator[FrameFields], bound: tuple[int, bool], ahead: Any) -> None:
        self.records, self.bound, self.ahead = records, bound, ahead

    def __iter__(self) -> Iterator[FrameFields]:
        limit, inclusive = self.bound
        record = self.ahead
        while record is not _END:
            ts = record[1]
            if ts > limit or (ts == limit and not inclusive):
                break
            yield record
            record = next(self.records, _END)
        self.ahead = record


class _Merge:
    """The order the records of a run's files are read in: by timestamp, as mergecap merges
    files that overlap in time; on a tie, the file named (or, in a directory, begun) first.
    Files that do not overlap (rotated captures) are read one after the other, each straight
    through. A file is opened when the run reaches its first packet's time, so a long rotation
    keeps one or two files open. TCP figures count in the file whose frames were being read."""

    def __init__(self, files: list[_File], reassembler: TcpReassembler) -> None:
        self.files = files
        self.reassembler = reassembler
        self.open: list[_File] = []
        self.waiting = list(files)  # not yet begun, in run order
        self.reading: _File | None = None
        self.mark = reassembler.stats

    def runs(self) -> Iterator[tuple[_File, tuple[int, bool] | None]]:
        """(file, bound): read `file` up to `bound` (a time, and whether a record at that very
        time is read too); None: to its end. An empty file is yielded once, to be ended."""
        while self.open or self.waiting:
            while self.waiting and (not self.open or self._overlaps(self.waiting[0])):
                self.open.append(self.waiting.pop(0))
            file = min(self.open, key=lambda f: (f.ahead is not _END, f.ahead[1] if f.ahead is not _END else 0,
                                                 f.index))
            self._switch(file)
            if file.ahead is _END:
                yield file, None
                continue
            others = [(f.ahead[1], f.index > file.index) for f in self.open if f is not file]
            later = self.waiting[0] if self.waiting else None
            if later is not None and later.first_ts_ns is not None and file.first_ts_ns is not None \
                    and later.first_ts_ns >= file.first_ts_ns:
                others.append((later.first_ts_ns, True))
            yield file, (min(others) if others else None)

    def _overlaps(self, file: _File) -> bool:
        """Whether `file`, next in run order, begins while an open file is still going (from
        its first packet to its next one): an empty file, or one that begins before them, waits
        for them to end, as files one after the other are read."""
        begins = file.first_ts_ns
        return begins is not None and any(
            f.ahead is not _END and f.first_ts_ns is not None and f.first_ts_ns <= begins <= f.ahead[1]
            for f in self.open)

    def _switch(self, file: _File) -> None:
        if self.reading is not file:
            self._count()
            self.reading = file
            self.reassembler.file = file.name  # the file its problems name

    def _count(self) -> None:
        now = self.reassembler.stats
        if self.reading is not None:
            tcp = self.reading.stats.tcp
            for key, value in _since(now, self.mark).items():
                tcp[key] = tcp.get(key, 0) + value
            self.reading.stats.connections = tcp["connections"]  # first seen in this file
        self.mark = now

    def ended(self, file: _File) -> None:
        if file in self.open:
            self.open.remove(file)

    def settle(self) -> None:
        self._count()
        for file in self.files:
            if not file.stats.tcp:
                file.stats.tcp = {key: 0 for key in self.mark}


def _since(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: value - before[key] for key, value in now.items()}


def _counting(on_exchange: ExchangeConsumer, captures: list[CaptureStats],
              first_capture: int) -> Callable[[Exchange], None]:
    def counted(exchange: Exchange) -> None:
        captures[first_message(exchange).first_capture - first_capture].exchanges += 1
        on_exchange(exchange)

    return counted
