"""Entity extraction: byte-exact rebuilding, coverage, refused data, conflicts, safe names."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitstrace.analyzer.bits import extract
from bitstrace.analyzer.bits.extract import PARTIAL_SUFFIX, Extractor, entity_name, sanitise
from bitstrace.analyzer.bits.sessions import SessionTracker
from bitstrace.analyzer.bits.protocol import Header, PacketType, parse_content_range
from tests.support import REPO
from tests.support.bits_fixtures import SID, SID2, Wire, codes, payload

T = 12_000
FRAGS = [(0, 5119), (5120, 10239), (10240, 11999)]
NAME = "A0FF5911-4144-45B3-BF27-27AFC8EC8A67_report.bin"


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_clean_upload_is_rebuilt_byte_exact(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.upload(total=T)
    session, = w.finish().sessions
    entity = session.entity
    assert entity is not None and entity.complete
    assert files(tmp_path) == [NAME]
    data = (tmp_path / NAME).read_bytes()
    assert data == payload(T)
    assert entity.sha256 == hashlib.sha256(data).hexdigest()
    assert entity.path == os.path.join(str(tmp_path), NAME)
    assert [(c.first, c.last, c.frames, c.acknowledged) for c in entity.coverage] == [
        (0, T - 1, tuple(f.request_frame for f in session.fragments), True)]
    assert session.anomalies == []


def test_out_of_order_and_overlapping_fragments(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 6999, T)
    w.fragment(SID, 3000, 9999, T)  # Win32 trim: only 7000-9999 is new
    w.fragment(SID, 10000, 11999, T)
    w.close()
    entity = w.finish().sessions[0].entity
    assert entity.complete and (tmp_path / NAME).read_bytes() == payload(T)


def test_session_spread_over_connections_and_many_chunks(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.create()
    for first, last in FRAGS:
        w.connect()
        w.fragment(SID, first, last, T, chunks=7)
    w.close()
    w.finish()
    assert (tmp_path / NAME).read_bytes() == payload(T)


def test_partial_entity_is_marked_and_mapped(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, *FRAGS[0], T)
    w.fragment(SID, *FRAGS[1], T, status=None)  # never acknowledged
    entity = w.finish().sessions[0].entity
    assert not entity.complete and entity.sha256 is None
    assert files(tmp_path) == [NAME + PARTIAL_SUFFIX]
    assert [(c.first, c.last, c.acknowledged) for c in entity.coverage] == [(0, 5119, True), (5120, 10239, False)]
    assert entity.acknowledged_bytes == 5120
    assert (tmp_path / (NAME + PARTIAL_SUFFIX)).read_bytes()[:5120] == payload(T)[:5120]


def test_refused_fragment_does_not_count_as_delivered(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, *FRAGS[0], T)
    w.fragment(SID, *FRAGS[2], T, status=416, received=5120)  # gap: the server kept nothing
    w.fragment(SID, *FRAGS[1], T, status=500, received=None)  # refused
    entity = w.finish().sessions[0].entity
    assert not entity.complete and entity.acknowledged_bytes == 5120
    assert [(c.first, c.last, c.acknowledged) for c in entity.coverage] == [(0, 5119, True), (5120, 11999, False)]


def test_unacknowledged_bytes_are_replaced_by_the_acknowledged_resend(tmp_path: Path) -> None:
    good = payload(T)
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, *FRAGS[0], T)
    w.fragment(SID, *FRAGS[1], T, seed=9, status=500, received=None)  # garbage, refused
    w.fragment(SID, *FRAGS[1], T)
    w.fragment(SID, *FRAGS[2], T)
    session = w.finish().sessions[0]
    assert session.entity.complete and (tmp_path / NAME).read_bytes() == good
    conflict, = [a for a in session.anomalies if a.code == "resend-conflict"]
    assert "5120-10239" in conflict.message and "replaced" in conflict.message


def test_acknowledged_bytes_are_kept_against_a_differing_resend(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, *FRAGS[0], T)
    tampered = bytearray(payload(T)[2000:8000])
    tampered[1000] ^= 0xFF  # byte 3000 differs inside the acknowledged range
    w.fragment(SID, 2000, 7999, T, body=bytes(tampered))
    w.fragment(SID, 8000, 11999, T)
    session = w.finish().sessions[0]
    assert session.entity.complete and (tmp_path / NAME).read_bytes() == payload(T)
    conflicts = [a for a in session.anomalies if a.code == "resend-conflict"]
    assert len(conflicts) == 1 and "2000-5119" in conflicts[0].message and "kept" in conflicts[0].message
    assert "first differing byte 3000" in conflicts[0].message


def test_identical_resend_is_not_a_conflict(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, *FRAGS[0], T)
    w.fragment(SID, *FRAGS[0], T)
    assert "resend-conflict" not in codes(w.finish().sessions[0].anomalies)


def test_ack_below_the_fragment_end_acknowledges_only_up_to_n(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, *FRAGS[0], T, received=4000)  # the server trimmed
    entity = w.finish().sessions[0].entity
    assert [(c.first, c.last, c.acknowledged) for c in entity.coverage] == [(0, 3999, True), (4000, 5119, False)]


def test_two_sessions_and_no_content_name(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.upload(SID)
    w.create(SID2)
    w.fragment(SID2, 0, 99, 100, content_name=None, seed=3)
    w.close(SID2)
    w.finish()
    assert files(tmp_path) == ["A0FF5911-4144-45B3-BF27-27AFC8EC8A67_report.bin", "C85B4E0A-1D2E-4F6A-9B8C-0D1E2F3A4B5C"]
    assert (tmp_path / "C85B4E0A-1D2E-4F6A-9B8C-0D1E2F3A4B5C").read_bytes() == payload(100, 3)


HOSTILE = ["../x", "../../../../tmp/evil", "/etc/passwd", "C:\\x", "C:\\Windows\\system32\\cfg.sys",
           "a\x00b", "\x01\x02\x1b[31m", "x" * 10_000, "..", ".", "", "CON", "nul.txt", " . ",
           "dir/..", "\\\\server\\share\\f", "é" * 300]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_content_names_stay_inside_dir(tmp_path: Path, name: str) -> None:
    out = tmp_path / "out"
    w = Wire(out)
    w.create()
    w.fragment(SID, 0, 99, 100, content_name=name)
    w.close()
    w.finish()
    assert files(tmp_path) == ["out"]
    written, = files(out)
    assert "/" not in written and "\x00" not in written and "\\" not in written
    assert len(written.encode()) <= 255 and written.startswith("A0FF5911-")
    assert (out / written).resolve().parent == out.resolve()
    assert (out / written).read_bytes() == payload(100)


def test_existing_files_and_symlinks_are_never_followed_or_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, out / NAME)
    w = Wire(out)
    w.upload()
    entity = w.finish().sessions[0].entity
    assert victim.read_bytes() == b"precious"
    assert entity.path.endswith("_report.bin-2") and Path(entity.path).read_bytes() == payload(T)
    assert os.path.islink(out / NAME)


def test_sanitise_rules() -> None:
    assert sanitise("../../etc/passwd") == "passwd"
    assert sanitise("C:\\Users\\x\\report.doc") == "report.doc"
    assert sanitise("a\x00b\x7fc") == "abc"
    assert sanitise('what?*<>|".txt') == "what______.txt"
    assert sanitise("COM1.log") == "_COM1.log"
    assert sanitise("..") == "" and sanitise(" .hidden. ") == "hidden"
    assert len(sanitise("x" * 10_000).encode()) <= 180
    assert entity_name("{ABC}", None) == "ABC"
    assert entity_name("../../{x}", "../y") == "x_y"
    assert entity_name("{}", "\x00") == "session"


def test_nothing_left_behind_but_the_entities(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, *FRAGS[0], T, status=None)  # the exchange is never settled with an ack
    w.finish()
    assert files(tmp_path) == [NAME + PARTIAL_SUFFIX]


@settings(max_examples=150, deadline=None)
@given(total=st.integers(1, 48), sends=st.lists(st.tuples(
    st.integers(0, 47), st.integers(0, 47), st.integers(0, 3), st.sampled_from([200, 200, 416, 500, None]),
    st.integers(0, 48), st.integers(1, 4)), min_size=1, max_size=12))
def test_coverage_map_matches_a_byte_model(tmp_path_factory, total: int, sends: list) -> None:
    """Against a per-byte model: acknowledged bytes are never overwritten, others take the latest copy,
    and a 200 acknowledges the bytes its fragment stored below min(E+1, N)."""
    out = tmp_path_factory.mktemp("out")
    w = Wire(out)
    w.create()
    value: list[int | None] = [None] * total
    acked = [False] * total
    for a, b, seed, status, received, chunks in sends:
        first, last = sorted((a % total, b % total))
        body = payload(total, seed)[first:last + 1]
        owned = [i for i in range(first, last + 1) if not acked[i]]
        for i in owned:
            value[i] = body[i - first]
        w.fragment(SID, first, last, total, body=body, status=status, received=received if status else None,
                   chunks=chunks)
        if status == 200:
            for i in owned:
                acked[i] = i < min(last + 1, received)
    entity = w.finish().sessions[0].entity
    data = Path(entity.path).read_bytes()
    for covered in entity.coverage:
        for i in range(covered.first, covered.last + 1):
            assert data[i] == value[i] and acked[i] == covered.acknowledged
    present = {i for c in entity.coverage for i in range(c.first, c.last + 1)}
    assert present == {i for i in range(total) if value[i] is not None}
    assert entity.complete == all(acked)
    if entity.complete:
        assert entity.sha256 == hashlib.sha256(bytes(value)).hexdigest()


def test_reissued_session_id_gets_its_own_entity(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.upload(SID, seed=1)
    w.upload(SID, seed=2)  # a server deriving ids from client and URL issues the same id again
    first, second = w.finish().sessions
    assert (first.generation, second.generation) == (0, 1)
    assert Path(first.entity.path).read_bytes() == payload(T, 1)
    assert Path(second.entity.path).read_bytes() == payload(T, 2)
    assert second.entity.path.endswith("-2") and "resend-conflict" not in codes(first.anomalies + second.anomalies)


# --- the streamed sha256 ----------------------------------------------------------------------
# Publishing hashes only what the streamed hash does not cover; counting the bytes it reads back
# shows which path each upload took.

def finish_counting_read_back(w: Wire, monkeypatch: pytest.MonkeyPatch):
    read: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, size: int, offset: int) -> bytes:
        block = real_pread(fd, size, offset)
        read.append(len(block))
        return block

    with monkeypatch.context() as patch:
        patch.setattr(os, "pread", counting_pread)
        session = w.finish().sessions[0]
    entity = session.entity
    assert entity.complete and entity.sha256 == hashlib.sha256(Path(entity.path).read_bytes()).hexdigest()
    return session, sum(read)


def hold_acks(w: Wire) -> list:
    """Bodies pass now, acks later: several fragments in flight at once."""
    held: list = []
    w.tracker.on_exchange = held.append
    return held


def release_acks(w: Wire, held: list) -> None:
    del w.tracker.on_exchange
    for exchange in held:
        w.tracker.on_exchange(exchange)


def test_in_order_upload_is_hashed_as_it_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = Wire(tmp_path)
    w.create()
    for first, last in FRAGS:
        w.fragment(SID, first, last, T, chunks=7)
    w.close()
    session, read_back = finish_counting_read_back(w, monkeypatch)
    assert read_back == 0 and session.entity.sha256 == hashlib.sha256(payload(T)).hexdigest()


def test_resends_of_acknowledged_bytes_leave_the_streamed_hash_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, *FRAGS[0], T)
    w.fragment(SID, *FRAGS[1], T)
    w.fragment(SID, *FRAGS[0], T, seed=9)  # differing resend: acknowledged bytes are kept
    w.fragment(SID, 3000, 11999, T)  # Win32 trim: only 10240-11999 is new, and it continues the hash
    session, read_back = finish_counting_read_back(w, monkeypatch)
    assert read_back == 0 and session.entity.sha256 == hashlib.sha256(payload(T)).hexdigest()


def test_refused_fragments_do_not_enter_the_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, *FRAGS[0], T)
    w.fragment(SID, *FRAGS[1], T, seed=9, status=416, received=5120)
    w.fragment(SID, *FRAGS[1], T, seed=8, status=500, received=None)
    w.fragment(SID, *FRAGS[1], T)  # the resend starts where the hash ends: it streams again
    w.fragment(SID, *FRAGS[2], T)
    session, read_back = finish_counting_read_back(w, monkeypatch)
    assert read_back == 0 and session.entity.sha256 == hashlib.sha256(payload(T)).hexdigest()


def test_partial_ack_falls_back_to_reading_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, *FRAGS[0], T, received=4000)  # the fed hash runs past what was acknowledged
    w.fragment(SID, 4000, 11999, T)
    session, read_back = finish_counting_read_back(w, monkeypatch)
    assert read_back == T and session.entity.sha256 == hashlib.sha256(payload(T)).hexdigest()


def test_out_of_order_fragments_read_back_what_the_hash_missed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, *FRAGS[1], T)
    w.fragment(SID, *FRAGS[0], T)
    w.fragment(SID, *FRAGS[2], T)  # the hash stopped at 5120: this one does not continue it
    session, read_back = finish_counting_read_back(w, monkeypatch)
    assert read_back == T - 5120 and session.entity.sha256 == hashlib.sha256(payload(T)).hexdigest()


def test_gap_in_a_body_stops_the_hash_until_the_hole_is_filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = Wire(tmp_path)
    real_on_body = w.extractor.on_body
    lost = (6000, 7000)

    def lossy_on_body(connection, message, chunk, body_offset) -> None:  # the capture lost some bytes
        at = parse_content_range(message.headers.get(Header.CONTENT_RANGE)).first + body_offset
        data = bytes(chunk)
        real_on_body(connection, message, data[:max(0, lost[0] - at)], body_offset)
        if at + len(data) > lost[1]:
            keep = max(lost[1], at)
            real_on_body(connection, message, data[keep - at:], body_offset + keep - at)

    w.extractor.on_body = lossy_on_body
    w.create()
    w.fragment(SID, *FRAGS[0], T)
    w.fragment(SID, *FRAGS[1], T, chunks=5)  # acknowledged whole: the server had all of it
    w.fragment(SID, *FRAGS[2], T)
    w.extractor.on_body = real_on_body
    w.fragment(SID, *FRAGS[1], T)  # the resend fills the hole, which continues the hash
    session, read_back = finish_counting_read_back(w, monkeypatch)
    assert read_back == T - lost[1] and session.entity.sha256 == hashlib.sha256(payload(T)).hexdigest()


def test_pipelined_fragments_hash_correctly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = Wire(tmp_path)
    w.create()
    held = hold_acks(w)
    w.fragment(SID, *FRAGS[0], T)
    w.fragment(SID, *FRAGS[1], T)  # in flight behind the first: not streamed
    release_acks(w, held)
    w.fragment(SID, *FRAGS[2], T)
    session, read_back = finish_counting_read_back(w, monkeypatch)
    assert read_back == T - 5120 and session.entity.sha256 == hashlib.sha256(payload(T)).hexdigest()


def test_in_flight_overwrite_of_streamed_bytes_drops_the_streamed_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = Wire(tmp_path)
    w.create()
    held = hold_acks(w)
    w.fragment(SID, 0, 6999, T)
    w.fragment(SID, 3000, 11999, T, seed=9)  # replaces provisional bytes 3000-6999 the hash was fed
    release_acks(w, held)
    session, read_back = finish_counting_read_back(w, monkeypatch)
    assert read_back == T
    assert session.entity.sha256 == hashlib.sha256(payload(T)[:3000] + payload(T, 9)[3000:]).hexdigest()


def test_hash_past_the_total_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = Wire(tmp_path)
    w.create()
    for first, last in FRAGS:
        w.fragment(SID, first, last, T + 1000)
    w.fragment(SID, T, T + 999, T + 1000)  # the streamed hash runs to T + 1000
    w.fragment(SID, 0, 99, T)  # the last acknowledged fragment gives the final TOTAL: the file is cut to T
    session, read_back = finish_counting_read_back(w, monkeypatch)
    assert read_back == T and session.entity.sha256 == hashlib.sha256(payload(T)).hexdigest()


@pytest.mark.parametrize("variant", [
    {}, {"packet_type": "FRAGMENT"}, {"packet_type": " fragment "}, {"packet_type": "Fragmen"},
    {"packet_type": "Close-Session"}, {"content_range": "bytes 10-5/100"}, {"content_range": "5120-10239/12000"},
    {"session": "  " + SID + "  "}, {"session": "upload-42"},
])
def test_extractor_sees_the_fragments_classify_sees(variant: dict, tmp_path: Path) -> None:
    """The extractor stores a body when classify calls its request a Fragment with a session id
    and a valid range, under that id and range: it reads the head with the packets layer's parse."""
    w = Wire(tmp_path)
    session = variant.get("session", SID)
    w.fragment(session, *FRAGS[1], T, packet_type=variant.get("packet_type", "Fragment"),
               content_range=variant.get("content_range"))
    summary = w.finish()
    pkt = next(p for s in summary.sessions for p in s.packets)
    entity = next((s.entity for s in summary.sessions if s.entity is not None), None)
    if pkt.packet_type is PacketType.FRAGMENT and pkt.content_range is not None:
        assert entity is not None and entity.session_id == pkt.session_id == session.strip()
        assert [(c.first, c.last) for c in entity.coverage] == [(pkt.content_range.first, pkt.content_range.last)]
    else:
        assert entity is None and [f for f in files(tmp_path) if not f.startswith(".")] == []


