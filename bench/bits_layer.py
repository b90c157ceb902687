"""Cost of the BITS layer alone: CPU per exchange and memory per packet kept.

Reads the first N exchanges of a capture (default 30,000 of bench/data/many.pcap, the
many-small-requests capture) into memory once, then times over them, best of a few runs:
classify() alone, SessionTracker.on_exchange (classify and filing), and finish() (the session
walk); then, over a fresh read of the same exchanges (so that nothing else holds what the
packets hold), the traced bytes left per BITS packet after finish().

    .venv/bin/python bench/bits_layer.py [capture] [N]
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc

from bitstrace.analyzer.bits.packets import classify
from bitstrace.analyzer.bits.sessions import SessionTracker
from bitstrace.analyzer.pipeline import read_exchanges


class _Enough(Exception):
    pass


def feed_first(capture: str, count: int, consumer) -> None:
    """The first `count` exchanges of `capture` to `consumer`; the pipeline's state is dropped."""
    seen = 0

    def counted(exchange) -> None:
        nonlocal seen
        consumer(exchange)
        seen += 1
        if seen >= count:
            raise _Enough

    try:
        read_exchanges([capture], counted)
    except _Enough:
        pass


def best_of(runs: int, work) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    capture = sys.argv[1] if len(sys.argv) > 1 else "bench/data/many.pcap"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 30_000
    gc.set_threshold(100_000, 50, 100)  # as bits-analyze runs
    exchanges: list = []
    feed_first(capture, count, exchanges.append)
    n = len(exchanges)
    print(f"{n} exchanges of {capture}; CPU seconds, best of 3:")

    seconds = best_of(3, lambda: [classify(e) for e in exchanges])
    print(f"  classify               {seconds / n * 1e6:6.2f} us/exchange")

    def track() -> SessionTracker:
        tracker = SessionTracker()
        for exchange in exchanges:
            tracker.on_exchange(exchange)
        return tracker

    seconds = best_of(3, track)
    print(f"  on_exchange            {seconds / n * 1e6:6.2f} us/exchange")
    trackers = [track() for _ in range(3)]
    seconds = min(best_of(1, tracker.finish) for tracker in trackers)
    print(f"  finish                 {seconds / n * 1e6:6.2f} us/exchange")

    del trackers
    exchanges.clear()
    gc.collect()
    tracemalloc.start()
    tracker = SessionTracker()
    feed_first(capture, count, tracker.on_exchange)
    summary = tracker.finish()
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    packets = sum(len(s.packets) for s in summary.sessions)
    print(f"  held after finish      {held / max(packets, 1):6.0f} B/BITS packet "
          f"({packets} packets, {len(summary.sessions)} sessions)")


if __name__ == "__main__":
    main()
