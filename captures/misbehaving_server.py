"""A small BITS upload server that misbehaves on purpose, for the corpus's field cases.

It speaks just enough BITS for the client's upload (Ping, Create-Session, contiguous Fragments
with the IIS trim policy for resends, 416 past the offset, Close-Session storing the file,
Cancel-Session) and frames requests with the analyzer's own HTTP parser. Two misbehaviours seen
on real third-party servers:

- `overrun`: after the ack of the `overrun_after`-th fragment (1-based), which says
  `Content-Length: 0`, it writes these bytes as well, as a server that writes a body it did not
  announce (the next status line follows them on the same connection);
- `silent`: the first `silent` times a fragment starts at the offset `silent_at`, it reads the
  whole fragment and closes the connection without answering.

It offers what captures/make_captures.py uses of the reference server: start(), stop(),
address, url and records (one `Record` per request read, its status None when unanswered).
Single-purpose and for loopback tests only: one thread per connection, no limits.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

from bitstrace.analyzer.bits.protocol import PROTOCOL_GUID, Header, PacketType, parse_content_range
from bitstrace.analyzer.http import BodyChunk, MessageEnd, RequestHead, HttpParser

CHUNK = 64 * 1024


class Record(NamedTuple):
    """One request as the server read it, and what it did with it."""

    method: str
    target: str
    packet: str | None
    session_id: str | None
    content_range: str | None
    status: int | None  # None: not answered on purpose
    received: int | None
    extra: int  # bytes written after the ack beyond its Content-Length

    def line(self) -> str:
        answer = "no answer (on purpose)" if self.status is None else str(self.status)
        return (f"misbehaving-server: {self.method} {self.target} {self.packet or '-'} "
                f"{self.content_range or ''} -> {answer}" + (f" +{self.extra} extra bytes" if self.extra else ""))


class _Session:
    def __init__(self, destination: Path) -> None:
        self.destination = destination
        self.data = bytearray()
        self.total: int | None = None


class MisbehavingServer:
    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0, log: object = None, *,
                 overrun: bytes = b"", overrun_after: int = 1, silent: int = 0, silent_at: int = 0) -> None:
        self.root = Path(root)
        self.overrun, self.overrun_after = overrun, overrun_after
        self.silent, self.silent_at = silent, silent_at
        self.records: list[Record] = []
        self._sessions: dict[str, _Session] = {}
        self._fragments = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._listener.settimeout(0.1)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- what make_captures uses -------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def start(self) -> "MisbehavingServer":
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._listener.close()

    # --- serving ------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        parser = HttpParser("request")
        head: RequestHead | None = None
        body = bytearray()
        conn.settimeout(0.2)
        deadline = time.monotonic() + 30
        with conn:
            while not self._stopping.is_set() and time.monotonic() < deadline:
                try:
                    data = conn.recv(CHUNK)
                except (TimeoutError, socket.timeout):
                    continue
                except OSError:
                    return
                if not data:
                    return
                for event in parser.feed(data, 0, 0):
                    if type(event) is RequestHead:
                        head, body = event, bytearray()
                    elif type(event) is BodyChunk:
                        body += event.data
                    elif type(event) is MessageEnd and head is not None:
                        answer = self._answer(head, bytes(body))
                        if answer is None:  # silent: hang up without a word
                            conn.shutdown(socket.SHUT_RDWR)
                            return
                        conn.sendall(answer)
                        head = None

    def _answer(self, head: RequestHead, body: bytes) -> bytes | None:
        headers = head.headers
        packet = headers.get(Header.PACKET_TYPE)
        kind = PacketType.parse(packet)
        session_id = headers.get(Header.SESSION_ID)
        content_range = headers.get(Header.CONTENT_RANGE)
        ack: list[tuple[str, str]] = [(Header.PACKET_TYPE, "Ack")]
        status, received, extra = 200, None, b""
        with self._lock:
            session = self._sessions.get(session_id or "")
            if kind is PacketType.CREATE_SESSION:
                session_id = "{" + str(uuid.uuid4()).upper() + "}"
                self._sessions[session_id] = _Session(self.root / head.target.lstrip("/"))
                ack += [(Header.PROTOCOL, PROTOCOL_GUID), (Header.SESSION_ID, session_id),
                        ("Accept-Encoding", "identity")]
            elif kind is PacketType.PING:
                pass
            elif session is None:
                status = 500
                ack += [(Header.ERROR_CODE, "0x8020001F"), (Header.ERROR_CONTEXT, "0x5")]
            elif kind is PacketType.FRAGMENT:
                placed = parse_content_range(content_range or "")
                if placed is None or len(body) != placed.length:
                    status = 400
                    ack += [(Header.ERROR_CODE, "0x80070057"), (Header.ERROR_CONTEXT, "0x5")]
                else:
                    if placed.first == self.silent_at and self.silent:
                        self.silent -= 1
                        self.records.append(Record(head.method, head.target, packet, session_id,
                                                   content_range, None, None, 0))
                        return None
                    session.total = placed.total
                    have = len(session.data)
                    if placed.first > have:
                        status = 416
                    elif placed.last >= have:
                        session.data += body[have - placed.first:]
                    received = len(session.data)
                    ack += [(Header.SESSION_ID, session_id or ""), (Header.RECEIVED_CONTENT_RANGE, str(received))]
                    self._fragments += status == 200
                    if status == 200 and self._fragments == self.overrun_after:
                        extra = self.overrun
            elif kind is PacketType.CLOSE_SESSION:
                if session.total is not None and len(session.data) == session.total:
                    session.destination.parent.mkdir(parents=True, exist_ok=True)
                    session.destination.write_bytes(bytes(session.data))
                del self._sessions[session_id or ""]
                ack.append((Header.SESSION_ID, session_id or ""))
            elif kind is PacketType.CANCEL_SESSION:
                del self._sessions[session_id or ""]
                ack.append((Header.SESSION_ID, session_id or ""))
            else:
                status = 400
            self.records.append(Record(head.method, head.target, packet, session_id, content_range,
                                       status, received, len(extra)))
        reason = {200: "OK", 400: "Bad Request", 416: "Requested Range Not Satisfiable",
                  500: "Internal Server Error"}[status]
        lines = [f"HTTP/1.1 {status} {reason}", "Server: misbehaving-bits/1", *(f"{k}: {v}" for k, v in ack),
                 "Content-Length: 0"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + extra
