"""Running a plan: sessions start in capture order at their captured time (scaled by the
speed), up to the concurrency cap, one thread per session in flight; and the dry run, which
says what would be sent without sending anything."""

from __future__ import annotations

import heapq
import threading
from typing import Any, Iterator

from bitstrace.analyzer.bits.protocol import PacketType
from bitstrace.replay.replayer.connections import Connections
from bitstrace.replay.replayer.options import MODES, Options
from bitstrace.replay.replayer.pacing import Clock
from bitstrace.replay.replayer.plan import Plan, PlannedSession
from bitstrace.replay.replayer.results import (
    Observer,
    ReplayResult,
    SessionResult,
    result_of,
    unexpected_fault,
)
from bitstrace.replay.replayer.session import SessionReplay


def dry_run(plan: Plan, options: Options) -> list[dict[str, Any]]:
    """What `replay` would send, session by session (see `describe`), as one list."""
    return list(describe(plan, options))


def describe(plan: Plan, options: Options) -> Iterator[dict[str, Any]]:
    """What `replay` would send, request by request, without sending anything: one dict per
    session, made as it is asked for (a report can write each and let it go). Live session
    ids are shown as `<live id of CAPTURED>`; adaptive mode's reactions depend on the live
    answers, so the captured sequence is shown."""
    clock = Clock(plan, options.speed)
    unused = Connections(plan, options)  # opens nothing until asked to
    seen: set[int] = set()
    for session in plan.sessions:
        worker = SessionReplay(session, plan, options, clock, unused, None)
        requests = []
        for request in worker.requests:
            if request.packet_type is PacketType.CREATE_SESSION:
                captured = ((request.response.session_id if request.response else None)
                            or session.session_id or session.key)
                worker.live_ids[captured] = f"<live id of {captured}>"
            body = request.body
            requests.append({
                "label": request.label,
                "at_s": clock.due(request.ts_ns),
                "connection": request.connection, "file": request.file,
                "new_connection": request.connection not in seen,
                "method": request.method,
                "url": f"{options.target.scheme}://{options.target.netloc}"
                       f"{options.target.path_for(request.target, options.strip_prefix)}",
                "headers": worker.headers_for(request),
                "body_length": body.length if body else 0,
                "body_sha256": body.sha256 if body else None,
                "note": ("body incomplete in the capture: not sent"
                         if body is not None and not body.complete else None),
            })
            seen.add(request.connection)
        yield {"captured_id": session.session_id or session.key,
               "generation": session.generation, "requests": requests}


def replay(plan: Plan, options: Options, observer: Observer | None = None) -> ReplayResult:
    """Replay every session of the plan; sessions that overlapped in the capture overlap here
    (up to `options.concurrency` at once). Faults stop the session they hit, not the replay."""
    if options.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    clock = Clock(plan, options.speed)
    connections = Connections(plan, options)
    slots = threading.BoundedSemaphore(options.concurrency) if options.concurrency else None
    results: list[SessionResult | None] = [None] * len(plan.sessions)

    finished = [threading.Event() for _ in plan.sessions]

    def run(position: int, session: PlannedSession, due: float | None) -> None:
        result = results[position] = result_of(session)
        try:
            worker = SessionReplay(session, plan, options, clock, connections, observer)
            result = results[position] = worker.result
            if due is not None:
                worker.shift = max(0.0, clock.now() - due)
            if observer is not None:
                observer.on_session_start(session)
            result.started_s = clock.now()
            worker.run()
            result.ended_s = clock.now()
            if observer is not None:
                observer.on_session_end(session, result)
        except Exception as exc:  # outside the session's own steps (the observer, say)
            result.fault = result.fault or unexpected_fault(exc)
        finally:
            finished[position].set()
            if slots is not None:
                slots.release()

    # Sessions start in capture order at their captured time, one thread per session in
    # flight, and never before the sessions that had ended when they began in the capture:
    # at any speed, what did not overlap there does not overlap here.
    threads: list[threading.Thread] = []
    running: list[tuple[int, int]] = []  # heap of (captured end, position) of started sessions
    interrupted = False
    try:
        for position, session in enumerate(plan.sessions):
            while running and running[0][0] <= session.first_ts_ns:
                finished[heapq.heappop(running)[1]].wait()
            due = clock.due(session.first_ts_ns)
            clock.wait_until(due)
            if slots is not None:
                slots.acquire()
            thread = threading.Thread(target=run, args=(position, session, due),
                                      name=f"replay-{session.key}", daemon=True)
            thread.start()
            threads.append(thread)
            heapq.heappush(running, (session.done_ts_ns, position))
        for thread in threads:
            thread.join()
    except KeyboardInterrupt:
        # Stop waiting and sending; closing the connections ends requests in flight.
        interrupted = True
        clock.stopped.set()
        connections.close_all()
        for position in range(len(threads)):
            # Not Thread.join: after an interrupted join, CPython 3.11 may return at once.
            finished[position].wait(options.timeout)
    finally:
        connections.close_all()
    return ReplayResult(str(options.target), options.mode, options.speed,
                        [r for r in results if r is not None], interrupted)
