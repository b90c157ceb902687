"""The report dict of schema version 1 (schema.md), built from an Analysis; JSON and JSON Lines.

Every other format renders this dict, so this module is the only one that reads the analysis
model; `session_filter` and `min_severity` are applied here, once, for all formats.

The sessions' packet records are most of a report (a capture of many small requests holds
hundreds of thousands), so bits-analyze never holds them all: it builds the report without
them (`with_packets=False`) and hands the writers a `PacketSource`, which builds one session's
packet records when the writer reaches that session.
"""

from __future__ import annotations

import json
import math
from json.encoder import encode_basestring_ascii as _quote
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, cast

from bitstrace import __version__
from bitstrace.analyzer.analysis import Analysis
from bitstrace.analyzer.clock import epoch, iso
from bitstrace.analyzer.bits import protocol as p
from bitstrace.analyzer.bits.catalogue import CATALOGUE, Anomaly, Severity
from bitstrace.analyzer.bits.packets import BitsPacket, Download
from bitstrace.analyzer.bits.protocol import session_key
from bitstrace.analyzer.bits.sessions import Session, Verdict
from bitstrace.analyzer.bits.skew import ClockSkew
from bitstrace.analyzer.decode import format_endpoint
from bitstrace.analyzer.pipeline import CaptureStats
from bitstrace.analyzer.problems import Problem
from bitstrace.analyzer.tls import facts_record
from bitstrace.analyzer.report.schema import (
    AnomalyRecord, CaptureRecord, ClockSkewRecord, DownloadRecord, ExtractedRecord, PacketRecord, ProblemRecord, Report,
    ResponseRecord, SessionRecord,
)

SCHEMA = "bitstrace.report"
VERSION = 1
SEVERITY_ORDER = tuple(severity.value for severity in Severity)  # worst first


def severity_at_least(severity: str, minimum: str) -> bool:
    return SEVERITY_ORDER.index(severity) <= SEVERITY_ORDER.index(minimum)


def capture_record(stats: CaptureStats, skew: ClockSkew | None = None) -> CaptureRecord:
    record: CaptureRecord = {
        "file": stats.file, "format": stats.format, "frames": stats.frames, "bytes": stats.bytes_read,
        "first_time": iso(stats.first_ts_ns), "first_ts": epoch(stats.first_ts_ns),
        "last_time": iso(stats.last_ts_ns), "last_ts": epoch(stats.last_ts_ns),
        "complete": stats.complete, "connections": stats.connections, "exchanges": stats.exchanges,
        "decoder": stats.decoder, "tcp": stats.tcp, "clock_skew": skew_record(skew),
    }
    if stats.tls:  # only then: reports of captures without TLS stay as they were (schema.md)
        record["tls"] = [facts_record(facts, format_endpoint) for facts in stats.tls]
    if stats.capture_point is None:
        return record
    return cast(CaptureRecord, {"capture_point": stats.capture_point, **record})  # directories only, first


def skew_record(skew: ClockSkew | None) -> ClockSkewRecord | None:
    """The capture's clock skew note: null when its BITS exchanges show none."""
    if skew is None or not skew.detected:
        return None
    return {
        "answers_before_requests": skew.answers_before_requests, "behind_s": skew.behind_ns / 1e9,
        "answers_after_next_request": skew.answers_after_next_request, "ahead_s": skew.ahead_ns / 1e9,
        "offset_s": skew.offset_ns / 1e9,
    }


def problem_record(problem: Problem) -> ProblemRecord:
    return {"kind": problem.kind, "message": problem.message, "file": problem.file,
            "frame": problem.frame, "offset": problem.offset, "connection": problem.connection,
            "fatal": problem.fatal}


def anomaly_record(item: Anomaly) -> AnomalyRecord:
    kind = CATALOGUE[item.code]
    first = item.timestamps[0] if item.timestamps else None
    return {
        "code": item.code, "severity": item.severity.value, "meaning": kind.meaning, "spec": kind.rule,
        "message": item.message, "session": item.session_id, "connection": item.connection,
        "frames": list(item.frames), "captures": [capture for capture, _ in item.places],
        "time": iso(first), "ts": epoch(first),
    }


