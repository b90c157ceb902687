"""Partitioned runs: the unit of work is (capture point, partition k of N); a merge stitches the
units' results into the analysis one process would make.

Partition key. A unit keeps the TCP connections whose symmetric hash of the 4-tuple falls in
its partition (`partition_of`): both directions of a connection, and every reuse of its
4-tuple, land in the same unit, so TCP and HTTP in a unit are exactly those of one process
restricted to its connections. A hash of the client address alone would keep a client's
sessions together, but a fleet behind a NAT, a proxy or loopback is one address: the benchmark
captures have one client (127.0.0.1) and would make one partition. A BITS session whose
connections fall in several units is stitched by session id in the merge, before the session
walk, which therefore sees every packet of it, as one process does.

What a unit returns (`UnitResult`) is compact: per exchange its classification (the BITS
packet, download or loose anomalies, never a frame or a body) with its times and an order
key; the connections it opened (local id, first frame); its files' statistics; its problems.

Identical output. In one process the session tracker files exchanges in the order they
complete; each exchange gets the key of that moment: (capture point, 0, frame being read) while
frames are read, (capture point, 1, first frame of its connection) when the connections still
open are flushed at the end (they flush in the order they opened). Frames of one connection
are in one unit, so keys of different units never tie, and within a unit the order is kept.
Connection ids are numbered in the order the connections first appeared over all units, as
the reassembler numbers them; exchange indices follow the merged order. Decoder and reader
figures and problems are the same in every unit of a capture point (every unit decodes every
frame): partition 0's are kept; TCP figures are summed; HTTP problems are merged by place and
bounded again as one ProblemLog bounds them.

`--extract`: a capture point is then not split (one unit per capture point): a session's
fragments on connections of two units would be spooled twice, and the byte-level resend
checks and the coverage map need all of them in one place.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from bitstrace.analyzer.analysis import Analysis
from bitstrace.analyzer.bits.catalogue import Anomaly
from bitstrace.analyzer.bits.extract import ExtractedEntity, Extractor
from bitstrace.analyzer.bits.packets import BitsPacket, Classified, classify
from bitstrace.analyzer.bits.sessions import Session, SessionTracker, exchange_times
from bitstrace.analyzer.exchanges import Exchange
from bitstrace.analyzer.pipeline import CaptureStats, RunResult, read_exchanges
from bitstrace.analyzer.problems import Problem, ProblemLog
from bitstrace.analyzer.selection import FrameSelection
from bitstrace.analyzer.sources import CapturePoint
from bitstrace.analyzer.tcp import Connection, StreamSink

_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive ports over the partitions
_MASK = (1 << 64) - 1

OrderKey = tuple[int, int, int]


def partition_of(src: bytes, sport: int, dst: bytes, dport: int, partitions: int) -> int:
    """The partition of a connection: the same for both directions (the hash is symmetric)."""
    mixed = ((int.from_bytes(src, "big") ^ int.from_bytes(dst, "big") ^ sport ^ dport) * _MIX) & _MASK
    return (mixed >> 32) % partitions


@dataclass(frozen=True)
class Options:
    """What every unit of a run is told (picklable: units run in other processes and hosts)."""

    several_captures: bool = False
    extract_dir: str | None = None
    selection: tuple[str | None, int | None, int | None, int | None] | None = None  # FrameSelection's arguments

    def frame_selection(self) -> FrameSelection | None:
        return None if self.selection is None else FrameSelection(*self.selection)


@dataclass(frozen=True)
class Unit:
    point: int  # index of the capture point among the run's
    point_name: str | None
    files: tuple[str, ...]
    first_capture: int  # index of files[0] among all the run's files
    partition: int
    partitions: int
    options: Options = Options()

    @property
    def label(self) -> str:
        where = f"capture point {self.point_name}" if self.point_name is not None else "the captures named"
        files = ", ".join(self.files[:3]) + (f" and {len(self.files) - 3} more" if len(self.files) > 3 else "")
        return f"{where} ({files}), partition {self.partition + 1} of {self.partitions}"

    @property
    def size(self) -> int:
        total = 0
        for path in self.files:
            try:
                total += os.path.getsize(path)
            except OSError:
                pass
        return total


@dataclass
class UnitResult:
    unit: Unit
    exchanges: list[tuple[OrderKey, Classified, list[int | None]]]
    opened: list[tuple[int, int]]  # (local connection id, first frame) of every connection
    captures: list[CaptureStats]
    file_problems: list[Problem]  # reader, decoder, filter: the same in every unit of a capture point
    http_problems: list[Problem]
    http_counts: dict[str, int]
    extract_problems: list[Problem] = field(default_factory=list)
    entities: dict[tuple[str, int], ExtractedEntity] = field(default_factory=dict)
    worker: str = ""


def units_of(points: Sequence[CapturePoint], partitions: int, options: Options) -> list[Unit]:
    """Every (capture point, partition) of a run; one partition per capture point when extracting."""
    count = 1 if options.extract_dir is not None else max(1, partitions)
    units: list[Unit] = []
    first = 0
    for index, point in enumerate(points):
        units.extend(Unit(index, point.name, tuple(point.files), first, k, count, options) for k in range(count))
        first += len(point.files)
    return units


class _Opened:
    """The stream sink between TCP and HTTP, noting each connection as it opens."""

    def __init__(self, sink: StreamSink, opened: list[tuple[int, int]]) -> None:
        self.sink = sink
        self.opened = opened
        self.on_data = sink.on_data  # the per-packet call goes straight through
        self.on_gap = sink.on_gap
        self.on_conflict = sink.on_conflict
        self.on_fin = sink.on_fin
        self.on_rst = sink.on_rst
        self.on_close = sink.on_close

    def on_open(self, conn: Connection) -> None:
        self.opened.append((conn.id, conn.first_frame))
        self.sink.on_open(conn)


def worker_name() -> str:
    """Where a unit runs: the Dask worker's address, else host and process id."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"{socket.gethostname()} pid {os.getpid()}"


