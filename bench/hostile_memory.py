"""Memory against a hostile capture: a real early hole with about a gigabyte of data behind it.
A figure, not a timed test: it prints each case's peak RSS next to the caps that bound it.

    .venv/bin/python bench/hostile_memory.py [--gigabytes 1.0] [--keep DIR]

The captures are written on demand, streaming, into a temporary directory (or DIR, e.g.
bench/data, which git ignores) and deleted afterwards unless --keep is given:

- one-connection: one upload whose 10th segment is missing from the capture (the server
  acknowledges it: it got it) and ~1 GB of data behind the hole. The direction's cap
  (max_buffer, 8 MiB) bounds what waits for the hole.
- many-connections: 128 uploads interleaved, each with an early hole and 8 MiB behind it, so
  ~1 GB waits at once over all connections: the budget over all connections (max_buffered)
  bounds it; the run is made at the default budget and at a quarter of it.

Each analysis runs in its own process (the full pipeline, as `bits-analyze --http` reads), and
the peak RSS is that process's ru_maxrss from wait4. The baseline is the same pipeline on a
capture of one small upload: the interpreter and the libraries.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from bitstrace.analyzer.tcp import MAX_BUFFERED

SEGMENT = 1448
CLIENT_IP, SERVER_IP = bytes([10, 1, 0, 1]), bytes([10, 1, 0, 2])
ACK, PSH, SYN, FIN = 0x10, 0x08, 0x02, 0x01
_ETHERNET = bytes(6) + bytes([2, 0, 0, 0, 0, 1]) + b"\x08\x00"


def _frame(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes) -> bytes:
    tcp = struct.pack(">HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, 65535, 0, 0)
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 6, 0, src, dst)
    return _ETHERNET + ip + tcp + payload


class _Writer:
    def __init__(self, path: Path) -> None:
        self.out = open(path, "wb", buffering=1 << 20)
        self.out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        self.ts_us = 1_700_000_000 * 1_000_000

    def write(self, frame: bytes) -> None:
        self.ts_us += 10
        self.out.write(struct.pack("<IIII", self.ts_us // 1_000_000, self.ts_us % 1_000_000, len(frame), len(frame)))
        self.out.write(frame)

    def close(self) -> None:
        self.out.close()


class _Upload:
    """One client→server upload, a segment at a time; `hole` is the index of the one segment
    left out of the capture (the server still acknowledges it)."""

    def __init__(self, writer: _Writer, port: int, body: int, hole: int | None) -> None:
        self.w, self.port, self.hole = writer, port, hole
        self.cseq, self.sseq = 1_000_000 + port, 5_000_000
        self.head = (f"BITS_POST /upload HTTP/1.1\r\nHost: bench\r\nBITS-Packet-Type: Fragment\r\n"
                     f"Content-Length: {body}\r\n\r\n").encode()
        self.remaining = len(self.head) + body
        self.index = 0
        self.offset = 0
        self._pattern = bytes(range(256)) * (SEGMENT // 256 + 2)
        w = self.w
        w.write(_frame(CLIENT_IP, SERVER_IP, port, 80, self.cseq, 0, SYN, b""))
        w.write(_frame(SERVER_IP, CLIENT_IP, 80, port, self.sseq, self.cseq + 1, SYN | ACK, b""))
        w.write(_frame(CLIENT_IP, SERVER_IP, port, 80, self.cseq + 1, self.sseq + 1, ACK, b""))

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def step(self) -> None:
        size = min(SEGMENT, self.remaining)
        if self.offset < len(self.head):
            payload = (self.head + self._pattern)[self.offset:self.offset + size]
        else:
            start = self.offset % 256
            payload = self._pattern[start:start + size]
        seq = self.cseq + 1 + self.offset
        if self.index != self.hole:
            self.w.write(_frame(CLIENT_IP, SERVER_IP, self.port, 80, seq, self.sseq + 1, ACK | PSH, payload))
        self.offset += size
        self.remaining -= size
        self.index += 1
        if self.index % 16 == 0 or self.done:  # the server got every byte, the missing one too
            self.w.write(_frame(SERVER_IP, CLIENT_IP, 80, self.port, self.sseq + 1, self.cseq + 1 + self.offset,
                                ACK, b""))
        if self.done:
            end = self.cseq + 1 + self.offset
            self.w.write(_frame(CLIENT_IP, SERVER_IP, self.port, 80, end, self.sseq + 1, ACK | FIN, b""))
            self.w.write(_frame(SERVER_IP, CLIENT_IP, 80, self.port, self.sseq + 1, end + 1, ACK | FIN, b""))
            self.w.write(_frame(CLIENT_IP, SERVER_IP, self.port, 80, end + 1, self.sseq + 2, ACK, b""))


def write_capture(path: Path, connections: int, body: int, hole: int | None) -> None:
    writer = _Writer(path)
    uploads = [_Upload(writer, 40000 + i, body, hole) for i in range(connections)]
    while uploads:
        for upload in uploads:
            upload.step()
        uploads = [u for u in uploads if not u.done]
    writer.close()


_RUN = """
import sys
from bitstrace.analyzer.pipeline import read_exchanges
result = read_exchanges([sys.argv[1]], lambda exchange: None, reorder_window=float(sys.argv[3]),
                        max_buffered=int(sys.argv[2]))
