"""The replay's clock: when each captured moment falls in the replay, at a given speed."""

from __future__ import annotations

import threading
import time

from bitstrace.replay.replayer.plan import Plan


class Clock:
    """Seconds since the replay started; `due` maps a capture timestamp to the moment it is
    due (None at speed 0: no waiting). `stopped` ends every wait at once (interruption)."""

    def __init__(self, plan: Plan, speed: float) -> None:
        self.start = time.monotonic()
        self.origin_ns = plan.first_ts_ns
        self.speed = speed
        self.stopped = threading.Event()  # set on interruption: waits end, nothing more is sent

    def now(self) -> float:
        return time.monotonic() - self.start

    def due(self, ts_ns: int) -> float | None:
        if self.speed <= 0:
            return None
        return (ts_ns - self.origin_ns) / 1e9 / self.speed

    def wait_until(self, due: float | None) -> None:
        if due is not None:
            delay = due - self.now()
            if delay > 0:
                # A tiny --speed stretches the capture past what a wait can be given.
                self.stopped.wait(min(delay, threading.TIMEOUT_MAX))