def _hresult_name(code: int | None) -> str | None:
    return None if code is None else p.describe_hresult(code).name


def packet_record(pkt: BitsPacket, codes: list[str]) -> PacketRecord:
    rng = pkt.content_range
    response: ResponseRecord | None = None
    if pkt.answered:
        response = {
            "status": pkt.status, "reason": pkt.reason, "frame": pkt.response_frame,
            "capture": pkt.response_capture,
            "time": iso(pkt.acked_ns), "ts": epoch(pkt.acked_ns), "packet_type": pkt.ack_type_raw,
            "session_id": pkt.ack_session_id, "received": pkt.received_offset,
            "error_code": None if pkt.error_code is None else p.format_hresult(pkt.error_code),
            "error_name": _hresult_name(pkt.error_code),
            "error_context": None if pkt.error_context is None else f"0x{pkt.error_context:X}",
            "reply_url": pkt.reply_url, "host_id": pkt.host_id,
        }
    return {
        "type": pkt.packet_type.value if pkt.packet_type else None,
        "type_raw": pkt.type_raw,
        "connection": pkt.connection,
        "request": {
            "method": pkt.method, "target": pkt.target, "frame": pkt.request_frame,
            "capture": pkt.request_capture, "last_frame": pkt.request_last_frame,
            "last_capture": pkt.request_last_capture, "time": iso(pkt.sent_ns), "ts": epoch(pkt.sent_ns),
            "range": None if rng is None else {"first": rng.first, "last": rng.last, "total": rng.total},
            "content_length": pkt.content_length, "body_length": pkt.body_length,
            "body_sha256": pkt.body_sha256,
        },
        "response": response,
        "anomalies": codes,
    }


def _packet_codes(anomalies: list[Anomaly]) -> dict[tuple[int, int], list[str]]:
    """Anomaly codes per packet, matched by the packet's (capture, frame) places."""
    by_place: dict[tuple[int, int], list[str]] = {}
    for item in anomalies:
        for place in item.places:
            codes = by_place.setdefault(place, [])
            if item.code not in codes:
                codes.append(item.code)
    return by_place


def _kept(anomalies: list[Anomaly], min_severity: str) -> list[Anomaly]:
    return [a for a in anomalies if severity_at_least(a.severity.value, min_severity)]


def packet_records(session: Session, min_severity: str = "info") -> list[PacketRecord]:
    """The session's packet records; each lists the codes of the anomalies raised at it, only
    codes that some anomaly of the session at `min_severity` or worse has (as `filter_report`)."""
    shown = {a.code for a in _kept(session.anomalies, min_severity)}
    by_place = _packet_codes(session.anomalies) if shown else {}
    frames = {frame for _, frame in by_place}  # a cheap first look: most packets have no anomaly
    records = []
    for pkt in session.packets:
        codes: list[str] = []
        if pkt.request_frame in frames or pkt.response_frame in frames:
            for place in pkt.places:
                codes += [c for c in by_place.get(place, ()) if c not in codes and c in shown]
        records.append(packet_record(pkt, codes))
    return records