def run_unit(unit: Unit) -> UnitResult:
    """Read the unit's files and classify the exchanges of its connections."""
    options = unit.options
    point, partition, partitions = unit.point, unit.partition, unit.partitions
    clock = [0, 0]  # [phase, frame being read]
    exchanges: list[tuple[OrderKey, Classified, list[int | None]]] = []
    opened: list[tuple[int, int]] = []
    sinks: list[_Opened] = []
    extractor = tracker = None
    if options.extract_dir is not None:
        extractor = Extractor(options.extract_dir, several_captures=options.several_captures,
                              capture_names=[""] * unit.first_capture + list(unit.files))
        tracker = SessionTracker(extractor, several_captures=options.several_captures)

    if partitions == 1:
        def keep(frame: int, src: bytes, sport: int, dst: bytes, dport: int) -> bool:
            clock[1] = frame
            return True
    else:
        def keep(frame: int, src: bytes, sport: int, dst: bytes, dport: int) -> bool:
            # partition_of, inline: this runs for every frame
            if ((((int.from_bytes(src, "big") ^ int.from_bytes(dst, "big") ^ sport ^ dport) * _MIX) & _MASK) >> 32) \
                    % partitions != partition:
                return False
            clock[1] = frame
            return True

    def on_exchange(exchange: Exchange) -> None:
        found = classify(exchange)
        times = exchange_times(exchange)
        if tracker is not None:
            tracker.file_classified(found, times)  # the extractor learns the acks and the re-issued ids
        key = (point, 1, exchange.connection.first_frame) if clock[0] else (point, 0, clock[1])
        exchanges.append((key, found, times))

    def tap(sink: StreamSink) -> StreamSink:
        sinks.append(_Opened(sink, opened))
        return sinks[-1]

    def ending() -> None:
        clock[0] = 1

    run = read_exchanges(list(unit.files), on_exchange, on_body=extractor.on_body if extractor else None,
                         selection=options.frame_selection(), keep=keep, first_capture=unit.first_capture,
                         tap=tap, before_finish=ending)
    http_log = getattr(sinks[0].sink, "problems", []) if sinks else []
    http_ids = {id(problem) for problem in http_log}
    worker = worker_name()
    file_problems = [_on_worker(problem, worker) for problem in run.problems if id(problem) not in http_ids]
    result = UnitResult(unit, exchanges, opened, run.captures, file_problems, list(http_log),
                        dict(getattr(http_log, "counts", {})), worker=worker)
    if extractor is not None and tracker is not None:
        result.entities = extractor.finish(_entity_names(tracker.sessions()))
        result.extract_problems = list(extractor.problems)
    return result


