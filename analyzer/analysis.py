"""One analysis run: the pipeline's exchanges fed to the BITS session tracker (and extractor)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, Iterable

from bitstrace.analyzer.bits.extract import WRITE_FAILURES, Extractor
from bitstrace.analyzer.bits.sessions import DEFAULT_STALL_AFTER_S, BitsSummary, SessionTracker
from bitstrace.analyzer.exchanges import Exchange
from bitstrace.analyzer.pipeline import ProgressHook, RunResult, display_name, read_exchanges
from bitstrace.analyzer.problems import Problem
from bitstrace.analyzer.selection import FrameSelection
from bitstrace.analyzer.tcp import MAX_BUFFERED, REORDER_WINDOW_NS
from bitstrace.analyzer.tls import TlsKeys


@dataclass
class Analysis:
    run: RunResult
    bits: BitsSummary

    @property
    def problems(self) -> list[Problem]:
        return self.run.problems

    @property
    def complete(self) -> bool:
        """Every capture read to its end and every extracted file written."""
        return self.run.complete and not any(p.kind in WRITE_FAILURES for p in self.problems)


def analyze(
    sources: Iterable[str | os.PathLike[str] | BinaryIO],
    *,
    extract_dir: str | os.PathLike[str] | None = None,
    progress: ProgressHook | None = None,
    stall_after_s: float | None = None,
    selection: FrameSelection | None = None,
    reorder_window: float | None = None,
    tls_keys: TlsKeys | None = None,
    max_buffered: int | None = None,
) -> Analysis:
    """Read every capture and reconstruct the BITS sessions in them."""
    sources = list(sources)
    several = len(sources) > 1  # messages then name frames `capture:frame`, as the reports do
    extractor = (Extractor(extract_dir, several_captures=several, capture_names=[display_name(s) for s in sources])
                 if extract_dir is not None else None)
    tracker = SessionTracker(extractor, several_captures=several,
                             stall_after_s=DEFAULT_STALL_AFTER_S if stall_after_s is None else stall_after_s)

    def file_exchange(exchange: Exchange) -> None:  # the packet on_exchange returns is not wanted here
        tracker.on_exchange(exchange)

    try:
        run = read_exchanges(sources, file_exchange,
                             on_body=extractor.on_body if extractor else None, progress=progress,
                             selection=selection,
                             reorder_window=REORDER_WINDOW_NS / 1e9 if reorder_window is None else reorder_window,
                             tls_keys=tls_keys, max_buffered=MAX_BUFFERED if max_buffered is None else max_buffered)
        starts = [c.first_ts_ns for c in run.captures if c.first_ts_ns is not None]
        ends = [c.last_ts_ns for c in run.captures if c.last_ts_ns is not None]
        bits = tracker.finish(min(starts) if starts else None, max(ends) if ends else None)
    except BaseException:  # an interrupt, a signal made an exception, a bug: no temp file may stay
        if extractor is not None:
            extractor.discard()
        raise
    if extractor is not None:
        run.problems.extend(extractor.problems)
    return Analysis(run, bits)
