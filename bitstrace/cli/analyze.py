"""bits-analyze: the command line.

Exit status: 0 = done; 1 = `--fail-on` threshold reached; 2 = usage error; 3 = some input could
not be read completely (what could be read was still analysed and reported).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import sys
from importlib import resources
from types import FrameType
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, TextIO

from bitstrace import __version__
from bitstrace.analyzer.report.logs import FORMATS as LOG_FORMATS
from bitstrace.analyzer.tcp import MAX_BUFFERED, REORDER_WINDOW_NS
from bitstrace.analyzer.tls import TlsKeys
from bitstrace.analyzer.selection import FrameSelection, SelectionError, parse_time
from bitstrace.cli.common import (Exit, SessionChoiceError, choose_session, discard_further_output, distinct_sources,
                                  seconds, size, whole)
from bitstrace.analyzer.pipeline import ProgressHook, display_name, read_exchanges
from bitstrace.analyzer.problems import Problem
from bitstrace.analyzer.report.json import SEVERITY_ORDER as SEVERITIES

if TYPE_CHECKING:
    from rich.progress import ProgressColumn


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bits-analyze",
        description="Reconstruct BITS upload sessions from pcap/pcapng captures and flag anomalies.",
    )
    parser.add_argument("captures", nargs="*", metavar="CAPTURE",
                        help="pcap or pcapng file, gzip-compressed or not; '-' reads standard input")
    parser.add_argument("-r", dest="read_files", action="append", default=[], metavar="FILE",
                        help="a capture to read, as tcpdump and tshark take it (repeatable; read "
                             "before the positional ones)")
    parser.add_argument("--http", action="store_true",
                        help="print every HTTP exchange as JSON Lines instead of the BITS report")
    out = parser.add_argument_group("reports (without --json, --jsonl, --html or --logs the text report goes to standard output)")
    out.add_argument("--json", metavar="FILE", help="write the JSON report (schema v1) to FILE, '-' for stdout")
    out.add_argument("--jsonl", metavar="FILE", help="write the report as JSON Lines to FILE, '-' for stdout")
    out.add_argument("--html", metavar="FILE", help="write a self-contained HTML report to FILE")
    out.add_argument("--extract", metavar="DIR", help="rebuild each session's uploaded file into DIR")
    out.add_argument("--annotate", metavar="OUT.pcapng",
                     help="write the input frames unchanged into a pcapng file, with a comment on "
                          "every frame an anomaly or a session boundary names (Wireshark's "
                          "frame.comment)")
    out.add_argument("--logs", metavar="DIR",
                     help="write one log per record type into DIR (captures, sessions, packets, "
                          "anomalies, problems, downloads), as Zeek writes its logs")
    out.add_argument("--logs-format", choices=LOG_FORMATS, default="zeek",
                     help="zeek: TSV with #fields/#types headers (default); csv: a header row")
    tls = parser.add_argument_group("TLS (HTTPS) decryption; the capture's own pcapng secrets are always read")
    tls.add_argument("--tls-keylog", metavar="FILE", action="append", default=[],
                     help="NSS key log (SSLKEYLOGFILE format); repeatable; SSLKEYLOGFILE is read too when set")
    tls.add_argument("--tls-rsa-key", metavar="PEM", action="append", default=[],
                     help="the server's RSA private key, for TLS 1.2 RSA key exchange; repeatable")
    frames = parser.add_argument_group("frames read (tcpdump's selections)")
    frames.add_argument("-f", "--filter", metavar="EXPR",
                        help="a BPF filter, as tcpdump takes it (libpcap compiles it), e.g. "
                             "'host 10.0.0.5 and tcp port 443'")
    frames.add_argument("-c", "--count", type=whole(1), metavar="N",
                        help="read only the first N frames (that pass the filter), over all captures")
    frames.add_argument("--from", dest="start", metavar="TIME",
                        help="leave out frames before TIME (ISO 8601, UTC unless an offset is "
                             "given, or seconds since the epoch)")
    frames.add_argument("--to", dest="end", metavar="TIME", help="leave out frames after TIME")
    sel = parser.add_argument_group("selection and exit status")
    sel.add_argument("--session", metavar="ID",
                     help="report only this session: its id or any unique prefix of it, braces "
                          "optional, any case")
    sel.add_argument("--min-severity", choices=SEVERITIES, default="info",
                     help="leave out anomalies below this severity (default: info, i.e. all)")
    sel.add_argument("--fail-on", choices=("error", "warning"),
                     help="exit with status 1 when an anomaly of this severity or worse is found")
    sel.add_argument("--max-memory", type=size(1 << 16), metavar="SIZE", default=None,
                     help="what TCP reassembly may hold over all connections (out-of-order data and "
                          "retransmission history; default 512M); past it the oldest holes give way, "
                          "each a located problem")
    sel.add_argument("--reorder-window", type=seconds(), metavar="SECONDS", default=None,
                     help="how long, in capture time, a TCP hole waits for late or reordered data "
                          "before its bytes count as lost (default 2)")
    sel.add_argument("--stall-after", type=seconds(), metavar="SECONDS", default=None,
                     help="flag 'stalled' after this long without progress (default 300)")
    out.add_argument("-q", "--quiet", action="store_true",
                     help="no text report (the file outputs and the problems on stderr remain)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour in the text report (auto: only on a terminal)")
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    from bitstrace.cli.parallel import add_arguments

    add_arguments(parser)
    parser.add_argument("--version", action="version", version=f"bits-analyze {__version__}")
    parser.add_argument("--schema", action=_PrintSchema,
                        help="print the JSON report's schema document (Markdown) and exit")
    return parser


class _PrintSchema(argparse.Action):
    """Like --version: answers without captures. The document ships inside the package."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        schema = resources.files("bitstrace.analyzer.report").joinpath("schema.md")
        sys.stdout.write(schema.read_text(encoding="utf-8"))
        parser.exit(Exit.OK)