# --- write-behind: small contiguous chunks reach the file as one pwrite per run ----------------

def counting_pwrite(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> list[tuple[int, int]]:
    """Records each pwrite as (offset, size); the `fail_at`-th call (0-based) fails with ENOSPC."""
    calls: list[tuple[int, int]] = []
    real_pwrite = os.pwrite

    def pwrite(fd: int, data, offset: int) -> int:
        calls.append((offset, len(data)))
        if len(calls) - 1 == fail_at:
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return calls


def test_small_contiguous_chunks_are_written_in_one_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_pwrite(monkeypatch)
    w = Wire(tmp_path)
    w.create()
    for first, last in FRAGS:
        w.fragment(SID, first, last, T, chunks=7)
    w.fragment(SID, *FRAGS[0], T, status=None)  # an unanswered resend waits in memory beside the run
    session = w.finish().sessions[0]
    assert calls == [(0, T)]
    assert session.entity.complete and (tmp_path / NAME).read_bytes() == payload(T)


def test_a_run_breaks_where_the_writes_stop_continuing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_pwrite(monkeypatch)
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, *FRAGS[1], T)
    w.fragment(SID, *FRAGS[0], T)
    w.fragment(SID, *FRAGS[2], T)
    w.fragment(SID, 3000, 11999, T, seed=9, status=500, received=None)  # replaces nothing: all acknowledged
    session = w.finish().sessions[0]
    assert calls == [(5120, 5120), (0, 5120), (10240, 1760)]
    assert session.entity.complete and (tmp_path / NAME).read_bytes() == payload(T)
    assert "resend-conflict" in codes(session.anomalies)


