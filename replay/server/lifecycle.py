"""BitsServer: the server's life (start, stop), its listening socket, accept loop and caps.

At start it checks that the root is writable and removes the session directories an earlier
run left (sessions live in memory, so none of them can be resumed), unless another running
server holds the root's lock. One thread accepts; each
admitted connection is served on a thread of its own (http_front.Connection). Connections are
capped (`max_connections`, by default what the descriptor limit leaves room for): at the cap a
new connection displaces the one that has waited longest for a request (an idle keep-alive
connection or a head that trickles in), and when every connection is busy with a request the
newcomer is answered 503 with `Connection: close`. An accept that fails for want of descriptors
or memory pauses the accept loop (doubling up to ACCEPT_PAUSE_MAX) instead of spinning.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, TextIO

from bitstrace.analyzer.authority import url_authority
from bitstrace.replay.server.http_front import Connection, response_head
from bitstrace.replay.server.log import PacketRecord, ServerLog
from bitstrace.replay.server.options import ServerOptions
from bitstrace.replay.server.service import UploadService
from bitstrace.replay.server.tls import server_context
from bitstrace.replay.server.paths import STATE_DIR
from bitstrace.replay.server.sessions import UploadSession

#: Connections at most by default, and descriptors kept back from the limit for session files,
#: the log and the listening socket (each connection holds its socket and, streaming, one file).
DEFAULT_MAX_CONNECTIONS = 512
RESERVED_DESCRIPTORS = 64
ACCEPT_PAUSE = 0.05
ACCEPT_PAUSE_MAX = 1.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: A refused connection is closed this long after its 503, so the client's request bytes are
#: read first (closing over unread bytes resets the connection, and the 503 may be lost).
REFUSAL_LINGER_S = 1.0
MAX_LINGERING = 256
LISTEN_BACKLOG = 128
ROOT_LOCK = "server.lock"


class RootNotWritable(OSError):
    """The upload root exists but the server cannot create files in it."""


def check_writable(root: Path) -> None:
    """Raise RootNotWritable unless a file can be made (and removed) in `root`."""
    try:
        fd, name = tempfile.mkstemp(dir=root, prefix=".bits-server-write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise RootNotWritable(exc.errno, f"cannot create files in it ({exc.strerror})", str(root)) from None


def connection_cap(configured: int | None) -> int:
    """`configured`, or by default as many as the descriptor limit leaves room for."""
    if configured is not None:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, (soft - RESERVED_DESCRIPTORS) // 2))


class BitsServer:
    """The reference server; see the package docstring. Options are ServerOptions fields."""

    def __init__(self, root: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0, *,
                 on_packet: Callable[[PacketRecord], None] | None = None,
                 log: TextIO | None = sys.stderr, max_records: int = 100_000, **options: Any) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        check_writable(self.root)
        self.options = ServerOptions(**options)
        self.service = UploadService(self.root, self.options)
        self.log = ServerLog(log, on_packet, max_records)
        self.connection_cap = connection_cap(self.options.max_connections)
        self.refused_connections = 0  # answered 503: every connection busy
        self.evicted_connections = 0  # displaced at the cap while waiting for a request
        self._host, self._port = host, port
        self._tls: ssl.SSLContext | None = None
        #: the self-signed certificate's PEM (tls_self_signed), for clients that must trust it
        self.certificate_pem: bytes | None = None
        if self.options.tls:
            self._tls, self.certificate_pem = server_context(
                self.options.tls_cert, self.options.tls_key,
                host if self.options.tls_self_signed else None, self.options.tls_keylog)
        self._listener: socket.socket | None = None
        self._root_lock: TextIO | None = None
        self._connections: set[Connection] = set()
        self._connections_lock = threading.Lock()
        self._lingering: deque[tuple[float, socket.socket]] = deque()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # --- life cycle -----------------------------------------------------------------------
    def start(self) -> "BitsServer":
        if self._claim_root():
            orphans = self.service.table.remove_orphans()
        else:
            orphans = []
            self.log.line(f"bits-server: another bits-server uses {self.root}: its session directories are left alone")
        if orphans:
            shown = ", ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
            self.log.line(f"bits-server: removed {len(orphans)} session director{'y' if len(orphans) == 1 else 'ies'} "
                          f"left by an earlier run: {shown}")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._listener = socket.create_server((self._host, self._port), family=family, backlog=LISTEN_BACKLOG)
        self._listener.settimeout(0.5)
        self._stopping.clear()
        self._threads = [
            threading.Thread(target=self._accept_loop, args=(self._listener,), name="bits-server", daemon=True),
            threading.Thread(target=self._sweep, name="bits-server-sweeper", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        listener = self._listener
        if listener is None:
            return
        self._stopping.set()
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        except OSError:
            pass
        for thread in self._threads:
            thread.join(timeout=5)
        listener.close()
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            connection.shutdown()
        while self._lingering:
            self._lingering.popleft()[1].close()
        if self._root_lock is not None:
            self._root_lock.close()  # releases the flock
            self._root_lock = None
        self._listener = None

    def _claim_root(self) -> bool:
        """Take the root's lock (a flock on BITS-Sessions/server.lock, released by stop or the
        process's end, kill -9 included); False when another running server holds it, whose
        session directories are live, not orphans."""
        state = self.root / STATE_DIR
        state.mkdir(exist_ok=True)
        self._root_lock = open(state / ROOT_LOCK, "a")
        try:
            fcntl.flock(self._root_lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def __enter__(self) -> "BitsServer":
        return self.start() if self._listener is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None, "start() the server first"
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{url_authority(scheme, *self.address)}/"

    @property
    def records(self) -> deque[PacketRecord]:
        """PacketRecord per answered request, in completion order (the newest max_records)."""
        return self.log.records

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def sessions(self) -> list[UploadSession]:
        return self.service.table.sessions()

    # --- connections ----------------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket) -> None:
        pause, failures = 0.0, 0
        while not self._stopping.is_set():
            try:
                sock, address = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    break
                if exc.errno in _OUT_OF_RESOURCES:
                    failures += 1
                    pause = min(ACCEPT_PAUSE_MAX, pause * 2 or ACCEPT_PAUSE)
                    if failures == 1:
                        self.log.line(f"bits-server: cannot accept connections ({exc.strerror}); "
                                      f"pausing accepts until that passes")
                    self._stopping.wait(pause)
                continue  # otherwise the client left before its accept (ECONNABORTED)
            if failures:
                self.log.line(f"bits-server: accepting again after {failures} failed accepts")
                pause, failures = 0.0, 0
            self._admit(sock, address)

    def _admit(self, sock: socket.socket, address: tuple[str, int]) -> None:
        evicted: Connection | None = None
        with self._connections_lock:
            if len(self._connections) >= self.connection_cap:
                waiting = sorted((c for c in self._connections if c.waiting_since is not None),
                                 key=lambda c: c.waiting_since or 0.0)
                evicted = next((c for c in waiting if c.evict()), None)
                if evicted is None:
                    self.refused_connections += 1
                    self._refuse(sock, address)
                    return
                self._connections.discard(evicted)
                self.evicted_connections += 1
            if self._tls is not None:  # the handshake runs on the connection's thread
                sock = self._tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            connection = Connection(sock, address, self.service, self.log, self._forget)
            self._connections.add(connection)
        if evicted is not None:
            self.log.line(f"bits-server: {evicted.client} closed: {self.connection_cap} connections open "
                          f"and it waited longest for a request")
        threading.Thread(target=connection.serve, name=f"bits-server {connection.client}", daemon=True).start()

    def _forget(self, connection: Connection) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def _refuse(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """503 with Connection: close; the socket is closed by the sweeper a moment later.
        Over TLS the connection is closed at once: answering would take a handshake on the
        accept thread, which a slow client could hold."""
        self.log.line(f"bits-server: {address[0]}:{address[1]} refused: {self.connection_cap} connections "
                      f"open, each busy with a request")
        if self._tls is not None:
            sock.close()
            return
        try:
            sock.setblocking(False)
            sock.send(response_head(503, [("Retry-After", "1"), ("Content-Length", "0"), ("Connection", "close")]))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        if len(self._lingering) >= MAX_LINGERING:
            _close_after_reading(self._lingering.popleft()[1])
        self._lingering.append((time.monotonic() + REFUSAL_LINGER_S, sock))

    # --- housekeeping ---------------------------------------------------------------------
    def _sweep(self) -> None:
        """Purge sessions idle past the session timeout; close refused connections."""
        options = self.options
        tick = max(0.02, min(0.25, options.session_timeout / 4))
        while not self._stopping.wait(tick):
            now = time.monotonic()
            with self._connections_lock:  # _refuse appends under it
                while self._lingering and self._lingering[0][0] < now:
                    _close_after_reading(self._lingering.popleft()[1])
            for session in self.service.table.expire_idle():
                self.log.line(f"bits-server: session {session.id} expired after {options.session_timeout:g} s idle")


def _close_after_reading(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:  # nothing more to read now (or the client reset)
        pass
    sock.close()
