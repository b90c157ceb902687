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

Local processes are forked from a forkserver started early (`start_workers`) with the
analysis and the main module imported once there; each unit has its process, which holds it
between the rounds (idle then, not counted against --jobs).
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

from bitstrace.analyzer.partition import (Failure, Plan, Planner, Unit, UnitResult, UnitSummary, finish_unit,
                                          read_unit, run_unit, unit_summary)

#: progress(units done, units in all, bytes read by the units done)
UnitProgress = Callable[[int, int, int], None]
ATTEMPTS = 2  # a failed unit runs once more


class EngineError(Exception):
    """The engine cannot run the units at all (no cluster, a worker without the files)."""


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def run_local(units: Sequence[Unit], jobs: int, planner: Planner,
              progress: UnitProgress | None = None) -> tuple[list[UnitResult], list[Failure]]:
    """The units in local processes, at most `jobs` of them working at a time. Each unit's
    process answers its summary, holds the unit while the others read (idle, it does not count
    against `jobs`), is sent its plan and answers the rest."""
    start_workers()
    context = multiprocessing.get_context("forkserver")
    collector = gc.get_threshold()  # the workers collect as this process does (bits-analyze sets it)
    attempts = dict.fromkeys(range(len(units)), 0)
    queue = list(range(len(units)))
    summaries: dict[int, UnitSummary] = {}
    results: dict[int, UnitResult] = {}
    failures: list[Failure] = []
    plans: dict[int, Plan] | None = None
    workers: dict[int, tuple[BaseProcess, Connection]] = {}
    held: list[int] = []  # read, waiting for the plan
    busy: set[int] = set()  # reading or finishing
    done_bytes = 0

    def start(index: int) -> None:
        mine, theirs = context.Pipe()
        process = context.Process(target=serve_unit, args=(units[index], theirs, collector), daemon=True)
        process.start()
        theirs.close()
        workers[index] = (process, mine)
        busy.add(index)

    def end(index: int, error: str | None) -> None:
        process, connection = workers.pop(index)
        connection.close()
        process.join(5)
        busy.discard(index)
        if error is None:
            return
        attempts[index] += 1
        if attempts[index] < ATTEMPTS:
            queue.append(index)
        else:
            failures.append(Failure(units[index], error))

    try:
        while queue or workers:
            while queue and len(busy) < jobs:
                start(queue.pop(0))
            if plans is None and not queue and not busy:  # every unit read (or failed): plan
                read = sorted(summaries)
                plans = dict(zip(read, planner([summaries[i] for i in read])))
            if plans is not None:
                while held and len(busy) < jobs:  # a unit read again (a retry) keeps its first plan
                    index = held.pop(0)
                    workers[index][1].send(plans[index])
                    busy.add(index)
            if not busy:
                continue
            owners = {id(workers[i][1]): i for i in busy}
            for ready in wait([workers[i][1] for i in busy]):
                index = owners[id(ready)]
                try:
                    kind, answer = workers[index][1].recv()
                except (EOFError, OSError):
                    process = workers[index][0]
                    process.join(5)
                    end(index, f"the worker process died (exit code {process.exitcode})")
                    continue
                if kind == "error":
                    end(index, answer)
                elif kind == "summary":
                    busy.discard(index)
                    if index not in summaries:
                        summaries[index] = answer
                        done_bytes += units[index].size
                        if progress is not None:
                            progress(len(summaries), len(units), done_bytes)
                    held.append(index)
                    held.sort()
                else:
                    results[index] = UnitResult(summaries[index], answer)
                    end(index, None)
    except BaseException:
        for process, _ in workers.values():
            if process.is_alive():
                process.terminate()
        for process, _ in workers.values():
            process.join(5)
        raise
    failures.sort(key=lambda failure: (failure.unit.point, failure.unit.partition))
    return [results[i] for i in sorted(results)], failures


def serve_unit(unit: Unit, connection: Connection, collector: tuple[int, int, int] | None = None) -> None:
    """A local worker process: read the unit, answer its summary, take the plan, answer the rest.
    `collector`: the garbage collector's thresholds (gc.set_threshold) of the client."""
    if collector is not None:
        gc.set_threshold(*collector)
    try:
        state = read_unit(unit)
        connection.send(("summary", state.summary))
        plan = connection.recv()
        connection.send(("finish", finish_unit(state, plan)))
    except Exception as error:  # noqa: BLE001  # any fault of a unit is reported, the others go on
        connection.send(("error", _describe(error)))
    finally:
        connection.close()


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
