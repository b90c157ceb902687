"""replay.fragment_loop: the recovery rules the client and the adaptive replay share, driven by
a simulated server (sans-I/O: no sockets). The client's and the replay's use of the loop
against the real server is tested in test_client.py and test_replay_send.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitstrace.analyzer.bits.protocol import MIN_FRAGMENT, ContentRange
from bitstrace.replay.fragment_loop import (
    MAX_ATTEMPTS_WITHOUT_PROGRESS,
    MAX_RECREATES,
    MAX_RESEND_FACTOR,
    FragmentLoop,
    GiveUp,
    Step,
)

KIB = 1024


class Server:
    """Holds the bytes in order like the reference server: a fragment at the offset it has
    advances it, one past it draws 416, one over `largest` draws 413."""

    def __init__(self, largest: int | None = None) -> None:
        self.have = 0
        self.largest = largest

    def answer(self, sent: ContentRange) -> tuple[int, int | None, bool]:
        if self.largest is not None and sent.length > self.largest:
            return 413, None, False
        if sent.first > self.have:
            return 416, self.have, False
        self.have = max(self.have, sent.last + 1)
        return 200, self.have, False


def run(loop: FragmentLoop, server: Server, size: int) -> list[ContentRange]:
    sent = []
    while not loop.done:
        wanted = loop.next_range(size)
        sent.append(wanted)
        assert loop.answer(*server.answer(wanted)) is Step.SEND
    return sent


def test_fragments_follow_the_acknowledged_offset_to_the_end() -> None:
    loop = FragmentLoop(100 * KIB, 0)
    sent = run(loop, Server(), 32 * KIB)
    assert [(r.first, r.last) for r in sent] == [
        (0, 32 * KIB - 1), (32 * KIB, 64 * KIB - 1), (64 * KIB, 96 * KIB - 1), (96 * KIB, 100 * KIB - 1)]
    assert loop.offset == 100 * KIB and all(r.total == 100 * KIB for r in sent)


def test_416_moves_the_next_fragment_back_to_the_server_offset() -> None:
    server = Server()
    server.have = 10 * KIB
    loop = FragmentLoop(40 * KIB, 20 * KIB)  # the client believes more arrived than did
    sent = run(loop, server, 10 * KIB)
    assert [r.first for r in sent] == [20 * KIB, 10 * KIB, 20 * KIB, 30 * KIB]


def test_stop_ends_the_loop_early_but_fragments_keep_their_size() -> None:
    loop = FragmentLoop(100 * KIB, 0, stop=KIB + 1)
    assert [(r.first, r.last) for r in run(loop, Server(), 16 * KIB)] == [(0, 16 * KIB - 1)]


def test_end_cuts_the_last_fragment_short() -> None:
    loop = FragmentLoop(100 * KIB, 0, stop=40 * KIB, end=40 * KIB)
    assert [r.length for r in run(loop, Server(), 16 * KIB)] == [16 * KIB, 16 * KIB, 8 * KIB]


def test_413_halves_the_fragment_size_until_the_server_takes_it() -> None:
    loop = FragmentLoop(100 * KIB, 0)
    sent = run(loop, Server(largest=20 * KIB), 64 * KIB)
    assert [r.length for r in sent[:3]] == [64 * KIB, 32 * KIB, 16 * KIB]
    assert {r.length for r in sent[2:-1]} == {16 * KIB}


def test_413_at_the_smallest_fragment_gives_up() -> None:
    loop = FragmentLoop(100 * KIB, 0)
    with pytest.raises(GiveUp, match=f"413 for a {MIN_FRAGMENT}-byte fragment"):
        run(loop, Server(largest=MIN_FRAGMENT - 1), 4 * MIN_FRAGMENT)
    assert loop.offset == 0


def test_a_forgotten_session_starts_over_from_zero_a_few_times_only() -> None:
    loop = FragmentLoop(30 * KIB, 0)
    loop.next_range(10 * KIB)
    assert loop.answer(200, 10 * KIB, False) is Step.SEND and loop.offset == 10 * KIB
    for _ in range(MAX_RECREATES):
        assert loop.next_range(10 * KIB).first == 10 * KIB
        assert loop.answer(500, None, True) is Step.NEW_SESSION
        loop.restart()
        assert loop.offset == 0
        loop.next_range(10 * KIB)
        loop.answer(200, 10 * KIB, False)
    loop.next_range(10 * KIB)
    with pytest.raises(GiveUp, match=f"forgot the session {MAX_RECREATES} times"):
        loop.answer(500, None, True)


def test_answers_that_do_not_move_the_offset_give_up() -> None:
    loop = FragmentLoop(30 * KIB, 0)
    for _ in range(MAX_ATTEMPTS_WITHOUT_PROGRESS - 1):
        loop.next_range(10 * KIB)
        loop.answer(416, 0, False)
    loop.next_range(10 * KIB)
    with pytest.raises(GiveUp, match="the server keeps answering N=0"):
        loop.answer(200, 0, False)


def test_progress_resets_the_count_and_lost_connections_count() -> None:
    loop = FragmentLoop(30 * KIB, 0)
    for _ in range(MAX_ATTEMPTS_WITHOUT_PROGRESS - 1):
        loop.next_range(10 * KIB)
        assert loop.lost() is Step.SEND
    loop.next_range(10 * KIB)
    loop.answer(200, 10 * KIB, False)
    for _ in range(MAX_ATTEMPTS_WITHOUT_PROGRESS - 1):
        loop.next_range(10 * KIB)
        loop.lost()
    loop.next_range(10 * KIB)
    with pytest.raises(GiveUp, match=f"{MAX_ATTEMPTS_WITHOUT_PROGRESS} attempts at offset {10 * KIB}"):
        loop.lost()


def test_a_server_that_creeps_forward_exhausts_the_budget() -> None:
    total = 100 * KIB
    loop = FragmentLoop(total, 0)
    sent = 0
    with pytest.raises(GiveUp, match=f"{MAX_RESEND_FACTOR} times the file sent"):
        while True:
            wanted = loop.next_range(50 * KIB)
            sent += wanted.length
            loop.answer(200, loop.offset + 1, False)  # one byte of progress a fragment
    assert sent > MAX_RESEND_FACTOR * total


@pytest.mark.parametrize("status, received, says", [
    (400, None, "the server refused bytes 0-9999/30000: HTTP 400"),
    (200, None, "the ack for bytes 0-9999/30000 gives no usable received offset"),
    (200, 30001, "gives no usable received offset"),
])
def test_refusals_and_unusable_offsets_give_up(status: int, received: int | None, says: str) -> None:
    loop = FragmentLoop(30_000, 0)
    loop.next_range(10_000)
    with pytest.raises(GiveUp, match=says):
        loop.answer(status, received, False)


def test_413_on_a_fragment_the_end_cut_short_never_resends_the_same_range() -> None:
    """A 10 KiB file sent in 64 KiB fragments to a server that takes at most 8 KiB: the first
    fragment is the whole file, cut by the end. After its 413 the next one must be shorter
    (it once halved the 64 KiB asked for and resent the same 10 KiB twice)."""
    loop = FragmentLoop(10 * KIB, 0)
    sent = run(loop, Server(largest=8 * KIB), 64 * KIB)
    assert [r.length for r in sent] == [10 * KIB, 5 * KIB, 5 * KIB]


def test_413_on_a_last_fragment_no_longer_than_the_smallest_gives_up_at_once() -> None:
    loop = FragmentLoop(MIN_FRAGMENT + 100, MIN_FRAGMENT)
    loop.next_range(64 * KIB)
    with pytest.raises(GiveUp, match="413 for a 100-byte fragment"):
        loop.answer(413, None, False)


def test_after_a_413_a_smaller_fragment_asked_for_stays_smaller() -> None:
    """The adaptive replay asks for each captured fragment's size: a short captured fragment
    after a 413 is not blown up to the shrunk size (it once was: `size` was replaced)."""
    loop = FragmentLoop(200 * KIB, 0)
    loop.next_range(64 * KIB)
    loop.answer(413, None, False)
    assert loop.next_range(64 * KIB).length == 32 * KIB
    assert loop.next_range(KIB).length == KIB


def test_an_end_past_the_total_never_sends_bytes_past_the_file() -> None:
    """The adaptive replay ends its loop after the last captured fragment; a capture whose
    client changed the total (bytes 1000-2999/3000 after bytes 0-999/2000) once made it send
    `bytes 1000-2999/2000`, a range no server can parse."""
    loop = FragmentLoop(2000, 0, stop=3000, end=3000)
    sent = run(loop, Server(), 1500)
    assert [str(r) for r in sent] == ["bytes 0-1499/2000", "bytes 1500-1999/2000"] and loop.done


def test_a_stop_past_the_end_ends_at_the_end() -> None:
    """Bytes past `end` are never sent, so the loop cannot wait for them (it once went on with
    empty ranges, `bytes 1000-999/2000`, until it gave up)."""
    loop = FragmentLoop(2000, 0, stop=1500, end=1000)
    assert [str(r) for r in run(loop, Server(), 600)] == ["bytes 0-599/2000", "bytes 600-999/2000"]
    assert loop.done


@pytest.mark.parametrize("min_fragment, size", [(0, 10), (5, 0)])
def test_sizes_below_one_byte_are_refused(min_fragment: int, size: int) -> None:
    """A smallest fragment of 0 bytes once made a 413 loop forever (0 halves to 0, read as
    'not shrunk'); a fragment of 0 bytes has no Content-Range."""
    with pytest.raises(ValueError):
        FragmentLoop(100, 0, min_fragment=min_fragment).next_range(size)


# --- property: any server, scripted answer by answer -------------------------------------------

# What the simulated server does with one fragment: `take` is the honest reference server
# (append at its offset, 416 with it otherwise), `creep` one that keeps only the fragment's
# first byte; the others are what a broken, forgetful or hostile server may answer, with N
# drawn from around the file.
ANSWERS = st.one_of(
    st.just(("take",)), st.just(("creep",)), st.just(("413",)), st.just(("forget",)), st.just(("lost",)),
    st.just(("refuse",)), st.just(("no-offset",)),
    st.tuples(st.sampled_from(["ack", "resync"]), st.integers(0, 3100)),
)


@st.composite
def loops(draw) -> tuple[FragmentLoop, int, int, int, int]:
    total = draw(st.integers(1, 3000))
    offset = draw(st.integers(0, total))
    min_fragment = draw(st.integers(1, 64))
    size = draw(st.integers(1, 700))
    if draw(st.booleans()):  # the client: up to the file's end, perhaps stopping early
        stop = draw(st.none() | st.integers(1, total))
        loop = FragmentLoop(total, offset, stop=stop, min_fragment=min_fragment)
    else:  # the adaptive replay: only the bytes the capture holds, up to `end` (past the
        # total when a captured fragment changed it)
        end = draw(st.integers(1, total + 500))
        stop = draw(st.none() | st.integers(1, total) | st.just(end))
        loop = FragmentLoop(total, offset, stop=stop, end=end, min_fragment=min_fragment)
    return loop, total, loop.stop, loop.end, size


@settings(max_examples=400, deadline=None)
@given(loops(), st.lists(st.tuples(ANSWERS, st.integers(1, 20)), max_size=30))  # (answer, times)
def test_any_server_either_gets_every_byte_or_the_loop_gives_up_within_its_limits(setup, script) -> None:
    loop, total, stop, end, size = setup
    have = min(loop.offset, total)  # the server's own offset
    answers = iter([answer for answer, times in script for _ in range(times)])
    sent_acked = forgotten = no_progress = steps = 0
    refused_413: ContentRange | None = None
    why = None
    while not loop.done:
        steps += 1
        assert steps < 5_000, "the loop never ends"
        before = loop.offset
        wanted = loop.next_range(size)
        assert wanted.total == total and wanted.first == before
        assert 0 <= wanted.first <= wanted.last < min(end, total) and wanted.length <= size
        if refused_413 is not None:
            assert wanted.length < refused_413.length, "resent a range the server refused as too large"
        refused_413 = None
        kind, *n = next(answers, ("take",))
        try:
            if kind in ("take", "creep"):
                if wanted.first <= have:
                    have = max(have, wanted.last + 1 if kind == "take" else wanted.first + 1)
                step = loop.answer(200 if wanted.first <= have else 416, have, False)
            elif kind == "413":
                refused_413 = wanted
                step = loop.answer(413, None, False)
            elif kind == "forget":
                have = 0
                forgotten += 1
                step = loop.answer(500, None, True)
            elif kind == "lost":
                step = loop.lost()
            elif kind == "refuse":
                step = loop.answer(500, None, False)
            elif kind == "no-offset":
                step = loop.answer(200, None, False)
            else:
                step = loop.answer(200 if kind == "ack" else 416, n[0], False)
        except GiveUp as exc:
            why = (kind, wanted, str(exc))
            break
        if kind in ("take", "creep", "ack", "resync"):
            sent_acked += wanted.length
            assert loop.offset == (have if kind in ("take", "creep") else n[0])
        moved = kind in ("take", "creep", "ack", "resync") and loop.offset > before
        no_progress = 0 if moved else no_progress + (kind not in ("413", "forget"))
        assert (step is Step.NEW_SESSION) == (kind == "forget")
        # ... and it went on only within its limits
        assert sent_acked <= MAX_RESEND_FACTOR * min(end, total) + loop.min_fragment
        assert no_progress < MAX_ATTEMPTS_WITHOUT_PROGRESS and forgotten <= MAX_RECREATES
        if step is Step.NEW_SESSION:
            loop.restart()
            assert loop.offset == 0 and loop.without_progress == 0
            no_progress = 0
    if why is None:  # finished: the server acknowledged every byte up to `stop`
        assert loop.offset >= stop
        return
    kind, wanted, message = why
    assert (
        kind in ("refuse", "no-offset")
        or (kind in ("ack", "resync") and n[0] > total)
        or (kind == "413" and wanted.length <= loop.min_fragment)
        or (kind == "forget" and forgotten > MAX_RECREATES)
        or sent_acked + wanted.length > MAX_RESEND_FACTOR * min(end, total) + loop.min_fragment
        or no_progress + 1 >= MAX_ATTEMPTS_WITHOUT_PROGRESS
    ), f"gave up without reason: {message}"


def test_sessions_forgotten_in_earlier_loops_count_towards_the_limit() -> None:
    loop = FragmentLoop(30 * KIB, 0, recreated=MAX_RECREATES - 1)
    loop.next_range(10 * KIB)
    assert loop.answer(500, None, True) is Step.NEW_SESSION and loop.recreated == MAX_RECREATES
    loop.restart()
    loop.next_range(10 * KIB)
    with pytest.raises(GiveUp, match=f"forgot the session {MAX_RECREATES} times"):
        loop.answer(500, None, True)
