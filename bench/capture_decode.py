"""Throughput of the per-packet loop: capture reading and decoding, in frames per second.

Writes a pcap of N Ethernet/IPv4/TCP frames (default 200 000, 200-byte payloads) to a
temporary directory, then times: our CaptureReader alone, CaptureReader + Decoder, and
scapy's RawPcapReader alone (the reader the house first chose, for comparison).

    .venv/bin/python bench/capture_decode.py [N]
"""

from __future__ import annotations

import struct
import sys
import tempfile
import time
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import RawPcapReader

from analyzer.capture import CaptureReader
from analyzer.decode import Decoder


def write_capture(path: Path, count: int) -> None:
    packet = bytearray(bytes(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=40000, dport=80, flags="PA") / (b"x" * 200)))
    seq_at = 14 + 20 + 4
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for index in range(count):
            struct.pack_into("!I", packet, seq_at, index * 200)
            out.write(struct.pack("<IIII", 1_700_000_000 + index // 1000, index % 1000 * 1000, len(packet), len(packet)))
            out.write(packet)


def timed(label: str, count: int, run) -> None:
    start = time.perf_counter()
    seen = run()
    elapsed = time.perf_counter() - start
    assert seen == count, (label, seen)
    print(f"{label:32} {count / elapsed:>10,.0f} frames/s  ({elapsed:.2f} s)")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pcap"
        write_capture(path, count)

        def read_only() -> int:
            return sum(1 for _ in CaptureReader(path))

        def read_and_decode() -> int:
            decode = Decoder(str(path)).decode
            return sum(1 for frame in CaptureReader(path) if decode(frame) is not None)

        def scapy_read_only() -> int:
            with RawPcapReader(str(path)) as reader:
                return sum(1 for _ in reader)

        timed("CaptureReader", count, read_only)
        timed("CaptureReader + Decoder", count, read_and_decode)
        timed("scapy RawPcapReader", count, scapy_read_only)


if __name__ == "__main__":
    main()
