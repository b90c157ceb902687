"""Where the units of a partitioned run (partition.py) run: local processes, or a Dask cluster.

Each engine takes the units and returns their results and the units that failed twice. A unit
that raises, or whose process dies, is run once more; a second failure is a `Failure` (the
merge reports it as a located problem and the rest of the report is written). Ctrl-C stops
every worker: the local processes are terminated, the Dask futures cancelled.

Dask (`--dask ADDRESS`, the optional extra `bitstrace[dask]`) is the only engine past one
machine. Its workers read the capture paths themselves, so the paths must name the same files
on every worker (shared storage); `check_dask_workers` asks every worker before the run and
names the worker and the path it cannot open. What crosses the network is a unit's
description (paths, partition, options) and its plan one way, its summary and its finished
sessions (without packets, for a report without packet records) the other: the bulk of a
unit, its packets, stays in its worker's memory between the two rounds (partition.py).

Local processes (`--jobs N`: N of them) are forked from a forkserver started early
(`start_workers`) with the analysis and the main module imported once there; each holds the
states of the units it read until their plans come.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import uuid
from multiprocessing import forkserver
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, Callable, Sequence

from bitstrace.analyzer.partition import (Failure, Plan, Planner, Unit, UnitResult, UnitState, UnitSummary,
                                          finish_unit, read_unit, run_unit, unit_summary)

#: progress(units done, units in all, bytes read by the units done)
UnitProgress = Callable[[int, int, int], None]
ATTEMPTS = 2  # a failed unit runs once more


class EngineError(Exception):
    """The engine cannot run the units at all (no cluster, a worker without the files)."""


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def run_local(units: Sequence[Unit], jobs: int, planner: Planner,
              progress: UnitProgress | None = None) -> tuple[list[UnitResult], list[Failure]]:
    """The units in `jobs` local worker processes. A worker is given one unit to read at a
    time and holds the states of the units it read; once every unit is read the client plans
    and each worker finishes its own. A worker that dies takes its units' states with it:
    they are read again by another (or a new) worker, their second attempt."""
    start_workers()
    context = multiprocessing.get_context("forkserver")
    collector = gc.get_threshold()  # the workers collect as this process does (bits-analyze sets it)
    attempts = dict.fromkeys(range(len(units)), 0)
    queue = list(range(len(units)))  # units to read
    summaries: dict[int, UnitSummary] = {}
    results: dict[int, UnitResult] = {}
    failures: list[Failure] = []
    plans: dict[int, Plan] = {}
    workers: list[_Worker] = []
    done_bytes = 0

    def failed(index: int, error: str) -> None:
        summaries.pop(index, None)
        attempts[index] += 1
        if attempts[index] < ATTEMPTS:
            queue.append(index)
        else:
            failures.append(Failure(units[index], error))

    try:
        while True:
            while len(workers) < min(jobs, max(1, len(queue))) and (queue or not workers):
                workers.append(_Worker(context, collector))
            for worker in workers:  # give out work to the idle
                if worker.asked is not None:
                    continue
                if queue:
                    worker.ask("read", queue.pop(0), units)
                elif not plans and len(summaries) + len(failures) == len(units) and summaries:
                    read = sorted(summaries)
                    plans.update(zip(read, planner([summaries[i] for i in read])))
                if plans and worker.asked is None:
                    mine = [i for i in worker.held if i not in results and i in plans]
                    if mine:
                        worker.ask("finish", mine[0], plans)
            if all(w.asked is None for w in workers) and not queue:
                if len(results) + len(failures) == len(units):
                    break
                if not plans and not summaries:  # every unit failed: nothing to plan
                    break
            for ready in wait([w.connection for w in workers if w.asked is not None]):
                worker = next(w for w in workers if w.connection is ready)
                index = worker.asked
                assert index is not None
                try:
                    kind, answer = worker.connection.recv()
                except (EOFError, OSError):
                    worker.close()
                    workers.remove(worker)
                    why = f"the worker process died (exit code {worker.process.exitcode})"
                    for lost in sorted({index, *worker.held} - set(results)):
                        failed(lost, why)
                    plans.clear()  # the units read again are planned again with the others
                    continue
                worker.asked = None
                if kind == "error":
                    worker.held.discard(index)
                    failed(index, answer)
                elif kind == "summary":
                    worker.held.add(index)
                    summaries[index] = answer
                    done_bytes += units[index].size
                    if progress is not None:
                        progress(len(summaries), len(units), done_bytes)
                else:
                    worker.held.discard(index)
                    results[index] = UnitResult(summaries[index], answer)
    except BaseException:
        for worker in workers:
            worker.process.terminate()
        raise
    finally:
        for worker in workers:
            worker.close()
    failures.sort(key=lambda failure: (failure.unit.point, failure.unit.partition))
    return [results[i] for i in sorted(results)], failures


class _Worker:
    """A local worker process and what the client knows of it."""

    def __init__(self, context: Any, collector: tuple[int, int, int]) -> None:
        self.connection, theirs = context.Pipe()
        self.process: BaseProcess = context.Process(target=serve_units, args=(theirs, collector), daemon=True)
        self.process.start()
        theirs.close()
        self.asked: int | None = None  # the unit it is reading or finishing
        self.held: set[int] = set()  # units read, not finished

    def ask(self, what: str, index: int, given: Any) -> None:
        try:
            self.connection.send((what, index, given[index]))
        except OSError:  # it died: waiting on it then finds its end of the pipe closed
            pass
        self.asked = index

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.connection.send(("stop", -1, None))
            except OSError:
                pass
        self.connection.close()
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


def serve_units(connection: Connection, collector: tuple[int, int, int] | None = None) -> None:
    """A local worker process: read the units it is given, holding each one's state; finish
    each when given its plan; stop when told. `collector`: the client's gc thresholds."""
    if collector is not None:
        gc.set_threshold(*collector)
    states: dict[int, UnitState] = {}
    while True:
        try:
            what, index, given = connection.recv()
        except (EOFError, OSError):
            return
        if what == "stop":
            return
        try:
            if what == "read":
                states[index] = read_unit(given)
                connection.send(("summary", states[index].summary))
            else:
                connection.send(("finish", finish_unit(states.pop(index), given)))
        except Exception as error:  # noqa: BLE001  # any fault of a unit is reported, the others go on
            states.pop(index, None)
            connection.send(("error", _describe(error)))