@contextlib.contextmanager
def progress_bar(enabled: bool) -> Iterator[ProgressHook | None]:
    """A rich progress bar on stderr, only when stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeRemainingColumn

    # Percentage and time left only mean something when the size is known (not on a pipe):
    # rich leaves both columns empty for a task without a total.
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), *size_columns(),
                  TimeRemainingColumn(), transient=True, console=Console(stderr=True)) as bar:
        tasks: dict[str, TaskID] = {}

        def hook(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.update(tasks[name], completed=done)

        yield hook


def size_columns() -> list["ProgressColumn"]:
    """Bytes read (of the total when known) and the rate, in the reports' units (binary, IEC
    names: presentation.human_size); rich's own columns would write decimal MB."""
    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    from bitstrace.analyzer.report.presentation import human_rate, human_size

    class Read(ProgressColumn):
        def render(self, task: Task) -> Text:
            done = human_size(task.completed)
            return Text(done if task.total is None else f"{done} of {human_size(task.total)}", style="progress.download")

    class Rate(ProgressColumn):
        def render(self, task: Task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else human_rate(speed), style="progress.data.speed")

    return [Read(), Rate()]


def report_problems(problems: Sequence[Problem], err: TextIO) -> None:
    for problem in problems:
        print(f"bits-analyze: {problem}", file=err)


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


