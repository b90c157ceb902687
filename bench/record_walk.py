"""The floor of any pure-Python per-packet loop: walk a pcap file's records and do nothing else.

    .venv/bin/python bench/record_walk.py CAPTURE.pcap

One `struct.unpack_from` per record header over 1 MiB reads: no decoding, no objects, no
payload touched. Whatever bits-analyze does per packet comes on top of this, so the time it
prints bounds from below what a Python analyzer can reach on the file (bench/run.py's `walk`).
"""

from __future__ import annotations

import struct
import sys

_FILE_HEADER = 24
_RECORD = {b"\xd4\xc3\xb2\xa1": struct.Struct("<IIII"), b"\x4d\x3c\xb2\xa1": struct.Struct("<IIII"),
           b"\xa1\xb2\xc3\xd4": struct.Struct(">IIII"), b"\xa1\xb2\x3c\x4d": struct.Struct(">IIII")}


def walk(path: str) -> int:
    """The number of records in the pcap file at `path`."""
    records = 0
    with open(path, "rb", buffering=0) as capture:
        header = capture.read(_FILE_HEADER)
        record = _RECORD.get(header[:4])
        if record is None:
            raise SystemExit(f"{path}: not a pcap file (pcapng is not walked here)")
        unpack = record.unpack_from
        pending = b""
        while block := capture.read(1 << 20):
            data = pending + block
            position, end = 0, len(data)
            while position + 16 <= end:
                _, _, captured, _ = unpack(data, position)
                following = position + 16 + captured
                if following > end:
                    break
                records += 1
                position = following
            pending = data[position:]
    return records


if __name__ == "__main__":
    print(walk(sys.argv[1]))
