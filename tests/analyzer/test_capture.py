"""CaptureReader on crafted pcap/pcapng/gzip files, pipes, real tcpdump/tshark output and damage."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from tests.support import craft
from bitstrace.analyzer.capture import CHUNK_SIZE, CaptureReader, Frame
from bitstrace.analyzer.decode import Decoder

SECOND = 1_000_000_000
T0 = 1_700_000_000 * SECOND


def ether(payload: bytes = b"data", sport: int = 40000) -> Ether:
    return (Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP(src="192.0.2.1", dst="192.0.2.2") / TCP(sport=sport, dport=80, flags="PA") / payload)


def frames_of(source, **kwargs) -> tuple[CaptureReader, list[Frame]]:
    reader = CaptureReader(source, **kwargs)
    return reader, [Frame(f.number, f.ts_ns, f.link_type, bytes(f.data), f.orig_len) for f in reader]


PACKETS = [ether(b"first"), ether(b"second" * 100, sport=40001), ether(b"", sport=40002)]
TIMES = [T0 + 123_456_789, T0 + SECOND + 1_000, T0 + 7 * SECOND]


@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize("nanosecond", [False, True])
def test_pcap_byte_orders_and_resolutions(tmp_path, byte_order, nanosecond):
    path = craft.write(tmp_path / "c.pcap", craft.pcap_bytes(zip(TIMES, PACKETS), byte_order=byte_order,
                                                             nanosecond=nanosecond))
    reader, frames = frames_of(path)
    expected_first = T0 + 123_456_789 if nanosecond else T0 + 123_456_000
    assert [f.ts_ns for f in frames] == [expected_first, T0 + SECOND + 1_000, T0 + 7 * SECOND]
    assert [f.number for f in frames] == [1, 2, 3]
    assert [f.data for f in frames] == [bytes(p) for p in PACKETS]
    assert {f.link_type for f in frames} == {1}
    assert reader.format == "pcap" and reader.complete and not reader.problems
    assert reader.bytes_read == os.path.getsize(path)
    assert reader.name == path


def test_pcap_snaplen_cut_keeps_wire_length(tmp_path):
    path = craft.write(tmp_path / "c.pcap", craft.pcap_bytes(zip(TIMES, PACKETS), snaplen=64))
    _, frames = frames_of(path)
    assert [len(f.data) for f in frames] == [min(64, len(p)) for p in PACKETS]
    assert [f.orig_len for f in frames] == [len(p) for p in PACKETS]


def test_records_across_chunk_boundaries(tmp_path):
    # Record sizes that do not divide the chunk size, plus one record larger than a chunk.
    packets = [bytes(ether(b"z" * (size % 1400))) for size in range(0, 600 * 7, 7)]
    packets.insert(300, packets[0] + b"L" * (CHUNK_SIZE + 1000))  # not valid IP; a capture may hold it
    path = craft.write(tmp_path / "c.pcap", craft.pcap_bytes(
        [(T0 + i * 1000, p) for i, p in enumerate(packets)], snaplen=CHUNK_SIZE * 2))
    reader, frames = frames_of(path)
    assert frames == [Frame(i + 1, T0 + i * 1000, 1, p, len(p)) for i, p in enumerate(packets)]
    assert reader.complete and reader.bytes_read == os.path.getsize(path)


def test_pcapng_interfaces_sections_and_block_types(tmp_path):
    le, be = "<", ">"
    ipv6 = IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(sport=1, dport=2)
    data = b"".join([
        craft.shb(be),
        craft.idb(1, be, snaplen=80),                                  # 0: Ethernet, µs (default)
        craft.idb(101, be, tsresol=9, tsoffset=-10),                   # 1: raw IP, ns, offset -10 s
        craft.epb(0, 1_700_000_000_123_456, PACKETS[0], be),
        craft.epb(1, 1_700_000_000_000_000_042, bytes(ipv6), be),
        craft.spb(PACKETS[1], be),                                    # cut to interface 0's snaplen
        craft.block(0x0BAD, b"unknown block type", be),
        craft.opb(0, 1_700_000_001_000_000, PACKETS[2], be),
        craft.block(5, b"\0" * 12, be),                                # interface statistics
        craft.shb(le),                                                 # a new section: new interfaces
        craft.idb(229, le, tsresol=0x80 | 20, tsoffset=1_700_000_000),  # IPv6 link, 2^-20 s
        craft.epb(0, 3 << 19, bytes(ipv6), le),                        # 1.5 s after the offset
    ])
    reader, frames = frames_of(craft.write(tmp_path / "c.pcapng", data))
    assert reader.format == "pcapng" and reader.complete and not reader.problems
    assert frames == [
        Frame(1, T0 + 123_456_000, 1, bytes(PACKETS[0]), len(PACKETS[0])),
        Frame(2, T0 + 42 - 10 * SECOND, 101, bytes(ipv6), len(ipv6)),
        Frame(3, 0, 1, bytes(PACKETS[1])[:80], len(PACKETS[1])),
        Frame(4, T0 + SECOND, 1, bytes(PACKETS[2]), len(PACKETS[2])),
        Frame(5, T0 + SECOND * 3 // 2, 229, bytes(ipv6), len(ipv6)),
    ]


def test_pcapng_epb_snaplen_cut(tmp_path):
    data = craft.shb() + craft.idb(1, snaplen=60) + craft.epb(0, 5, PACKETS[1], snaplen=60)
    _, frames = frames_of(io.BytesIO(data))
    assert frames == [Frame(1, 5000, 1, bytes(PACKETS[1])[:60], len(PACKETS[1]))]


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
def test_gzip_file(tmp_path, kind):
    data = (craft.pcap_bytes(zip(TIMES, PACKETS)) if kind == "pcap" else
            craft.shb() + craft.idb(1) + b"".join(craft.epb(0, t // 1000, p) for t, p in zip(TIMES, PACKETS)))
    path = craft.write(tmp_path / "c.gz", data, compress=True)
    reader, frames = frames_of(path)
    assert reader.format == kind and reader.complete and not reader.problems
    assert [f.data for f in frames] == [bytes(p) for p in PACKETS]
    assert reader.bytes_read == os.path.getsize(path)


def test_concatenated_gzip_members():
    data = craft.pcap_bytes(zip(TIMES, PACKETS))
    _, frames = frames_of(io.BytesIO(gzip.compress(data[:50]) + gzip.compress(data[50:])))
    assert [f.data for f in frames] == [bytes(p) for p in PACKETS]


COUNT_FROM_STDIN = ("import sys; from bitstrace.analyzer.capture import CaptureReader; r = CaptureReader('-'); "
                    "print(r.format, [(f.number, f.ts_ns, len(f.data)) for f in r], r.complete, r.name)")


@pytest.mark.parametrize("compress", [False, True])
def test_stdin_through_a_pipe(compress):
    data = craft.pcap_bytes(zip(TIMES, PACKETS))
    out = subprocess.run([sys.executable, "-c", COUNT_FROM_STDIN],
                         input=gzip.compress(data) if compress else data, capture_output=True, check=True)
    expected = [(i + 1, f.ts_ns, len(f.data)) for i, f in enumerate(CaptureReader(io.BytesIO(data)))]
    assert out.stdout.decode().strip() == f"pcap {expected} True <stdin>"


def test_pipe_is_read_as_it_arrives():
    """A frame is yielded as soon as its record is in the pipe, before the writer finishes."""
    data = craft.pcap_bytes(zip(TIMES, PACKETS))
    first_record_end = 24 + 16 + len(PACKETS[0])
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as pipe_in, open(write_end, "wb", buffering=0) as pipe_out:
        pipe_out.write(data[:first_record_end])
        reader = CaptureReader(pipe_in)
        frames = iter(reader)
        assert bytes(next(frames).data) == bytes(PACKETS[0])
        writer = threading.Thread(target=lambda: (pipe_out.write(data[first_record_end:]), pipe_out.close()))
        writer.start()
        assert [f.number for f in frames] == [2, 3]
        writer.join()
    assert reader.complete


def capture_with(tool: list[str], source: str) -> bytes:
    return subprocess.run(tool + ["-r", source, "-w", "-"], capture_output=True, check=True).stdout


@pytest.mark.skipif(not shutil.which("tcpdump") or not shutil.which("tshark"), reason="needs tcpdump and tshark")
def test_real_writers_through_stdin_match_tshark(tmp_path):
    source = craft.write(tmp_path / "in.pcap", craft.pcap_bytes(zip(TIMES, PACKETS), nanosecond=True))
    fields = subprocess.run(["tshark", "-r", source, "-T", "fields", "-e", "frame.number", "-e", "frame.len",
                             "-e", "frame.time_epoch"], capture_output=True, text=True, check=True).stdout.split("\n")
    expected = [line.split("\t") for line in fields if line]
    expected = [(int(n), int(length), int(epoch.replace(".", ""))) for n, length, epoch in expected]
    for writer in (["tcpdump", "--time-stamp-precision=nano"], ["tshark", "-F", "pcapng"]):
        out = subprocess.run([sys.executable, "-c", COUNT_FROM_STDIN], input=capture_with(writer, source),
                             capture_output=True, check=True).stdout.decode()
        assert out.startswith("pcapng" if "tshark" in writer else "pcap")
        assert f"{[(n, ts, length) for n, length, ts in expected]} True" in out


# --- damaged input -------------------------------------------------------------------------

def only_problem(reader: CaptureReader):
    assert len(reader.problems) == 1, reader.problems
    return reader.problems[0]


@pytest.mark.parametrize("cut", [5, 16 + 10, 16 + 100])  # in the record header / in the data
def test_truncated_pcap(tmp_path, cut):
    data = craft.pcap_bytes(zip(TIMES, PACKETS))
    second_record = 24 + 16 + len(PACKETS[0])
    path = craft.write(tmp_path / "c.pcap", data[:second_record + cut])
    reader, frames = frames_of(path)
    assert [f.data for f in frames] == [bytes(PACKETS[0])]
    problem = only_problem(reader)
    assert (problem.kind, problem.file, problem.frame, problem.offset, problem.fatal) == (
        "truncated-record", path, 2, second_record, True)
    assert not reader.complete


def test_truncated_pcap_header():
    reader, frames = frames_of(io.BytesIO(craft.pcap_bytes([])[:10]))
    assert frames == [] and not reader.complete
    assert only_problem(reader).kind == "truncated-record"


def test_truncated_gzip_reports_both_layers(tmp_path):
    compressed = gzip.compress(craft.pcap_bytes(zip(TIMES, PACKETS)))
    reader, frames = frames_of(io.BytesIO(compressed[:-30]))
    assert [f.number for f in frames] == [1, 2]
    assert {p.kind for p in reader.problems} == {"truncated-gzip", "truncated-record"}
    assert not reader.complete


def test_corrupt_gzip():
    compressed = bytearray(gzip.compress(craft.pcap_bytes(zip(TIMES, PACKETS)) * 3))
    compressed[30:60] = b"\xff" * 30
    reader, _ = frames_of(io.BytesIO(bytes(compressed)))
    assert any(p.kind == "corrupt-gzip" for p in reader.problems) and not reader.complete


def test_impossible_pcap_record_length():
    data = bytearray(craft.pcap_bytes(zip(TIMES, PACKETS)))
    second_record = 24 + 16 + len(PACKETS[0])
    struct.pack_into("<I", data, second_record + 8, 0x7FFFFFFF)
    reader, frames = frames_of(io.BytesIO(bytes(data)))
    assert len(frames) == 1
    problem = only_problem(reader)
    assert (problem.kind, problem.frame, problem.offset) == ("corrupt-record", 2, second_record)


def pcapng_three_packets() -> tuple[bytes, list[int]]:
    blocks = [craft.shb(), craft.idb(1)] + [craft.epb(0, t // 1000, p) for t, p in zip(TIMES, PACKETS)]
    starts = [sum(map(len, blocks[:i])) for i in range(len(blocks))]
    return b"".join(blocks), starts[2:]


@pytest.mark.parametrize("where", ["length-not-multiple-of-4", "length-too-small", "trailer-mismatch"])
def test_pcapng_corrupt_block_stops_reading(where):
    data, starts = pcapng_three_packets()
    data = bytearray(data)
    second = starts[1]
    if where == "trailer-mismatch":
        struct.pack_into("<I", data, starts[2] - 4, 999)
    else:
        struct.pack_into("<I", data, second + 4, 4 * 9 + 2 if where == "length-not-multiple-of-4" else 8)
    reader, frames = frames_of(io.BytesIO(bytes(data)))
    assert [f.number for f in frames] == [1]
    problem = only_problem(reader)
    assert (problem.kind, problem.frame, problem.offset, problem.fatal) == ("corrupt-block", 2, second, True)
    assert not reader.complete


def test_pcapng_self_consistent_bad_blocks_are_skipped():
    data, starts = pcapng_three_packets()
    data = bytearray(data)
    struct.pack_into("<I", data, starts[0] + 20, 5000)  # captured length past the block
    struct.pack_into("<I", data, starts[1] + 8, 7)      # an interface the section never described
    reader, frames = frames_of(io.BytesIO(bytes(data)))
    assert frames == [Frame(1, TIMES[2] // 1000 * 1000, 1, bytes(PACKETS[2]), len(PACKETS[2]))]
    assert [(p.kind, p.frame, p.offset, p.fatal) for p in reader.problems] == [
        ("corrupt-block", 1, starts[0], False), ("unknown-interface", 1, starts[1], False)]
    assert reader.complete


def test_pcapng_truncated_block():
    data, starts = pcapng_three_packets()
    reader, frames = frames_of(io.BytesIO(data[:starts[2] + 30]))
    assert [f.number for f in frames] == [1, 2]
    problem = only_problem(reader)
    assert (problem.kind, problem.frame, problem.offset) == ("truncated-record", 3, starts[2])


def test_many_skipped_blocks_make_bounded_problems():
    blocks = [craft.shb(), craft.idb(1)] + [craft.epb(9, 0, PACKETS[0])] * 500 + [craft.epb(0, 0, PACKETS[0])]
    reader, frames = frames_of(io.BytesIO(b"".join(blocks)))
    assert len(frames) == 1
    assert reader.problems.counts == {"unknown-interface": 500}
    assert len(reader.problems) == reader.problems.limit + 1


@pytest.mark.parametrize("content, kind", [
    (b"", "empty-file"),
    (b"GET / HTTP/1.1\r\nHost: example\r\n\r\n", "not-a-capture"),
    (b"\x7fELF", "not-a-capture"),
    (gzip.compress(b"just some text"), "not-a-capture"),
])
def test_not_a_capture(tmp_path, content, kind):
    path = craft.write(tmp_path / "f", content)
    reader, frames = frames_of(path)
    assert frames == [] and reader.format is None and not reader.complete
    problem = only_problem(reader)
    assert (problem.kind, problem.file, problem.offset) == (kind, path, 0)


def test_missing_file(tmp_path):
    reader, frames = frames_of(tmp_path / "nothing-here.pcap")
    assert frames == [] and not reader.complete
    assert only_problem(reader).kind == "unreadable-file"


@settings(max_examples=150, deadline=None)
@given(prefix=st.sampled_from([b"", craft.pcap_bytes([])[:24], craft.shb(), craft.shb() + craft.idb(1),
                               craft.pcap_bytes([], byte_order=">")]),
       body=st.binary(max_size=400), compress=st.booleans())
def test_random_bytes_never_raise(prefix, body, compress):
    data = prefix + body
    reader = CaptureReader(io.BytesIO(gzip.compress(data) if compress else data))
    frames = list(reader)
    assert all(f.number == i + 1 for i, f in enumerate(frames))
    assert reader.complete or any(p.fatal for p in reader.problems)


@pytest.mark.needs_root
@pytest.mark.skipif(not shutil.which("tcpdump") or os.geteuid() != 0, reason="needs tcpdump as root")
def test_live_tcpdump_pipe_is_decoded_as_it_streams():
    """`tcpdump -w - | bits-analyze -`: real loopback TCP, read from the pipe while tcpdump still runs."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    dump = subprocess.Popen(["tcpdump", "-i", "lo", "-U", "-w", "-", f"tcp port {port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert b"listening on" in dump.stderr.readline()
        with socket.create_connection(("127.0.0.1", port)) as client, server.accept()[0] as peer:
            client.sendall(b"BITS_POST /up HTTP/1.1\r\n\r\n")
            assert peer.recv(100) == b"BITS_POST /up HTTP/1.1\r\n\r\n"
        decoder = Decoder("<stdin>")
        payloads = []
        for frame in CaptureReader(dump.stdout):
            segment = decoder.decode(frame)
            if segment and segment.payload:
                payloads.append((segment.dport, bytes(segment.payload)))
                break  # still streaming: tcpdump has not stopped
        assert payloads == [(port, b"BITS_POST /up HTTP/1.1\r\n\r\n")]
    finally:
        dump.terminate()
        dump.wait()
        server.close()
