"""Whole-pipeline runs over crafted captures with the faults real capture points make:
capture loss inside a fragment body, a capture that starts mid-connection, data captured after
the ACK that covers it, and one upload spread over rotated capture files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from bitstrace.analyzer.analysis import analyze
from bitstrace.analyzer.bits.protocol import PROTOCOL_GUID, Header
from bitstrace.analyzer.exchanges import exchange_to_json
from bitstrace.analyzer.pipeline import read_exchanges
from tests.support.craft import pcap_bytes, write
from tests.support import REPO

CAPTURES = REPO / "captures"

SID = "{11111111-2222-3333-4444-555555555555}"
CLIENT_ADDR, SERVER_ADDR = "10.0.0.1", "10.0.0.2"
TOTAL = 10240
BODY = bytes(range(256)) * (TOTAL // 256)


def bits_request(packet_type: str, extra: str = "", body: bytes = b"") -> bytes:
    head = (f"BITS_POST /up/f.bin HTTP/1.1\r\nHost: x\r\nUser-Agent: Microsoft BITS/7.8\r\n"
            f"{Header.PACKET_TYPE}: {packet_type}\r\n{extra}Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def bits_ack(extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\n{Header.PACKET_TYPE}: Ack\r\n{Header.SESSION_ID}: {SID}\r\n"
            f"{extra}Content-Length: 0\r\n\r\n").encode()


def upload_messages() -> list[tuple[str, bytes]]:
    """A one-fragment upload: ("c", request bytes) and ("s", response bytes) in order."""
    return [
        ("c", bits_request("Create-Session", f"{Header.SUPPORTED_PROTOCOLS}: {PROTOCOL_GUID}\r\n")),
        ("s", bits_ack(f"{Header.PROTOCOL}: {PROTOCOL_GUID}\r\n")),
        ("c", bits_request("Fragment", f"{Header.SESSION_ID}: {SID}\r\nContent-Name: f.bin\r\n"
                                       f"{Header.CONTENT_RANGE}: bytes 0-{TOTAL - 1}/{TOTAL}\r\n", BODY)),
        ("s", bits_ack(f"{Header.RECEIVED_CONTENT_RANGE}: {TOTAL}\r\n")),
        ("c", bits_request("Close-Session", f"{Header.SESSION_ID}: {SID}\r\n")),
        ("s", bits_ack()),
    ]


class Wire:
    """Builds one TCP connection's packets; `handshake=False` leaves out the SYN exchange."""

    def __init__(self, client_port: int, server_port: int, handshake: bool = True) -> None:
        self.ports = {"c": (client_port, server_port), "s": (server_port, client_port)}
        self.addrs = {"c": (CLIENT_ADDR, SERVER_ADDR), "s": (SERVER_ADDR, CLIENT_ADDR)}
        self.next = {"c": 1001, "s": 5001}
        self.packets: list = []
        if handshake:
            self.packets.append(self.packet("c", 1000, 0, b"", "S"))
            self.packets.append(self.packet("s", 5000, 1001, b"", "SA"))

    def packet(self, side: str, seq: int, ack: int, data: bytes, flags: str = "PA"):
        (src, dst), (sport, dport) = self.addrs[side], self.ports[side]
        return Ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq,
                                                      ack=ack) / Raw(data)

    def other(self, side: str) -> str:
        return "s" if side == "c" else "c"

    def send(self, side: str, data: bytes, mss: int = 1400, drop: range | None = None) -> None:
        """`data` in segments of `mss` bytes; segments starting inside `drop` are not captured."""
        for at in range(0, len(data), mss):
            if drop is None or at not in drop:
                self.packets.append(self.packet(side, self.next[side] + at, self.next[self.other(side)],
                                                data[at:at + mss]))
        self.next[side] += len(data)

    def ack(self, side: str):
        return self.packet(side, self.next[side], self.next[self.other(side)], b"", "A")

    def write(self, path: Path) -> Path:
        write(path, pcap_bytes((1_700_000_000_000_000_000 + i * 1_000_000, p)
                               for i, p in enumerate(self.packets)))
        return path


def test_extract_places_bytes_after_a_capture_gap_and_leaves_the_gap_missing(tmp_path: Path) -> None:
    wire = Wire(40000, 80)
    lost = range(1000, 2000)  # body bytes of the one segment the capture missed
    for side, data in upload_messages():
        if side == "c" and data.endswith(BODY):
            wire.send(side, data[:-len(BODY)])
            wire.send(side, BODY, mss=1000, drop=lost)
        else:
            wire.send(side, data)
    capture = wire.write(tmp_path / "gap.pcap")
    [session] = analyze([capture], extract_dir=tmp_path / "out").bits.sessions
    entity = session.entity
    assert not entity.complete
    data = Path(entity.path).read_bytes()
    assert data[:lost.start] == BODY[:lost.start] and data[lost.stop:TOTAL] == BODY[lost.stop:]
    assert [(c.first, c.last, c.acknowledged) for c in entity.coverage] == [
        (0, lost.start - 1, True), (lost.stop, TOTAL - 1, True)]
    assert entity.acknowledged_bytes == TOTAL - len(lost)


