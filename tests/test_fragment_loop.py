"""replay.fragment_loop: the recovery rules the client and the adaptive replay share, driven by
a simulated server (sans-I/O: no sockets). The client's and the replay's use of the loop
against the real server is tested in test_client.py and test_replay_send.py."""

from __future__ import annotations

import pytest

from analyzer.bits.protocol import MIN_FRAGMENT, ContentRange
from replay.fragment_loop import (
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
