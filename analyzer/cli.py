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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.http:
            return run_http(args, sys.stdout, sys.stderr)
        return run_http(args, sys.stdout, sys.stderr)
    except BrokenPipeError:
        # `bits-analyze --http x.pcap | head` is normal use, not an error.
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
