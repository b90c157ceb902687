"""The report as one log per record type, as Zeek writes its logs: `captures`, `sessions`,
`packets`, `anomalies`, `problems` and `downloads`, each a flat table with one row per record,
joinable on the session id (`session`) and the capture file (`capture_file`).

Two formats: Zeek's TSV (`#fields` and `#types` headers, `-` for unset, `(empty)` for an empty
string or list, `T`/`F`, lists joined by `,`), read by zeek-cut, zat and anything that reads
Zeek logs; and CSV with a header row, where unset is an empty field, so that pandas'
`read_csv(..., dtype_backend="numpy_nullable")` keeps integer columns integers.

The columns are declared here, once, with their Zeek types: a table has the same columns
whatever a run found (pandas gets the same frame shape from every run). tests/report/
test_logs.py checks that every scalar field of the report has a column.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any, NamedTuple

from bitstrace.analyzer.report.json import PacketSource, sessions_with_packets
from bitstrace.analyzer.report.schema import Report

FORMATS = ("zeek", "csv")


class Column(NamedTuple):
    name: str
    zeek_type: str  # count, int, double, time, interval, bool, string, vector[...]
    path: tuple[str, ...]  # where the value is in the report record


def _columns(*spec: str) -> tuple[Column, ...]:
    """`name:type` or `name:type:dotted.path` (the path defaults to the name, dots nesting)."""
    columns = []
    for item in spec:
        name, zeek_type, *path = item.split(":")
        columns.append(Column(name, zeek_type, tuple((path[0] if path else name).split("."))))
    return tuple(columns)


CAPTURE_COLUMNS = _columns(
    "capture_file:string:file", "format:string", "frames:count", "bytes:count", "first_ts:time",
    "last_ts:time", "complete:bool", "connections:count", "exchanges:count",
    "malformed_frames:count:decoder.malformed", "tcp_gaps:count:tcp.gaps", "tcp_gap_bytes:count:tcp.gap_bytes",
    "tcp_conflicts:count:tcp.conflicts", "tcp_conflict_bytes:count:tcp.conflict_bytes")
SESSION_COLUMNS = _columns(
    "first_ts:time", "session:string:id", "client:string", "server:string", "host:string", "url:string",
    "content_name:string", "protocol:string", "user_agent:string", "state:string", "verdict:string",
    "verdict_reason:string", "before_capture:bool", "reply_url:string", "total:count",
    "acknowledged:count", "bytes_sent:count", "fragments:count", "last_ts:time",
    "duration_s:interval", "throughput_bps:double", "connections:vector[count]",
    "anomalies:count:anomaly_count", "extracted.path:string", "extracted.complete:bool",
    "extracted.sha256:string")
PACKET_COLUMNS = _columns(
    "ts:time:request.ts", "session:string", "capture_file:string", "type:string", "type_raw:string",
    "connection:count", "method:string:request.method", "target:string:request.target",
    "frame:count:request.frame", "last_frame:count:request.last_frame",
    "range_first:count:request.range.first", "range_last:count:request.range.last",
    "range_total:count:request.range.total", "content_length:count:request.content_length",
    "body_length:count:request.body_length", "body_sha256:string:request.body_sha256",
    "status:count:response.status", "reason:string:response.reason",
    "response_frame:count:response.frame", "response_ts:time:response.ts",
    "packet_type:string:response.packet_type", "session_id:string:response.session_id",
    "received:count:response.received", "error_code:count:response.error_code",
    "error_name:string:response.error_name", "error_context:count:response.error_context",
    "ack_reply_url:string:response.reply_url", "host_id:string:response.host_id",
    "anomalies:vector[string]")
ANOMALY_COLUMNS = _columns(
    "ts:time", "session:string", "code:string", "severity:string", "meaning:string", "spec:string",
    "message:string", "connection:count", "frames:vector[count]", "capture_files:vector[string]")
PROBLEM_COLUMNS = _columns(
    "capture_file:string:file", "kind:string", "message:string", "frame:count", "offset:count",
    "connection:count", "fatal:bool")
DOWNLOAD_COLUMNS = _columns(
    "ts:time", "session:string", "capture_file:string", "client:string", "server:string",
    "method:string", "url:string", "host:string", "status:count", "bytes:count", "range:string",
    "user_agent:string", "frame:count")

LOGS: dict[str, tuple[Column, ...]] = {
    "captures": CAPTURE_COLUMNS, "sessions": SESSION_COLUMNS, "packets": PACKET_COLUMNS,
    "anomalies": ANOMALY_COLUMNS, "problems": PROBLEM_COLUMNS, "downloads": DOWNLOAD_COLUMNS,
}


def _value(record: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = record
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def log_rows(report: Report, packets: PacketSource | None = None) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(log name, record) for every row of every log, one session's packets at a time."""
    files = [capture["file"] for capture in report["captures"]]

    def file_of(index: int | None) -> str | None:
        return files[index] if index is not None and 0 <= index < len(files) else None

    for capture in report["captures"]:
        yield "captures", capture
    for problem in report["problems"]:
        yield "problems", problem
    for session in sessions_with_packets(report, packets):
        yield "sessions", {**session, "anomaly_count": len(session["anomalies"])}
        for packet in session["packets"]:
            request = packet["request"] or {}
            yield "packets", {**packet, "session": session["id"], "capture_file": file_of(request.get("capture"))}
        for anomaly in session["anomalies"]:
            yield "anomalies", _anomaly_row(anomaly, file_of)
    for anomaly in report["anomalies"]:
        yield "anomalies", _anomaly_row(anomaly, file_of)
    for download in report["downloads"]:
        yield "downloads", {**download, "capture_file": file_of(download.get("capture"))}


