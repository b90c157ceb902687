"""Throughput of the per-packet loop: capture reading and decoding, in frames per second.

Writes a pcap of N Ethernet/IPv4/TCP frames (default 200 000, 200-byte payloads) to a
temporary directory, as pcap and as pcapng, then times: our CaptureReader alone (as Frames and
as the plain records the pipeline reads), records + Decoder.decode_into (the pipeline's
per-packet loop, segments handed to a function that does nothing), Frames + Decoder.decode (the
general path, frame by frame), and scapy's raw reader alone (the reader the house first chose).

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
from scapy.utils import RawPcapNgReader, RawPcapReader

from bitstrace.analyzer.capture import CaptureReader
from bitstrace.analyzer.decode import Decoder


def write_capture(path: Path, count: int, pcapng: bool) -> None:
    packet = bytearray(bytes(
        Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        / IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=40000, dport=80, flags="PA") / (b"x" * 200)))
    packet += b"\0" * (-len(packet) % 4)
    seq_at = 14 + 20 + 4
    with open(path, "wb") as out:
        if pcapng:
            out.write(struct.pack("<IIIHHq", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1) + struct.pack("<I", 28))
            out.write(struct.pack("<IIHHII", 1, 20, 1, 0, 0, 20))
        else:
            out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for index in range(count):
            struct.pack_into("!I", packet, seq_at, index * 200)
            if pcapng:
                ts = 1_700_000_000_000_000 + index * 1000
                length = 32 + len(packet)
                out.write(struct.pack("<IIIIIII", 6, length, 0, ts >> 32, ts & 0xFFFFFFFF, len(packet), len(packet)))
                out.write(packet + struct.pack("<I", length))
            else:
                out.write(struct.pack("<IIII", 1_700_000_000 + index // 1000, index % 1000 * 1000,
                                      len(packet), len(packet)))
                out.write(packet)


def timed(label: str, count: int, run) -> None:
    start = time.perf_counter()
    seen = run()
    elapsed = time.perf_counter() - start
    assert seen == count, (label, seen)
    print(f"{label:40} {count / elapsed:>10,.0f} frames/s  ({elapsed:.2f} s)")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    with tempfile.TemporaryDirectory() as tmp:
        for kind, scapy_reader in (("pcap", RawPcapReader), ("pcapng", RawPcapNgReader)):
            path = Path(tmp) / f"bench.{kind}"
            write_capture(path, count, pcapng=kind == "pcapng")
            measure(kind, path, count, scapy_reader)


def ignore(*segment_fields) -> None:
    pass


def measure(kind: str, path: Path, count: int, scapy_reader: type) -> None:
    def read_frames() -> int:
        return sum(1 for _ in CaptureReader(path))

    def read_records() -> int:
        return sum(1 for _ in CaptureReader(path).records())

    def read_and_decode() -> int:
        decoder = Decoder(str(path))
        decoder.decode_into(CaptureReader(path).records(), ignore)
        return decoder.stats["tcp"]

    def read_and_decode_frames() -> int:
        decode = Decoder(str(path)).decode
        return sum(1 for frame in CaptureReader(path) if decode(frame) is not None)

    def scapy_read_only() -> int:
        with scapy_reader(str(path)) as reader:
            return sum(1 for _ in reader)

    timed(f"{kind}: CaptureReader, Frames", count, read_frames)
    timed(f"{kind}: CaptureReader.records()", count, read_records)
    timed(f"{kind}: records + Decoder.decode_into", count, read_and_decode)
    timed(f"{kind}: Frames + Decoder.decode (general)", count, read_and_decode_frames)
    timed(f"{kind}: scapy {scapy_reader.__name__}", count, scapy_read_only)


if __name__ == "__main__":
    main()