def session_record(session: Session, with_packets: bool = True) -> SessionRecord:
    duration = (session.last_ns - session.first_ns) / 1e9 if session.last_ns and session.first_ns else 0.0
    entity = session.entity
    extracted: ExtractedRecord | None = None
    if entity is not None:
        extracted = {
            "path": entity.path, "complete": entity.complete, "sha256": entity.sha256,
            "coverage": [{"first": r.first, "last": r.last, "frames": list(r.frames),
                          "captures": list(r.captures), "acknowledged": r.acknowledged} for r in entity.coverage],
            "holes": [{"first": h.first, "last": h.last} for h in entity.holes],
        }
    record: SessionRecord = {
        "id": session.id, "client": session.client, "server": session.server, "host": session.host,
        "url": session.url, "content_name": session.content_name, "protocol": session.protocol,
        "user_agent": session.user_agent, "state": session.state.value, "verdict": Verdict(session.verdict).value,
        "verdict_reason": session.verdict_reason, "before_capture": session.before_capture,
        "reply_url": session.reply_url, "total": session.total, "acknowledged": session.acknowledged,
        "bytes_sent": session.bytes_sent, "fragments": session.fragment_count,
        "first_time": iso(session.first_ns or None), "first_ts": epoch(session.first_ns or None),
        "last_time": iso(session.last_ns or None), "last_ts": epoch(session.last_ns or None),
        "duration_s": duration,
        "throughput_bps": session.acknowledged / duration if duration > 0 else None,
        "connections": list(session.connections),
        "packets": packet_records(session) if with_packets else [],
        "anomalies": [anomaly_record(a) for a in session.anomalies], "extracted": extracted,
    }
    if not session.capture_points:
        return record
    return cast(SessionRecord, {"capture_points": list(session.capture_points), **record})  # directories only, first


def download_record(item: Download) -> DownloadRecord:
    return {"client": item.client, "server": item.server, "method": item.method, "url": item.target,
            "host": item.host, "status": item.status, "bytes": item.bytes, "range": item.range,
            "user_agent": item.user_agent, "frame": item.frame,
            "capture": item.capture, "time": iso(item.sent_ns), "ts": epoch(item.sent_ns), "session": item.reply_of}


def _wanted(session_filter: str | None) -> str | None:
    return session_key(session_filter) if session_filter else None


def _selected(analysis: Analysis, session_filter: str | None) -> list[Session]:
    wanted = _wanted(session_filter)
    return [s for s in analysis.bits.sessions if wanted is None or s.key == wanted]


def build_report(analysis: Analysis, *, session_filter: str | None = None,
                 with_packets: bool = True) -> Report:
    """The schema-v1 dict. `session_filter` keeps one session (id compared like the protocol).
    Without `with_packets` the sessions' packet lists stay empty: the text report does not show
    them, and the other writers take them from a `PacketSource`, one session at a time."""
    wanted = _wanted(session_filter)
    sessions = _selected(analysis, session_filter)
    session_records = [session_record(s, with_packets) for s in sessions]
    loose = [] if wanted else analysis.bits.anomalies
    counts = dict.fromkeys(SEVERITY_ORDER, 0)
    for item in [a for s in sessions for a in s.anomalies] + loose:
        counts[item.severity.value] += 1
    verdicts = [Verdict(s.verdict).value for s in sessions]
    tally = analysis.bits.counts
    return {
        "schema": SCHEMA, "version": VERSION,
        "tool": {"name": "bits-analyze", "version": __version__},
        "filter": {"session": session_filter, "min_severity": "info"},
        "captures": [capture_record(c, analysis.bits.clock_skew.get(index))
                     for index, c in enumerate(analysis.run.captures)],
        "problems": [problem_record(problem) for problem in analysis.problems],
        "summary": {
            "sessions": len(sessions), "delivered": verdicts.count("delivered"),
            "not_delivered": verdicts.count("not-delivered"), "unknown": verdicts.count("unknown"),
            "anomalies": {"error": counts["error"], "warning": counts["warning"], "info": counts["info"]},
            "http_exchanges": tally["http_exchanges"], "bits_exchanges": tally["bits_exchanges"],
            "other_http": tally["other_http"], "downloads": tally["downloads"],
        },
        "sessions": session_records,
        "anomalies": [anomaly_record(a) for a in loose],
        "downloads": [] if wanted else [download_record(d) for d in analysis.bits.downloads],
    }


