"""tshark as the oracle: our reassembly and HTTP pairing against Wireshark's, on every capture.

- Each direction of each TCP connection: our reassembled bytes hash the same as tshark's
  `follow,tcp,raw,N` output.
- Response status lines: the same, in the same order per connection, as tshark's HTTP dissector
  sees them (read through pyshark). tshark 4.0 does not take `BITS_POST` for HTTP, so the check runs on a copy of the
  capture where `BITS_POST /` is replaced by the same-length `PROPPATCH /`: every sequence
  number stays the same and its HTTP dissector sees the requests.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pyshark
import pytest

from bitstrace.analyzer.capture import CaptureReader
from bitstrace.analyzer.decode import Decoder
from bitstrace.analyzer.pipeline import read_exchanges
from bitstrace.analyzer.tcp import TcpReassembler
from tests.support import REPO

CAPTURES = REPO / "captures"
CORPUS = sorted(p for p in CAPTURES.glob("*.pcap*") if p.is_file())
EXPECTED = json.loads((CAPTURES / "expected.json").read_text())["captures"]

pytestmark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")


class HashingSink:
    """Hashes each direction of each connection as the reassembler delivers it."""

    def __init__(self) -> None:
        self.hashes: dict[tuple[int, int], "hashlib._Hash"] = defaultdict(hashlib.sha256)
        self.gaps = 0

    def on_open(self, conn) -> None:
        self.hashes[(conn.id, 0)]
        self.hashes[(conn.id, 1)]

    def on_data(self, conn, direction, data, frame, ts_ns) -> None:
        self.hashes[(conn.id, direction)].update(data)

    def on_gap(self, conn, direction, size, frame, ts_ns) -> None:
        self.gaps += 1

    def on_conflict(self, *args) -> None:
        pass

    def on_fin(self, *args) -> None:
        pass

    def on_rst(self, *args) -> None:
        pass

    def on_close(self, conn) -> None:
        pass


def our_stream_hashes(path: Path) -> dict[tuple[int, int], str]:
    sink = HashingSink()
    reassembler = TcpReassembler(sink)
    Decoder(file=str(path)).decode_into(CaptureReader(path).records(), reassembler.receive)  # as the pipeline
    reassembler.finish()
    assert sink.gaps == 0, f"{path.name}: loopback captures have no gaps"
    return {key: h.hexdigest() for key, h in sink.hashes.items()}


def plain_copy(path: Path, tmp_path: Path) -> Path:
    """tshark reads gzip itself, but the PROPPATCH rewrite needs the raw bytes."""
    if path.read_bytes()[:2] == b"\x1f\x8b":
        target = tmp_path / path.name.removesuffix(".gz")
        target.write_bytes(gzip.decompress(path.read_bytes()))
        return target
    return path


def tshark_stream_hashes(path: Path, streams: int) -> dict[tuple[int, int], str]:
    """One tshark run with a follow,tcp,raw,N tap per stream."""
    args = ["tshark", "-n", "-q", "-r", str(path)]
    for n in range(streams):
        args += ["-z", f"follow,tcp,raw,{n}"]
    output = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    hashes: dict[tuple[int, int], "hashlib._Hash"] = defaultdict(hashlib.sha256)
    stream = -1
    for line in output.splitlines():
        if line.startswith("Filter: tcp.stream eq "):
            # tshark prints the taps in its own order: take the stream from each header.
            stream = int(line.rsplit(" ", 1)[1])
            hashes[(stream, 0)]
            hashes[(stream, 1)]
            continue
        if not line.strip() or line.startswith(("=", "Follow:", "Node ")):
            continue
        direction = 1 if line.startswith("\t") else 0
        hashes[(stream, direction)].update(bytes.fromhex(line.strip()))
    return {key: h.hexdigest() for key, h in hashes.items()}


@pytest.mark.parametrize("capture", CORPUS, ids=[p.name for p in CORPUS])
def test_reassembled_bytes_equal_tshark_follow(capture: Path, tmp_path: Path) -> None:
    ours = our_stream_hashes(capture)
    streams = len({conn for conn, _ in ours})
    assert streams > 0
    theirs = tshark_stream_hashes(plain_copy(capture, tmp_path), streams)
    assert ours == theirs


def tshark_status_lines(path: Path) -> dict[int, list[tuple[int, str]]]:
    """Status lines per TCP stream as Wireshark's HTTP dissector sees them (through pyshark)."""
    capture = pyshark.FileCapture(str(path), display_filter="http.response", keep_packets=False)
    lines: dict[int, list[tuple[int, str]]] = defaultdict(list)
    try:
        for packet in capture:
            # One frame can complete several pipelined responses: one http layer each.
            for layer in packet.get_multiple_layers("http"):
                lines[int(packet.tcp.stream)].append((int(layer.response_code), layer.response_phrase))
    finally:
        capture.close()
    return dict(lines)


@pytest.mark.parametrize("capture", CORPUS, ids=[p.name for p in CORPUS])
def test_response_status_lines_equal_tshark_http(capture: Path, tmp_path: Path) -> None:
    plain = plain_copy(capture, tmp_path)
    rewritten = tmp_path / f"proppatch-{plain.name}"
    rewritten.write_bytes(plain.read_bytes().replace(b"BITS_POST /", b"PROPPATCH /"))

    ours: dict[int, list[tuple[int, str]]] = defaultdict(list)

    def collect(exchange) -> None:
        for message in [*exchange.informational, exchange.response]:
            if message is not None:
                ours[exchange.connection.id].append((message.status, message.reason))

    read_exchanges([capture], collect)
    theirs = tshark_status_lines(rewritten)
    overruns = EXPECTED.get(capture.name, {}).get("overruns", [])
    if overruns:  # tshark loses each response after bytes an earlier one did not announce
        assert set(ours) == set(theirs)
        assert sum(map(len, ours.values())) == sum(map(len, theirs.values())) + len(overruns)
        for connection, lines in theirs.items():
            found = iter(ours[connection])
            assert all(line in found for line in lines)  # theirs, in order, among ours
    else:
        assert dict(ours) == theirs
