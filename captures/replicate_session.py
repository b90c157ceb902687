"""Many sessions from one real one: a corpus capture's BITS session copied N times, each copy
with its own session id and client port, one after another in time.

    .venv/bin/python captures/replicate_session.py OUT.pcap.gz [--count 30000] [--template captures/single-fragment.pcap]

The copies are the recorded frames byte for byte but for the session id in the BITS headers
(same length, so no length or sequence number moves), the client's TCP port and the TCP
checksum (kept valid), and the timestamps (each copy starts where the previous one ended). The
capture of issue 13 (30,000 one-fragment sessions, 237 MB, 4.8 MB gzip-compressed) is
`--count 30000` of single-fragment.pcap; tests and bench/report_scale.py build it with this.
"""

from __future__ import annotations

import argparse
import gzip
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "single-fragment.pcap"
SESSION_ID = re.compile(rb"BITS-Session-Id: *(\{[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\})",
                        re.IGNORECASE)
FIRST_CLIENT_PORT = 10000  # copy k uses port 10000 + k
ETHERNET, IPV4, TCP = 1, 0x0800, 6


@dataclass(frozen=True)
class _Frame:
    """One frame of the template, with what each copy changes in it."""

    offset_ns: int  # since the template's first frame
    data: bytes
    port_at: int  # offset of the client port (source or destination port) in `data`
    checksum_at: int  # offset of the TCP checksum in `data`
    tcp_at: int  # offset of the TCP header in `data`
    ids_at: tuple[int, ...]  # offsets of the session id in `data`
    lower: tuple[bool, ...]  # whether each id is written in lower case
    fixed_sum: int  # 16-bit one's complement sum of pseudo-header and segment, port, checksum and ids zeroed


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _template(path: Path) -> tuple[bytes, list[_Frame], int, bytes]:
    """The pcap file header, the frames, the client port and the session id of `path`: a
    little-endian microsecond pcap of Ethernet/IPv4/TCP frames holding one BITS session."""
    raw = path.read_bytes()
    magic, _, _, _, _, _, link = struct.unpack_from("<IHHiIII", raw)
    if magic != 0xA1B2C3D4 or link != ETHERNET:
        raise ValueError(f"{path}: not a little-endian microsecond pcap of Ethernet frames")
    ids = {match.group(1).upper() for match in SESSION_ID.finditer(raw)}
    if len(ids) != 1:
        raise ValueError(f"{path}: holds {len(ids)} session ids, not one")
    session_id = ids.pop()
    records: list[tuple[int, bytes]] = []
    at = 24
    while at < len(raw):
        seconds, micros, captured, wire = struct.unpack_from("<IIII", raw, at)
        if captured != wire:
            raise ValueError(f"{path}: frame {len(records) + 1} is cut short")
        records.append((seconds * 1_000_000_000 + micros * 1000, raw[at + 16:at + 16 + captured]))
        at += 16 + captured
    first_ts = records[0][0]
    client_port = struct.unpack_from("!H", records[0][1], 14 + (records[0][1][14] & 0x0F) * 4)[0]  # the SYN's sender
    frames = []
    for ts, data in records:
        if struct.unpack_from("!H", data, 12)[0] != IPV4 or data[23] != TCP:
            raise ValueError(f"{path}: a frame that is not TCP over IPv4")
        ip_at, tcp_at = 14, 14 + (data[14] & 0x0F) * 4
        source, destination = struct.unpack_from("!HH", data, tcp_at)
        port_at = tcp_at if source == client_port else tcp_at + 2
        if client_port not in (source, destination):
            raise ValueError(f"{path}: a frame of another connection")
        segment_length = struct.unpack_from("!H", data, ip_at + 2)[0] - (tcp_at - ip_at)
        ids_at = tuple(m.start() for m in re.finditer(re.escape(session_id), data, re.IGNORECASE))
        lower = tuple(data[i:i + len(session_id)] == session_id.lower() for i in ids_at)
        zeroed = bytearray(data[tcp_at:tcp_at + segment_length])
        for at_ in (port_at, tcp_at + 16):
            zeroed[at_ - tcp_at:at_ - tcp_at + 2] = b"\0\0"
        for at_ in ids_at:
            zeroed[at_ - tcp_at:at_ - tcp_at + len(session_id)] = bytes(len(session_id))
        pseudo = data[ip_at + 12:ip_at + 20] + struct.pack("!BBH", 0, TCP, segment_length)
        frames.append(_Frame(ts - first_ts, data, port_at, tcp_at + 16, tcp_at, ids_at, lower,
                             _ones_sum(pseudo + bytes(zeroed))))
    return raw[:24], frames, client_port, session_id


def copy_id(number: int) -> bytes:
    """The session id of copy `number`, as long as a GUID in braces."""
    return f"{{{number:08X}-0000-4000-8000-{number:012X}}}".encode()


def write_replicated(out_path: str | Path, count: int, template: Path = TEMPLATE, gap_ns: int = 1_000_000) -> int:
    """Write `count` copies of `template`'s session to `out_path` (gzip-compressed when it ends in
    .gz); returns the frames written."""
    header, frames, _, session_id = _template(template)
    if count > 65536 - FIRST_CLIENT_PORT:
        raise ValueError(f"at most {65536 - FIRST_CLIENT_PORT} copies (one client port each)")
    span_ns = frames[-1].offset_ns + gap_ns
    start_ns = 1_000_000_000 * 1_795_600_000  # 2026-11-25, as the corpus
    written = 0
    with gzip.open(out_path, "wb", compresslevel=6) if str(out_path).endswith(".gz") else open(out_path, "wb") as out:
        out.write(header)
        for number in range(count):
            new_id = copy_id(number)
            variants = (new_id, new_id.lower())
            # what the id adds to the checksum at an even and at an odd offset of the segment
            id_sums = {(case, odd): _ones_sum(b"\0" * odd + variants[case])
                       for case in (0, 1) for odd in (0, 1)}
            port = FIRST_CLIENT_PORT + number
            chunks = []
            for frame in frames:
                data = bytearray(frame.data)
                total = frame.fixed_sum + port
                for at, lower in zip(frame.ids_at, frame.lower):
                    data[at:at + len(session_id)] = variants[lower]
                    total += id_sums[(int(lower), (at - frame.tcp_at) % 2)]
                while total >> 16:
                    total = (total & 0xFFFF) + (total >> 16)
                struct.pack_into("!H", data, frame.port_at, port)
                struct.pack_into("!H", data, frame.checksum_at, ~total & 0xFFFF)
                seconds, rest = divmod(start_ns + number * span_ns + frame.offset_ns, 1_000_000_000)
                chunks.append(struct.pack("<IIII", seconds, rest // 1000, len(data), len(data)))
                chunks.append(bytes(data))
            out.write(b"".join(chunks))
            written += len(frames)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the capture to write (.pcap, or .pcap.gz for gzip)")
    parser.add_argument("--count", type=int, default=30_000, help="copies of the session (default 30000)")
    parser.add_argument("--template", type=Path, default=TEMPLATE, help="the capture of one session")
    args = parser.parse_args(argv)
    frames = write_replicated(args.out, args.count, args.template)
    print(f"{args.out}: {args.count:,} sessions, {frames:,} frames", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