def filter_report(report: Report, min_severity: str) -> Report:
    """The report with anomalies below `min_severity` left out of the lists; the summary still
    counts every anomaly, so it reads the same in every format."""
    def keep(items: list[AnomalyRecord]) -> list[AnomalyRecord]:
        return [a for a in items if severity_at_least(a["severity"], min_severity)]

    sessions: list[SessionRecord] = []
    for session in report["sessions"]:
        anomalies = keep(session["anomalies"])
        codes = {a["code"] for a in anomalies}
        packets: list[PacketRecord] = [{**pkt, "anomalies": [c for c in pkt["anomalies"] if c in codes]}
                                       for pkt in session["packets"]]
        sessions.append({**session, "anomalies": anomalies, "packets": packets})
    return {**report, "filter": {**report["filter"], "min_severity": min_severity},
            "sessions": sessions, "anomalies": keep(report["anomalies"])}


#: The packet records of the session at an index of the report's `sessions`.
PacketSource = Callable[[int], list[PacketRecord]]


def packet_source(analysis: Analysis, report: Report) -> PacketSource:
    """The packet records of `report`'s sessions (built from `analysis` without packets, filtered
    or not), built when a writer asks for them, as `filter_report` would have left them."""
    sessions = _selected(analysis, report["filter"]["session"])
    min_severity = report["filter"]["min_severity"]
    return lambda index: packet_records(sessions[index], min_severity)


def sessions_with_packets(report: Report, packets: PacketSource | None) -> Iterator[SessionRecord]:
    """The report's session records, each with its packets from `packets` (when given) while
    the caller holds it."""
    for index, session in enumerate(report["sessions"]):
        yield session if packets is None else {**session, "packets": packets(index)}


def write_json(report: Report, out: IO[str], packets: PacketSource | None = None) -> None:
    """`json.dump(report, out, indent=2)` and a newline, byte for byte, written a session at a
    time (with its packets from `packets` when given)."""
    for index, (key, value) in enumerate(report.items()):
        out.write(("{\n  " if index == 0 else ",\n  ") + _quote(key) + ": ")
        if key == "sessions" and value:
            for number, session in enumerate(sessions_with_packets(report, packets)):
                out.write(("[\n    " if number == 0 else ",\n    ") + _indented(session, "\n    "))
            out.write("\n  ]")
        else:
            out.write(_indented(value, "\n  "))
    out.write("\n}\n" if report else "{}\n")


def _indented(value: Any, indent: str) -> str:  # Any: a JSON value of any shape, told apart by type()
    """`json.dumps(value, indent=2)` for a value nested at `indent` (a newline and the spaces of
    its depth), byte for byte. The json module indents with its pure-Python encoder; this does
    the report's types itself, about twice as fast, and leaves anything else to json."""
    kind = type(value)
    if kind is str:
        return _quote(value)
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    if kind is dict:
        if not value:
            return "{}"
        inner = indent + "  "
        try:
            items = [_quote(key) + ": " + _indented(item, inner) for key, item in value.items()]
        except TypeError:  # a key that is not a string: json's own rules
            return json.dumps(value, indent=2).replace("\n", indent)
        return "{" + inner + ("," + inner).join(items) + indent + "}"
    if kind is list:
        if not value:
            return "[]"
        inner = indent + "  "
        return "[" + inner + ("," + inner).join([_indented(item, inner) for item in value]) + indent + "]"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return json.dumps(value, indent=2).replace("\n", indent)  # NaN, infinities, subclasses, tuples...


def jsonl_records(report: Report, packets: PacketSource | None = None) -> Iterator[dict[str, object]]:
    """The report as one record a line, in the order schema.md gives (each session with its
    packets from `packets` when given)."""
    yield from ({"record": "capture", **c} for c in report["captures"])
    yield from ({"record": "problem", **p_} for p_ in report["problems"])
    yield from ({"record": "session", **s} for s in sessions_with_packets(report, packets))
    yield from ({"record": "anomaly", **a} for a in report["anomalies"])
    yield from ({"record": "download", **d} for d in report["downloads"])
    yield {"record": "summary", "schema": report["schema"], "version": report["version"], **report["summary"]}


def write_jsonl(records: Iterable[Mapping[str, object]], out: IO[str]) -> None:
    for record in records:
        out.write(json.dumps(record, separators=(",", ":")) + "\n")
