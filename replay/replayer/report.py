"""The report of a replay: its results (and a dry run's plan) as text and as JSON.

`--json` writes one object, schema "bitstrace.replay" version 1 (fields only ever added):
target, mode, speed, notes (what cannot be replayed), problems (capture reading), summary
{sessions, packets_sent, bytes_sent, differences, faults, median_pacing_error_s}, and
sessions [{captured_id, generation, live_ids, fault, notes, started_s, ended_s, differences,
packets}] (generation: how many earlier sessions had the id, for servers that issue an id
again), each packet {label, captured (type, file, connection, frame, ts, range, body_length,
response), sent, bytes_sent, live, differences [{field, captured, live}], fault, note, due_s,
sent_s, pacing_error_s}; a response is {status, packet_type, error_code ("0x8020001F"),
error_name, error_context, received, reply_url (present or not), session_id, host_id}.
Connections are numbered across the captures, which are read as one (rotated files). Times in
seconds after the replay started. `--dry-run --json` writes {dry_run: true, target, notes,
sessions [{captured_id, generation, requests [{label, at_s, file, connection, new_connection,
method, url, headers, body_length, body_sha256, note}]}]}.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, TextIO

from rich.console import Console
from rich.table import Table

from bitstrace.analyzer.bits.protocol import format_hresult
from bitstrace.replay.replayer.plan import Plan, PlannedRequest
from bitstrace.replay.replayer.results import Outcome, ReplayResult, SessionResult

SCHEMA = "bitstrace.replay"
SCHEMA_VERSION = 1


class Streamed(list[Any]):
    """A JSON array whose items are made while it is written and let go after: json.dump
    (whose indenting encoder is pure Python and iterates lists) writes each item as the
    iterator gives it, so a report of 100,000 requests never exists whole in memory, and the
    text is byte for byte what the same items in a plain list give."""

    def __init__(self, items: Iterable[Any], count: int) -> None:
        super().__init__()
        self._items = items
        self._count = count

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0


def write_json(document: dict[str, Any], out: TextIO) -> None:
    # json.dump writes piece by piece (and Streamed arrays item by item): a replay of 100k
    # requests would otherwise first build its whole JSON text, or its whole document.
    json.dump(document, out, indent=2)
    out.write("\n")


def dry_run_json(described: Iterable[dict[str, Any]], sessions: int, target: str,
                 notes: list[str]) -> dict[str, Any]:
    """The --dry-run --json document of `described` (schedule.describe), `sessions` long."""
    return {"schema": SCHEMA, "version": SCHEMA_VERSION, "dry_run": True,
            "target": target, "notes": notes, "sessions": Streamed(described, sessions)}


# --- JSON --------------------------------------------------------------------------------------

def _request_json(request: PlannedRequest | None) -> dict[str, Any] | None:
    if request is None:
        return None
    return {
        "type": request.packet_type.value if request.packet_type else None,
        "type_raw": request.packet_type_raw,
        "file": request.file, "connection": request.connection, "frame": request.frame,
        "ts": request.ts_ns / 1e9,
        "range": ({"first": request.range.first, "last": request.range.last,
                   "total": request.range.total} if request.range else None),
        "body_length": request.body.length if request.body else 0,
        "response": request.response.to_json() if request.response else None,
    }


def _outcome_json(outcome: Outcome) -> dict[str, Any]:
    return {
        "label": outcome.label,
        "captured": _request_json(outcome.captured),
        "sent": outcome.sent,
        "bytes_sent": outcome.bytes_sent,
        "live": outcome.live.to_json() if outcome.live else None,
        "differences": [d.to_json() for d in outcome.differences],
        "fault": outcome.fault,
        "note": outcome.note,
        "due_s": outcome.due_s, "sent_s": outcome.sent_s,
        "pacing_error_s": outcome.pacing_error_s,
    }


def result_json(result: ReplayResult, plan: Plan, notes: list[str]) -> dict[str, Any]:
    median = result.median_pacing_error_s()
    return {
        "schema": SCHEMA, "version": SCHEMA_VERSION,
        "target": result.target, "mode": result.mode, "speed": result.speed,
        "interrupted": result.interrupted,
        "notes": notes,
        "problems": [str(p) for p in plan.problems],
        "summary": {
            "sessions": len(result.sessions),
            "packets_sent": sum(o.sent for s in result.sessions for o in s.outcomes),
            "bytes_sent": sum(o.bytes_sent for s in result.sessions for o in s.outcomes),
            "differences": result.differences,
            "faults": result.faults,
            "median_pacing_error_s": median,
        },
        "sessions": Streamed(({
            "captured_id": s.captured_id, "generation": s.generation, "live_ids": s.live_ids,
            "fault": s.fault, "notes": s.notes,
            "started_s": s.started_s, "ended_s": s.ended_s, "differences": s.differences,
            "packets": [_outcome_json(o) for o in s.outcomes],
        } for s in result.sessions), len(result.sessions)),
    }


def _show(field: str, value: object) -> str:
    if value is None:
        return "—"
    if field == "error_code" and isinstance(value, int):
        return format_hresult(value)
    if field == "error_context" and isinstance(value, int):
        return f"0x{value:X}"
    return str(value)


def render_text(result: ReplayResult, notes: list[str], console: Console) -> None:
    for note in notes:
        console.print(f"note: {note}", highlight=False)
    table = Table(title="Differences: captured vs live", title_justify="left")
    for column in ("session", "#", "packet", "field", "captured", "live"):
        table.add_column(column, overflow="fold")
    for session in result.sessions:
        for number, outcome in enumerate(session.outcomes, 1):
            for diff in outcome.differences:
                table.add_row(session.key, str(number), outcome.label, diff.field,
                              _show(diff.field, diff.captured), _show(diff.field, diff.live))
    if table.row_count:
        console.print(table)
    for session in result.sessions:
        _render_session(session, console)
    sent = sum(o.sent for s in result.sessions for o in s.outcomes)
    median = result.median_pacing_error_s()
    pacing = f"; median pacing error {median * 1000:.1f} ms" if median is not None else ""
    console.print(f"{len(result.sessions)} session(s), {sent} request(s) sent to "
                  f"{result.target} ({result.mode}), {result.differences} difference(s), "
                  f"{result.faults} fault(s){pacing}", highlight=False)


def _render_session(session: SessionResult, console: Console) -> None:
    """A line for a session with something to say (thousands of quiet ones say nothing)."""
    if not (session.differences or session.fault or session.notes
            or any(o.note or o.fault for o in session.outcomes)):
        return
    live = ", ".join(session.live_ids) or "none"
    sent = sum(o.sent for o in session.outcomes)
    console.print(f"session {session.key}: {sent} request(s) sent, live id {live}, "
                  f"{session.differences} difference(s)", highlight=False)
    for outcome in session.outcomes:
        if outcome.fault:
            console.print(f"  fault at {outcome.label}: {outcome.fault}", highlight=False)
        elif outcome.note:
            console.print(f"  {outcome.label}: {outcome.note}", highlight=False)
    for note in session.notes:
        console.print(f"  note: {note}", highlight=False)
    if session.fault and not any(o.fault for o in session.outcomes):
        console.print(f"  stopped: {session.fault}", highlight=False)


def render_dry_run(described: Iterable[dict[str, Any]], console: Console) -> None:
    for session in described:
        console.print(f"session {session['captured_id']} ({len(session['requests'])} request(s))",
                      highlight=False)
        for request in session["requests"]:
            when = f"+{request['at_s']:.3f}s" if request["at_s"] is not None else "at once"
            new = " (new connection)" if request["new_connection"] else ""
            console.print(f"  {when} connection {request['connection']}{new}: "
                          f"{request['method']} {request['url']}", highlight=False)
            for name, value in request["headers"]:
                console.print(f"      {name}: {value}", highlight=False, markup=False)
            if request["note"]:
                console.print(f"      ({request['note']})", highlight=False)
            elif request["body_length"]:
                console.print(f"      body: {request['body_length']} bytes, sha256 "
                              f"{request['body_sha256']}", highlight=False)
