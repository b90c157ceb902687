"""The text report of many sessions (issue 13, item 3): seconds and peak RSS of bits-analyze's text
report against `--json -` on a capture of 30,000 one-fragment sessions.

    .venv/bin/python bench/report_scale.py [--sessions 30000] [--runs 1] [--capture FILE] [--code DIR]

The capture is captures/single-fragment.pcap's real session replicated with new session ids and
client ports (captures/replicate_session.py: 570,000 frames, 237 MB, about 9 MB gzip-compressed),
made in a scratch directory unless --capture names one (made there if missing). Each mode runs
`--runs` times, in turn; the table gives the median wall time, the median CPU time (user +
system: on a machine shared with other work it moves less than the wall time), the peak RSS of
the process (GNU time's %M) and the lines of output. --code runs another checkout's code instead of this
one's: DIR is a tree shaped like the installed package (DIR/bitstrace/{analyzer,replay,...}, as
.ci/typecheck links one in .venv/typecheck), put first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from captures.replicate_session import write_replicated  # noqa: E402

GNU_TIME = "/usr/bin/time"
MODES = {"text": [], "json": ["--json", "-"]}


def replicate(path: Path, sessions: int) -> None:
    started = time.perf_counter()
    frames = write_replicated(path, sessions)
    print(f"made {path}: {sessions:,} sessions, {frames:,} frames, {path.stat().st_size / 1e6:.1f} MB, "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr)


def run_once(arguments: list[str], code: Path | None) -> tuple[float, float, int, int]:
    """Wall seconds, CPU seconds, peak RSS (bytes) and lines written of one bits-analyze run."""
    environment = dict(os.environ)
    if code is not None:
        environment["PYTHONPATH"] = str(code) + os.pathsep + environment.get("PYTHONPATH", "")
    command = [str(ROOT / ".venv" / "bin" / "python"), "-m", "bitstrace.cli.analyze", "--no-progress", *arguments]
    with tempfile.NamedTemporaryFile("r") as rss, tempfile.TemporaryFile("w+b") as out:
        started = time.perf_counter()
        # cwd: outside the repository, so `bitstrace` comes from the install (or from --code)
        done = subprocess.run([GNU_TIME, "-f", "%U %S %M", "-o", rss.name, *command], stdin=subprocess.DEVNULL,
                              stdout=out, stderr=subprocess.PIPE, env=environment, cwd=tempfile.gettempdir())
        elapsed = time.perf_counter() - started
        if done.returncode not in (0, 3):
            raise RuntimeError(f"bits-analyze exited {done.returncode}:\n{done.stderr.decode(errors='replace')[-2000:]}")
        out.seek(0)
        lines = sum(block.count(b"\n") for block in iter(lambda: out.read(1 << 20), b""))
        user, system, peak_kib = rss.read().split()[-3:]
        return elapsed, float(user) + float(system), int(peak_kib) * 1024, lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--capture", type=Path, help="the replicated capture (made if missing)")
    parser.add_argument("--code", type=Path, help="run the code of this tree instead of the installed one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bits-report-scale-") as scratch:
        capture = args.capture or Path(scratch) / f"{args.sessions}-sessions.pcap.gz"
        if not capture.exists():
            replicate(capture, args.sessions)
        results: dict[str, list[tuple[float, float, int, int]]] = {mode: [] for mode in MODES}
        for round_number in range(1, args.runs + 1):
            for mode, options in MODES.items():
                seconds, cpu, rss, lines = run_once([*options, str(capture.resolve())], args.code)
                results[mode].append((seconds, cpu, rss, lines))
                print(f"  round {round_number}: {mode} {seconds:.1f} s ({cpu:.1f} s CPU), {rss / 1e6:.0f} MB, "
                      f"{lines:,} lines", file=sys.stderr, flush=True)
    print(f"{capture.name}: {args.sessions:,} sessions" + (f" (code: {args.code})" if args.code else ""))
    print(f"  {'report':<8} {'median s':>9} {'runs (s)':<24} {'CPU s':>7} {'peak RSS':>9} {'lines':>11}")
    for mode, runs in results.items():
        seconds = [run[0] for run in runs]
        print(f"  {mode:<8} {statistics.median(seconds):>9.1f} {' '.join(f'{s:.1f}' for s in seconds):<24} "
              f"{statistics.median(run[1] for run in runs):>7.1f} {max(run[2] for run in runs) / 1e6:>7.0f}MB "
              f"{runs[-1][3]:>11,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
