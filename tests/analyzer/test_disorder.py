"""Real corpus captures disordered as field captures are (tests/support/disorder.py), every byte kept:
the TCP streams must come out as from the original, with no byte declared lost; a control that
truly removes segments must lose exactly those bytes."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import pytest

from bitstrace.analyzer.capture import CaptureReader
from bitstrace.analyzer.decode import Decoder
from bitstrace.analyzer.exchanges import exchange_to_json
from bitstrace.analyzer.pipeline import read_exchanges
from bitstrace.analyzer.tcp import CLIENT, Connection, TcpReassembler

from tests.support.disorder import (TO_CLIENT, TO_SERVER, Tap, displace_handshakes_and_endings, drop, duplicate,
                      read_packets, shuffle, skew, write_pcap, write_two_taps)
from tests.support import REPO

CAPTURES = REPO / "captures"
MS = 1_000_000

CORPUS = sorted(p.name for p in CAPTURES.glob("*.pcap*"))
# upload-reply.pcap has a HEAD, whose answer announces a Content-Length it does not carry: when
# the answer is recorded before the request, the exchange layer still frames it without the
# request (its part of issue 12, item 3), so only there are response bodies not compared.
ANSWER_NEEDS_REQUEST_FIRST = {"upload-reply.pcap": ("server-clock", "20ms-skew", "all-shuffled-within-16",
                                                    "each-direction-shuffled-within-4")}

VARIANTS = {
    **{f"server-clock-{ms}ms-behind": (lambda p, d=ms * MS: skew(p, TO_CLIENT, -d)) for ms in (1, 2, 20, 500, 1000)},
    **{f"client-clock-{ms}ms-behind": (lambda p, d=ms * MS: skew(p, TO_SERVER, -d)) for ms in (1, 20, 1000)},
    "server-clock-20ms-ahead": lambda p: skew(p, TO_CLIENT, 20 * MS),
    "each-direction-shuffled-within-4": lambda p: shuffle(p, 4, per_direction=True),
    "each-direction-shuffled-within-16": lambda p: shuffle(p, 16, seed=2, per_direction=True),
    "all-shuffled-within-6": lambda p: shuffle(p, 6),
    "all-shuffled-within-16": lambda p: shuffle(p, 16, seed=3),
    "syn-late-fin-early": lambda p: displace_handshakes_and_endings(p, 3),
    "3%-duplicated": lambda p: duplicate(p, 0.03),
    "20ms-skew-then-shuffled-within-8": lambda p: shuffle(skew(p, TO_CLIENT, -20 * MS), 8, seed=4),
}


class StreamSink:
    """Each direction's bytes, gaps marked, keyed by the connection's ends (not its id: the
    order connections are first seen in can change with the frames')."""

    def __init__(self) -> None:
        self.streams: dict[tuple, bytearray] = defaultdict(bytearray)
        self.gap_bytes = 0
        self._keys: dict[int, tuple] = {}
        self._seen: dict[tuple, int] = defaultdict(int)

    def _key(self, conn: Connection, direction: int) -> tuple:
        return (*self._keys[conn.id], direction)

    def on_open(self, conn: Connection) -> None:
        ends = tuple(sorted((conn.client, conn.server)))
        self._keys[conn.id] = (ends, self._seen[ends])
        self._seen[ends] += 1

    def on_data(self, conn, direction, data, frame, ts_ns) -> None:
        end = conn.client if direction == CLIENT else conn.server
        self.streams[(*self._keys[conn.id], end)] += data

    def on_gap(self, conn, direction, size, frame, ts_ns) -> None:
        end = conn.client if direction == CLIENT else conn.server
        self.streams[(*self._keys[conn.id], end)] += b"\0?GAP?\0" * size
        self.gap_bytes += size

    def on_conflict(self, *args) -> None: ...

    def on_fin(self, *args) -> None: ...

    def on_rst(self, *args) -> None: ...

    def on_close(self, conn) -> None: ...


def reassemble(path: Path) -> StreamSink:
    """The pipeline's capture → segments → streams path, with a sink that keeps the streams."""
    sink = StreamSink()
    reassembler = TcpReassembler(sink)
    Decoder().decode_into(CaptureReader(str(path)).records(), reassembler.receive)
    reassembler.finish()
    return sink


def digests(sink: StreamSink) -> dict[tuple, str]:
    return {key: hashlib.sha256(data).hexdigest() for key, data in sink.streams.items() if data}


def bodies(path: Path) -> tuple[list, list]:
    """The sorted request and response body digests of `--http`."""
    requests, responses = [], []

    def take(exchange) -> None:
        record = exchange_to_json(exchange, None)
        if record.get("request"):
            requests.append((str(record["request"]["body_sha256"]), record["request"]["partial"]))
        if record.get("response"):
            responses.append((str(record["response"]["body_sha256"]), record["response"]["partial"]))

    read_exchanges([str(path)], take)
    return sorted(requests), sorted(responses)


@pytest.fixture(scope="module")
def originals() -> dict[str, tuple]:
    return {}


def original(name: str, cache: dict[str, tuple]) -> tuple:
    if name not in cache:
        path = CAPTURES / name
        sink = reassemble(path)
        cache[name] = (read_packets(path), digests(sink), sink.gap_bytes, bodies(path))
    return cache[name]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", CORPUS)
def test_disordered_copy_gives_the_original_streams_and_bodies(name, variant, originals, tmp_path):
    packets, streams, gap_bytes, (requests, responses) = original(name, originals)
    copy = tmp_path / "copy.pcap"
    write_pcap(copy, VARIANTS[variant](packets))
    sink = reassemble(copy)
    assert digests(sink) == streams
    assert sink.gap_bytes == gap_bytes  # none but the original's own (gap.pcap has a real one)
    copy_requests, copy_responses = bodies(copy)
    assert copy_requests == requests
    if not variant.startswith(ANSWER_NEEDS_REQUEST_FIRST.get(name, ())):
        assert copy_responses == responses


@pytest.mark.parametrize("skew_ms", [0, 3, 700])
@pytest.mark.parametrize("name", ["clean-multi-fragment.pcap", "two-sessions-interleaved.pcap", "gap.pcap"])
def test_two_tap_pcapng_with_vlans_resolutions_and_clocks_apart_reads_as_one_conversation(
        name, skew_ms, originals, tmp_path):
    packets, streams, gap_bytes, (requests, _) = original(name, originals)
    copy = tmp_path / "two-taps.pcapng"
    write_two_taps(copy, packets, Tap(vlan=10, tsresol=6), Tap(vlan=20, tsresol=9, clock_offset_ns=-skew_ms * MS))
    reader = CaptureReader(str(copy))
    assert sum(1 for _ in reader.records()) == len(packets) and reader.format == "pcapng"
    sink = reassemble(copy)
    assert digests(sink) == streams and sink.gap_bytes == gap_bytes
    assert bodies(copy)[0] == requests


def test_truly_removed_segments_are_exactly_the_gaps(originals, tmp_path):
    packets, _, _, _ = original("clean-multi-fragment.pcap", originals)
    data = [p for p in packets if p.is_data and p.stream_offset is not None]
    starts = defaultdict(int)
    for p in data:
        starts[(p.direction, p.seq)] += 1
    unique = [p for p in data if starts[(p.direction, p.seq)] == 1]
    lost = unique[10:13] + unique[len(unique) // 2:len(unique) // 2 + 1] + [
        p for p in unique if p.direction == TO_CLIENT][3:4]
    lost_bytes = sum(p.payload for p in lost)
    full = reassemble(CAPTURES / "clean-multi-fragment.pcap")
    copy = tmp_path / "lost.pcap"
    write_pcap(copy, shuffle(drop(packets, lost), 4, per_direction=True))
    sink = reassemble(copy)
    assert sink.gap_bytes == lost_bytes
    # Each stream is the original with exactly the removed segments' bytes marked missing.
    expected = {key: bytearray(value) for key, value in full.streams.items()}
    marker = b"\0?GAP?\0"
    for key in expected:
        holes = sorted((p.stream_offset, p.payload) for p in lost if _sender(p) == key[2])
        rebuilt, position = bytearray(), 0
        for offset, size in holes:
            rebuilt += expected[key][position:offset] + marker * size
            position = offset + size
        expected[key] = rebuilt + expected[key][position:]
    assert {k: hashlib.sha256(v).hexdigest() for k, v in expected.items()} == digests(sink)


def test_reorder_window_option_decides_how_long_holes_wait(originals, tmp_path, capsys):
    from bitstrace.cli.analyze import main

    packets, _, _, (requests, _) = original("clean-multi-fragment.pcap", originals)
    copy = tmp_path / "shuffled.pcap"
    write_pcap(copy, shuffle(packets, 8, per_direction=True))
    assert main(["--http", "--no-progress", str(copy)]) == 0
    default = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["--http", "--no-progress", "--reorder-window", "0.000001", str(copy)]) == 0
    hasty = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    def partial(records: list) -> int:
        return sum(bool(record["request"] and record["request"]["partial"]) for record in records)

    assert partial(default) == 0 and partial(hasty) > 0  # with no time to wait, holes gave up early


