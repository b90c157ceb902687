"""bits-analyze: the command line.

Exit status: 0 = done; 1 = `--fail-on` threshold reached; 2 = usage error; 3 = some input could
not be read completely (what could be read was still analysed and reported).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Iterator, Sequence, TextIO

from analyzer import __version__
from analyzer.pipeline import ProgressHook, RunResult, read_exchanges
from analyzer.report.json import SEVERITY_ORDER as SEVERITIES

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
    sel.add_argument("--stall-after", type=float, metavar="SECONDS", default=None,
                     help="flag 'stalled' after this long without progress (default 300)")
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
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), transient=True,
                  console=__import__("rich.console").console.Console(stderr=True)) as bar:
        tasks: dict[str, int] = {}

        def hook(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)

        yield hook


def report_problems(result: RunResult, err: TextIO) -> None:
    for problem in result.problems:
        print(f"bits-analyze: {problem}", file=err)


def run_http(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from analyzer.exchanges import exchange_to_json

    multiple = len(args.captures) > 1
    current: dict[str, str] = {}

    def emit(exchange) -> None:
        record = exchange_to_json(exchange)
        if multiple:
            record = {"capture": current.get("file"), **record}
        out.write(json.dumps(record, separators=(",", ":")) + "\n")

    def tracking(name: str, done: int, total: int | None) -> None:
        current["file"] = name
        if hook is not None:
            hook(name, done, total)

    with progress_bar(not args.no_progress) as hook:
        result = read_exchanges(_sources(args.captures, current), emit, progress=tracking)
    report_problems(result, err)
    return EXIT_OK if result.complete else EXIT_INCOMPLETE


def _sources(paths: Sequence[str], current: dict[str, str]) -> Iterator[str]:
    for path in paths:
        current["file"] = "<stdin>" if path == "-" else path
        yield path


def run_report(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from analyzer.analysis import analyze
    from analyzer.report import render_html, render_text
    from analyzer.report.json import (build_report, jsonl_records, severity_at_least, write_json,
                                      write_jsonl)

    with progress_bar(not args.no_progress) as hook:
        analysis = analyze(args.captures, extract_dir=args.extract, progress=hook,
                           stall_after_s=args.stall_after)
    report = build_report(analysis, session_filter=args.session)
    filtered = build_report(analysis, session_filter=args.session, min_severity=args.min_severity)
    if args.json:
        with _output(args.json, out) as stream:
            write_json(filtered, stream)
    if args.jsonl:
        with _output(args.jsonl, out) as stream:
            write_jsonl(jsonl_records(filtered), stream)
    if args.html:
        with open(args.html, "w", encoding="utf-8") as stream:
            stream.write(render_html(filtered))
    if "-" not in (args.json, args.jsonl):
        color = out.isatty() if args.color == "auto" else args.color == "always"
        render_text(report, out, min_severity=args.min_severity, color=color)
    report_problems(analysis.run, err)
    if args.fail_on:
        found = [a["severity"] for s in report["sessions"] for a in s["anomalies"]]
        found += [a["severity"] for a in report["anomalies"]]
        if any(severity_at_least(severity, args.fail_on) for severity in found):
            return EXIT_FAIL_ON
    return EXIT_OK if analysis.run.complete else EXIT_INCOMPLETE


@contextlib.contextmanager
def _output(path: str, stdout: TextIO) -> Iterator[TextIO]:
    if path == "-":
        yield stdout
        return
    with open(path, "w", encoding="utf-8") as stream:
        yield stream


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.http:
            return run_http(args, sys.stdout, sys.stderr)
        return run_report(args, sys.stdout, sys.stderr)
    except BrokenPipeError:
        # `bits-analyze --http x.pcap | head` is normal use, not an error.
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
