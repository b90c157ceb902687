"""bits-analyze: the command line.

Exit status: 0 = done; 1 = `--fail-on` threshold reached; 2 = usage error; 3 = some input could
not be read completely (what could be read was still analysed and reported).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
from typing import Callable, Iterator, Sequence, TextIO

from bitstrace import __version__
from bitstrace.analyzer.pipeline import ProgressHook, read_exchanges
from bitstrace.analyzer.problems import Problem
from bitstrace.analyzer.report.json import SEVERITY_ORDER as SEVERITIES
from bitstrace.analyzer.tls import TlsKeys

EXIT_OK, EXIT_FAIL_ON, EXIT_USAGE, EXIT_INCOMPLETE = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bits-analyze",
        description="Reconstruct BITS upload sessions from pcap/pcapng captures and flag anomalies.",
    )
    parser.add_argument("captures", nargs="+", metavar="CAPTURE",
                        help="pcap or pcapng file, gzip-compressed or not; '-' reads standard input")
    parser.add_argument("--http", action="store_true",
                        help="print every HTTP exchange as JSON Lines instead of the BITS report")
    out = parser.add_argument_group("reports (the text report goes to standard output unless it is taken)")
    out.add_argument("--json", metavar="FILE", help="write the JSON report (schema v1) to FILE, '-' for stdout")
    out.add_argument("--jsonl", metavar="FILE", help="write the report as JSON Lines to FILE, '-' for stdout")
    out.add_argument("--html", metavar="FILE", help="write a self-contained HTML report to FILE")
    out.add_argument("--extract", metavar="DIR", help="rebuild each session's uploaded file into DIR")
    sel = parser.add_argument_group("selection and exit status")
    sel.add_argument("--session", metavar="ID", help="report only this session (id as in the Create ack)")
    sel.add_argument("--min-severity", choices=SEVERITIES, default="info",
                     help="leave out anomalies below this severity (default: info, i.e. all)")
    sel.add_argument("--fail-on", choices=("error", "warning"),
                     help="exit with status 1 when an anomaly of this severity or worse is found")
    sel.add_argument("--stall-after", type=_positive_seconds, metavar="SECONDS", default=None,
                     help="flag 'stalled' after this long without progress (default 300)")
    tls = parser.add_argument_group("TLS (HTTPS) decryption; the capture's own pcapng secrets are always read")
    tls.add_argument("--tls-keylog", metavar="FILE", action="append", default=[],
                     help="NSS key log (SSLKEYLOGFILE format); repeatable; SSLKEYLOGFILE is read too when set")
    tls.add_argument("--tls-rsa-key", metavar="PEM", action="append", default=[],
                     help="the server's RSA private key, for TLS 1.2 RSA key exchange; repeatable")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour in the text report (auto: only on a terminal)")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    parser.add_argument("--version", action="version", version=f"bits-analyze {__version__}")
    return parser


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[ProgressHook | None]:
    """A rich progress bar on stderr, only when stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), transient=True,
                  console=__import__("rich.console").console.Console(stderr=True)) as bar:
        tasks: dict[str, TaskID] = {}

        def hook(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)

        yield hook


def tls_keys(args: argparse.Namespace, err: TextIO) -> TlsKeys | None:
    """The keys of --tls-keylog, SSLKEYLOGFILE and --tls-rsa-key; None (after saying why on
    `err`) when one cannot be read."""
    keys = TlsKeys()
    files = list(args.tls_keylog)
    from_env = os.environ.get("SSLKEYLOGFILE")
    if from_env and from_env not in files:
        print(f"bits-analyze: reading TLS keys from SSLKEYLOGFILE={from_env}", file=err)
        files.append(from_env)
    try:
        for path in files:
            with open(path, "rb") as keylog:
                keys.add_keylog(keylog.read(), path)
        for path in args.tls_rsa_key:
            with open(path, "rb") as pem:
                keys.add_rsa_key(pem.read(), path)
    except OSError as error:
        print(f"bits-analyze: cannot read {error.filename}: {error.strerror}", file=err)
        return None
    except ValueError as error:
        print(f"bits-analyze: {error}", file=err)
        return None
    return keys


def report_problems(problems: Sequence[Problem], err: TextIO) -> None:
    for problem in problems:
        print(f"bits-analyze: {problem}", file=err)


