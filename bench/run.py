"""The benchmark: bits-analyze against tshark's HTTP pass and a plain read, on the same captures.

    .venv/bin/python bench/run.py [CAPTURE ...] [--runs 3] [--skip TOOL ...]     (or: make bench)

Default captures: bench/data/{small,large,many}.pcap, made by bench/make_captures.py. For each
capture the tools run in turn, round after round (so a slow spell of the shared machine hits
them all alike), and the table gives the median wall time, frames/s, MB/s, the peak RSS of the
process (ru_maxrss from wait4, so only that process) and the ratios to tshark and to the read.

Tools:
- read:     `cat CAPTURE > /dev/null`, warm cache: the floor.
- walk:     bench/record_walk.py: a Python loop that only walks the pcap records (one
            struct.unpack_from each, nothing else): the floor of any pure-Python per-packet loop.
- analyze:  `bits-analyze CAPTURE` (the full BITS text report, to /dev/null).
- json:     `bits-analyze --json - CAPTURE` (the JSON report instead of the text, to /dev/null).
- extract:  the same with `--extract DIR` (every uploaded file rebuilt; DIR emptied between runs).
- write:    `cp CAPTURE DIR`: writing about as many bytes as extraction writes, the yardstick
            for what --extract may add.
- tshark:   `tshark -n -q -r COPY -z http,tree`, TCP reassembly and HTTP body reassembly on (the
            defaults, stated on the command line). tshark 4.0 does not take BITS_POST for an
            HTTP method, so on the capture as recorded it would skip every request and its body;
            COPY is the capture with `BITS_POST /` rewritten to the same-length `PROPPATCH /`
            (as tests/analyzer/test_oracle.py does), so tshark parses every request and reassembles every
            body, the same work bits-analyze does. The copy is made once, outside the timing.

Then `bits-replay --speed 0` sends the sessions of small.pcap to a `bits-server` on 127.0.0.1
(its own process, port 0, a scratch root), at --concurrency 1, 2 and 4, and the table gives the
fragment bytes sent per second of sending (first session start to last session end, from
bits-replay's JSON, so reading the capture is not counted). --skip replay leaves it out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data"
DEFAULT_CAPTURES = ("small", "large", "many")
TOOLS = ("read", "walk", "analyze", "json", "extract", "write", "tshark")
REPLAY_CONCURRENCY = (1, 2, 4)
TSHARK_OPTIONS = ["-o", "tcp.desegment_tcp_streams:TRUE", "-o", "http.desegment_headers:TRUE",
                  "-o", "http.desegment_body:TRUE"]
REWRITE = (b"BITS_POST /", b"PROPPATCH /")
GNU_TIME = "/usr/bin/time"


@dataclass
class Measurement:
    seconds: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)  # bytes

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def run_once(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one run of `command`, its output thrown away.

    The command runs under GNU time (`-f %M`, peak RSS of that process alone): Linux carries a
    parent's peak RSS across fork and exec, so wait4() on a child of this Python process would
    report at least this process's own peak.
    """
    with tempfile.NamedTemporaryFile("r") as rss_file:
        started = time.perf_counter()
        done = subprocess.run([GNU_TIME, "-f", "%M", "-o", rss_file.name, *command], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - started
        peak_kib = int(rss_file.read().split()[-1])
    # bits-analyze exits 3 for an incomplete capture, which is still a full run
    if done.returncode not in (0, 3):
        raise RuntimeError(f"{command[0]} exited {done.returncode}:\n{done.stderr.decode(errors='replace')[-2000:]}")
    return elapsed, peak_kib * 1024


def rewritten_copy(capture: Path, directory: Path) -> Path:
    """The capture with BITS_POST requests renamed PROPPATCH, for tshark's HTTP dissector."""
    copy = directory / f"proppatch-{capture.name}"
    old, new = REWRITE
    overlap = len(old) - 1
    with open(capture, "rb") as source, open(copy, "wb") as out:
        carry = b""
        while block := source.read(1 << 22):
            data = (carry + block).replace(old, new)
            # keep a tail that may hold the start of a match cut by the block boundary
            carry, data = data[-overlap:], data[:-overlap]
            out.write(data)
        out.write(carry)
    return copy


def frames_in(capture: Path, manifest: dict) -> int:
    entry = manifest.get(capture.stem)
    if entry and entry.get("bytes") == capture.stat().st_size:
        return entry["packets"]
    from bitstrace.analyzer.capture import CaptureReader  # a capture not made by make_captures.py
    return sum(1 for _ in CaptureReader(capture))


def bench(capture: Path, tools: list[str], runs: int, scratch: Path) -> dict[str, Measurement]:
    analyze = str(ROOT / ".venv" / "bin" / "bits-analyze")
    extract_dir = scratch / "extract"
    commands: dict[str, list[str]] = {
        "read": ["cat", str(capture)],
        "walk": [sys.executable, str(HERE / "record_walk.py"), str(capture)],
        "analyze": [analyze, "--no-progress", str(capture)],
        "json": [analyze, "--no-progress", "--json", "-", str(capture)],
        "extract": [analyze, "--no-progress", "--extract", str(extract_dir), str(capture)],
        "write": ["cp", str(capture), str(extract_dir)],
    }
    if "tshark" in tools:
        copy = rewritten_copy(capture, scratch)
        commands["tshark"] = ["tshark", "-n", "-q", *TSHARK_OPTIONS, "-r", str(copy), "-z", "http,tree"]
    results = {tool: Measurement() for tool in tools}
    run_once(commands["read"])  # warm the page cache
    for round_number in range(1, runs + 1):
        for tool in tools:
            if tool in ("extract", "write"):
                shutil.rmtree(extract_dir, ignore_errors=True)
                extract_dir.mkdir()
            seconds, rss = run_once(commands[tool])
            results[tool].seconds.append(seconds)
            results[tool].peak_rss.append(rss)
            print(f"  {capture.name} round {round_number}: {tool} {seconds:.2f} s, "
                  f"{rss / 1e6:.0f} MB", file=sys.stderr, flush=True)
    shutil.rmtree(extract_dir, ignore_errors=True)
    return results


def targets(large: dict[str, Measurement], small: dict[str, Measurement] | None) -> list[str]:
    """Issue 6's targets, on the large capture."""
    lines = ["targets (issue 6), large capture:"]

    def line(name: str, value: str, met: bool) -> None:
        lines.append(f"  {'met    ' if met else 'NOT met'}  {name}: {value}")

    analyze = large["analyze"].median
    if "tshark" in large:
        ratio = large["tshark"].median / analyze
        line("bits-analyze >= 15x faster than tshark's HTTP pass", f"{ratio:.1f}x", ratio >= 15)
    if "read" in large:
        ratio = analyze / large["read"].median
        line("bits-analyze within 10x of a plain read", f"{ratio:.1f}x", ratio <= 10)
    if "walk" in large and "tshark" in large and "read" in large:
        walk = large["walk"].median
        lines.append(f"  (floor of a Python per-packet loop, the bare record walk: {walk:.2f} s, that is "
                     f"{large['tshark'].median / walk:.1f}x tshark and {walk / large['read'].median:.1f}x the read)")
    peak = max(large["analyze"].peak_rss)
    line("peak memory < 150 MB", f"{peak / 1e6:.0f} MB", peak < 150e6)
    if small is not None:
        growth = peak / max(small["analyze"].peak_rss) - 1
        line("memory flat: large within 20% of small", f"{growth:+.0%}", abs(growth) <= 0.20)
    if "extract" in large and "write" in large:
        added = large["extract"].median - analyze
        line("--extract adds no more than writing the files", f"+{added:.2f} s, writing "
             f"{large['write'].median:.2f} s", added <= large["write"].median)
    return lines


def table(capture: Path, frames: int, results: dict[str, Measurement]) -> list[str]:
    size = capture.stat().st_size
    read = results.get("read")
    tshark = results.get("tshark")
    lines = [f"{capture.name}: {size / 1e6:,.0f} MB, {frames:,} frames",
             f"  {'tool':<8} {'median s':>9} {'runs (s)':<24} {'frames/s':>11} {'MB/s':>8} "
             f"{'peak RSS':>9} {'tshark/x':>9} {'x/read':>8}"]
    for tool, m in results.items():
        runs = " ".join(f"{s:.2f}" for s in m.seconds)
        vs_tshark = f"{tshark.median / m.median:.1f}x" if tshark else "-"
        vs_read = f"{m.median / read.median:.1f}x" if read else "-"
        lines.append(f"  {tool:<8} {m.median:>9.2f} {runs:<24} {frames / m.median:>11,.0f} "
                     f"{size / 1e6 / m.median:>8,.0f} {max(m.peak_rss) / 1e6:>7,.0f}MB "
                     f"{vs_tshark:>9} {vs_read:>8}")
    return lines


def replay(capture: Path, runs: int, scratch: Path) -> dict[int, list[float]]:
    """Fragment MB/s of `bits-replay --speed 0` against bits-server, per concurrency."""
    bin_dir = ROOT / ".venv" / "bin"
    server = subprocess.Popen([str(bin_dir / "bits-server"), "--root", str(scratch / "root"), "--host", "127.0.0.1",
                               "--port", "0", "--quiet"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    results: dict[int, list[float]] = {n: [] for n in REPLAY_CONCURRENCY}
    try:
        url = server.stdout.readline().rsplit(" ", 1)[-1].strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"bits-server did not start: {url!r}")
        for round_number in range(1, runs + 1):
            for concurrency in REPLAY_CONCURRENCY:
                done = subprocess.run([str(bin_dir / "bits-replay"), str(capture), "--target", url, "--speed", "0",
                                       "--concurrency", str(concurrency), "--no-progress", "--json"],
                                      stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True)
                report = json.loads(done.stdout)
                sessions = report["sessions"]
                if report["summary"]["faults"]:
                    raise RuntimeError(f"bits-replay reported faults: {report['summary']}")
                span = max(s["ended_s"] for s in sessions) - min(s["started_s"] for s in sessions)
                rate = report["summary"]["bytes_sent"] / span / 1e6
                results[concurrency].append(rate)
                print(f"  replay round {round_number}: concurrency {concurrency} {rate:.0f} MB/s",
                      file=sys.stderr, flush=True)
                shutil.rmtree(scratch / "root" / "uploads", ignore_errors=True)
    finally:
        server.terminate()
        server.wait(timeout=10)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("captures", nargs="*", type=Path,
                        help="captures to measure (default: small, large and many from bench/data)")
    parser.add_argument("--runs", type=int, default=3, help="rounds per capture (default 3)")
    parser.add_argument("--skip", nargs="+", choices=(*TOOLS, "replay"), default=[], help="tools to leave out")
    parser.add_argument("--json", type=Path, help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    captures = args.captures or [DATA / f"{name}.pcap" for name in DEFAULT_CAPTURES
                                 if (DATA / f"{name}.pcap").is_file()]
    if not captures:
        parser.exit(2, "bench/run.py: no captures; make them first: sudo .venv/bin/python "
                       "bench/make_captures.py\n")
    if not os.access(GNU_TIME, os.X_OK):
        parser.exit(2, f"bench/run.py: needs GNU time at {GNU_TIME} (Debian package: time)\n")
    tools = [tool for tool in TOOLS if tool not in args.skip]
    if "tshark" in tools and shutil.which("tshark") is None:
        print("bench/run.py: tshark not found; leaving it out", file=sys.stderr)
        tools.remove("tshark")
    manifest_path = DATA / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    report, raw = [], {}
    measured: dict[str, dict[str, Measurement]] = {}
    for capture in captures:
        with tempfile.TemporaryDirectory(prefix="bits-bench-", dir=capture.parent) as scratch:
            results = bench(capture, tools, args.runs, Path(scratch))
        frames = frames_in(capture, manifest)
        measured[capture.name] = results
        report += table(capture, frames, results) + [""]
        raw[capture.name] = {"bytes": capture.stat().st_size, "frames": frames,
                             **{tool: {"seconds": m.seconds, "peak_rss": m.peak_rss}
                                for tool, m in results.items()}}
    replay_source = DATA / "small.pcap"
    if "replay" not in args.skip and replay_source.is_file():
        with tempfile.TemporaryDirectory(prefix="bits-bench-replay-", dir=DATA) as scratch:
            rates = replay(replay_source, args.runs, Path(scratch))
        report.append(f"bits-replay --speed 0 of {replay_source.name} against bits-server on 127.0.0.1 "
                      f"(fragment MB/s while sending)")
        for concurrency, values in rates.items():
            report.append(f"  --concurrency {concurrency}: median {statistics.median(values):,.0f} MB/s  "
                          f"(runs: {' '.join(f'{v:.0f}' for v in values)})")
        report.append("")
        raw["replay"] = {str(n): v for n, v in rates.items()}
    if "large.pcap" in measured and "analyze" in measured["large.pcap"]:
        small = measured.get("small.pcap")
        report += targets(measured["large.pcap"], small if small and "analyze" in small else None) + [""]
    print("\n".join(report))
    print("peak RSS: of the process alone (GNU time %M); tshark/x: how many times faster than tshark; "
          "x/read: how many times the plain read's time")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
