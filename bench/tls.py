"""HTTPS benchmark: bits-analyze on a large TLS capture (AES-GCM) against the same traffic in clear.

    .venv/bin/python bench/tls.py [--source bench/data/small.pcap] [--runs 3] [--suite aes128|aes256]

Makes, on demand (once; kept in bench/data/, git-ignored), two captures of the same BITS
traffic: the source capture's TCP streams carried through real OpenSSL TLS 1.3 (Python's ssl
module in memory, AES-GCM, an NSS key log written beside it) and the same plaintext in clear,
both cut into 1448-byte segments by the same writer, so the only difference is TLS. Then it
runs `bits-analyze` on each in turn (round after round, like bench/run.py) and prints the
median time, MB/s of capture, the TLS capture's MB/s as a share of the plain one's (target
>= 70%) and the peak RSS (target < 150 MB).
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data"
sys.path.insert(0, str(ROOT))

MSS = 1448
SUITES = {"aes128": "TLS_AES_128_GCM_SHA256", "aes256": "TLS_AES_256_GCM_SHA384"}
GNU_TIME = "/usr/bin/time"


class PcapWriter:
    """Ethernet/IPv4/TCP frames written with struct: scapy is far too slow for a large file."""

    def __init__(self, path: Path) -> None:
        self.out = open(path, "wb")
        self.out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        self.ts_us = 1_700_000_000 * 1_000_000

    def segment(self, src: tuple[bytes, int], dst: tuple[bytes, int], seq: int, ack: int, flags: int,
                payload: bytes | memoryview = b"") -> None:
        tcp = struct.pack(">HHIIBBHHH", src[1], dst[1], seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags,
                          65535, 0, 0)
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64, 6, 0,
                         src[0], dst[0])
        frame = b"\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x01\x08\x00" + ip + tcp + bytes(payload)
        self.ts_us += 10
        self.out.write(struct.pack("<IIII", self.ts_us // 1_000_000, self.ts_us % 1_000_000, len(frame), len(frame)))
        self.out.write(frame)

    def connection(self, number: int, chunks: list[tuple[int, bytes]]) -> None:
        client = (bytes([10, 0, number >> 8 & 255, number & 255]), 40000 + number % 20000)
        server = (bytes([10, 1, 0, 1]), 443)
        ends = (client, server)
        seq = [1000, 9000]
        self.segment(client, server, seq[0], 0, 0x02)
        seq[0] += 1
        self.segment(server, client, seq[1], seq[0], 0x12)
        seq[1] += 1
        self.segment(client, server, seq[0], seq[1], 0x10)
        for side, data in chunks:
            view = memoryview(data)
            for start in range(0, len(data), MSS):
                piece = view[start:start + MSS]
                self.segment(ends[side], ends[1 - side], seq[side], seq[1 - side], 0x18, piece)
                seq[side] += len(piece)
        for side in (0, 1):
            self.segment(ends[side], ends[1 - side], seq[side], seq[1 - side], 0x11)
            seq[side] += 1
        self.segment(client, server, seq[0], seq[1], 0x10)

    def close(self) -> None:
        self.out.close()


class _Streams:
    """A StreamSink that hands each connection's turns to `done` when it closes."""

    def __init__(self, done) -> None:
        self.turns: dict[int, list[tuple[int, bytearray]]] = {}
        self.done = done

    def on_open(self, conn) -> None:
        self.turns[conn.id] = []

    def on_data(self, conn, direction, data, frame, ts_ns) -> None:
        turns = self.turns[conn.id]
        if turns and turns[-1][0] == direction:
            turns[-1][1].extend(data)
        else:
            turns.append((direction, bytearray(data)))

    def on_gap(self, *args) -> None:
        pass

    def on_conflict(self, *args) -> None:
        pass

    def on_fin(self, *args) -> None:
        pass

    def on_rst(self, *args) -> None:
        pass

    def on_close(self, conn) -> None:
        self.done(conn.id, [(side, bytes(data)) for side, data in self.turns.pop(conn.id)])