def test_a_failed_run_is_a_problem_and_its_bytes_are_not_claimed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counting_pwrite(monkeypatch, fail_at=0)
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, *FRAGS[0], T)
    w.fragment(SID, *FRAGS[2], T)  # does not continue the run: the first run is written now, and fails
    w.fragment(SID, *FRAGS[1], T)
    session = w.finish().sessions[0]
    problem, = w.extractor.problems
    assert problem.kind == "extract-write-failed" and "bytes 0-5119 are lost" in problem.message
    entity = session.entity
    assert not entity.complete and entity.acknowledged_bytes == T - 5120
    assert [(c.first, c.last, c.acknowledged) for c in entity.coverage] == [(5120, 11999, True)]
    assert (tmp_path / (NAME + PARTIAL_SUFFIX)).read_bytes()[5120:] == payload(T)[5120:]


def test_a_run_failing_while_a_fragment_lands_on_new_bytes_keeps_the_map_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counting_pwrite(monkeypatch, fail_at=1)
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 10240, 11999, T)  # its run is written when the next fragment starts elsewhere
    w.fragment(SID, 0, 4999, T)  # waits in memory before the first fragment's piece
    w.fragment(SID, 6000, 9999, T)  # lands between the two: the waiting run is written now, and fails
    w.fragment(SID, 0, 4999, T, status=None)  # a resend meets the map where the run's bytes were
    session = w.finish().sessions[0]
    problem, = w.extractor.problems
    assert "bytes 0-4999 are lost" in problem.message
    assert [(c.first, c.last, c.acknowledged) for c in session.entity.coverage] == [
        (0, 4999, False), (6000, 9999, True), (10240, 11999, True)]
    assert session.entity.acknowledged_bytes == 4000 + 1760
    stored = (tmp_path / (NAME + PARTIAL_SUFFIX)).read_bytes()
    assert stored[6000:10000] == payload(T)[6000:10000] and stored[10240:] == payload(T)[10240:]