def _sender(packet) -> tuple:
    """The sending end (address, port) of a segment, as the StreamSink keys a direction."""
    found = []

    def receive(frame, ts_ns, src, sport, *rest) -> None:
        found.append((src, sport))

    Decoder().decode_into(iter([(1, packet.ts_ns, packet.link_type, packet.data, len(packet.data))]), receive)
    return found[0]


def outcome(path: Path) -> list[tuple]:
    """What a user reads of each session: its id, state, verdict and anomaly codes."""
    from bitstrace.analyzer.analysis import analyze

    bits = analyze([str(path)]).bits
    return sorted((s.id or s.key, s.state.value, str(s.verdict), tuple(sorted(a.code for a in s.anomalies)))
                  for s in bits.sessions) + [("-", "", "", tuple(sorted(a.code for a in bits.anomalies)))]


# Frames shuffled out of time order still read as the original streams, but the session walk
# then sees messages timed by the frame that released their bytes, so timing checks
# (concurrent-requests) fire that the original does not raise: shuffles are left out here
# until messages carry the time of the frames that carried them.
IN_TIME_ORDER = sorted(v for v in VARIANTS if "shuffled" not in v)


@pytest.mark.parametrize("variant", IN_TIME_ORDER)
@pytest.mark.parametrize("name", CORPUS)
def test_disordered_copy_gives_the_original_sessions_verdicts_and_anomalies(name, variant, originals, tmp_path):
    packets = original(name, originals)[0]
    copy = tmp_path / "copy.pcap"
    write_pcap(copy, VARIANTS[variant](packets))
    assert outcome(copy) == outcome(CAPTURES / name)