def start_workers() -> None:
    """Start the forkserver the local workers are forked from, with the analysis imported once
    there, not in each worker; the main module too, which each worker would otherwise import
    again (multiprocessing's spawn preparation). Called early, its start-up overlaps the
    client's own."""
    multiprocessing.set_forkserver_preload(["__main__", "bitstrace.analyzer.partition"])
    forkserver.ensure_running()


def _readable(paths: Sequence[str]) -> list[tuple[str, str]]:
    """On a worker: the paths it cannot open, with why."""
    missing = []
    for path in paths:
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            missing.append((path, error.strerror or str(error)))
    return missing


def _sees(path: str, token: str) -> str | None:
    """On a worker: why the --extract directory is not the one the client made, or None."""
    try:
        with open(os.path.join(path, token), encoding="ascii") as probe:
            return None if probe.read() == token else "holds another probe file"
    except OSError as error:
        return f"cannot see the client's probe file in it ({error.strerror or error}): not shared storage"


def dask_client(address: str) -> Any:
    try:
        from distributed import Client
    except ImportError as error:
        raise EngineError("--dask needs the optional extra: pip install 'bitstrace[dask]'") from error
    try:
        return Client(address, timeout=10, set_as_default=False)  # type: ignore[no-untyped-call]  # distributed's Client is not annotated
    except (OSError, TimeoutError) as error:
        raise EngineError(f"cannot reach the Dask scheduler at {address}: {error}") from error


def dask_threads(client: Any) -> int:
    """Threads over all workers: the partitions a capture point is split into."""
    threads: dict[str, int] = client.nthreads()
    return max(1, sum(threads.values()))