# --- a bounded number of open temp files ------------------------------------------------------

def sid(i: int) -> str:
    return f"{{{i:08X}-1D2E-4F6A-9B8C-0D1E2F3A4B5C}}"


def interleaved_uploads(w: Wire, sessions: int, total: int = T) -> None:
    """Every session created first, then their fragments taking turns, with resends (read back)
    and an out-of-order fragment, so each temp file is closed and reopened on the way."""
    for i in range(sessions):
        w.create(sid(i))
    for first, last in [FRAGS[1], FRAGS[0], (3000, 7999), FRAGS[2]]:
        for i in range(sessions):
            w.fragment(sid(i), first, min(last, total - 1), total, seed=i, chunks=3)
    for i in range(sessions):
        w.close(sid(i))


def spool_fds(directory: Path) -> int:
    """Descriptors of this process open on temp files in `directory` (not the run's one lock file)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(directory)) and os.path.basename(target).startswith(".bitstrace-") and target.endswith(".tmp")
    return count


def test_a_bounded_number_of_temp_files_stay_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unbounded = tmp_path / "unbounded"
    w = Wire(unbounded)
    interleaved_uploads(w, 6)
    assert len(w.finish().sessions) == 6 and w.extractor.problems == []

    bounded = tmp_path / "bounded"
    monkeypatch.setattr(extract, "MAX_OPEN_SPOOLS", 2)
    real_open = os.open
    most_open, reopened = [0], [0]

    def watching_open(path, flags, *args, **kw):
        fd = real_open(path, flags, *args, **kw)
        reopened[0] += str(path).startswith(".bitstrace-") and not flags & os.O_CREAT
        most_open[0] = max(most_open[0], spool_fds(bounded))
        return fd

    w = Wire(bounded)
    monkeypatch.setattr(os, "open", watching_open)
    interleaved_uploads(w, 6)
    summary = w.finish()
    monkeypatch.undo()
    assert w.extractor.problems == [] and all(s.entity.complete for s in summary.sessions)
    assert most_open[0] == 2 and reopened[0] > 6
    assert files(bounded) == files(unbounded) and len(files(bounded)) == 6
    for name in files(unbounded):
        assert (bounded / name).read_bytes() == (unbounded / name).read_bytes()
    assert sorted((bounded / name).read_bytes() for name in files(bounded)) == sorted(payload(T, i) for i in range(6))


LOW_LIMIT_RUN = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
sys.path.insert(0, sys.argv[2])
from tests.support.bits_fixtures import Wire
from tests.analyzer.bits.test_extract import interleaved_uploads
w = Wire(Path(sys.argv[1]))
interleaved_uploads(w, 200, total=600)
summary = w.finish()
print(sum(s.entity is not None and s.entity.complete for s in summary.sessions), len(w.extractor.problems))
"""


