"""The benchmark: bits-analyze against tshark's HTTP pass and a plain read, on the same captures.

    .venv/bin/python bench/run.py [CAPTURE ...] [--runs 3] [--skip TOOL ...]     (or: make bench)

Default captures: bench/data/{small,large,many}.pcap, made by bench/make_captures.py. For each
capture the tools run in turn, round after round (so a slow spell of the shared machine hits
them all alike), and the table gives the median wall time, frames/s, MB/s, the peak RSS of the
process (ru_maxrss from wait4, so only that process) and the ratios to tshark and to the read.

Tools:
- read:     `cat CAPTURE > /dev/null`, warm cache: the floor.
- analyze:  `bits-analyze CAPTURE` (the full BITS text report, to /dev/null).
- extract:  the same with `--extract DIR` (every uploaded file rebuilt; DIR emptied between runs).
- tshark:   `tshark -n -q -r COPY -z http,tree`, TCP reassembly and HTTP body reassembly on (the
            defaults, stated on the command line). tshark 4.0 does not take BITS_POST for an
            HTTP method, so on the capture as recorded it would skip every request and its body;
            COPY is the capture with `BITS_POST /` rewritten to the same-length `PROPPATCH /`
            (as tests/test_oracle.py does), so tshark parses every request and reassembles every
            body, the same work bits-analyze does. The copy is made once, outside the timing.
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
TOOLS = ("read", "analyze", "extract", "tshark")
TSHARK_OPTIONS = ["-o", "tcp.desegment_tcp_streams:TRUE", "-o", "http.desegment_headers:TRUE",
                  "-o", "http.desegment_body:TRUE"]
REWRITE = (b"BITS_POST /", b"PROPPATCH /")


@dataclass
class Measurement:
    seconds: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)  # bytes

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def run_once(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one run of `command`, its output thrown away."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    errors = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    # bits-analyze exits 3 for an incomplete capture, which is still a full run
    if process.returncode not in (0, 3):
        raise RuntimeError(f"{command[0]} exited {process.returncode}:\n{errors[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024


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
    from analyzer.capture import CaptureReader  # a capture not made by make_captures.py
    return sum(1 for _ in CaptureReader(capture))


def bench(capture: Path, tools: list[str], runs: int, scratch: Path) -> dict[str, Measurement]:
    analyze = str(ROOT / ".venv" / "bin" / "bits-analyze")
    extract_dir = scratch / "extract"
    commands: dict[str, list[str]] = {
        "read": ["cat", str(capture)],
        "analyze": [analyze, "--no-progress", str(capture)],
        "extract": [analyze, "--no-progress", "--extract", str(extract_dir), str(capture)],
    }
    if "tshark" in tools:
        copy = rewritten_copy(capture, scratch)
        commands["tshark"] = ["tshark", "-n", "-q", *TSHARK_OPTIONS, "-r", str(copy), "-z", "http,tree"]
    results = {tool: Measurement() for tool in tools}
    run_once(commands["read"])  # warm the page cache
    for round_number in range(1, runs + 1):
        for tool in tools:
            if tool == "extract":
                shutil.rmtree(extract_dir, ignore_errors=True)
                extract_dir.mkdir()
            seconds, rss = run_once(commands[tool])
            results[tool].seconds.append(seconds)
            results[tool].peak_rss.append(rss)
            print(f"  {capture.name} round {round_number}: {tool} {seconds:.2f} s, "
                  f"{rss / 1e6:.0f} MB", file=sys.stderr, flush=True)
    return results


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("captures", nargs="*", type=Path,
                        help="captures to measure (default: small, large and many from bench/data)")
    parser.add_argument("--runs", type=int, default=3, help="rounds per capture (default 3)")
    parser.add_argument("--skip", nargs="+", choices=TOOLS, default=[], help="tools to leave out")
    parser.add_argument("--json", type=Path, help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    captures = args.captures or [DATA / f"{name}.pcap" for name in DEFAULT_CAPTURES
                                 if (DATA / f"{name}.pcap").is_file()]
    if not captures:
        parser.exit(2, "bench/run.py: no captures; make them first: sudo .venv/bin/python "
                       "bench/make_captures.py\n")
    tools = [tool for tool in TOOLS if tool not in args.skip]
    if "tshark" in tools and shutil.which("tshark") is None:
        print("bench/run.py: tshark not found; leaving it out", file=sys.stderr)
        tools.remove("tshark")
    manifest_path = DATA / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    report, raw = [], {}
    for capture in captures:
        with tempfile.TemporaryDirectory(prefix="bits-bench-", dir=capture.parent) as scratch:
            results = bench(capture, tools, args.runs, Path(scratch))
        frames = frames_in(capture, manifest)
        report += table(capture, frames, results) + [""]
        raw[capture.name] = {"bytes": capture.stat().st_size, "frames": frames,
                             **{tool: {"seconds": m.seconds, "peak_rss": m.peak_rss}
                                for tool, m in results.items()}}
    print("\n".join(report))
    print("peak RSS: ru_maxrss of the process; tshark/x: how many times faster than tshark; "
          "x/read: how many times the plain read's time")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