def run_http(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from bitstrace.analyzer.exchanges import Exchange, exchange_to_json

    # Several files: each record names the file its frame numbers count in.
    names = [display_name(path) for path in args.captures] if len(args.captures) > 1 else None

    def emit(exchange: Exchange) -> None:
        out.write(json.dumps(exchange_to_json(exchange, names), separators=(",", ":")) + "\n")

    keys = tls_keys(args, err)
    if keys is None:
        return Exit.USAGE
    with progress_bar(not args.no_progress) as hook:
        result = read_exchanges(args.captures, emit, progress=hook, selection=args.selection,
                                reorder_window=args.reorder_window or REORDER_WINDOW_NS / 1e9, tls_keys=keys,
                                max_buffered=args.max_memory or MAX_BUFFERED)
    report_problems(result.problems, err)
    return Exit.OK if result.complete else Exit.INCOMPLETE


def run_report(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from bitstrace.analyzer.analysis import analyze
    from bitstrace.analyzer.report import render_text, write_html
    from bitstrace.analyzer.report.json import (build_report, sessions_with_packets, filter_report, jsonl_records,
                                      packet_source, severity_at_least, write_json, write_jsonl)

    keys = tls_keys(args, err)
    if keys is None:
        return Exit.USAGE
    # Every output is opened before the analysis, so a bad path costs nothing but a message.
    with contextlib.ExitStack() as outputs:
        try:
            json_out = outputs.enter_context(_output(args.json, out)) if args.json else None
            jsonl_out = outputs.enter_context(_output(args.jsonl, out)) if args.jsonl else None
            html_out = outputs.enter_context(_output(args.html, out)) if args.html else None
            annotated = outputs.enter_context(open(args.annotate, "wb")) if args.annotate else None
            for directory in (args.extract, args.logs):
                if directory:
                    os.makedirs(directory, exist_ok=True)
        except OSError as error:
            print(f"bits-analyze: cannot write {error.filename}: {error.strerror}", file=err)
            return Exit.USAGE
        if args.partitioned:  # a directory, --jobs or --dask: bitstrace/cli/parallel.py
            from bitstrace.analyzer.engines import EngineError
            from bitstrace.cli.parallel import run_analysis

            try:
                analysis = run_analysis(args, err, None)
            except EngineError as error:
                print(f"bits-analyze: {error}", file=err)
                return Exit.USAGE
        else:
            with progress_bar(not args.no_progress) as hook:
                analysis = analyze(args.captures, extract_dir=args.extract, progress=hook,
                                   stall_after_s=args.stall_after, selection=args.selection,
                               reorder_window=args.reorder_window, tls_keys=keys, max_buffered=args.max_memory)
        session = None
        if args.session:
            try:
                session = choose_session(args.session, [s.id for s in analysis.bits.sessions if s.id])
            except SessionChoiceError as error:
                print(f"bits-analyze: {error}", file=err)
                return Exit.USAGE
        # Without the packets: each writer gets them a session at a time from `packets`.
        report = build_report(analysis, session_filter=session, with_packets=False)
        filtered = filter_report(report, args.min_severity)
        packets = packet_source(analysis, filtered)
        try:
            if json_out:
                _write(args.json, lambda: write_json(filtered, json_out, packets), json_out)
            if jsonl_out:
                _write(args.jsonl, lambda: write_jsonl(jsonl_records(filtered, packets), jsonl_out), jsonl_out)
            if html_out:
                _write(args.html, lambda: write_html(filtered, html_out, sessions_with_packets(filtered, packets)),
                       html_out)
            if annotated:
                from bitstrace.analyzer.report.annotate import comments_by_frame, write_annotated

                notes = comments_by_frame(filtered, sessions_with_packets(filtered, packets))
                try:
                    again = make_selection(args)
                    analysis.problems.extend(write_annotated(args.captures, notes, annotated,
                                                             again.apply if again else None))
                    annotated.flush()
                except OSError as error:
                    raise OutputFailed(args.annotate, error) from error
            if args.logs:
                from bitstrace.analyzer.report.logs import log_rows, write_logs

                try:
                    write_logs(log_rows(filtered, packets), args.logs, args.logs_format)
                except OSError as error:
                    raise OutputFailed(error.filename or args.logs, error) from error
        except OutputFailed:
            report_problems(analysis.problems, err)  # the report that would list them is lost (a full disk
            raise                                    # fills the extraction first)
    text_on_terminal = False
    nothing_read = all(c.frames == 0 and not c.complete for c in analysis.run.captures)
    # A report format asked for is the output (to a file or stdout): the text is not rendered.
    # --extract and --annotate alone still get it: it says which files are whole, what was found.
    if not (args.json or args.jsonl or args.html or args.logs or args.quiet or nothing_read):
        text_on_terminal = out.isatty()
        color = text_on_terminal if args.color == "auto" else args.color == "always"
        stories = packet_source(analysis, report)
        try:
            _write("-", lambda: render_text(report, out, min_severity=args.min_severity, color=color,
                                            packets=stories), out)
        except OutputFailed:
            report_problems(analysis.problems, err)
            raise
    if not text_on_terminal:  # on a terminal the report's own problems table says it
        report_problems(analysis.problems, err)
    if args.fail_on:
        found = [a["severity"] for s in report["sessions"] for a in s["anomalies"]]
        found += [a["severity"] for a in report["anomalies"]]
        if any(severity_at_least(severity, args.fail_on) for severity in found):
            return Exit.FINDINGS
    return Exit.OK if analysis.complete else Exit.INCOMPLETE


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


def make_selection(args: argparse.Namespace) -> FrameSelection | None:
    """The frames to read, from -f, -c, --from and --to (None: every frame)."""
    if not (args.filter or args.start or args.end or args.count):
        return None
    return FrameSelection(args.filter, parse_time(args.start) if args.start else None,
                          parse_time(args.end) if args.end else None, args.count)


def _stop(signum: int, frame: FrameType | None) -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so the extractor removes its temp files on the way out;
    the exit status is the shell's for that signal."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    # The analysis allocates many long-lived records (one per BITS packet) and few cycles; the
    # default thresholds make the collector rescan them all again and again (measured on the
    # benchmark's many-small-requests capture: 19.4 s -> 14.8 s, large capture unchanged).
    gc.set_threshold(100_000, 50, 100)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:  # one set to be ignored (nohup) stays ignored
            signal.signal(signum, _stop)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json == "-" and args.jsonl == "-":
        parser.error("--json - and --jsonl - would interleave on standard output: send one to a file")
    if args.http:
        taken = [option for option, value in (("--json", args.json), ("--jsonl", args.jsonl), ("--html", args.html),
                                              ("--extract", args.extract), ("--logs", args.logs),
                                              ("--annotate", args.annotate), ("--session", args.session),
                                              ("--fail-on", args.fail_on), ("-q", args.quiet)) if value]
        if taken:
            parser.error(f"--http prints the HTTP exchanges instead of the BITS report: it cannot go with "
                         f"{', '.join(taken)}")
    args.captures = distinct_sources(args.read_files + args.captures, sys.stderr, "bits-analyze")
    if not args.captures:
        parser.error("no capture given: name one (or -r FILE, or '-' for standard input)")
    try:
        args.selection = make_selection(args)
    except SelectionError as error:
        parser.error(str(error))
    if args.annotate and "-" in args.captures:
        parser.error("--annotate reads the captures a second time: standard input cannot be read twice")
    from bitstrace.cli.parallel import check_arguments

    check_arguments(args, parser)
    try:
        if args.http:
            return run_http(args, sys.stdout, sys.stderr)
        return run_report(args, sys.stdout, sys.stderr)
    except OutputFailed as failure:
        print(f"bits-analyze: {failure}", file=sys.stderr)
        if failure.path == "-":
            discard_further_output(sys.stdout)
        return Exit.USAGE
    except BrokenPipeError:
        # `bits-analyze x.pcap | head` is normal use, not an error.
        discard_further_output(sys.stdout)
        return Exit.OK
    except KeyboardInterrupt:
        print("bits-analyze: interrupted; no report was written", file=sys.stderr)
        return Exit.INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
