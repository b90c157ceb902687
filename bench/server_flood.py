"""bits-server under a flood on 127.0.0.1: what it refuses, what it holds, how a legitimate client fares.

    .venv/bin/python bench/server_flood.py [--sessions 3000] [--slow 1100] [--pings 20]

Starts `bits-server` (default options) as a process of its own on a port picked at run time, then:
1. a session flood: `--sessions` Create-Session from one client on one keep-alive connection;
   prints how many were accepted and refused (the per-client cap) and the rate;
2. a connection flood: `--slow` connections that each send part of a head and then nothing
   (slowloris), held open; meanwhile `--pings` Pings from a legitimate client, each on a fresh
   connection, one every 0.1 s. Prints the server's descriptors and threads (from /proc) before and during the
   flood, the Ping latencies and failures, the server's CPU use during the flood, and the
   latency of a Ping sent right after the slow connections all close at once.
Everything is bounded in count and time (each step gives up after --limit seconds).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL_GUID = "{7df0354d-249b-430f-820d-3d2a9bef4931}"


def request(packet: str, target: str = "/flood/file.bin", extra: str = "") -> bytes:
    return (f"BITS_POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nBITS-Packet-Type: {packet}\r\n{extra}"
            f"Content-Length: 0\r\n\r\n").encode()


def read_status(sock: socket.socket, pending: bytearray) -> int:
    """The status of the next answer on `sock` (answers carry Content-Length: 0)."""
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        pending += chunk
    head, _, rest = bytes(pending).partition(b"\r\n\r\n")
    pending[:] = rest
    return int(head.split(b" ", 2)[1])


def process_figures(pid: int) -> tuple[int, int, float]:
    """(open descriptors, threads, CPU seconds) of a process."""
    descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    threads = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("Threads:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return descriptors, threads, cpu


def session_flood(address: tuple[str, int], count: int, limit: float) -> None:
    statuses: dict[int, int] = {}
    started = time.monotonic()
    sent = 0
    with socket.create_connection(address, timeout=10) as sock:
        pending = bytearray()
        for n in range(count):
            if time.monotonic() - started > limit:
                break
            sock.sendall(request("Create-Session", f"/flood/{n}.bin", f"BITS-Supported-Protocols: {PROTOCOL_GUID}\r\n"))
            status = read_status(sock, pending)
            statuses[status] = statuses.get(status, 0) + 1
            sent += 1
    elapsed = time.monotonic() - started
    accepted = statuses.get(200, 0)
    refused = statuses.get(503, 0)
    other = sent - accepted - refused
    print(f"session flood: {sent:,} Create-Session from one client in {elapsed:.1f} s ({sent / elapsed:,.0f}/s): "
          f"{accepted:,} accepted, {refused:,} refused (503)" + (f", {other:,} other" if other else ""))


def ping_latency(address: tuple[str, int]) -> float | None:
    started = time.monotonic()
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(request("Ping"))
            if read_status(sock, bytearray()) != 200:
                return None
    except OSError:
        return None
    return time.monotonic() - started


def connection_flood(address: tuple[str, int], pid: int, count: int, pings: int, limit: float) -> None:
    before = process_figures(pid)
    slow: list[socket.socket] = []
    started = time.monotonic()
    failed_opens = 0
    try:
        for _ in range(count):
            if time.monotonic() - started > limit:
                break
            try:
                sock = socket.create_connection(address, timeout=5)
                sock.sendall(b"BITS_POST /flood/x.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            except OSError:
                failed_opens += 1
                continue
            slow.append(sock)
        opened = time.monotonic() - started
        time.sleep(0.5)
        cpu_start = process_figures(pid)[2]
        flood_started = time.monotonic()
        latencies = []
        for _ in range(pings):  # spread over pings/10 s, so the CPU share is over a span worth measuring
            latencies.append(ping_latency(address))
            time.sleep(0.1)
        during = process_figures(pid)
        cpu_share = (during[2] - cpu_start) / (time.monotonic() - flood_started)
        still_open = 0
        for sock in slow:
            sock.settimeout(0)
            try:
                still_open += sock.recv(1) != b""
            except BlockingIOError:
                still_open += 1
            except OSError:
                pass
    finally:
        for sock in slow:
            sock.close()
    after_close = ping_latency(address)  # the flood's connections all closing at once
    answered = [latency for latency in latencies if latency is not None]
    print(f"connection flood: {len(slow):,} slow connections opened in {opened:.1f} s"
          + (f" ({failed_opens:,} could not be opened)" if failed_opens else "")
          + f"; {still_open:,} still open at the end (the others closed by the server)")
    print(f"  server descriptors {before[0]:,} before, {during[0]:,} during; threads {before[1]:,} before, "
          f"{during[1]:,} during; CPU {cpu_share:.0%} of a core while the Pings ran")
    if answered:
        print(f"  legitimate Pings: {len(answered)}/{pings} answered, latency median "
              f"{statistics.median(answered) * 1000:.1f} ms, max {max(answered) * 1000:.1f} ms")
    else:
        print(f"  legitimate Pings: 0/{pings} answered")
    print("  a Ping right after the slow connections all closed at once: "
          + (f"{after_close * 1000:.1f} ms" if after_close is not None else "not answered"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=3000, help="Create-Session of the session flood")
    parser.add_argument("--slow", type=int, default=1100, help="slow connections of the connection flood")
    parser.add_argument("--pings", type=int, default=20, help="legitimate Pings during the connection flood")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds each step may take at most")
    parser.add_argument("--server-nofile", type=int, default=1024,
                        help="the server's descriptor limit (RLIMIT_NOFILE soft), Linux's usual default")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.slow + 256
    if soft < wanted:  # this process holds the slow connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    with tempfile.TemporaryDirectory(prefix="bits-flood-") as scratch:
        server_soft = min(args.server_nofile, hard)
        server = subprocess.Popen([str(ROOT / ".venv" / "bin" / "bits-server"), "--root", str(Path(scratch) / "root"),
                                   "--quiet"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (server_soft, hard)))
        try:
            url = server.stdout.readline().split()[-1] if server.stdout else ""
            host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
            address = (host, int(port))
            print(f"bits-server pid {server.pid} on {url} (descriptor limit {server_soft:,}), default options")
            session_flood(address, args.sessions, args.limit)
            connection_flood(address, server.pid, args.slow, args.pings, args.limit)
        finally:
            server.terminate()
            server.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