def _on_worker(problem: Problem, worker: str) -> Problem:
    """A file a Dask worker cannot open is named with the worker (storage is not shared there)."""
    if problem.kind == "unreadable-file" and worker.startswith(("tcp://", "tls://", "inproc://", "ucx://")):
        return Problem(problem.kind, f"{problem.message} (on Dask worker {worker})", file=problem.file,
                       frame=problem.frame, offset=problem.offset, connection=problem.connection,
                       fatal=problem.fatal)
    return problem


def _entity_names(sessions: list[Session]) -> dict[tuple[str, int], tuple[str, str | None]]:
    """What Extractor.finish names each entity by: the session id and its first Content-Name in send order."""
    names = {}
    for s in sessions:
        if s.id is None:
            continue
        ordered = sorted(s.packets, key=lambda pkt: (pkt.sent_ns, pkt.request_capture, pkt.request_frame))
        names[(s.key, s.generation)] = (s.id, next((pkt.content_name for pkt in ordered if pkt.content_name), None))
    return names


class _Collected:
    """The merge's stand-in for the Extractor: the units extracted; the tracker attaches."""

    def __init__(self, entities: dict[tuple[str, int], ExtractedEntity]) -> None:
        self.entities = entities
        self.problems: list[Problem] = []

    def settle(self, packet: BitsPacket) -> None:
        """The units settled their own fragments."""

    def session_reissued(self, key: str) -> None:
        """The units numbered their own generations."""

    def finish(self, names: dict[tuple[str, int], tuple[str, str | None]]) -> dict[tuple[str, int], ExtractedEntity]:
        return self.entities


@dataclass
class Failure:
    """A unit that failed twice: reported as a located problem, the rest of the report stands."""

    unit: Unit
    error: str


def merge(units: Sequence[Unit], results: Iterable[UnitResult], points: Sequence[CapturePoint],
          failures: Sequence[Failure] = (), notes: Sequence[Problem] = (),
          stall_after_s: float | None = None) -> Analysis:
    """The analysis one process would make of the units' files, from the units' results."""
    by_unit = {(r.unit.point, r.unit.partition): r for r in results}
    options = units[0].options if units else Options()
    # global connection ids: the order connections first appeared, capture point after capture point
    firsts = sorted((r.unit.point, frame, r.unit.partition, local) for r in by_unit.values() for local, frame in r.opened)
    ids = {(point, partition, local): rank for rank, (point, _, partition, local) in enumerate(firsts)}
    run = RunResult()
    run.problems.extend(notes)
    entities: dict[tuple[str, int], ExtractedEntity] = {}
    extract_problems: list[Problem] = []
    filed: list[tuple[OrderKey, Classified, list[int | None]]] = []
    for index, point in enumerate(points):
        mine = [u for u in units if u.point == index]
        got = [by_unit[(u.point, u.partition)] for u in mine if (u.point, u.partition) in by_unit]
        first = mine[0].first_capture if mine else len(run.captures)
        if not got:  # every unit of the capture point failed: its files are named, nothing read
            run.captures.extend(CaptureStats(file=f, complete=False, capture_point=point.name) for f in point.files)
            continue
        base = got[0]
        for position, stats in enumerate(base.captures):
            stats.capture_point = point.name
            stats.exchanges = sum(r.captures[position].exchanges for r in got)
            stats.tcp = {key: sum(r.captures[position].tcp[key] for r in got) for key in stats.tcp}
            stats.connections = stats.tcp.get("connections", 0)
            if len(got) < len(mine):
                stats.complete = False
            run.captures.append(stats)
        run.problems.extend(base.file_problems)
        run.problems.extend(_merged_http_problems(got, {f: first + i for i, f in enumerate(point.files)}, ids))
        for r in got:
            extract_problems.extend(r.extract_problems)
            for key, entity in r.entities.items():
                entities.setdefault(key, entity)
                _renumber_anomalies(entity.anomalies, ids, r.unit)
            if len(got) > 1 or len(points) > 1:
                for _, found, _ in r.exchanges:
                    _renumber(found, ids, r.unit)
            filed.extend(r.exchanges)
    for failure in failures:
        unit = failure.unit
        run.problems.append(Problem("unit-failed", f"{unit.label} failed twice, not analysed: {failure.error}",
                                    file=unit.files[0] if unit.files else None, fatal=True))
    filed.sort(key=lambda item: item[0])
    several = options.several_captures
    collected = _Collected(entities) if options.extract_dir is not None else None
    extra = {} if stall_after_s is None else {"stall_after_s": stall_after_s}
    tracker = SessionTracker(collected, several_captures=several, **extra)  # type: ignore[arg-type]  # duck-typed Extractor
    for index, (_, found, times) in enumerate(filed):
        if found.packet is not None:
            found.packet.exchange = index
        if found.download is not None:
            found.download.exchange = index
        tracker.file_classified(found, times)
    starts = [c.first_ts_ns for c in run.captures if c.first_ts_ns is not None]
    ends = [c.last_ts_ns for c in run.captures if c.last_ts_ns is not None]
    bits = tracker.finish(min(starts) if starts else None, max(ends) if ends else None)
    run.problems.extend(extract_problems)
    if any(point.name is not None for point in points):
        names = [c.capture_point for c in run.captures]
        for session in bits.sessions:
            session.capture_points = list(dict.fromkeys(
                name for pkt in session.packets for name in (names[pkt.request_capture],) if name is not None))
    return Analysis(run, bits)


