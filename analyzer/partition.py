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

Two rounds. A unit first reads its files, classifies the exchanges of its connections and
files them into its own session tracker, and answers a small `UnitSummary` (its connections
with the moment each opened, its session keys, its files' statistics and problems), keeping the
rest in its worker's memory (`UnitState`). The client then makes each unit's `Plan`: the run's
connection ids for the unit's connections, the keys of sessions filed in more than one unit
(a resume on a connection of another unit, a Host-Id redirect, a session seen at two capture
points) and the run's capture bounds. In the second round (`finish_unit`) the unit puts the
run's connection ids on everything, walks the sessions of no shipped key itself
(SessionTracker.walk: the state table, the checks of one session's history) and answers them
with their order keys, and every other exchange, classified (downloads, other HTTP, packets
outside any session, the shipped sessions' packets). The client files those in one process's
order, walks the shipped sessions, joins them to the walked ones in the order they began, and
runs what needs every session (duplicate-create, session-recreated, reply fetches, extracted
files) over all of them (SessionTracker.finish(joined=...)). Without packet records in the
report (the text report, or none), a walked session comes back as a `ShippedSession`: only
the packets the cross-session checks read (the first and the first Close-Session) and its
fragment count; so the client never unpickles the bulk of the packets.

Identical output. In one process the session tracker files exchanges in the order they
complete; each exchange gets the key of that moment: (capture point, 0, TCP segments read so
far) while frames are read (every unit of a capture point reads the same segments in the same
order, its files merged by time as pipeline.py merges them), (capture point, 1, segments read
when its connection opened) when the connections still open are flushed at the end (they flush
in the order they opened). Segments of one connection
are in one unit, so keys of different units never tie, and within a unit the order is kept;
a session's order key is that of its first packet. A session key filed in one unit only has
there all its packets and every earlier session of that key (its generation), so walking it
there is walking it in one process. Connection ids are numbered in the order the connections
first appeared over all units, as the reassembler numbers them, before any message names one
(concurrent-requests does). `BitsPacket.exchange` is the index among the exchanges filed in
the client, or within its unit for a walked session (no report shows it). Decoder and reader
figures and problems are the same in every unit of a capture point (every unit decodes every
frame): partition 0's are kept; TCP figures are summed; HTTP problems are merged by place and
bounded again as one ProblemLog bounds them.

`--extract`: a capture point is then not split (one unit per capture point): a session's
fragments on connections of two units would be spooled twice, and the byte-level resend
checks and the coverage map need all of them in one place.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Sequence

from bitstrace.analyzer.analysis import Analysis
from bitstrace.analyzer.bits.catalogue import Anomaly
from bitstrace.analyzer.bits.extract import ExtractedEntity, Extractor
from bitstrace.analyzer.bits.packets import BitsPacket, Classified, classify
from bitstrace.analyzer.bits.protocol import PacketType
from bitstrace.analyzer.bits.sessions import DEFAULT_STALL_AFTER_S, Session, SessionTracker, exchange_times
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
    stall_after_s: float | None = None
    with_packets: bool = True  # a report with packet records: walked sessions come back with their packets

    def frame_selection(self) -> FrameSelection | None:
        return None if self.selection is None else FrameSelection(*self.selection)

    @property
    def stall_after(self) -> float:
        return DEFAULT_STALL_AFTER_S if self.stall_after_s is None else self.stall_after_s


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
class UnitSummary:
    """A unit's first answer, once its files are read: what the plan of the second needs (its
    connections and session keys) and what the merge takes as it is. Small: no packet."""

    unit: Unit
    opened: list[tuple[int, int]]  # (local connection id, segments read when it opened) of every connection
    keys: list[str]  # of the sessions filed in the unit, in filing order
    captures: list[CaptureStats]
    file_problems: list[Problem]  # reader, decoder, filter: the same in every unit of a capture point
    http_problems: list[Problem]
    http_counts: dict[str, int]
    worker: str = ""


@dataclass(frozen=True)
class Plan:
    """What the client tells a unit once every unit has read its files."""

    connections: dict[int, int]  # local connection id → the run's
    shipped: frozenset[str]  # keys of sessions filed in several units: their packets go to the client
    start_ns: int  # the run's capture bounds, which the session walk needs
    end_ns: int


@dataclass
class UnitFinish:
    """A unit's second answer: the sessions it walked and every other exchange, classified."""

    exchanges: list[tuple[OrderKey, Classified, list[int | None]]]  # all but the walked sessions' packets
    sessions: list[tuple[OrderKey, Session]]  # walked here; the key is that of the session's first packet
    extract_problems: list[Problem] = field(default_factory=list)
    entities: dict[tuple[str, int], ExtractedEntity] = field(default_factory=dict)
    cpu_s: float = 0.0  # the worker process's CPU time (user + sys) when the unit ended


@dataclass
class UnitResult:
    summary: UnitSummary
    finish: UnitFinish

    @property
    def unit(self) -> Unit:
        return self.summary.unit


@dataclass
class UnitState:
    """A unit between its two answers, in its worker's memory: every exchange classified and
    filed into the unit's own session tracker, nothing walked yet."""

    summary: UnitSummary
    exchanges: list[tuple[OrderKey, Classified, list[int | None]]]
    tracker: SessionTracker
    extractor: Extractor | None


#: The client's side between the rounds: the summaries of the units read → each one's plan.
Planner = Callable[[list[UnitSummary]], list[Plan]]


class ShippedSession(Session):
    """A session walked in its unit and sent without its packets (a report without packet
    records): it keeps the packets the cross-session checks read (the first, and the first
    Close-Session, in send order) and its fragment count, which the report shows."""

    shipped_fragments: int = 0
    shipped_packets: int = 0

    @property
    def fragment_count(self) -> int:
        return self.shipped_fragments


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

    def __init__(self, sink: StreamSink, opened: list[tuple[int, int]], clock: list[int], began: dict[int, int]) -> None:
        self.sink = sink
        self.opened = opened
        self.clock = clock
        self.began = began
        self.on_data = sink.on_data  # the per-packet call goes straight through
        self.on_gap = sink.on_gap
        self.on_conflict = sink.on_conflict
        self.on_fin = sink.on_fin
        self.on_rst = sink.on_rst
        self.on_close = sink.on_close

    def on_open(self, conn: Connection) -> None:
        self.opened.append((conn.id, self.clock[1]))
        self.began[conn.id] = self.clock[1]
        self.sink.on_open(conn)


def worker_name() -> str:
    """Where a unit runs: the Dask worker's address, else host and process id."""
    distributed = sys.modules.get("distributed")  # a Dask worker has imported it; a local worker need not (0.5 s)
    if distributed is not None:
        try:
            return str(distributed.get_worker().address)
        except ValueError:  # imported, but not in a Dask worker
            pass
    return f"{socket.gethostname()} pid {os.getpid()}"


def temp_tag(unit: Unit) -> str:
    """The unit's extractor's temp file tag: host, process and unit. Dask workers on several
    hosts share the --extract directory, and one process holds several units between rounds."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64]
    return f"{host}-{os.getpid()}-u{unit.point}.{unit.partition}"


def read_unit(unit: Unit) -> UnitState:
    """The first round: read the unit's files, classify the exchanges of its connections and
    file them into the unit's own session tracker."""
    options = unit.options
    point, partition, partitions = unit.point, unit.partition, unit.partitions
    clock = [0, 0]  # [phase, segments read]: every unit of a capture point reads the same segments in one order
    exchanges: list[tuple[OrderKey, Classified, list[int | None]]] = []
    opened: list[tuple[int, int]] = []
    began: dict[int, int] = {}  # local connection id → segments read when it opened
    sinks: list[_Opened] = []
    extractor = None
    if options.extract_dir is not None:
        extractor = Extractor(options.extract_dir, several_captures=options.several_captures,
                              capture_names=[""] * unit.first_capture + list(unit.files), temp_tag=temp_tag(unit))
    tracker = SessionTracker(extractor, several_captures=options.several_captures, stall_after_s=options.stall_after)

    if partitions == 1:
        def keep(frame: int, src: bytes, sport: int, dst: bytes, dport: int) -> bool:
            clock[1] += 1
            return True
    else:
        def keep(frame: int, src: bytes, sport: int, dst: bytes, dport: int) -> bool:
            clock[1] += 1
            # partition_of, inline: this runs for every frame
            return ((((int.from_bytes(src, "big") ^ int.from_bytes(dst, "big") ^ sport ^ dport) * _MIX) & _MASK) >> 32) \
                % partitions == partition

    def on_exchange(exchange: Exchange) -> None:
        found = classify(exchange)
        times = exchange_times(exchange)
        tracker.file_classified(found, times)  # (the extractor learns the acks and the re-issued ids)
        key = (point, 1, began[exchange.connection.id]) if clock[0] else (point, 0, clock[1])
        exchanges.append((key, found, times))

    def tap(sink: StreamSink) -> StreamSink:
        sinks.append(_Opened(sink, opened, clock, began))
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
    summary = UnitSummary(unit, opened, [s.key for s in tracker.sessions()], run.captures, file_problems,
                          list(http_log), dict(getattr(http_log, "counts", {})), worker=worker)
    return UnitState(summary, exchanges, tracker, extractor)


def unit_summary(state: UnitState) -> UnitSummary:
    return state.summary


def finish_unit(state: UnitState, plan: Plan) -> UnitFinish:
    """The second round: the run's connection ids on everything, the unit's own sessions walked
    (those of no shipped key), and every other exchange for the client's tracker."""
    connections = plan.connections
    for _, found, _ in state.exchanges:
        _renumber(found, connections)
    tracker, options = state.tracker, state.summary.unit.options
    sessions = tracker.sessions()
    finish = UnitFinish([], [])
    if state.extractor is not None:
        finish.entities = state.extractor.finish(_entity_names(sessions))
        for entity in finish.entities.values():
            _renumber_anomalies(entity.anomalies, connections)
        finish.extract_problems = list(state.extractor.problems)
    own = [s for s in sessions if s.key not in plan.shipped]
    order = {id(found.packet): key for key, found, _ in state.exchanges if found.packet is not None}
    firsts = [order[id(s.packets[0])] for s in own]  # filing order: the packet that began the session
    tracker.walk(own, plan.start_ns, plan.end_ns)
    walked = {id(pkt) for s in own for pkt in s.packets}
    finish.exchanges = [item for item in state.exchanges if item[1].packet is None or id(item[1].packet) not in walked]
    name = state.summary.unit.point_name
    for session in own:
        session.capture_points = [name] if name is not None else []
    finish.sessions = list(zip(firsts, own if options.with_packets else [_shipped(s) for s in own]))
    finish.cpu_s = _cpu_seconds()
    return finish


def run_unit(unit: Unit, plan_of: Callable[[UnitSummary], Plan]) -> UnitResult:
    """Both rounds of one unit, here: the plan from `plan_of` its summary."""
    state = read_unit(unit)
    return UnitResult(state.summary, finish_unit(state, plan_of(state.summary)))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _shipped(session: Session) -> ShippedSession:
    """The session without the packets only the report's packet records read."""
    light = ShippedSession(**{f.name: getattr(session, f.name) for f in fields(Session)})
    packets = session.packets
    close = next((pkt for pkt in packets if pkt.packet_type is PacketType.CLOSE_SESSION), None)
    light.packets = packets[:1] + ([close] if close is not None and close is not packets[0] else [])
    light.shipped_fragments = session.fragment_count
    light.shipped_packets = len(packets)
    return light


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


def plan(summaries: Sequence[UnitSummary]) -> list[Plan]:
    """Each unit's plan: connection ids numbered in the order connections first appeared over
    all units, capture point after capture point, as the reassembler numbers them; the keys of
    sessions filed in more than one unit; the run's capture bounds."""
    firsts = sorted((s.unit.point, frame, s.unit.partition, local) for s in summaries for local, frame in s.opened)
    ids = {(point, partition, local): rank for rank, (point, _, partition, local) in enumerate(firsts)}
    units_of_key: dict[str, set[int]] = {}
    for number, summary in enumerate(summaries):
        for key in summary.keys:
            units_of_key.setdefault(key, set()).add(number)
    shipped = frozenset(key for key, where in units_of_key.items() if len(where) > 1)
    starts = [c.first_ts_ns for s in summaries for c in s.captures if c.first_ts_ns is not None]
    ends = [c.last_ts_ns for s in summaries for c in s.captures if c.last_ts_ns is not None]
    start, end = (min(starts) if starts else 0), (max(ends) if ends else 0)
    return [Plan({local: ids[(s.unit.point, s.unit.partition, local)] for local, _ in s.opened}, shipped, start, end)
            for s in summaries]


def merge(units: Sequence[Unit], results: Iterable[UnitResult], points: Sequence[CapturePoint],
          failures: Sequence[Failure] = (), notes: Sequence[Problem] = ()) -> Analysis:
    """The analysis one process would make of the units' files, from the units' results."""
    by_unit = {(r.unit.point, r.unit.partition): r for r in results}
    options = units[0].options if units else Options()
    summaries = [r.summary for r in by_unit.values()]
    firsts = sorted((s.unit.point, frame, s.unit.partition, local) for s in summaries for local, frame in s.opened)
    ids = {(point, partition, local): rank for rank, (point, _, partition, local) in enumerate(firsts)}
    run = RunResult()
    run.problems.extend(notes)
    entities: dict[tuple[str, int], ExtractedEntity] = {}
    extract_problems: list[Problem] = []
    filed: list[tuple[OrderKey, Classified, list[int | None]]] = []
    walked: list[tuple[OrderKey, Session]] = []
    for index, point in enumerate(points):
        mine = [u for u in units if u.point == index]
        got = [by_unit[(u.point, u.partition)] for u in mine if (u.point, u.partition) in by_unit]
        first = mine[0].first_capture if mine else len(run.captures)
        if not got:  # every unit of the capture point failed: its files are named, nothing read
            run.captures.extend(CaptureStats(file=f, complete=False, capture_point=point.name) for f in point.files)
            continue
        base = got[0].summary
        for position, stats in enumerate(base.captures):
            stats.capture_point = point.name
            stats.exchanges = sum(r.summary.captures[position].exchanges for r in got)
            stats.tcp = {key: sum(r.summary.captures[position].tcp[key] for r in got) for key in stats.tcp}
            stats.connections = stats.tcp.get("connections", 0)
            if len(got) < len(mine):
                stats.complete = False
            run.captures.append(stats)
        run.problems.extend(base.file_problems)
        run.problems.extend(_merged_http_problems([r.summary for r in got],
                                                  {f: first + i for i, f in enumerate(point.files)}, ids))
        for r in got:
            extract_problems.extend(r.finish.extract_problems)
            for name, entity in r.finish.entities.items():
                entities.setdefault(name, entity)
            filed.extend(r.finish.exchanges)
            walked.extend(r.finish.sessions)
    for failure in failures:
        unit = failure.unit
        run.problems.append(Problem("unit-failed", f"{unit.label} failed twice, not analysed: {failure.error}",
                                    file=unit.files[0] if unit.files else None, fatal=True))
    filed.sort(key=lambda item: item[0])
    collected = _Collected(entities) if options.extract_dir is not None else None
    tracker = SessionTracker(collected, several_captures=options.several_captures,  # type: ignore[arg-type]  # duck-typed Extractor
                             stall_after_s=options.stall_after)
    order: dict[int, OrderKey] = {}
    for key, found, times in filed:
        if found.packet is not None:
            order[id(found.packet)] = key
        tracker.file_classified(found, times)
    names = [c.capture_point for c in run.captures]
    named = any(point.name is not None for point in points)

    def joined(stitched: list[Session]) -> list[Session]:
        """The sessions walked here (filed in several units) among those the units walked."""
        for session in stitched:
            if named:
                session.capture_points = list(dict.fromkeys(
                    name for pkt in session.packets for name in (names[pkt.request_capture],) if name is not None))
        begun = [(min(order[id(pkt)] for pkt in s.packets), s) for s in stitched] + walked
        begun.sort(key=lambda item: item[0])
        return [session for _, session in begun]

    starts = [c.first_ts_ns for c in run.captures if c.first_ts_ns is not None]
    ends = [c.last_ts_ns for c in run.captures if c.last_ts_ns is not None]
    bits = tracker.finish(min(starts) if starts else None, max(ends) if ends else None, joined=joined)
    packets = sum(s.shipped_packets if isinstance(s, ShippedSession) else len(s.packets) for _, s in walked)
    for count in ("http_exchanges", "bits_exchanges"):  # the walked sessions' packets were not filed here
        bits.counts[count] += packets
    run.problems.extend(extract_problems)
    return Analysis(run, bits)


def _renumber(found: Classified, ids: dict[int, int]) -> None:
    """Local connection ids → the run's."""
    seen: set[int] = set()
    if found.packet is not None:
        found.packet.connection = ids[found.packet.connection]
        _renumber_anomalies(found.packet.anomalies, ids, seen)
    if found.download is not None:
        found.download.connection = ids[found.download.connection]
    _renumber_anomalies(found.anomalies, ids, seen)


def _renumber_anomalies(anomalies: Iterable[Anomaly], ids: dict[int, int], seen: set[int] | None = None) -> None:
    seen = set() if seen is None else seen
    for item in anomalies:
        if item.connection is not None and id(item) not in seen:
            seen.add(id(item))
            item.connection = ids[item.connection]


def _merged_http_problems(summaries: Sequence[UnitSummary], capture_index: dict[str | None, int],
                          ids: dict[tuple[int, int, int], int]) -> list[Problem]:
    """The units' HTTP problems in the order of their places, bounded as one ProblemLog bounds them."""
    placed = []
    for s in summaries:
        for position, problem in enumerate(s.http_problems):
            connection = problem.connection
            if connection is not None:
                problem = Problem(problem.kind, problem.message, file=problem.file, frame=problem.frame,
                                  offset=problem.offset, fatal=problem.fatal,
                                  connection=ids[(s.unit.point, s.unit.partition, connection)])
            placed.append(((capture_index.get(problem.file, -1), problem.frame or 0, s.unit.partition, position), problem))
    placed.sort(key=lambda item: item[0])
    log = ProblemLog()
    for _, problem in placed:
        log.report(problem)
    return list(log)


#: Where the units run (engines.py): both rounds of every unit, `Planner` between them.
Engine = Callable[[list[Unit], Planner], tuple[list[UnitResult], list[Failure]]]


def analyze_units(points: Sequence[CapturePoint], partitions: int, options: Options, engine: Engine,
                  notes: Sequence[Problem] = ()) -> Analysis:
    """Split the run into units, have `engine` run them, merge."""
    units = units_of(points, partitions, options)
    results, failures = engine(units, plan)
    return merge(units, results, points, failures, notes)


def run_in_process(units: list[Unit], planner: Planner) -> tuple[list[UnitResult], list[Failure]]:
    """The engine of --jobs 1: each unit in turn, here."""
    states = [read_unit(unit) for unit in units]
    plans = planner([state.summary for state in states])
    return [UnitResult(state.summary, finish_unit(state, p)) for state, p in zip(states, plans)], []


def partition_options(files: Sequence[Any], extract_dir: str | None,
                      selection: tuple[str | None, int | None, int | None, int | None] | None,
                      stall_after_s: float | None = None, with_packets: bool = True) -> Options:
    return Options(several_captures=len(files) > 1, extract_dir=os.fspath(extract_dir) if extract_dir else None,
                   selection=selection, stall_after_s=stall_after_s, with_packets=with_packets)