def test_more_sessions_than_the_open_file_limit(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", LOW_LIMIT_RUN, str(tmp_path), str(REPO)],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.split() == ["200", "0"]
    assert len(files(tmp_path)) == 200
    assert (tmp_path / f"{sid(7).strip('{}')}_report.bin").read_bytes() == payload(600, 7)


def test_a_temp_file_replaced_while_closed_loses_only_its_entity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(extract, "MAX_OPEN_SPOOLS", 1)
    w = Wire(tmp_path)
    w.create(sid(0))
    w.fragment(sid(0), *FRAGS[0], T)
    w.create(sid(1))
    w.fragment(sid(1), *FRAGS[0], T, seed=1)  # session 1's temp file takes the one place: session 0's is closed
    temp = tmp_path / ".bitstrace-{}-0.tmp".format(os.getpid())
    assert temp.exists()
    temp.unlink()
    temp.write_bytes(b"someone else's file")
    for first, last in FRAGS[1:]:
        w.fragment(sid(0), first, last, T)
        w.fragment(sid(1), first, last, T, seed=1)
    summary = w.finish()
    problem, = w.extractor.problems
    assert problem.kind == "extract-temp-file-lost"
    assert sid(0) in problem.message and str(temp) in problem.message and "replaced" in problem.message
    first, second = summary.sessions
    assert first.entity is None and second.entity.complete
    assert files(tmp_path) == [temp.name, f"{sid(1).strip('{}')}_report.bin"]
    assert temp.read_bytes() == b"someone else's file"  # left alone: not ours
    assert (tmp_path / f"{sid(1).strip('{}')}_report.bin").read_bytes() == payload(T, 1)


def test_a_session_that_cannot_be_written_is_named_once_and_the_rest_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk fails every later fragment again: one problem per session, then a count."""
    failed = []

    def full(fd: int, data, offset: int) -> int:
        failed.append(offset)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    w = Wire(tmp_path)
    for sid in (SID, SID2):
        w.create(session=sid)
        for first, last in FRAGS * 3:  # resends meet bytes whose write failed
            w.fragment(sid, first, last, T, chunks=1)
    w.finish()
    problems = w.extractor.problems
    named = [p for p in problems if "session" in p.message and "only counted" not in p.message]
    assert sorted(SID.lower() in p.message.lower() or SID2.lower() in p.message.lower() for p in named) == [True, True]
    assert {p.kind for p in problems} == {"extract-write-failed"}
    counted, = [p for p in problems if "only counted" in p.message]
    assert len(failed) > 2 and counted.message.startswith(f"{len(failed) - 2:,} more")


def test_a_failed_write_names_the_capture_file_of_its_fragment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rotated captures: frame numbers start again in each file, so the problem names the file too."""
    w = Wire(tmp_path)
    w.extractor.several_captures, w.extractor.capture_names = True, ["first.pcap", "second.pcap"]
    w.create()
    w.fragment(SID, 0, 19999, 40000, chunks=1)
    w.rotate()

    def full(fd: int, data, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    second = w.fragment(SID, 20000, 39999, 40000, chunks=1)
    w.finish()
    problem, = [p for p in w.extractor.problems if p.frame is not None]
    assert (problem.file, problem.frame) == ("second.pcap", second.request.first_frame)
    assert str(problem).startswith("second.pcap")


@pytest.mark.parametrize("tags", [(None, None), ("host-a-41", "host-b-41")], ids=["process-id", "host-tagged"])
def test_writers_sharing_a_directory_are_kept_apart_by_their_temp_tag(tmp_path: Path, tags: tuple) -> None:
    """Two writers into one directory at once, in one process as two Dask workers on two hosts
    with the same process id would be: with the default tag (the process id) the second one
    skips the temp names the first holds; tags naming the host keep them apart from the start.
    Either way both files are whole."""
    wires = []
    for tag in tags:
        w = Wire()
        w.extractor = Extractor(tmp_path, temp_tag=tag)
        w.tracker = SessionTracker(w.extractor)
        wires.append(w)
    for n, w in enumerate(wires):  # both temp files exist at once
        w.create(sid(n))
        w.fragment(sid(n), *FRAGS[0], T, seed=n)
    temps = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    if tags[0] is not None:  # each writer's temp file carries its tag
        assert [name.split("-")[:4] for name in temps] == [[".bitstrace", "host", tag, "41"] for tag in "ab"]
    else:
        assert len(temps) == 2
    for n, w in enumerate(wires):
        for first, last in FRAGS[1:]:
            w.fragment(sid(n), first, last, T, seed=n)
        w.finish()
    assert not wires[0].extractor.problems and not wires[1].extractor.problems
    assert {p.name for p in tmp_path.iterdir()} == {f"{sid(n).strip('{}')}_report.bin" for n in (0, 1)}
    for n in (0, 1):
        assert (tmp_path / f"{sid(n).strip('{}')}_report.bin").read_bytes() == payload(T, n)
