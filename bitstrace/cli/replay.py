"""bits-replay: replay captured BITS upload sessions against a live server and compare answers.

Exit status (the same scheme as bits-analyze and bits-server): 0 = done; 1 = differences found
and --fail-on-diff given; 2 = usage error (bad option, unusable --target, a selected session
not in the captures); 3 = a capture could not be read (to its end), or a fault stopped some
session early (the results so far are still reported); 130 = interrupted (Ctrl-C), the results
so far reported. Output cut short by the reader (`bits-replay --dry-run x.pcap | head`) is not
an error: exit 0.

`--json` writes one object, schema "bitstrace.replay" version 1: see
bitstrace.replay.replayer.report, which renders the results (text and JSON); this module only
parses the command line and runs the replay.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence, TextIO

from bitstrace import __version__
from bitstrace.analyzer.sources import expand
from bitstrace.cli.common import Exit, OutputConsole, credentials, discard_further_output, finite, seconds, whole
from bitstrace.replay.replayer.options import MODES, Options, Target, TargetError
from bitstrace.replay.replayer.plan import build_plan
from bitstrace.replay.replayer.progress import progress_display
from bitstrace.replay.replayer.report import dry_run_json, render_dry_run, render_text, result_json, write_json
from bitstrace.replay.replayer.schedule import describe, replay
from bitstrace.replay.replayer.session import auth_notes

#: Longest --timeout: socket timeouts beyond the platform's time_t overflow.
MAX_TIMEOUT = 86400.0


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
    parser.add_argument("--tls-keylog", metavar="FILE",
                        help="https: append the TLS secrets of every connection to FILE (NSS key "
                             "log format), so a capture of the replay can be decrypted "
                             "(bits-analyze --tls-keylog FILE, Wireshark)")
    parser.add_argument("--insecure", action="store_true",
                        help="https: do not verify the server's certificate")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be sent, send nothing")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--fail-on-diff", action="store_true",
                        help="exit with status 1 when a live answer differs from the captured one")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress display")
    return parser


# --- main --------------------------------------------------------------------------------------

def _options(args: argparse.Namespace) -> Options:
    return Options(target=Target.parse(args.target), mode=args.mode, speed=args.speed,
                   concurrency=args.concurrency, timeout=args.timeout, auth=args.auth,
                   follow_host_id=args.follow_host_id, strip_prefix=args.strip_prefix,
                   verify_tls=not args.insecure, tls_keylog=args.tls_keylog)


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
    if args.tls_keylog is not None:
        try:
            open(args.tls_keylog, "a").close()  # as ssl will open it: fail now, not per session
        except OSError as exc:
            print(f"bits-replay: --tls-keylog {args.tls_keylog}: {exc.strerror or exc}", file=err)
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
            described = describe(plan, options)
            if args.json:
                write_json(dry_run_json(described, len(plan.sessions), str(options.target), notes),
                           out)
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
            write_json(result_json(result, plan, notes), out)
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
