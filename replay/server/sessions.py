"""bits-server's session table and per-session state machine (docs/protocol.md 5.1).

Every transition the server can make is one row of TRANSITIONS; anything else is a bug in the
caller and raises. Sessions are keyed by id, never by connection, so they survive reconnects.
Ended sessions (closed, cancelled, expired) leave the table: a later packet for them is
answered like an unknown id (BG_E_SESSION_NOT_FOUND). The table counts live sessions per
client address, for the service's caps.
"""

from __future__ import annotations

import enum
import hashlib
import shutil
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from bitstrace.analyzer.bits.protocol import session_key
from bitstrace.replay.server.paths import REPLIES_DIR, REPLY_FILE, REQUEST_FILE, REQUESTS_DIR, STATE_DIR, state_paths


class UploadState(enum.Enum):
    INIT = "INIT"
    RECEIVE_FRAGMENTS = "RECEIVE_FRAGMENTS"
    NOTIFY = "NOTIFY"
    WAIT_FOR_CLOSE = "WAIT_FOR_CLOSE"
    COMPLETE = "COMPLETE"
    CANCELLED = "CANCEL"
    EXPIRED = "EXPIRED"


class UploadEvent(enum.Enum):
    CREATE = "create"
    FRAGMENT = "fragment"  # bytes appended (or an already-acknowledged range resent)
    LAST_BYTE = "last-byte"  # the entity is complete: notify the application
    NOTIFIED = "notified"
    NOTIFY_FAILED = "notify-failed"
    CLOSE = "close"
    CANCEL = "cancel"
    TIMEOUT = "timeout"


TRANSITIONS: dict[tuple[UploadState, UploadEvent], UploadState] = {
    (UploadState.INIT, UploadEvent.CREATE): UploadState.RECEIVE_FRAGMENTS,
    (UploadState.RECEIVE_FRAGMENTS, UploadEvent.FRAGMENT): UploadState.RECEIVE_FRAGMENTS,
    (UploadState.RECEIVE_FRAGMENTS, UploadEvent.LAST_BYTE): UploadState.NOTIFY,
    (UploadState.NOTIFY, UploadEvent.NOTIFIED): UploadState.WAIT_FOR_CLOSE,
    # a failed notification leaves the session open: a resent final fragment retries it
    (UploadState.NOTIFY, UploadEvent.NOTIFY_FAILED): UploadState.RECEIVE_FRAGMENTS,
    # a resent fragment after the last ack was lost: re-acked, never re-notified
    (UploadState.WAIT_FOR_CLOSE, UploadEvent.FRAGMENT): UploadState.WAIT_FOR_CLOSE,
    (UploadState.WAIT_FOR_CLOSE, UploadEvent.CLOSE): UploadState.COMPLETE,
    # Close before the last byte: the partial upload is discarded, never published (Win32)
    (UploadState.RECEIVE_FRAGMENTS, UploadEvent.CLOSE): UploadState.COMPLETE,
    (UploadState.RECEIVE_FRAGMENTS, UploadEvent.CANCEL): UploadState.CANCELLED,
    (UploadState.WAIT_FOR_CLOSE, UploadEvent.CANCEL): UploadState.CANCELLED,
    (UploadState.RECEIVE_FRAGMENTS, UploadEvent.TIMEOUT): UploadState.EXPIRED,
    (UploadState.WAIT_FOR_CLOSE, UploadEvent.TIMEOUT): UploadState.EXPIRED,
}

ENDED = frozenset({UploadState.COMPLETE, UploadState.CANCELLED, UploadState.EXPIRED})


class IllegalTransition(RuntimeError):
    pass


def new_session_id() -> str:
    """A fresh session id as IIS writes it: an uppercase brace GUID."""
    return "{" + str(uuid.uuid4()).upper() + "}"


class Abortable(Protocol):
    """A request body that can be cut from another thread (the streaming fragment of a session
    being cancelled)."""

    def abort(self) -> None: ...


