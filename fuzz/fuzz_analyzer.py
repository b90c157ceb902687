"""Fuzzing bits-analyze: mutated corpus captures through the whole analysis, --extract and the reports.

    .venv/bin/python fuzz/fuzz_analyzer.py [--minutes 60] [--seed N] [--crashes fuzz/crashes] [--per-input 20]
    .venv/bin/python fuzz/fuzz_analyzer.py --replay fuzz/crashes/crash-….pcap

Each input is one capture of captures/ (pcap and pcapng) or one of the hostile seeds below (uploads
whose TOTAL changes, bytes past the TOTAL), each first as it is, then changed by one to eight
mutations: bytes
flipped, an ASCII digit changed (Content-Range, Content-Length, received offsets), a 32-bit field
set to a boundary value (record lengths, sequence numbers), bytes deleted, inserted or
duplicated (retransmissions, repeated records), a piece of another capture spliced in, the file
cut short, or the whole gzip-compressed. Every input runs through `analyze` with `--extract` into
a fresh directory, then the JSON and text reports, and must hold:

- no exception escapes (the analyzer's promise: no traceback for any input);
- no hang: each input finishes within `--per-input` seconds (SIGALRM);
- nothing is certified that was not seen: every entity reported complete has no holes, its file
  is TOTAL bytes long with the reported sha256, and every byte of it is a byte of a fragment body
  the capture carried, acknowledged by a 200/201 (N included), recorded from the body stream
  independently of the extractor's coverage map;
- no temp file stays behind.

A failing input is written to CRASHES/crash-<sha1>.pcap with the failure, the mutations and the
seed in crash-<sha1>.txt beside it; `--replay FILE` runs one input again. The suite runs the same
target under hypothesis for a few seconds (tests/test_fuzz_analyzer.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Iterator, Sequence

from bitstrace.analyzer import analysis
from bitstrace.analyzer.bits.extract import TEMP_PREFIX, Extractor
from bitstrace.analyzer.bits.protocol import PacketType
from bitstrace.analyzer.report import render_text
from bitstrace.analyzer.report.json import build_report, packet_source, write_json

ROOT = Path(__file__).resolve().parent.parent
CAPTURES = ROOT / "captures"
DEFAULT_CRASHES = ROOT / "fuzz" / "crashes"
KINDS = ("flip", "digit", "int32", "delete", "insert", "duplicate", "splice", "truncate", "gzip")
BOUNDARIES = (0, 1, 0x7F, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
CONTENT_CHECK_PIECES = 20_000  # past this many acknowledged chunks only coverage is checked, not each byte


def corpus() -> dict[str, bytes]:
    """The captures of captures/ and the hostile seeds below, by name."""
    files = {p.name: p.read_bytes() for p in sorted(CAPTURES.iterdir()) if p.suffix in (".pcap", ".pcapng")}
    for name, fragments in HOSTILE_SEEDS.items():
        files[name] = upload_capture(fragments)
    return files


# Uploads the corpus (made by a conformant client) never holds, as (first, last, TOTAL, ack status):
# the TOTAL changes between fragments, bytes lie past the final TOTAL, the server acknowledges a
# fragment whose TOTAL changed. Random mutations seldom line such numbers up; from these seeds they
# vary them.
HOSTILE_SEEDS: dict[str, list[tuple[int, int, int, int]]] = {
    "seed-total-grows-over-a-hole.pcap": [(0, 29, 50, 200), (40, 59, 70, 200)],
    "seed-bytes-past-the-final-total.pcap": [(0, 19, 100, 200), (40, 99, 100, 200), (0, 9, 80, 200)],
    "seed-total-shrinks.pcap": [(0, 69, 70, 200), (0, 49, 50, 200)],
    "seed-changed-total-refused.pcap": [(0, 29, 50, 200), (30, 69, 70, 400), (30, 49, 50, 200)],
}
SEED_SESSION = "{6B29FC40-CA47-1067-B31D-00DD010662DA}"
SEED_PROTOCOL = "{7df0354d-249b-430f-820d-3d2a9bef4931}"


def upload_capture(fragments: Sequence[tuple[int, int, int, int]]) -> bytes:
    """A pcap of one TCP connection carrying Create-Session, the fragments and Close-Session, each
    request and its ack in one segment (Ethernet, IPv4, TCP; checksums are not checked)."""
    client, server = (bytes([10, 0, 0, 1]), 49152), (bytes([10, 0, 0, 2]), 80)
    seq = {client: 1000, server: 5000}
    records: list[bytes] = []

    def segment(src: tuple[bytes, int], dst: tuple[bytes, int], flags: int, data: bytes = b"") -> None:
        tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq[src], seq[dst], 5 << 4, flags, 65535, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(data), 0, 0x4000, 64, 6, 0, src[0], dst[0])
        frame = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + ip + tcp + data
        ts = 1_700_000_000_000_000 + len(records) * 1000  # microseconds
        records.append(struct.pack("<IIII", ts // 1_000_000, ts % 1_000_000, len(frame), len(frame)) + frame)
        seq[src] = (seq[src] + len(data) + (flags & 0x03 != 0)) & 0xFFFFFFFF

    def exchange(headers: str, body: bytes, status: int, ack: str) -> None:
        segment(client, server, 0x18, f"BITS_POST /uploads/seed.bin HTTP/1.1\r\nHost: 10.0.0.2\r\n{headers}"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        segment(server, client, 0x18, f"HTTP/1.1 {status} {'OK' if status < 300 else 'Error'}\r\n"
                f"BITS-Packet-Type: Ack\r\n{ack}Content-Length: 0\r\n\r\n".encode())

    segment(client, server, 0x02)
    seq[server] -= 1
    segment(server, client, 0x12)
    segment(client, server, 0x10)
    sid = f"BITS-Session-Id: {SEED_SESSION}\r\n"
    exchange(f"BITS-Packet-Type: Create-Session\r\nBITS-Supported-Protocols: {SEED_PROTOCOL}\r\n", b"", 200,
             f"BITS-Protocol: {SEED_PROTOCOL}\r\n{sid}")
    for first, last, total, status in fragments:
        body = bytes((i * 7 + total) & 0xFF for i in range(first, last + 1))
        received = f"BITS-Received-Content-Range: {last + 1}\r\n" if status == 200 else ""
        exchange(f"BITS-Packet-Type: Fragment\r\n{sid}Content-Name: seed.bin\r\n"
                 f"Content-Range: bytes {first}-{last}/{total}\r\n", body, status, sid + received)
    exchange(f"BITS-Packet-Type: Close-Session\r\n{sid}", b"", 200, sid)
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1) + b"".join(records)


@dataclass(frozen=True)
class Mutation:
    kind: str
    at: int  # position, taken modulo the length
    value: int  # byte value, digit, boundary index, length or source file, by kind
    length: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "at": self.at, "value": self.value, "length": self.length}


def mutate(data: bytes, mutations: Sequence[Mutation], files: dict[str, bytes]) -> bytes:
    """Apply `mutations` in order; each is defined for any length (positions wrap)."""
    buf = bytearray(data)
    others = list(files.values())
    for m in mutations:
        n = len(buf)
        at = m.at % n if n else 0
        if m.kind == "flip" and n:
            buf[at] ^= (m.value % 255) + 1
        elif m.kind == "digit" and n:
            digits = [i for i in range(at, min(n, at + 4096)) if 0x30 <= buf[i] <= 0x39]
            if digits:
                buf[digits[m.length % len(digits)]] = 0x30 + m.value % 10
        elif m.kind == "int32" and n >= 4:
            at = min(at, n - 4)
            buf[at:at + 4] = BOUNDARIES[m.value % len(BOUNDARIES)].to_bytes(4, "little" if m.length % 2 else "big")
        elif m.kind == "delete":
            del buf[at:at + m.length]
        elif m.kind == "insert":
            buf[at:at] = bytes((m.value + i * 37) & 0xFF for i in range(m.length))
        elif m.kind == "duplicate" and n:
            buf[at:at] = buf[at:at + m.length]
        elif m.kind == "splice":
            source = others[m.value % len(others)]
            start = (m.at * 7919) % max(1, len(source))
            buf[at:at + m.length] = source[start:start + m.length]
        elif m.kind == "truncate":
            del buf[at:]
        elif m.kind == "gzip":
            buf = bytearray(gzip.compress(bytes(buf), compresslevel=1, mtime=0))
    return bytes(buf)


def random_mutations(rng: random.Random) -> list[Mutation]:
    return [Mutation(rng.choice(KINDS), rng.randrange(1 << 31), rng.randrange(256), rng.choice((1, 2, 4, 16, 64, 300, 1500, 9000)))
            for _ in range(rng.randint(1, 8))]


class Failure(Exception):
    """The input broke a promise of the analyzer."""


class Hang(BaseException):
    """The input took longer than the bound (a BaseException, so the analyzer cannot swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class RecordingExtractor(Extractor):
    """The extractor, with every request body chunk it is handed recorded, as seen on the stream."""

    chunks: dict[tuple[int, int], list[tuple[int, bytes]]]

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.chunks = {}
        RecordingExtractor.last = self

    def on_body(self, connection: Any, message: Any, chunk: bytes | memoryview, body_offset: int) -> None:
        if message.is_request:
            self.chunks.setdefault((connection.id, message.stream_offset), []).append((body_offset, bytes(chunk)))
        super().on_body(connection, message, chunk, body_offset)

    last: "RecordingExtractor"


def acknowledged_copies(session: Any, chunks: dict[tuple[int, int], list[tuple[int, bytes]]]) -> list[tuple[int, bytes]]:
    """(entity offset, bytes) of every body byte seen of a fragment whose ack acknowledged it."""
    copies = []
    for pkt in session.packets:
        rng = pkt.content_range
        if pkt.packet_type is not PacketType.FRAGMENT or rng is None or not pkt.succeeded:
            continue
        limit = rng.last + 1 if pkt.received_offset is None else min(rng.last + 1, pkt.received_offset)
        for body_offset, data in chunks.get((pkt.connection, pkt.request_offset), ()):
            start = rng.first + body_offset
            end = min(start + len(data), limit)
            if end > start:
                copies.append((start, data[:end - start]))
    return copies


def check_certified(session: Any, chunks: dict[tuple[int, int], list[tuple[int, bytes]]]) -> bool:
    """Whether the session's entity is reported complete; raises Failure when that is not true."""
    entity = session.entity
    if entity is None or not entity.complete:
        return False
    where = f"session {session.id}: entity {entity.path}"
    if entity.holes:
        raise Failure(f"{where} reported complete with holes {entity.holes}")
    total = entity.total
    data = Path(entity.path).read_bytes()
    if total is None or len(data) != total:
        raise Failure(f"{where} is {len(data)} bytes, TOTAL {total}")
    if entity.sha256 != hashlib.sha256(data).hexdigest():
        raise Failure(f"{where}: sha256 {entity.sha256} is not that of the file")
    copies = acknowledged_copies(session, chunks)
    # Every byte of [0, TOTAL) must come from an acknowledged copy that holds that very value.
    bounds = sorted({0, total} | {s for s, _ in copies if s < total} | {s + len(d) for s, d in copies if s + len(d) < total})
    check_bytes = len(copies) <= CONTENT_CHECK_PIECES
    for a, b in zip(bounds, bounds[1:]):
        covering = [(s, d) for s, d in copies if s <= a and s + len(d) >= b]
        if not covering:
            raise Failure(f"{where} certifies bytes {a}-{b - 1}, which no acknowledged fragment body carried")
        if check_bytes and not any(d[a - s:b - s] == data[a:b] for s, d in covering):
            raise Failure(f"{where}: bytes {a}-{b - 1} differ from every acknowledged copy the capture carried")
    return True


def check_one(data: bytes, per_input_s: float = 20.0) -> int:
    """Run one input; raise Failure or Hang when a promise is broken (any other exception escaped).
    Returns how many complete entities were checked byte by byte."""
    out = Path(tempfile.mkdtemp(prefix="bits-fuzz-"))
    real = getattr(analysis, "Extractor")
    setattr(analysis, "Extractor", RecordingExtractor)  # analyze() then records what it hands the extractor
    try:
        with time_limit(per_input_s):
            result = analysis.analyze([io.BytesIO(data)], extract_dir=out)
            report = build_report(result, with_packets=False)
            write_json(report, io.StringIO(), packet_source(result, report))
            render_text(report, io.StringIO(), color=False)
        chunks = RecordingExtractor.last.chunks
        certified = sum(check_certified(session, chunks) for session in result.bits.sessions)
        left = [n for n in os.listdir(out) if n.startswith(TEMP_PREFIX)]
        if left:
            raise Failure(f"temp files left behind: {left}")
        return certified
    finally:
        setattr(analysis, "Extractor", real)
        shutil.rmtree(out, ignore_errors=True)


def save_crash(crashes: Path, data: bytes, detail: str) -> Path:
    crashes.mkdir(parents=True, exist_ok=True)
    name = f"crash-{hashlib.sha1(data).hexdigest()[:16]}"
    (crashes / f"{name}.pcap").write_bytes(data)
    (crashes / f"{name}.txt").write_text(detail)
    return crashes / f"{name}.pcap"


def run(minutes: float, seed: int, crashes: Path, per_input_s: float) -> int:
    files = corpus()
    names = sorted(files)
    rng = random.Random(seed)
    deadline = time.monotonic() + minutes * 60
    inputs = failures = certified = 0
    last_note = time.monotonic()
    print(f"fuzzing {len(names)} corpus captures for {minutes:g} min, seed {seed}, crashes to {crashes}", flush=True)
    while time.monotonic() < deadline:
        base = names[inputs] if inputs < len(names) else rng.choice(names)  # each seed as it is, first
        mutations = random_mutations(rng) if inputs >= len(names) else []
        data = mutate(files[base], mutations, files)
        inputs += 1
        try:
            certified += check_one(data, per_input_s)
        except BaseException as error:  # a Hang, a Failure, or an exception that escaped the analyzer
            if isinstance(error, KeyboardInterrupt):
                break
            failures += 1
            detail = (f"base {base}\nseed {seed}, input {inputs}\nmutations {json.dumps([m.to_json() for m in mutations])}\n\n"
                      + "".join(traceback.format_exception(error)))
            path = save_crash(crashes, data, detail)
            print(f"FAILED input {inputs} ({base}): {type(error).__name__}: {error} -> {path}", flush=True)
        if time.monotonic() - last_note > 30:
            last_note = time.monotonic()
            print(f"{inputs:,} inputs, {certified:,} complete entities checked, {failures} failures", flush=True)
    print(f"done: {inputs:,} inputs, {certified:,} complete entities checked, {failures} failures", flush=True)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="how long to run (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock, printed)")
    parser.add_argument("--crashes", type=Path, default=DEFAULT_CRASHES, help="where failing inputs go")
    parser.add_argument("--per-input", type=float, default=20.0, help="seconds one input may take (default 20)")
    parser.add_argument("--replay", type=Path, help="run one saved input again and show what it breaks")
    args = parser.parse_args(argv)
    if args.replay:
        certified = check_one(args.replay.read_bytes(), args.per_input)
        print(f"{args.replay}: no failure ({certified} complete entities checked)")
        return 0
    seed = args.seed if args.seed is not None else int(time.time())
    return run(args.minutes, seed, args.crashes, args.per_input)


if __name__ == "__main__":
    sys.exit(main())