def run_http(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from bitstrace.analyzer.exchanges import Exchange, exchange_to_json

    # Several files: each record names the file its frame numbers count in.
    names = ["<stdin>" if path == "-" else path for path in args.captures] if len(args.captures) > 1 else None

    def emit(exchange: Exchange) -> None:
        out.write(json.dumps(exchange_to_json(exchange, names), separators=(",", ":")) + "\n")

    keys = tls_keys(args, err)
    if keys is None:
        return EXIT_USAGE
    with progress_bar(not args.no_progress) as hook:
        result = read_exchanges(args.captures, emit, progress=hook, tls_keys=keys)
    report_problems(result.problems, err)
    return EXIT_OK if result.complete else EXIT_INCOMPLETE


def run_report(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from bitstrace.analyzer.analysis import analyze
    from bitstrace.analyzer.report import render_text, write_html
    from bitstrace.analyzer.report.json import (build_report, complete_sessions, filter_report, jsonl_records,
                                      packet_source, severity_at_least, write_json, write_jsonl)

    keys = tls_keys(args, err)
    if keys is None:
        return EXIT_USAGE
    # Every output is opened before the analysis, so a bad path costs nothing but a message.
    with contextlib.ExitStack() as outputs:
        try:
            json_out = outputs.enter_context(_output(args.json, out)) if args.json else None
            jsonl_out = outputs.enter_context(_output(args.jsonl, out)) if args.jsonl else None
            html_out = outputs.enter_context(_output(args.html, out)) if args.html else None
            if args.extract:
                os.makedirs(args.extract, exist_ok=True)
        except OSError as error:
            print(f"bits-analyze: cannot write {error.filename}: {error.strerror}", file=err)
            return EXIT_USAGE
        with progress_bar(not args.no_progress) as hook:
            analysis = analyze(args.captures, extract_dir=args.extract, progress=hook,
                               stall_after_s=args.stall_after, tls_keys=keys)
        # Without the packets: each writer gets them a session at a time from `packets`.
        report = build_report(analysis, session_filter=args.session, with_packets=False)
        if args.session and not report["sessions"]:
            print(f"bits-analyze: no session {args.session} in the capture", file=err)
            return EXIT_USAGE
        filtered = filter_report(report, args.min_severity)
        packets = packet_source(analysis, filtered)
        if json_out:
            _write(args.json, lambda: write_json(filtered, json_out, packets), json_out)
        if jsonl_out:
            _write(args.jsonl, lambda: write_jsonl(jsonl_records(filtered, packets), jsonl_out), jsonl_out)
        if html_out:
            _write(args.html, lambda: write_html(filtered, html_out, complete_sessions(filtered, packets)),
                   html_out)
    text_on_terminal = False
    if "-" not in (args.json, args.jsonl):
        text_on_terminal = out.isatty()
        color = text_on_terminal if args.color == "auto" else args.color == "always"
        _write("-", lambda: render_text(report, out, min_severity=args.min_severity, color=color), out)
    if not text_on_terminal:  # on a terminal the report's own problems table says it
        report_problems(analysis.problems, err)
    if args.fail_on:
        found = [a["severity"] for s in report["sessions"] for a in s["anomalies"]]
        found += [a["severity"] for a in report["anomalies"]]
        if any(severity_at_least(severity, args.fail_on) for severity in found):
            return EXIT_FAIL_ON
    return EXIT_OK if analysis.complete else EXIT_INCOMPLETE


class OutputFailed(Exception):
    """Writing an output failed midway (a full disk...): the half-written output is named."""

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(f"cannot write {'standard output' if path == '-' else path}: {error.strerror or error}")
        self.path = path


def _write(path: str, write: Callable[[], None], stream: TextIO) -> None:
    """Run `write` and flush `stream` (a full disk shows at the latest there, not in close)."""
    try:
        write()
        stream.flush()
    except BrokenPipeError:
        raise
    except OSError as error:
        raise OutputFailed(path, error) from error


@contextlib.contextmanager
def _output(path: str, stdout: TextIO) -> Iterator[TextIO]:
    if path == "-":
        yield stdout
        return
    stream = open(path, "w", encoding="utf-8")
    try:
        yield stream
    except BaseException:
        with contextlib.suppress(OSError):  # the buffer that failed fails again: the first error tells
            stream.close()
        raise
    stream.close()


def _positive_seconds(value: str) -> float:
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"needs a number of seconds above 0, not {value!r}")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    # The analysis allocates many long-lived records (one per BITS packet) and few cycles; the
    # default thresholds make the collector rescan them all again and again (measured on the
    # benchmark's many-small-requests capture: 19.4 s -> 14.8 s, large capture unchanged).
    gc.set_threshold(100_000, 50, 100)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json == "-" and args.jsonl == "-":
        parser.error("--json - and --jsonl - would interleave on standard output: send one to a file")
    try:
        if args.http:
            return run_http(args, sys.stdout, sys.stderr)
        return run_report(args, sys.stdout, sys.stderr)
    except OutputFailed as failure:
        print(f"bits-analyze: {failure}", file=sys.stderr)
        if failure.path == "-":  # what stdout still buffers would fail again in Python's flush at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_USAGE
    except BrokenPipeError:
        # `bits-analyze x.pcap | head` is normal use, not an error; nothing more can be written,
        # and Python's own flush at exit must not fail either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