@dataclass(eq=False)
class UploadSession:
    id: str
    destination: Path
    url_path: str  # decoded URL path the session was created on
    data_dir: Path
    reply_dir: Path
    protocol: str
    last_activity: float
    state: UploadState = UploadState.INIT
    total: int | None = None
    received: int = 0  # next byte wanted: the contiguous high-water mark
    # sha256 of bytes 0..received, kept only when a receipt will carry it (upload-reply mode):
    # hashing costs more CPU than receiving and storing the bytes.
    digest: "hashlib._Hash | None" = None
    reply_url: str | None = None
    client: str = ""  # the address that created it (the per-client cap counts by it)
    # Held by the packet being handled. A Cancel does not wait for it while a fragment's body
    # streams (`streaming`): it sets `cancel_requested` and aborts the body; the fragment's
    # holder ends the session. `guard` makes that handshake atomic.
    lock: threading.Lock = field(default_factory=threading.Lock)
    guard: threading.Lock = field(default_factory=threading.Lock)
    streaming: Abortable | None = None
    cancel_requested: bool = False

    @property
    def data_file(self) -> Path:
        return self.data_dir / REQUEST_FILE

    @property
    def reply_file(self) -> Path:
        return self.reply_dir / REPLY_FILE

    def fire(self, event: UploadEvent) -> UploadState:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise IllegalTransition(f"{self.id}: {event.value} in {self.state.value}") from None
        return self.state


class SessionTable:
    """Sessions by id; thread-safe. Each session's own lock serialises its packets."""

    def __init__(self, root: Path, timeout: float, clock: Callable[[], float] = time.monotonic):
        self.root = root
        self.timeout = timeout
        self.clock = clock
        self._sessions: dict[str, UploadSession] = {}
        self._per_client: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def held_by(self, client: str) -> int:
        """Live sessions created from `client`."""
        return self._per_client[client]

    def create(self, destination: Path, url_path: str, protocol: str, hashed: bool = False,
               client: str = "") -> UploadSession:
        """A new session with an empty request file (OSError if it cannot be made); `hashed`:
        keep the sha256 of the bytes received."""
        session_id = new_session_id()
        data_dir, reply_dir = state_paths(self.root, session_id)
        session = UploadSession(session_id, destination, url_path, data_dir, reply_dir, protocol,
                          last_activity=self.clock(), digest=hashlib.sha256() if hashed else None,
                          client=client)
        data_dir.mkdir(parents=True)
        try:
            session.data_file.touch(exist_ok=False)
        except OSError:
            shutil.rmtree(data_dir, ignore_errors=True)
            raise
        session.fire(UploadEvent.CREATE)
        with self._lock:
            self._sessions[session_key(session_id)] = session
            self._per_client[client] += 1
        return session

    def get(self, session_id: str) -> UploadSession | None:
        with self._lock:
            return self._sessions.get(session_key(session_id))

    def touch(self, session: UploadSession) -> None:
        session.last_activity = self.clock()

    def forget(self, session: UploadSession) -> None:
        """Take the session out of the table (later packets for it find no session); its data
        stays until `end`."""
        with self._lock:
            if self._sessions.pop(session_key(session.id), None) is not None:
                self._per_client[session.client] -= 1
                if not self._per_client[session.client]:
                    del self._per_client[session.client]

    def end(self, session: UploadSession, event: UploadEvent) -> None:
        """Apply a terminal event: drop the session and delete its temporary data and reply."""
        session.fire(event)
        self.forget(session)
        shutil.rmtree(session.data_dir, ignore_errors=True)
        shutil.rmtree(session.reply_dir, ignore_errors=True)

    def remove_orphans(self) -> list[str]:
        """Delete the session directories no live session owns (left by a server that was
        killed: sessions live in memory only, so none can be resumed); their names, sorted."""
        with self._lock:
            live = {session.id for session in self._sessions.values()}
        removed: set[str] = set()
        for kind in (REQUESTS_DIR, REPLIES_DIR):
            directory = self.root / STATE_DIR / kind
            try:
                entries = list(directory.iterdir())
            except OSError:  # no state directory yet
                continue
            for entry in entries:
                if entry.name not in live:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                    removed.add(entry.name)
        return sorted(removed)

    def expire_idle(self) -> list[UploadSession]:
        """Purge sessions idle longer than the timeout (busy sessions are left for the next sweep)."""
        limit = self.clock() - self.timeout
        with self._lock:
            candidates = [s for s in self._sessions.values() if s.last_activity < limit]
        expired = []
        for session in candidates:
            if not session.lock.acquire(blocking=False):
                continue
            try:
                if session.state not in ENDED and session.last_activity < limit:
                    self.end(session, UploadEvent.TIMEOUT)
                    expired.append(session)
            finally:
                session.lock.release()
        return expired

    def sessions(self) -> list[UploadSession]:
        with self._lock:
            return list(self._sessions.values())