def make(source: Path, suite: str) -> tuple[Path, Path, Path]:
    """(plain capture, TLS capture, key log), made unless already there."""
    stem = f"https-{source.stem}-{suite}"
    plain, tls, keylog = DATA / f"{stem}.plain.pcap", DATA / f"{stem}.pcap", DATA / f"{stem}.keys"
    if plain.exists() and tls.exists() and keylog.exists():
        return plain, tls, keylog
    if os.environ.get("OPENSSL_CONF_BENCH") != suite:  # pin the TLS 1.3 suite in a child
        with tempfile.NamedTemporaryFile("w", suffix=".cnf", delete=False) as config:
            config.write("openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n[ssl_sect]\n"
                         "system_default = system_default_sect\n[system_default_sect]\n"
                         f"Ciphersuites = {SUITES[suite]}\n")
        env = {**os.environ, "OPENSSL_CONF": config.name, "OPENSSL_CONF_BENCH": suite}
        subprocess.run([sys.executable, __file__, "--make-only", "--source", str(source), "--suite", suite],
                       env=env, check=True)
        os.unlink(config.name)
        return plain, tls, keylog

    from tests.support import tls_fixtures as fx
    from bitstrace.analyzer.capture import CaptureReader
    from bitstrace.analyzer.decode import Decoder
    from bitstrace.analyzer.tcp import TcpReassembler

    keylog.unlink(missing_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        creds = fx.make_credentials(Path(scratch))
        client, server = fx.contexts(creds, keylog, fx.TlsOptions())
        plain_out, tls_out = PcapWriter(plain), PcapWriter(tls)

        def done(number: int, turns: list[tuple[int, bytes]]) -> None:
            pair = fx.TlsPair(client, server, "uploads.example.test")
            pair.handshake()
            for side, data in turns:
                pair.send(side, data)
            pair.close()
            assert pair.ends[0].cipher()[0] == SUITES[suite]
            plain_out.connection(number, turns)
            tls_out.connection(number, pair.wire)

        reassembler = TcpReassembler(_Streams(done))
        Decoder(file=str(source)).decode_into(CaptureReader(source).records(), reassembler.receive)
        reassembler.finish()
        plain_out.close()
        tls_out.close()
    print(f"made {tls.name} ({tls.stat().st_size / 1e6:,.0f} MB) and {plain.name} in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr)
    return plain, tls, keylog


def run_once(command: list[str]) -> tuple[float, int]:
    with tempfile.NamedTemporaryFile("r") as rss_file:
        started = time.perf_counter()
        done = subprocess.run([GNU_TIME, "-f", "%M", "-o", rss_file.name, *command], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        elapsed = time.perf_counter() - started
        peak_kib = int(rss_file.read().split()[-1])
    if done.returncode != 0:
        raise RuntimeError(f"{command} exited {done.returncode}: {done.stderr.decode()[-400:]}")
    return elapsed, peak_kib * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DATA / "small.pcap")
    parser.add_argument("--suite", choices=sorted(SUITES), default="aes128")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    plain, tls, keylog = make(args.source, args.suite)
    if args.make_only:
        return 0
    analyze = str(ROOT / ".venv" / "bin" / "bits-analyze")
    commands = {"plain": [analyze, "--no-progress", str(plain)],
                "tls": [analyze, "--no-progress", "--tls-keylog", str(keylog), str(tls)]}
    times: dict[str, list[float]] = {name: [] for name in commands}
    peaks: dict[str, list[int]] = {name: [] for name in commands}
    env_key = os.environ.pop("SSLKEYLOGFILE", None)
    try:
        for round_number in range(1, args.runs + 1):
            for name, command in commands.items():
                seconds, peak = run_once(command)
                times[name].append(seconds)
                peaks[name].append(peak)
                print(f"  round {round_number}: {name} {seconds:.2f} s, {peak >> 20} MB", file=sys.stderr)
    finally:
        if env_key is not None:
            os.environ["SSLKEYLOGFILE"] = env_key
    rates = {}
    print(f"{'capture':<7} {'MB':>8} {'median s':>9} {'MB/s':>8} {'peak RSS':>9}")
    for name, path in (("plain", plain), ("tls", tls)):
        size = path.stat().st_size / 1e6
        median = statistics.median(times[name])
        rates[name] = size / median
        print(f"{name:<7} {size:>8,.0f} {median:>9.2f} {rates[name]:>8.0f} {max(peaks[name]) >> 20:>7}MB")
    share = rates["tls"] / rates["plain"]
    peak = max(peaks["tls"]) >> 20
    print(f"TLS ({SUITES[args.suite]}) at {share:.0%} of the plain MB/s "
          f"({'met' if share >= 0.7 else 'NOT met'}: target >= 70%); "
          f"peak memory {peak} MB ({'met' if peak < 150 else 'NOT met'}: target < 150 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