def check_dask_workers(client: Any, files: Sequence[str], extract_dir: str | None) -> None:
    """Every worker must open every capture (and see the --extract directory): else EngineError
    naming the worker and the path."""
    problems: list[str] = []
    for worker, missing in sorted(client.run(_readable, list(files)).items()):
        problems.extend(f"Dask worker {worker} cannot open {path}: {why}" for path, why in missing)
    if extract_dir is not None:
        token = f".bitstrace-probe-{uuid.uuid4().hex}"
        probe = os.path.join(extract_dir, token)
        with open(probe, "w", encoding="ascii") as out:
            out.write(token)
        try:
            for worker, why in sorted(client.run(_sees, extract_dir, token).items()):
                if why is not None:
                    problems.append(f"Dask worker {worker}: --extract directory {extract_dir} {why}")
        finally:
            os.unlink(probe)
    if problems:
        raise EngineError("; ".join(problems))


def run_dask(client: Any, units: Sequence[Unit], planner: Planner,
             progress: UnitProgress | None = None) -> tuple[list[UnitResult], list[Failure]]:
    """The units as Dask tasks: `read_unit` leaves each unit's state in its worker's memory,
    the client gathers only the summaries, plans, and `finish_unit` runs beside the state
    (Dask places a task where its input is). A task that raises is retried once; one whose
    worker dies is rescheduled by the scheduler (its `allowed-failures`: the state is computed
    again from the unit), then fails."""
    from distributed import as_completed

    run = uuid.uuid4().hex[:12]
    states = [client.submit(read_unit, unit, key=f"bits-unit-{run}-{i}", pure=False, retries=ATTEMPTS - 1)
              for i, unit in enumerate(units)]
    asked = [client.submit(unit_summary, state, key=f"bits-summary-{run}-{i}", pure=False)
             for i, state in enumerate(states)]
    index = {future.key: i for i, future in enumerate(asked)}
    summaries: dict[int, UnitSummary] = {}
    results: dict[int, UnitResult] = {}
    failures: list[Failure] = []
    done_bytes = 0
    try:
        for future in as_completed(asked, loop=client.loop):  # type: ignore[no-untyped-call]  # distributed's as_completed is not annotated
            i = index[future.key]
            try:
                summaries[i] = future.result()
            except Exception as error:  # the task's own error, or KilledWorker
                failures.append(Failure(units[i], _describe(error)))
                states[i].release()
                continue
            finally:
                future.release()
            done_bytes += units[i].size
            if progress is not None:
                progress(len(summaries), len(units), done_bytes)
        read = sorted(summaries)
        plans = dict(zip(read, planner([summaries[i] for i in read])))
        finishing = {client.submit(finish_unit, states[i], plans[i], key=f"bits-finish-{run}-{i}", pure=False): i
                     for i in read}
        by_key = {future.key: i for future, i in finishing.items()}
        for future in as_completed(list(finishing), loop=client.loop):  # type: ignore[no-untyped-call]  # not annotated, as above
            i = by_key[future.key]
            try:
                results[i] = UnitResult(summaries[i], future.result())
            except Exception:  # noqa: BLE001  # once more from the start: finish_unit changes the state it is given
                again = client.submit(run_unit, units[i], _KnownPlan(plans[i]), key=f"bits-again-{run}-{i}", pure=False)
                try:
                    results[i] = again.result()
                except Exception as error:
                    failures.append(Failure(units[i], _describe(error)))
                finally:
                    again.release()
            finally:
                future.release()
                states[i].release()
    except BaseException:
        client.cancel([*states, *asked], force=True)
        raise
    failures.sort(key=lambda failure: (failure.unit.point, failure.unit.partition))
    return [results[i] for i in sorted(results)], failures


class _KnownPlan:
    """A unit's plan, already made, for run_unit (picklable: it travels to a Dask worker)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def __call__(self, summary: UnitSummary) -> Plan:
        return self.plan
