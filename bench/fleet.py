"""The scale-out benchmark (issue 15): bits-analyze --jobs 1, --jobs 2 and --dask with two local
workers against tshark's HTTP pass, on the same bytes.

    .venv/bin/python bench/fleet.py [CAPTURE_OR_DIR ...] [--runs 3] [--skip tshark|dask]

Default input: bench/data/many.pcap (2,000 sessions of 64 small fragments: per-message work,
where partitions help most). Runs alternate (one of each tool per round) so a machine shared
with other work loads them alike; medians are printed with the load average. Peak memory is
the largest resident set of any process of the run (the parent and its workers: getrusage
RUSAGE_CHILDREN after each run, so each figure is measured in a fresh child of this script).
Nothing is written into the repository: tshark's rewritten copy goes to a temp directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import TSHARK_OPTIONS, rewritten_copy  # noqa: E402  # bench/run.py, beside this file

ROOT = HERE.parent
ANALYZE = str(ROOT / ".venv" / "bin" / "bits-analyze")
DASK = str(ROOT / ".venv" / "bin" / "dask")


_PROBE = """
import ctypes, os, resource, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: the run's orphans (the forkserver) are ours to wait for
def cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
t = time.perf_counter()
subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
wall = time.perf_counter() - t
own = cpu()
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, own, cpu() - own)
"""


def measured(command: list[str]) -> tuple[float, int, float, float]:
    """(wall seconds, peak RSS in MB of any process of the run, CPU seconds (user + sys) of the
    command's own process, of every other process of the run), measured in a fresh child that
    adopts and waits for the run's orphans (the forkserver and, through it, the workers)."""
    out = subprocess.run([sys.executable, "-c", _PROBE, *command], capture_output=True, text=True, check=True)
    wall, rss, own, others = out.stdout.split()
    return float(wall), int(rss) // 1024, float(own), float(others)


def start_cluster(directory: Path) -> tuple[str, list[subprocess.Popen]]:
    scheduler_file = directory / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    processes = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                                   "--scheduler-file", str(scheduler_file)], **quiet)]
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    for i in range(2):
        processes.append(subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                                           "--no-dashboard", "--name", f"bench{i}"], **quiet))
    from distributed import Client

    with Client(address, timeout=30) as client:
        client.wait_for_workers(2, timeout=60)
    return address, processes


def stop_cluster(processes: list[subprocess.Popen]) -> None:
    for process in reversed(processes):
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        process.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", default=[str(HERE / "data" / "many.pcap")])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[], choices=("tshark", "dask"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bits-fleet-") as scratch:
        tmp = Path(scratch)
        commands = {
            "--jobs 1": [ANALYZE, "-q", "--no-progress", "--jobs", "1", *args.inputs],
            "--jobs 2": [ANALYZE, "-q", "--no-progress", "--jobs", "2", *args.inputs],
        }
        cluster: list[subprocess.Popen] = []
        if "dask" not in args.skip:
            address, cluster = start_cluster(tmp)
            commands["--dask (2 workers)"] = [ANALYZE, "-q", "--no-progress", "--dask", address, *args.inputs]
        if "tshark" not in args.skip:
            files = [Path(p) for p in args.inputs]
            if len(files) == 1 and files[0].is_file():
                copy = rewritten_copy(files[0], tmp)
                commands["tshark HTTP"] = ["tshark", "-n", "-q", *TSHARK_OPTIONS, "-r", str(copy), "-z", "http,tree"]
        try:
            times: dict[str, list[float]] = {name: [] for name in commands}
            peaks: dict[str, list[int]] = {name: [] for name in commands}
            cpus: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
            loads = []
            for _ in range(args.runs):
                for name, command in commands.items():
                    wall, peak, own, others = measured(command)
                    times[name].append(wall)
                    peaks[name].append(peak)
                    cpus[name].append((own, others))
                loads.append(os.getloadavg()[0])
        finally:
            stop_cluster(cluster)
    base = statistics.median(times["--jobs 1"])
    print(f"inputs: {' '.join(args.inputs)}; {args.runs} alternating rounds; {os.cpu_count()} cores; "
          f"1-min load average after each round: {', '.join(f'{x:.1f}' for x in loads)}")
    print(f"{'run':22} {'median s':>9} {'runs':>14} {'speed-up':>9} {'peak RSS MB':>12} "
          f"{'CPU s: own':>11} {'others':>7} {'quiet est. s':>13}")
    quiet = {}
    for name in commands:
        own = statistics.median(c[0] for c in cpus[name])
        others = statistics.median(c[1] for c in cpus[name])
        # On an idle machine with a core per worker: the command's own CPU (start-up, merge,
        # report) plus the workers' share, as if they were evenly loaded (a lower bound).
        workers = 2 if name.startswith(("--jobs 2", "--dask")) else 1
        quiet[name] = own + others / workers
        median = statistics.median(times[name])
        runs = "–".join(f"{x:.2f}" for x in (min(times[name]), max(times[name])))
        print(f"{name:22} {median:9.2f} {runs:>14} {base / median:8.2f}x {max(peaks[name]):12,} "
              f"{own:11.2f} {others:7.2f} {quiet[name]:13.2f}")
    print(f"quiet-machine estimate, --jobs 2 against --jobs 1: {quiet['--jobs 1'] / quiet['--jobs 2']:.2f}x "
          "(Dask workers run in processes this script did not start: their CPU is not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