def exchanges_of(*captures: Path) -> list:
    found: list = []
    read_exchanges(captures, found.append)
    return found


def test_midstream_capture_takes_roles_from_the_data_when_the_server_port_is_higher(tmp_path: Path) -> None:
    wire = Wire(40000, 50000, handshake=False)  # the lower port is the client's
    messages = upload_messages()
    fragment = messages[2][1]
    wire.send("c", fragment[-4000:])  # the capture begins inside the fragment's body
    for side, data in messages[3:]:
        wire.send(side, data)
        wire.packets.append(wire.ack(wire.other(side)))
    orphan, close = exchanges_of(wire.write(tmp_path / "mid.pcap"))
    assert orphan.request is None and orphan.response.status == 200 and orphan.flags == {"orphan-response"}
    assert close.request.method == "BITS_POST" and close.response.status == 200 and not close.flags
    record = exchange_to_json(close)
    assert (record["client"], record["server"]) == (f"{CLIENT_ADDR}:40000", f"{SERVER_ADDR}:50000")
    conn = close.connection
    assert conn.data_bytes == (4000 + len(messages[4][1]), len(messages[3][1]) + len(messages[5][1]))


def test_data_recorded_after_the_ack_that_covers_it_still_counts(tmp_path: Path) -> None:
    wire = Wire(40000, 80)
    for side, data in upload_messages():
        if side == "c" and data.endswith(BODY):
            wire.send(side, data[:-len(BODY)])
            before = len(wire.packets)
            wire.send(side, BODY)
            for at in range(len(wire.packets) - 1, before - 1, -2):  # every other segment: ACK first
                segment = wire.packets[at]
                covered = segment[TCP].seq + len(segment[TCP].payload)
                wire.packets.insert(at, wire.packet("s", wire.next["s"], covered, b"", "A"))
        else:
            wire.send(side, data)
    out = tmp_path / "out"
    analysis = analyze([wire.write(tmp_path / "late.pcap")], extract_dir=out)
    [session] = analysis.bits.sessions
    assert session.entity.complete and Path(session.entity.path).read_bytes() == BODY
    assert analysis.run.captures[0].tcp["gaps"] == 0


@pytest.mark.skipif(shutil.which("editcap") is None, reason="editcap not installed")
def test_rotated_captures_read_as_one_with_frames_named_by_file(tmp_path: Path) -> None:
    whole = CAPTURES / "clean-multi-fragment.pcap"
    per_file = 400
    subprocess.run(["editcap", "-c", str(per_file), str(whole), str(tmp_path / "part.pcap")], check=True,
                   capture_output=True)
    parts = sorted(tmp_path.glob("part_*.pcap"))
    assert len(parts) == 3
    one, rotated = analyze([whole], extract_dir=tmp_path / "one"), analyze(parts, extract_dir=tmp_path / "rotated")

    def sessions(analysis):
        return [(s.id, s.verdict, s.total, s.acknowledged, s.entity.sha256, sorted(a.code for a in s.anomalies))
                for s in analysis.bits.sessions]

    assert sessions(rotated) == sessions(one) and one.bits.sessions[0].entity.complete
    frames = one.run.captures[0].frames
    assert rotated.problems == [] and [c.frames for c in rotated.run.captures] == [400, 400, frames - 800]
    assert sum(c.tcp["connections"] for c in rotated.run.captures) == one.run.captures[0].connections
    # Every message's frames name the file and the frame in it that the whole capture's frame became.
    names = [str(p) for p in parts]
    whole_records = [exchange_to_json(e) for e in exchanges_of(whole)]
    rotated_records = [exchange_to_json(e, names) for e in exchanges_of(*parts)]
    assert len(rotated_records) == len(whole_records) == sum(c.exchanges for c in rotated.run.captures)
    for mine, theirs in zip(rotated_records, whole_records):
        for kind in ("request", "response"):
            for end in ("first", "last"):
                number = theirs[kind][f"{end}_frame"] - 1
                assert (mine[kind][f"{end}_capture"], mine[kind][f"{end}_frame"]) == (
                    names[number // per_file], number % per_file + 1)
            assert mine[kind]["body_sha256"] == theirs[kind]["body_sha256"]
        assert mine["capture"] == mine["request"]["first_capture"]
