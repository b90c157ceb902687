"""bits-replay: replay captured BITS upload sessions against a live server and compare answers.

Exit status (the same scheme as bits-analyze and bits-server): 0 = done; 1 = differences found
and --fail-on-diff given; 2 = usage error (bad option, unusable --target, a selected session
not in the captures); 3 = a capture could not be read (to its end), or a fault stopped some
session early (the results so far are still reported); 130 = interrupted (Ctrl-C), the results
so far reported. Output cut short by the reader (`bits-replay --dry-run x.pcap | head`) is not
an error: exit 0.

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

import argparse
import contextlib
import json
import sys
from typing import Iterator, Sequence, TextIO

from rich.console import Console
from rich.table import Table

from bitstrace import __version__
from bitstrace.analyzer.bits.protocol import format_hresult
from bitstrace.analyzer.sources import expand
from bitstrace.cli.common import Exit, OutputConsole, credentials, discard_further_output, finite, seconds, whole
from bitstrace.replay.plan import Plan, PlannedRequest, PlannedSession, build_plan
from bitstrace.replay.send import (
    MODES,
    Options,
    Outcome,
    ReplayResult,
    SessionResult,
    Target,
    TargetError,
    auth_notes,
    dry_run,
    replay,
)

#: Longest --timeout: socket timeouts beyond the platform's time_t overflow.
MAX_TIMEOUT = 86400.0
SCHEMA = "bitstrace.replay"
SCHEMA_VERSION = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bits-replay",
        description="Replay the BITS upload sessions of pcap/pcapng captures against a live "
                    "server, and compare its answers with the captured ones.",
        epilog="Exit status: 0 ok, 1 differences (with --fail-on-diff), 2 usage error, "
               "3 a capture could not be read or a fault stopped a session, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("captures", nargs="+", metavar="CAPTURE",
                        help="pcap or pcapng file (gzip or not), or a directory of them (read as one run in "
                             "time order); '-' reads standard input")
    parser.add_argument("--target", required=True, metavar="URL",
                        help="where to send, e.g. http://127.0.0.1:8080/uploads; nothing is "
                             "ever sent anywhere else")
    parser.add_argument("--session", action="append", metavar="ID",
                        help="replay only this session (repeatable; default: all)")
    parser.add_argument("--mode", choices=MODES, default="faithful",
                        help="faithful: send exactly the captured requests (default); adaptive: "
                             "behave like a real client (follow 416, recreate, shrink on 413)")
    parser.add_argument("--speed", type=finite(0), default=1.0, metavar="X",
                        help="1 = the capture's own pacing, 2 = twice as fast, 0 = no waiting "
                             "(default 1)")
    parser.add_argument("--concurrency", type=whole(1), metavar="N",
                        help="at most N sessions in flight (default: as overlapped in the capture)")
    parser.add_argument("--timeout", type=seconds(MAX_TIMEOUT), default=30.0, metavar="SECONDS",
                        help="how long to wait for the server at any step (default 30, at most "
                             f"{MAX_TIMEOUT:g})")
    parser.add_argument("--auth", type=credentials, metavar="USER:PASS",
                        help="Basic credentials replacing the captured ones")
    parser.add_argument("--follow-host-id", action="store_true",
                        help="use a BITS-Host-Id as Host header, only if it resolves to the "
                             "target's own address")
    parser.add_argument("--strip-prefix", default="", metavar="PATH",
                        help="captured path prefix to drop before adding the target's path")
    parser.add_argument("--insecure", action="store_true",
                        help="https: do not verify the server's certificate")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be sent, send nothing")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--fail-on-diff", action="store_true",
                        help="exit with status 1 when a live answer differs from the captured one")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress display")
    return parser


# --- JSON --------------------------------------------------------------------------------------

def _request_json(request: PlannedRequest | None) -> dict | None:
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


def _outcome_json(outcome: Outcome) -> dict:
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


def result_json(result: ReplayResult, plan: Plan, notes: list[str]) -> dict:
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
        "sessions": [{
            "captured_id": s.captured_id, "generation": s.generation, "live_ids": s.live_ids,
            "fault": s.fault, "notes": s.notes,
            "started_s": s.started_s, "ended_s": s.ended_s, "differences": s.differences,
            "packets": [_outcome_json(o) for o in s.outcomes],
        } for s in result.sessions],
    }


# --- text --------------------------------------------------------------------------------------

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


def render_dry_run(described: list[dict], console: Console) -> None:
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


# --- progress ----------------------------------------------------------------------------------

class _ProgressObserver:
    """Sessions done and bytes sent, on a rich progress display."""

    def __init__(self, progress, plan: Plan) -> None:
        self.progress = progress
        self.in_flight = 0
        self.sessions = progress.add_task("sessions done", total=len(plan.sessions))
        self.bytes = progress.add_task("body bytes sent",
                                       total=sum(s.body_bytes for s in plan.sessions))

    def on_session_start(self, session: PlannedSession) -> None:
        self.in_flight += 1
        self._describe()

    def on_bytes(self, session: PlannedSession, count: int) -> None:
        self.progress.advance(self.bytes, count)

    def on_session_end(self, session: PlannedSession, result: SessionResult) -> None:
        self.in_flight -= 1
        self.progress.advance(self.sessions)
        self._describe()

    def _describe(self) -> None:
        self.progress.update(self.sessions, description=f"sessions done ({self.in_flight} in flight)")


@contextlib.contextmanager
def progress_display(enabled: bool, plan: Plan, err: TextIO) -> Iterator[_ProgressObserver | None]:
    if not enabled or not err.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=Console(file=err), transient=True) as progress:
        yield _ProgressObserver(progress, plan)


# --- main --------------------------------------------------------------------------------------

def _options(args: argparse.Namespace) -> Options:
    return Options(target=Target.parse(args.target), mode=args.mode, speed=args.speed,
                   concurrency=args.concurrency, timeout=args.timeout, auth=args.auth,
                   follow_host_id=args.follow_host_id, strip_prefix=args.strip_prefix,
                   verify_tls=not args.insecure)


def _write_json(document: dict, out: TextIO) -> None:
    # json.dump writes piece by piece: a replay of 100k requests would otherwise first build
    # its whole JSON text (1 GB peak where the document itself takes 0.3 GB).
    json.dump(document, out, indent=2)
    out.write("\n")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        return _run(args, out, err)
    except BrokenPipeError:
        discard_further_output(out)
        return Exit.OK
    except KeyboardInterrupt:  # while printing; the replay itself reports its results so far
        print("bits-replay: interrupted", file=err)
        return Exit.INTERRUPTED


def _capture_files(named: list[str], err: TextIO) -> list[str] | None:
    """The files to read, as one run: a directory named is its capture files in the order of
    their first packets, as bits-analyze reads a capture point (analyzer/sources.py); what is
    no capture is skipped with a note. None (a usage error, said) for several capture points."""
    inputs = expand(named)
    for note in inputs.notes:
        print(f"bits-replay: {note}", file=err)
    if len(inputs.points) > 1:
        where = ", ".join(point.name or "the files named" for point in inputs.points)
        print(f"bits-replay: one capture point at a time: {where} are {len(inputs.points)}", file=err)
        return None
    return inputs.files


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        options = _options(args)
    except TargetError as exc:
        print(f"bits-replay: {exc}", file=err)
        return Exit.USAGE
    captures = _capture_files(args.captures, err)
    if captures is None:
        return Exit.USAGE
    sources = [sys.stdin.buffer if c == "-" else c for c in captures]
    try:
        plan = build_plan(sources, args.session)
    except KeyboardInterrupt:
        print("bits-replay: interrupted while reading the captures; nothing was sent", file=err)
        return Exit.INTERRUPTED
    with plan:
        for problem in plan.problems:
            print(f"bits-replay: {problem}", file=err)
        if not plan.sessions:
            print("bits-replay: no BITS session to replay", file=err)
            if not plan.complete:
                return Exit.INCOMPLETE
            return Exit.USAGE if args.session else Exit.OK
        notes = auth_notes(plan, options)
        console = OutputConsole(file=out, width=160 if not out.isatty() else None,
                                 soft_wrap=False)
        if args.dry_run:
            described = dry_run(plan, options)
            if args.json:
                _write_json({"schema": SCHEMA, "version": SCHEMA_VERSION, "dry_run": True,
                             "target": str(options.target), "notes": notes, "sessions": described}, out)
            else:
                for note in notes:
                    console.print(f"note: {note}", highlight=False)
                render_dry_run(described, console)
            return Exit.OK if plan.complete else Exit.INCOMPLETE
        with progress_display(not args.no_progress and not args.json, plan, err) as observer:
            result = replay(plan, options, observer)
        if result.interrupted:
            print("bits-replay: interrupted; the results so far follow", file=err)
        if args.json:
            _write_json(result_json(result, plan, notes), out)
        else:
            render_text(result, notes, console)
    if result.interrupted:
        return Exit.INTERRUPTED
    if result.faults or not plan.complete:
        return Exit.INCOMPLETE
    if args.fail_on_diff and result.differences:
        return Exit.FINDINGS
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())
