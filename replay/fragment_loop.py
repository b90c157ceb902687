"""The fragment loop's recovery rules, written once for the client and the adaptive replay.

As a Windows client does it (bits-protocol.md 5.2): each fragment starts at the offset the
server last acknowledged; an ack of 200 or 416 gives the next one (BITS-Received-Content-Range);
413 halves the fragment size, never below the smallest fragment; BG_E_SESSION_NOT_FOUND means
a new session and a fresh start from offset 0; any other answer ends the upload.

Sans-I/O: `FragmentLoop` says which bytes to send next and, told the answer, what comes next;
the caller sends (replay.client from a file, replay.replayer.session from the captured bytes) and turns
`GiveUp` into its own error.
"""

from __future__ import annotations

import enum

from bitstrace.analyzer.bits.packets import RESYNC, SUCCESS, TOO_LARGE_STATUS
from bitstrace.analyzer.bits.protocol import MIN_FRAGMENT, ContentRange

#: Attempts in a row that leave the acknowledged offset where it was (answers, or connections
#: lost before one) before the loop gives up: the real client's BG_E_NO_PROGRESS, counted in
#: attempts instead of days. 413s do not count: halving ends at the smallest fragment anyway.
MAX_ATTEMPTS_WITHOUT_PROGRESS = 8
#: The loop gives up after sending this many times the bytes it has to deliver.
MAX_RESEND_FACTOR = 4
#: The loop gives up when the server forgets the session more often than this.
MAX_RECREATES = 3


def follows_offset(status: int) -> bool:
    """A fragment ack whose BITS-Received-Content-Range the client continues from: success or
    resynchronisation (the analyzer's rule for fragment acks)."""
    return status in SUCCESS or status == RESYNC


class GiveUp(Exception):
    """The upload cannot go on; the message says why."""


def count_recreation(recreated: int) -> int:
    """One more session the server forgot, on top of `recreated`; GiveUp past MAX_RECREATES.
    For the loop, and for a caller that finds the session forgotten outside it (at Close)."""
    recreated += 1
    if recreated > MAX_RECREATES:
        raise GiveUp(f"the server forgot the session {MAX_RECREATES} times: giving up")
    return recreated


class Step(enum.Enum):
    SEND = "send"  # send the next fragment
    NEW_SESSION = "new-session"  # the server forgot the session: create one, then restart()


class FragmentLoop:
    """Fragments of a `total`-byte file from `offset` until the server has acknowledged `stop`
    bytes (default and at most: `end`). No fragment reaches past byte `end` (default: the
    file's end) nor the file's end.

    Per fragment: `next_range(size)`, send it, then `answer(...)` or, when no answer came,
    `lost()`.
    """

    def __init__(self, total: int, offset: int, *, stop: int | None = None,
                 end: int | None = None, min_fragment: int = MIN_FRAGMENT,
                 recreated: int = 0) -> None:
        self.total = total
        self.offset = offset  # the acknowledged offset: where the next fragment starts
        # A caller's end past the total (a captured client that changed it) would make ranges
        # no server can parse; a stop past the end could only be reached by empty ones.
        self.end = total if end is None else min(end, total)
        self.stop = self.end if stop is None else min(stop, self.end)
        if min_fragment < 1:
            raise ValueError(f"the smallest fragment must be at least 1 byte, not {min_fragment}")
        self.min_fragment = min_fragment
        self.shrunk: int | None = None  # the largest fragment after a 413
        self.budget = MAX_RESEND_FACTOR * self.end + min_fragment
        self.without_progress = 0
        self.recreated = recreated  # sessions forgotten in this upload, earlier loops included
        self._sent: ContentRange | None = None

    @property
    def done(self) -> bool:
        return self.offset >= self.stop

    def next_range(self, size: int) -> ContentRange:
        """The next fragment: `size` bytes (fewer after a 413, or at the end) from the offset."""
        if size < 1:
            raise ValueError(f"a fragment holds at least 1 byte, not {size}")
        if self.shrunk is not None:
            size = min(size, self.shrunk)
        self._sent = ContentRange(self.offset, min(self.offset + size, self.end) - 1, self.total)
        return self._sent

    def lost(self) -> Step:
        """The fragment drew no answer (the connection broke): an attempt without progress."""
        self._no_progress()
        return Step.SEND

    def answer(self, status: int, received: int | None, session_not_found: bool) -> Step:
        """The server's answer to the last fragment; raises GiveUp when the loop cannot go on."""
        sent = self._sent
        assert sent is not None, "answer() before next_range()"
        if session_not_found:
            self.recreated = count_recreation(self.recreated)
            return Step.NEW_SESSION
        if status == TOO_LARGE_STATUS:
            # Halve what was sent, not what was asked for: the end may have cut it shorter,
            # and a 413 is never answered by the same range again.
            if sent.length <= self.min_fragment:
                raise GiveUp(f"413 for a {sent.length}-byte fragment: cannot shrink further")
            self.shrunk = max(self.min_fragment, sent.length // 2)
            return Step.SEND
        if not follows_offset(status):
            raise GiveUp(f"the server refused {sent}: HTTP {status}")
        if received is None or received > self.total:
            raise GiveUp(f"the ack for {sent} gives no usable received offset")
        self.budget -= sent.length
        if self.budget < 0:
            raise GiveUp(f"no progress: {MAX_RESEND_FACTOR} times the file sent, the server "
                         f"still wants byte {received}")
        if received > self.offset:
            self.without_progress = 0
        else:
            self._no_progress(received)
        self.offset = received
        return Step.SEND

    def restart(self) -> None:
        """A new session replaced the forgotten one: start over from offset 0."""
        self.offset = 0
        self.without_progress = 0

    def _no_progress(self, received: int | None = None) -> None:
        self.without_progress += 1
        if self.without_progress >= MAX_ATTEMPTS_WITHOUT_PROGRESS:
            where = f"the server keeps answering N={received}" if received is not None else (
                f"{self.without_progress} attempts at offset {self.offset}")
            raise GiveUp(f"no progress: {where}")