def _anomaly_row(anomaly: Mapping[str, Any], file_of: Any) -> Mapping[str, Any]:
    return {**anomaly, "capture_files": [file_of(index) for index in anomaly.get("captures") or ()]}


class _ZeekWriter:
    def __init__(self, stream: IO[str], name: str, columns: Sequence[Column]) -> None:
        self.stream = stream
        self.columns = columns
        stream.write("#separator \\x09\n#set_separator\t,\n#empty_field\t(empty)\n#unset_field\t-\n")
        stream.write(f"#path\t{name}\n")
        stream.write("#fields\t" + "\t".join(c.name for c in columns) + "\n")
        stream.write("#types\t" + "\t".join(c.zeek_type for c in columns) + "\n")

    def row(self, record: Mapping[str, Any]) -> None:
        self.stream.write("\t".join(_zeek(_value(record, c.path), c.zeek_type) for c in self.columns) + "\n")


class _CsvWriter:
    def __init__(self, stream: IO[str], name: str, columns: Sequence[Column]) -> None:
        self.columns = columns
        self.writer = csv.writer(stream, lineterminator="\n")
        self.writer.writerow([c.name for c in columns])

    def row(self, record: Mapping[str, Any]) -> None:
        self.writer.writerow([_csv(_value(record, c.path), c.zeek_type) for c in self.columns])


def _escape(text: str, in_container: bool) -> str:
    """Zeek's escaping: tab, backslash and non-printable characters as \\xNN, and the set
    separator inside a list; a value that reads as unset or empty is escaped too."""
    if text in ("", "-", "(empty)"):
        return {"": "(empty)", "-": "\\x2d", "(empty)": "\\x28empty)"}[text]
    special = "\\," if in_container else "\\"
    if text.isprintable() and not any(ch in special for ch in text):
        return text
    return "".join(ch if ch.isprintable() and ch not in special else "".join(f"\\x{b:02x}" for b in ch.encode())
                   for ch in text)


def _scalar(value: Any, zeek_type: str, in_container: bool = False) -> str:
    if isinstance(value, bool):
        return "T" if value else "F"
    if zeek_type in ("time", "interval") and isinstance(value, (int, float)):
        return f"{value:.6f}"
    if isinstance(value, float):
        return repr(value)
    return _escape(str(value), in_container)


def _zeek(value: Any, zeek_type: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        inner = zeek_type[len("vector["):-1] if zeek_type.startswith("vector[") else "string"
        return ",".join("-" if v is None else _scalar(v, inner, True) for v in value) if value else "(empty)"
    return _scalar(value, zeek_type)


def _csv(value: Any, zeek_type: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (list, tuple)):
        return ",".join("" if v is None else str(v) for v in value)
    if zeek_type in ("time", "interval") and isinstance(value, (int, float)):
        return f"{value:.6f}"
    return str(value)


def write_logs(rows: Iterable[tuple[str, Mapping[str, Any]]], directory: str | os.PathLike[str],
               fmt: str = "zeek") -> list[str]:
    """One file per log in `directory` (`sessions.log` or `sessions.csv`, ...), every log written
    even when empty, so a reader finds the same files every time. Returns the paths written."""
    suffix = ".log" if fmt == "zeek" else ".csv"
    make = _ZeekWriter if fmt == "zeek" else _CsvWriter
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, name + suffix) for name in LOGS}
    streams = {}
    try:
        for name, columns in LOGS.items():
            streams[name] = open(paths[name], "w", encoding="utf-8", newline="")
        writers = {name: make(streams[name], name, LOGS[name]) for name in LOGS}
        for name, record in rows:
            writers[name].row(record)
    finally:
        for stream in streams.values():
            stream.close()
    return list(paths.values())