def _renumber(found: Classified, ids: dict[tuple[int, int, int], int], unit: Unit) -> None:
    """Local connection ids → the run's."""
    point, partition = unit.point, unit.partition
    seen: set[int] = set()
    if found.packet is not None:
        found.packet.connection = ids[(point, partition, found.packet.connection)]
        _renumber_anomalies(found.packet.anomalies, ids, unit, seen)
    if found.download is not None:
        found.download.connection = ids[(point, partition, found.download.connection)]
    _renumber_anomalies(found.anomalies, ids, unit, seen)


def _renumber_anomalies(anomalies: Iterable[Anomaly], ids: dict[tuple[int, int, int], int], unit: Unit,
                        seen: set[int] | None = None) -> None:
    seen = set() if seen is None else seen
    for item in anomalies:
        if item.connection is not None and id(item) not in seen:
            seen.add(id(item))
            item.connection = ids[(unit.point, unit.partition, item.connection)]


def _merged_http_problems(results: Sequence[UnitResult], capture_index: dict[str | None, int],
                          ids: dict[tuple[int, int, int], int]) -> list[Problem]:
    """The units' HTTP problems in the order of their places, bounded as one ProblemLog bounds them."""
    placed = []
    for r in results:
        for position, problem in enumerate(r.http_problems):
            connection = problem.connection
            if connection is not None:
                problem = Problem(problem.kind, problem.message, file=problem.file, frame=problem.frame,
                                  offset=problem.offset, fatal=problem.fatal,
                                  connection=ids[(r.unit.point, r.unit.partition, connection)])
            placed.append(((capture_index.get(problem.file, -1), problem.frame or 0, r.unit.partition, position), problem))
    placed.sort(key=lambda item: item[0])
    log = ProblemLog()
    for _, problem in placed:
        log.report(problem)
    return list(log)


def analyze_units(points: Sequence[CapturePoint], partitions: int, options: Options,
                  engine: Callable[[list[Unit]], tuple[list[UnitResult], list[Failure]]],
                  notes: Sequence[Problem] = (), stall_after_s: float | None = None) -> Analysis:
    """Split the run into units, have `engine` run them, merge."""
    units = units_of(points, partitions, options)
    results, failures = engine(units)
    return merge(units, results, points, failures, notes, stall_after_s)


def run_in_process(units: list[Unit]) -> tuple[list[UnitResult], list[Failure]]:
    """The engine of --jobs 1: each unit in turn, here."""
    return [run_unit(unit) for unit in units], []


def partition_options(files: Sequence[Any], extract_dir: str | None,
                      selection: tuple[str | None, int | None, int | None, int | None] | None) -> Options:
    return Options(several_captures=len(files) > 1, extract_dir=os.fspath(extract_dir) if extract_dir else None,
                   selection=selection)
