"""bits-analyze's directories, --jobs and --dask: the run split into units (analyzer/partition.py).

Files named directly with the default `--jobs 1` take the one-process path (analysis.analyze)
unchanged; a directory, `--jobs N` other than 1 or `--dask` take the partitioned path, whose
report is the same byte for byte (tests/analyzer/test_scale.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator, TextIO

from bitstrace.analyzer.analysis import Analysis
from bitstrace.analyzer.engines import (UnitProgress, check_dask_workers, dask_client, dask_threads,
                                        run_dask, run_local, start_workers)
from bitstrace.analyzer.partition import analyze_units, partition_options, run_in_process
from bitstrace.analyzer.pipeline import ProgressHook
from bitstrace.analyzer.selection import parse_time
from bitstrace.analyzer.sources import Inputs, expand


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scale-out (a directory is a capture point; README, Performance)")
    group.add_argument("--jobs", type=int, default=1, metavar="N",
                       help="run the analysis in N local processes (0: one per core; default 1, one process)")
    group.add_argument("--dask", metavar="ADDRESS",
                       help="run it on the Dask scheduler at ADDRESS (tcp://host:8786); every worker must "
                            "read the capture paths (shared storage)")


def check_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.jobs < 0:
        parser.error("--jobs takes 0 (one per core) or more")
    if args.jobs == 0:
        args.jobs = os.cpu_count() or 1
    args.inputs = expand(args.captures)
    args.partitioned = args.jobs != 1 or args.dask is not None or args.inputs.has_directories
    if args.partitioned and args.http:
        parser.error("--http reads the files named one by one: it goes with neither a directory, --jobs nor --dask")
    if args.partitioned and "-" in args.captures:
        parser.error("standard input cannot be read by several workers: --jobs, --dask and directories take files")
    if args.jobs != 1 and args.dask is not None:
        parser.error("--jobs and --dask are two engines: choose one")
    if args.jobs != 1:
        start_workers()  # the forkserver imports the analysis while this process imports the rest


@contextlib.contextmanager
def unit_progress(enabled: bool, total_bytes: int) -> Iterator[UnitProgress | None]:
    """Units done, bytes read and the rate over all workers, on stderr when it is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from bitstrace.cli.analyze import size_columns

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), *size_columns(),
                  TimeRemainingColumn(), transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task("units", total=total_bytes)

        def hook(done: int, units: int, read: int) -> None:
            bar.update(task, completed=read, description=f"{done}/{units} units")

        yield hook


def run_analysis(args: argparse.Namespace, err: TextIO, progress: ProgressHook | None) -> Analysis:
    """The partitioned run for the command line's inputs. Raises EngineError (a usage error)."""
    inputs: Inputs = args.inputs
    selection = None
    if args.selection is not None:
        selection = (args.filter, parse_time(args.start) if args.start else None,
                     parse_time(args.end) if args.end else None, args.count)
    # the text report (or none) shows no packet records: the units' walked sessions come back without packets
    with_packets = bool(args.json or args.jsonl or args.html or args.logs or args.annotate)
    options = partition_options(inputs.files, args.extract, selection, args.stall_after, with_packets)
    units_bytes = sum(os.path.getsize(f) for f in inputs.files if os.path.isfile(f))
    if args.dask is not None:
        client = dask_client(args.dask)
        try:
            check_dask_workers(client, inputs.files, args.extract)
            partitions = dask_threads(client)
            with unit_progress(not args.no_progress, units_bytes * partitions) as hook:
                return analyze_units(inputs.points, partitions, options,
                                     lambda units, planner: run_dask(client, units, planner, hook), inputs.notes)
        finally:
            client.close()
    if args.jobs == 1:
        return analyze_units(inputs.points, 1, options, run_in_process, inputs.notes)
    with unit_progress(not args.no_progress, units_bytes * args.jobs) as hook:
        return analyze_units(inputs.points, args.jobs, options,
                             lambda units, planner: run_local(units, args.jobs, planner, hook), inputs.notes)
