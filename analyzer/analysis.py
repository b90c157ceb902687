"""One analysis run: the pipeline's exchanges fed to the BITS session tracker (and extractor)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, Iterable

from bitstrace.analyzer.bits.extract import Extractor
from bitstrace.analyzer.bits.sessions import BitsSummary, SessionTracker
from bitstrace.analyzer.pipeline import ProgressHook, RunResult, display_name, read_exchanges
from bitstrace.analyzer.problems import Problem
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
        return self.run.complete and not any(p.kind.startswith("extract-") for p in self.problems)


def analyze(
    sources: Iterable[str | os.PathLike[str] | BinaryIO],
    *,
    extract_dir: str | os.PathLike[str] | None = None,
    progress: ProgressHook | None = None,
    stall_after_s: float | None = None,
    tls_keys: TlsKeys | None = None,
) -> Analysis:
    """Read every capture and reconstruct the BITS sessions in them."""
    sources = list(sources)
    several = len(sources) > 1  # messages then name frames `capture:frame`, as the reports do
    extractor = (Extractor(extract_dir, several_captures=several, capture_names=[display_name(s) for s in sources])
                 if extract_dir is not None else None)
    tracker = (SessionTracker(extractor, several_captures=several) if stall_after_s is None else
               SessionTracker(extractor, several_captures=several, stall_after_s=stall_after_s))
    run = read_exchanges(sources, tracker.on_exchange,
                         on_body=extractor.on_body if extractor else None, progress=progress,
                         tls_keys=tls_keys)
    starts = [c.first_ts_ns for c in run.captures if c.first_ts_ns is not None]
    ends = [c.last_ts_ns for c in run.captures if c.last_ts_ns is not None]
    bits = tracker.finish(min(starts) if starts else None, max(ends) if ends else None)
    if extractor is not None:
        run.problems.extend(extractor.problems)
    return Analysis(run, bits)
