"""Where the units of a partitioned run (partition.py) run: local processes, or a Dask cluster.

Each engine takes the units and returns their results and the units that failed twice. A unit
that raises, or whose process dies, is run once more; a second failure is a `Failure` (the
merge reports it as a located problem and the rest of the report is written). Ctrl-C stops
every worker: the local processes are terminated, the Dask futures cancelled.

Dask (`--dask ADDRESS`, the optional extra `bitstrace[dask]`) is the only engine past one
machine. Its workers read the capture paths themselves, so the paths must name the same files
on every worker (shared storage); `check_dask_workers` asks every worker before the run and
names the worker and the path it cannot open. What crosses the network is a unit's
description (paths, partition, options) one way and its compact result the other.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence

from bitstrace.analyzer.partition import Failure, Unit, UnitResult, run_unit

#: progress(units done, units in all, bytes read by the units done)
UnitProgress = Callable[[int, int, int], None]
ATTEMPTS = 2  # a failed unit runs once more


class EngineError(Exception):
    """The engine cannot run the units at all (no cluster, a worker without the files)."""


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def run_local(units: Sequence[Unit], jobs: int, progress: UnitProgress | None = None) -> tuple[list[UnitResult], list[Failure]]:
    """The units in `jobs` local processes."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bitstrace.analyzer.partition"])
    results: dict[int, UnitResult] = {}
    failures: list[Failure] = []
    attempts = dict.fromkeys(range(len(units)), 0)
    done_bytes = 0
    pending = list(range(len(units)))
    while pending:
        pool = ProcessPoolExecutor(max_workers=max(1, min(jobs, len(pending))), mp_context=context)
        try:
            futures: dict[Future[UnitResult], int] = {pool.submit(run_unit, units[i]): i for i in pending}
            pending = []
            waiting = set(futures)
            while waiting:
                finished, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = futures[future]
                    try:
                        results[index] = future.result()
                    except (Exception, BrokenProcessPool) as error:  # noqa: B014  # a worker that died breaks the pool
                        attempts[index] += 1
                        if attempts[index] < ATTEMPTS:
                            pending.append(index)
                        else:
                            failures.append(Failure(units[index], _describe(error)))
                        continue
                    done_bytes += units[index].size
                    if progress is not None:
                        progress(len(results), len(units), done_bytes)
        except BaseException:
            _stop(pool)
            raise
        pool.shutdown(wait=True)
        pending.sort()
    failures.sort(key=lambda failure: (failure.unit.point, failure.unit.partition))
    return [results[i] for i in sorted(results)], failures


def _stop(pool: ProcessPoolExecutor) -> None:
    """Terminate every worker process of the pool (Ctrl-C, or a fault of our own)."""
    processes = list(getattr(pool, "_processes", {}).values())  # the executor offers no terminate
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(5)


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
        return Client(address, timeout=10, set_as_default=False)
    except (OSError, TimeoutError) as error:
        raise EngineError(f"cannot reach the Dask scheduler at {address}: {error}") from error


def dask_threads(client: Any) -> int:
    """Threads over all workers: the partitions a capture point is split into."""
    return max(1, sum(client.nthreads().values()))


def check_dask_workers(client: Any, files: Sequence[str], extract_dir: str | None) -> None:
    """Every worker must open every capture (and see the --extract directory): else EngineError
    naming the worker and the path."""
    problems = []
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


def run_dask(client: Any, units: Sequence[Unit], progress: UnitProgress | None = None) -> tuple[list[UnitResult], list[Failure]]:
    """The units as Dask tasks. A task that raises is retried once (`retries=1`); one whose
    worker dies is rescheduled by the scheduler (its `allowed-failures`), then fails."""
    from distributed import as_completed

    run = uuid.uuid4().hex[:12]
    futures = [client.submit(run_unit, unit, key=f"bits-unit-{run}-{i}", pure=False, retries=ATTEMPTS - 1)
               for i, unit in enumerate(units)]
    index = {future.key: i for i, future in enumerate(futures)}
    results: dict[int, UnitResult] = {}
    failures: list[Failure] = []
    done_bytes = 0
    try:
        for future in as_completed(futures, loop=client.loop):
            i = index[future.key]
            try:
                results[i] = future.result()
            except Exception as error:  # the task's own error, or KilledWorker
                failures.append(Failure(units[i], _describe(error)))
                continue
            finally:
                future.release()
            done_bytes += units[i].size
            if progress is not None:
                progress(len(results), len(units), done_bytes)
    except BaseException:
        client.cancel(futures, force=True)
        raise
    failures.sort(key=lambda failure: (failure.unit.point, failure.unit.partition))
    return [results[i] for i in sorted(results)], failures
