"""Makes the benchmark captures: real BITS uploads over kernel TCP, recorded with tcpdump.

    sudo .venv/bin/python bench/make_captures.py [--only large small many] [--large-sessions N] ...

Three captures go to bench/data/ (git-ignored; never commit them):
- large.pcap: SESSIONS uploads (default 200) of 8 fragments of 1 MiB, --parallel at a time,
  each on its own connection: about 1.8 GB, 1.5 M packets (the issue's reference traffic).
- small.pcap: the same traffic with a tenth of the sessions (about 180 MB), to show that
  memory stays flat as the file grows.
- many.pcap: many small requests (1 KiB fragments), which makes the per-packet and per-message
  cost show rather than the per-byte cost.
Like captures/make_captures.py, everything runs in a private network namespace whose loopback
has an Ethernet MTU (1500) and no segmentation offload, so segments are Ethernet-sized. File
contents are seeded pseudo-random bytes (the same on every run); session ids, ports and
timestamps differ. bench/data/manifest.json records what each capture holds.
Needs root, tcpdump and iproute2.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitstrace.replay.client import BitsClient  # noqa: E402
from bitstrace.replay.server import BitsServer  # noqa: E402
from captures.netns import run_in_namespace, wait_for  # noqa: E402
from captures.seeded_file import write_seeded_file  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
MANIFEST = "manifest.json"
MIB = 1 << 20
#: tcpdump's kernel buffer: a Python client on loopback outruns the default 2 MiB.
BUFFER_KIB = 1024 * 1024
SETTLE = 1.0  # for the last FIN/ACKs to reach the capture before it stops
ATTEMPTS = 3


@dataclass(frozen=True)
class Shape:
    """One capture's traffic: `sessions` uploads of `fragments` fragments of `fragment_size`."""

    name: str
    sessions: int
    fragments: int
    fragment_size: int
    parallel: int

    @property
    def file_size(self) -> int:
        return self.fragments * self.fragment_size


class PacketsLost(RuntimeError):
    """tcpdump dropped packets: the capture is retaken."""


def _upload(job: tuple[str, str, int]) -> None:
    """One session: Create, the fragments, Close, on one connection of its own."""
    url, path, fragment_size = job
    client = BitsClient(url, timeout=60.0)
    try:
        client.upload(path, fragment_size=fragment_size)
    finally:
        client.disconnect()


def record(shape: Shape, out: Path, workers: multiprocessing.pool.Pool) -> dict:
    """Run `shape`'s uploads against a fresh bits-server while tcpdump writes `out`."""
    with tempfile.TemporaryDirectory(prefix=f"bits-bench-{shape.name}-", dir=out.parent) as tmp:
        source = Path(tmp) / "upload.bin"
        write_seeded_file(source, shape.file_size, seed=6)
        server = BitsServer(Path(tmp) / "root", log=None).start()
        port = server.address[1]
        # --immediate-mode: packets reach tcpdump at once (else the last ring block can be lost at
        # SIGINT); no -U: it writes whole buffers to the file, which keeps up with the client.
        recorder = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-n", "--immediate-mode", "-Z", "root", "-B", str(BUFFER_KIB), "-w", str(out),
             f"tcp port {port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started = time.monotonic()
        try:
            wait_for(recorder, "listening on")
            jobs = [(f"{server.url}uploads/{shape.name}-{index:05d}.bin", str(source), shape.fragment_size)
                    for index in range(shape.sessions)]
            workers.map(_upload, jobs, chunksize=1)
            time.sleep(SETTLE)
            recorder.send_signal(signal.SIGINT)
            _, tail = recorder.communicate(timeout=60)
        finally:
            if recorder.poll() is None:
                recorder.kill()
                recorder.wait()
            server.stop()
        elapsed = time.monotonic() - started
    captured = re.search(r"(\d+) packets captured", tail)
    dropped = re.search(r"(\d+) packets dropped by kernel", tail)
    if captured is None or dropped is None or int(dropped.group(1)):
        raise PacketsLost(f"{out.name}: packets lost or tcpdump failed:\n{tail}")
    return {**asdict(shape), "file": out.name, "bytes": out.stat().st_size,
            "packets": int(captured.group(1)), "fragment_bytes": shape.sessions * shape.file_size,
            "seconds_to_record": round(elapsed, 1)}


def make(shapes: list[Shape], directory: Path) -> None:
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    parallel = max(shape.parallel for shape in shapes)
    # Client workers are separate processes (forked before the server's threads exist): one
    # Python process would serialise client and server on its GIL.
    with multiprocessing.get_context("fork").Pool(parallel) as workers:
        for shape in shapes:
            out = directory / f"{shape.name}.pcap"
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    entry = record(shape, out, workers)
                    break
                except PacketsLost as error:
                    out.unlink(missing_ok=True)
                    if attempt == ATTEMPTS:
                        raise
                    print(f"{error}; recording {shape.name} again", file=sys.stderr, flush=True)
            manifest[shape.name] = entry
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
            print(f"{out}: {entry['bytes'] / 1e6:,.0f} MB, {entry['packets']:,} packets, "
                  f"{shape.sessions} sessions, {entry['seconds_to_record']} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA, help="output directory (default: bench/data)")
    parser.add_argument("--only", nargs="+", choices=("large", "small", "many"), help="make only these")
    parser.add_argument("--large-sessions", type=int, default=200, help="sessions in large.pcap (default 200)")
    parser.add_argument("--small-sessions", type=int, default=20, help="sessions in small.pcap (default 20)")
    parser.add_argument("--many-sessions", type=int, default=2000, help="sessions in many.pcap (default 2000)")
    parser.add_argument("--parallel", type=int, default=2, help="uploads at a time (default 2)")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = [
        Shape("large", args.large_sessions, 8, MIB, args.parallel),
        Shape("small", args.small_sessions, 8, MIB, args.parallel),
        Shape("many", args.many_sessions, 64, 1024, args.parallel),
    ]
    shapes = [shape for shape in shapes if not args.only or shape.name in args.only]
    if not args.inside:
        if os.geteuid() != 0:
            parser.exit(2, "make_captures.py: needs root (network namespaces, packet capture)\n")
        args.out.mkdir(parents=True, exist_ok=True)
        forwarded = _without_out(sys.argv[1:] if argv is None else argv)
        return run_in_namespace(__file__, ["--out", str(args.out.resolve()), *forwarded], prefix="bitsbench")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    make(shapes, args.out)
    return 0


def _without_out(argv: list[str]) -> list[str]:
    """The command line minus --out and its value (the inner run gets the absolute path)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            kept.append(arg)
    return kept


if __name__ == "__main__":
    sys.exit(main())
