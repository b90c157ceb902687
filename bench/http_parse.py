"""Throughput of the HTTP layer on BITS-shaped traffic, in MB/s of stream bytes.

A client stream of N BITS_POST requests with 1 MiB bodies (default 64) and the matching Ack
responses, cut into segments of a given size (1448: Ethernet MSS; 65483: loopback), timed
through HttpParser alone, then through ExchangeAssembler (which adds SHA-256 and Exchange
records), then SHA-256 alone over the same bytes as the floor the assembler cannot beat.

    .venv/bin/python bench/http_parse.py [N]
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from types import SimpleNamespace

from bitstrace.analyzer.exchanges import ExchangeAssembler
from bitstrace.analyzer.http import HttpParser

MiB = 1 << 20


def streams(count: int) -> tuple[bytes, bytes]:
    body = os.urandom(MiB)
    request = (b"BITS_POST /upload/file.bin HTTP/1.1\r\nAccept: */*\r\nBITS-Packet-Type: Fragment\r\n"
               b"BITS-Session-Id: {A0FF5911-4144-45B3-BF27-27AFC8EC8A67}\r\n"
               b"Content-Range: bytes 0-1048575/67108864\r\nUser-Agent: Microsoft BITS/7.8\r\n"
               b"Host: server\r\nContent-Length: 1048576\r\nConnection: Keep-Alive\r\n\r\n" + body)
    response = (b"HTTP/1.1 200 OK\r\nBITS-Packet-Type: Ack\r\n"
                b"BITS-Session-Id: {A0FF5911-4144-45B3-BF27-27AFC8EC8A67}\r\n"
                b"BITS-Received-Content-Range: 1048576\r\nContent-Length: 0\r\n\r\n")
    return request * count, response * count


def segments(stream: bytes, size: int) -> list[memoryview]:
    view = memoryview(stream)
    return [view[i:i + size] for i in range(0, len(stream), size)]


def timed(label: str, total: int, run) -> None:
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    print(f"  {label:<34} {total / seconds / 1e6:8.0f} MB/s  ({seconds * 1e3:.0f} ms)")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    requests, responses = streams(count)
    total = len(requests) + len(responses)
    for size in (1448, 65483):
        client, server = segments(requests, size), segments(responses, size)
        print(f"{count} x 1 MiB BITS_POST, {size}-byte segments, {total / 1e6:.0f} MB:")

        def parse_only() -> None:
            parser = HttpParser("request")
            for number, piece in enumerate(client):
                parser.feed(piece, number, 0)

        def assemble() -> None:
            conn = SimpleNamespace(id=0, handshake_seen=True, last_frame=0, last_ts_ns=0)
            done = []
            assembler = ExchangeAssembler(done.append, lambda conn, message, block, offset: None)
            for number, piece in enumerate(client):
                assembler.on_data(conn, 0, piece, number, 0)
            for number, piece in enumerate(server):
                assembler.on_data(conn, 1, piece, number, 0)
            assert len(done) == count

        def sha_only() -> None:
            digest = hashlib.sha256()
            for piece in client:
                digest.update(piece)

        timed("HttpParser (requests)", len(requests), parse_only)
        timed("ExchangeAssembler (both ways)", total, assemble)
        timed("hashlib.sha256 alone (floor)", len(requests), sha_only)


if __name__ == "__main__":
    main()