tcp = result.captures[0].tcp
budget = [p for p in result.problems if p.kind == "reassembly-budget"]
print(tcp["gaps"], tcp["gap_bytes"], len(budget))
"""


def measure(path: Path, max_buffered: int, window: float = 2.0) -> tuple[int, str]:
    child = subprocess.Popen([sys.executable, "-c", _RUN, str(path), str(max_buffered), str(window)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    output = child.stdout.read().strip()
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(f"the analysis of {path} failed (status {status})")
    return usage.ru_maxrss * 1024, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=1.0, help="data behind the holes (default 1)")
    parser.add_argument("--keep", metavar="DIR", help="write the captures into DIR and keep them")
    args = parser.parse_args()
    directory = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hostile-memory-"))
    directory.mkdir(parents=True, exist_ok=True)
    total = int(args.gigabytes * 1e9)
    per_connection = 8 << 20
    connections = max(total // per_connection, 1)
    mib = 1 << 20
    try:
        cases = [
            ("baseline (one 1 MB upload, no hole)", "baseline.pcap", 1, 1_000_000, None, MAX_BUFFERED, 2.0),
            (f"one connection, hole then {total / 1e9:.2f} GB", "one-connection.pcap", 1, total, 10,
             MAX_BUFFERED, 2.0),
            # A window longer than the capture (10 us a frame), so that only the budget lets go.
            (f"{connections} connections x (hole then 8 MiB)", "many-connections.pcap", connections,
             per_connection, 10, MAX_BUFFERED, 3600.0),
            (f"{connections} connections x (hole then 8 MiB)", "many-connections.pcap", connections,
             per_connection, 10, MAX_BUFFERED // 4, 3600.0),
        ]
        print(f"{'case':<44} {'budget':>9} {'window':>7} {'capture':>9} {'peak RSS':>9}  "
              "gaps, gap bytes, reassembly-budget problems listed (10, then one saying more were counted)")
        baseline = 0
        for label, name, count, body, hole, budget, window in cases:
            path = directory / name
            if not path.exists():
                write_capture(path, count, body, hole)
            rss, output = measure(path, budget, window)
            baseline = baseline or rss
            print(f"{label:<44} {budget / mib:>5.0f} MiB {window:>6.0f}s {path.stat().st_size / mib:>5.0f} MiB "
                  f"{rss / mib:>5.0f} MiB  {output}")
        print(f"caps: 8 MiB buffered per direction (+ {64} payloads of history); {MAX_BUFFERED / mib:.0f} MiB "
              f"over all connections by default. Baseline RSS {baseline / mib:.0f} MiB.")
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
