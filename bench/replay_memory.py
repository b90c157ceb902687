"""bits-replay's peak memory on a capture of many small sessions (issue 13: under 150 MB on
bench/data/many.pcap, 2,000 sessions, 132,000 requests).

    .venv/bin/python bench/replay_memory.py [CAPTURE]        (default bench/data/many.pcap)

Prints the peak RSS (GNU time %M, the bits-replay process alone) and the wall time of
`bits-replay --dry-run --json` and of a real `--speed 0 --json` replay against a bits-server
on 127.0.0.1 (its own process, port 0, a scratch root), and the real replay's summary.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
GNU_TIME = "/usr/bin/time"


def measured(command: list[str], out_path: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `command`, its stdout to `out_path`."""
    with open(out_path, "wb") as out, tempfile.NamedTemporaryFile("r") as report:
        started = time.monotonic()
        subprocess.run([GNU_TIME, "-f", "%M", "-o", report.name, *command], stdout=out,
                       stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, check=True)
        seconds = time.monotonic() - started
        return int(report.read().split()[-1]) / 1024, seconds


def main() -> int:
    capture = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "data" / "many.pcap"
    if not capture.exists():
        print(f"bench/replay_memory.py: {capture} is missing; make it with "
              "sudo .venv/bin/python bench/make_captures.py", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bits-replay-memory-") as scratch:
        output = Path(scratch) / "out.json"
        rss, seconds = measured([str(BIN / "bits-replay"), str(capture), "--dry-run", "--json",
                                 "--target", "http://127.0.0.1:9/"], output)
        print(f"bits-replay --dry-run --json {capture.name}: peak {rss:.0f} MiB, {seconds:.1f} s")
        server = subprocess.Popen([str(BIN / "bits-server"), "--root", str(Path(scratch) / "root"),
                                   "--host", "127.0.0.1", "--port", "0", "--quiet"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        try:
            assert server.stdout is not None
            url = server.stdout.readline().rsplit(" ", 1)[-1].strip()
            if not url.startswith("http://"):
                raise RuntimeError(f"bits-server did not start: {url!r}")
            rss, seconds = measured([str(BIN / "bits-replay"), str(capture), "--target", url,
                                     "--speed", "0", "--json", "--no-progress"], output)
        finally:
            server.terminate()
            server.wait(timeout=10)
        summary = json.loads(output.read_text())["summary"]
        print(f"bits-replay --speed 0 --json {capture.name} to bits-server on 127.0.0.1: "
              f"peak {rss:.0f} MiB, {seconds:.1f} s; {summary['sessions']} sessions, "
              f"{summary['packets_sent']} requests sent, {summary['faults']} faults, "
              f"{summary['differences']} differences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
