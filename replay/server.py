"""bits-server: a conformant reference server for the upload side of [MC-BUP].

Command line::

    bits-server --root DIR [--host 127.0.0.1] [--port 0] [options]

prints ``bits-server: listening on http://HOST:PORT/`` on stdout when ready, logs one line per
packet on stderr, and stops cleanly on SIGINT/SIGTERM. ``bits-server --help`` lists the options.

Library API (for tests and the replayer)::

    from bitstrace.replay.server import BitsServer
    with BitsServer(root, overlap="reject", reply=True) as server:   # started on enter
        server.url              # "http://127.0.0.1:PORT/"
        server.records          # PacketRecord per packet, in completion order
        server.sessions()       # live sessions (replay.server_state.Session)
    # or: server = BitsServer(root, port=0, on_packet=callback); server.start(); ...; server.stop()

Keyword options are the fields of ServerOptions. ``on_packet(record)`` is called (from the worker
thread) for every packet answered; PacketRecord.started/finished are time.monotonic() stamps, so
tests can see which requests were in flight together. ``log`` is a text stream for the log lines
(default stderr; None for silence).

Behaviour (bits-protocol.md 1-7; the state transitions are one table in replay.server_state):
- Packet types are compared case-insensitively. Create negotiates the protocol GUID (answered in
  lowercase) and issues fresh uppercase brace GUIDs like IIS.
- A fragment must start at the next offset N: a gap draws 416 with BITS-Received-Content-Range N
  (BITS-Error-Code 0x00000000, context 0x5). An overlap keeps only the new bytes and answers 200
  (IIS, overlap="trim") or draws 416 (MC-BUP, overlap="reject"). Bodies stream in 64 KiB chunks to
  BITS-Sessions/Requests/{id}/requestfile.bin under the root; a failed or abandoned write is
  rolled back to N. A resent fragment after the last byte is re-acked 200 N=T.
- Close after the last byte moves the file into place atomically (404 when the temporary file is
  gone); Close before it discards the data (Win32). Cancel deletes the session's data and reply.
  Ended and expired sessions answer 500 BG_E_SESSION_NOT_FOUND. Sessions live in memory: they
  survive reconnects, not a server restart.
- Errors carry BITS-Error-Code (or BITS-Error, error_header="mcbup") and context 0x5; a failed
  reply receipt (reply mode) carries context 0x7 and is retried by a resent final fragment.
- An existing destination is overwritten unless overwrite=False (then 409, or exists_status=403,
  with E_ACCESSDENIED). The URL path never leaves the root (replay.paths); Content-Name is ignored.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hmac
import json
import os
import socket
import socketserver
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Literal, NamedTuple, TextIO

from bitstrace.analyzer.bits.protocol import (
    BG_E_SESSION_NOT_FOUND,
    BG_E_TOO_LARGE,
    DEFAULT_SESSION_TIMEOUT,
    E_ACCESSDENIED,
    E_INVALIDARG,
    ERROR_DISK_FULL,
    MAX_FRAGMENT,
    MAX_HEADER_VALUE,
    MAX_HOST_ID,
    MAX_SUPPORTED_PROTOCOLS,
    MAX_UPLOAD_SIZE,
    PROTOCOL_GUID,
    S_OK,
    ErrorContext,
    Header,
    METHOD,
    HResult,
    PacketType,
    format_hresult,
    parse_content_range,
    parse_decimal,
    split_protocols,
)
from bitstrace.replay.paths import UnsafePath, check_inside, reply_target, reply_url, upload_path, url_directory
from bitstrace.replay.server_state import ENDED, Event, Session, SessionTable, State

CHUNK = 64 * 1024
#: An unread body up to this size (or the fragment limit) is drained to keep the connection;
#: a larger one closes it.
DRAIN_LIMIT = 1 << 20
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
ERROR_HEADERS = {"win32": Header.ERROR_CODE, "mcbup": Header.ERROR_CODE_MCBUP}


@dataclass(frozen=True)
class ServerOptions:
    """Where [MC-BUP] and Windows differ, the IIS behaviour is the default."""

    overlap: Literal["trim", "reject"] = "trim"  # trim: keep only new bytes, 200 (IIS); reject: 416
    overwrite: bool = True  # False: an existing destination is refused with exists_status
    exists_status: Literal[409, 403] = 409  # 409 (Win32 Ack page) or 403 (MC-BUP)
    create_status: Literal[200, 201] = 200
    error_header: Literal["win32", "mcbup"] = "win32"  # BITS-Error-Code or BITS-Error
    max_upload_size: int = MAX_UPLOAD_SIZE
    max_fragment_size: int = MAX_FRAGMENT
    session_timeout: float = DEFAULT_SESSION_TIMEOUT
    host_id: str | None = None
    host_id_fallback_timeout: int | None = None
    reply: bool = False  # upload-reply: a JSON receipt served at BITS-Reply-URL
    auth: tuple[str, str] | None = None  # Basic credentials required on every request
    idle_timeout: float = 60.0  # seconds without a byte from the client
    request_timeout: float = 600.0  # seconds for one request, headers to answer

    def __post_init__(self) -> None:
        if self.overlap not in ("trim", "reject"):
            raise ValueError("overlap must be 'trim' or 'reject'")
        if self.exists_status not in (409, 403) or self.create_status not in (200, 201):
            raise ValueError("exists_status must be 409/403 and create_status 200/201")
        if self.error_header not in ERROR_HEADERS:
            raise ValueError("error_header must be 'win32' or 'mcbup'")
        if min(self.session_timeout, self.idle_timeout, self.request_timeout) <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_upload_size < 1 or self.max_fragment_size < 1:
            raise ValueError("size limits must be positive")
        if self.host_id_fallback_timeout is not None and self.host_id is None:
            raise ValueError("host_id_fallback_timeout needs host_id")
        if self.host_id is not None and not 0 < len(self.host_id) <= MAX_HOST_ID:
            raise ValueError(f"host_id must be 1-{MAX_HOST_ID} characters")


class PacketRecord(NamedTuple):
    """One answered request, as logged."""

    started: float  # time.monotonic() when the request line arrived
    finished: float  # time.monotonic() when the answer was sent
    client: str
    method: str
    target: str
    packet: str | None  # PacketType value, the raw header when unknown, None when absent
    session_id: str | None
    content_range: str | None  # as the request sent it
    status: int | None  # None: the client went away before the answer could be sent
    error: str | None  # HRESULT as "0x... NAME" when the answer carried one
    received: int | None  # BITS-Received-Content-Range of the answer
    note: str

    def line(self) -> str:
        parts = [f"bits-server: {self.client} {self.method} {self.target}", self.packet or "-"]
        if self.session_id:
            parts.append(self.session_id)
        if self.content_range:
            parts.append(self.content_range)
        parts.append(f"-> {self.status if self.status is not None else 'no answer (client gone)'}")
        if self.received is not None:
            parts.append(f"N={self.received}")
        if self.error:
            parts.append(self.error)
        if self.note:
            parts.append(f"({self.note})")
        return " ".join(parts)


@dataclass
class Ack:
    """A BITS answer: always `BITS-Packet-Type: Ack` and `Content-Length: 0`."""

    status: int
    session_id: str | None = None
    received: int | None = None
    error: HResult | None = None
    context: ErrorContext | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""


def error_ack(status: int, error: HResult | None, note: str, session_id: str | None = None,
              context: ErrorContext | None = ErrorContext.REMOTE_FILE, **more) -> Ack:
    return Ack(status, session_id=session_id, error=error,
               context=context if error is not None else None, note=note, **more)


class ClientGone(Exception):
    """The request body ended early or stalled; the connection is dropped without an answer."""


class Body:
    """The request body as a bounded stream; tracks how much is left unread."""

    def __init__(self, rfile: BinaryIO, length: int):
        self._rfile = rfile
        self.remaining = length

    def _read(self, size: int) -> bytes:
        try:
            data = self._rfile.read(min(size, self.remaining))
        except OSError as exc:
            raise ClientGone(f"body read failed: {exc}") from None
        if not data:
            raise ClientGone(f"body ended {self.remaining} bytes early")
        self.remaining -= len(data)
        return data

    def chunks(self) -> Iterator[bytes]:
        while self.remaining:
            yield self._read(CHUNK)

    def skip(self, count: int) -> None:
        """Read and drop `count` bytes (the already-received head of an overlapping fragment)."""
        while count:
            count -= len(self._read(min(CHUNK, count)))


class Request(NamedTuple):
    target: str
    headers: "HeaderView"
    body: Body


class HeaderView:
    """Case-insensitive header access over http.server's message object."""

    def __init__(self, message):
        self._message = message

    def get(self, name: str) -> str | None:
        value = self._message.get(name)
        return None if value is None else value.strip()

    def count(self, name: str) -> int:
        return len(self._message.get_all(name) or ())


class UploadService:
    """The BITS packet logic, independent of the HTTP plumbing."""

    def __init__(self, root: Path, options: ServerOptions):
        self.root = root
        self.options = options
        self.table = SessionTable(root, options.session_timeout)

    # --- dispatch -------------------------------------------------------------------------
    def handle(self, packet: PacketType, request: Request) -> Ack:
        handler = {
            PacketType.PING: self.ping,
            PacketType.CREATE_SESSION: self.create,
            PacketType.FRAGMENT: self.fragment,
            PacketType.CLOSE_SESSION: self.close,
            PacketType.CANCEL_SESSION: self.cancel,
        }[packet]
        return handler(request)

    def _session_for(self, request: Request) -> tuple[Session | None, Ack | None, str | None]:
        session_id = request.headers.get(Header.SESSION_ID)
        if not session_id:
            return None, error_ack(400, E_INVALIDARG, "no BITS-Session-Id"), None
        session = self.table.get(session_id)
        if session is None:
            return None, error_ack(500, BG_E_SESSION_NOT_FOUND, "unknown or ended session", session_id), session_id
        if not session.lock.acquire(timeout=self.options.request_timeout):
            return None, error_ack(500, BG_E_SESSION_NOT_FOUND, "session busy", session_id), session_id
        if session.state in ENDED:
            session.lock.release()
            return None, error_ack(500, BG_E_SESSION_NOT_FOUND, "session ended", session_id), session_id
        return session, None, session_id

    # --- packets --------------------------------------------------------------------------
    def ping(self, request: Request) -> Ack:
        return Ack(200)

    def create(self, request: Request) -> Ack:
        offered = request.headers.get(Header.SUPPORTED_PROTOCOLS)
        if not offered:
            return error_ack(400, E_INVALIDARG, "no BITS-Supported-Protocols")
        guids = [g.lower() for g in split_protocols(offered)[:MAX_SUPPORTED_PROTOCOLS]]
        if PROTOCOL_GUID not in guids:
            return error_ack(400, E_INVALIDARG, "no supported protocol offered")
        try:
            destination, url_path = upload_path(self.root, request.target)
        except UnsafePath as exc:
            return error_ack(400, E_INVALIDARG, f"bad upload URL: {exc}")
        refused = self._refuse_existing(destination)
        if refused is not None:
            return refused
        try:
            session = self.table.create(destination, url_path, PROTOCOL_GUID, hashed=self.options.reply)
        except OSError as exc:
            return self._os_error_ack(exc, None)
        headers = [(Header.PROTOCOL, session.protocol), (Header.ACCEPT_ENCODING, "identity")]
        if self.options.host_id is not None:
            headers.append((Header.HOST_ID, self.options.host_id))
            if self.options.host_id_fallback_timeout is not None:
                headers.append((Header.HOST_ID_FALLBACK_TIMEOUT, str(self.options.host_id_fallback_timeout)))
        return Ack(self.options.create_status, session_id=session.id, headers=headers,
                   note=f"new session for {url_path}")

    def fragment(self, request: Request) -> Ack:
        """Checks that need no session first; the session's lock is held while the body streams."""
        headers = request.headers
        if headers.get(Header.SESSION_ID) is None:
            return error_ack(400, E_INVALIDARG, "no BITS-Session-Id")
        raw_range = headers.get(Header.CONTENT_RANGE)
        content_range = parse_content_range(raw_range) if raw_range is not None else None
        if content_range is None:
            return error_ack(400, E_INVALIDARG, f"missing or malformed Content-Range {raw_range!r}")
        if request.body.remaining != content_range.length:
            return error_ack(400, E_INVALIDARG, "Content-Length differs from the range")
        encoding = headers.get(Header.CONTENT_ENCODING)
        if encoding is not None and encoding.lower() != "identity":
            return error_ack(400, E_INVALIDARG, f"Content-Encoding {encoding}")
        if content_range.length > self.options.max_fragment_size:
            return Ack(413, note="fragment too large")
        session, refused, session_id = self._session_for(request)
        if session is None:
            return refused
        try:
            return self._fragment_locked(session, session_id, content_range, request.body)
        finally:
            self.table.touch(session)
            session.lock.release()

    def _fragment_locked(self, session: Session, session_id: str, content_range, body: Body) -> Ack:
        if session.total is not None and content_range.total != session.total:
            return error_ack(400, E_INVALIDARG, f"total changed from {session.total}", session_id)
        if content_range.total > self.options.max_upload_size:
            return error_ack(500, BG_E_TOO_LARGE, f"{content_range.total} bytes is over the limit", session_id)
        session.total = content_range.total
        if session.state is State.WAIT_FOR_CLOSE:
            session.fire(Event.FRAGMENT)
            return self._final_ack(session, session_id, "resent after completion")
        if session.received == session.total:
            # every byte is in but the notification failed: this resend retries it
            return self._complete(session, session_id)
        first, last = content_range.first, content_range.last
        if first > session.received:
            return self._resync(session, session_id, "gap")
        if first < session.received and self.options.overlap == "reject":
            return self._resync(session, session_id, "overlap")
        if last < session.received:
            session.fire(Event.FRAGMENT)
            return Ack(200, session_id=session_id, received=session.received, note="already received")
        body.skip(session.received - first)
        try:
            self._append(session, body)
        except OSError as exc:
            return self._os_error_ack(exc, session_id)
        if session.received == session.total:
            return self._complete(session, session_id)
        session.fire(Event.FRAGMENT)
        return Ack(200, session_id=session_id, received=session.received)

    def _resync(self, session: Session, session_id: str, why: str) -> Ack:
        return Ack(416, session_id=session_id, received=session.received, error=S_OK,
                   context=ErrorContext.REMOTE_FILE, note=why)

    def _append(self, session: Session, body: Body) -> None:
        """Stream the body onto the request file; on any failure roll back to the last ack."""
        digest = session.digest.copy() if session.digest is not None else None
        written = session.received
        fd = os.open(session.data_file, os.O_WRONLY)
        try:
            os.lseek(fd, written, os.SEEK_SET)
            try:
                for chunk in body.chunks():
                    view = memoryview(chunk)
                    while view:
                        count = os.write(fd, view)
                        view = view[count:]
                    if digest is not None:
                        digest.update(chunk)
                    written += len(chunk)
            except BaseException:
                os.ftruncate(fd, session.received)
                raise
        finally:
            os.close(fd)
        session.digest, session.received = digest, written

    def _complete(self, session: Session, session_id: str) -> Ack:
        session.fire(Event.LAST_BYTE)
        if self.options.reply:
            try:
                self._write_receipt(session)
            except OSError as exc:
                session.fire(Event.NOTIFY_FAILED)
                ack = self._os_error_ack(exc, session_id)
                ack.context = ErrorContext.REMOTE_APPLICATION
                return ack
            session.reply_url = reply_url(session.id)
        session.fire(Event.NOTIFIED)
        return self._final_ack(session, session_id, "complete")

    def _write_receipt(self, session: Session) -> None:
        receipt = {"session_id": session.id, "path": session.url_path, "size": session.received,
                   "sha256": session.digest.hexdigest()}
        session.reply_dir.mkdir(parents=True, exist_ok=True)
        partial = session.reply_file.with_suffix(".partial")
        partial.write_text(json.dumps(receipt, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(partial, session.reply_file)

    def _final_ack(self, session: Session, session_id: str, note: str) -> Ack:
        headers = [(Header.REPLY_URL, session.reply_url)] if session.reply_url else []
        return Ack(200, session_id=session_id, received=session.total, headers=headers, note=note)

    def close(self, request: Request) -> Ack:
        session, refused, session_id = self._session_for(request)
        if session is None:
            return refused
        try:
            if session.state is State.RECEIVE_FRAGMENTS:
                self.table.end(session, Event.CLOSE)
                return Ack(200, session_id=session_id, note="closed before the last byte: discarded")
            if not session.data_file.is_file():
                self.table.end(session, Event.CLOSE)
                return Ack(404, session_id=session_id, note="the uploaded entity is gone")
            refused = self._refuse_existing(session.destination, session_id)
            if refused is not None:
                return refused
            try:
                check_inside(self.root, session.destination)
                session.destination.parent.mkdir(parents=True, exist_ok=True)
                check_inside(self.root, session.destination)
                os.replace(session.data_file, session.destination)
            except UnsafePath as exc:
                return error_ack(403, E_ACCESSDENIED, f"destination unsafe: {exc}", session_id)
            except OSError as exc:
                return self._os_error_ack(exc, session_id)
            self.table.end(session, Event.CLOSE)
            return Ack(200, session_id=session_id, note=f"published {session.url_path}")
        finally:
            session.lock.release()

    def cancel(self, request: Request) -> Ack:
        session, refused, session_id = self._session_for(request)
        if session is None:
            return refused
        try:
            self.table.end(session, Event.CANCEL)
            return Ack(200, session_id=session_id, note="cancelled")
        finally:
            session.lock.release()

    # --- helpers --------------------------------------------------------------------------
    def _refuse_existing(self, destination: Path, session_id: str | None = None) -> Ack | None:
        if self.options.overwrite or not destination.exists():
            return None
        return error_ack(self.options.exists_status, E_ACCESSDENIED, "destination exists", session_id)

    def _os_error_ack(self, exc: OSError, session_id: str | None) -> Ack:
        if exc.errno in _DISK_FULL_ERRNOS:
            return error_ack(500, ERROR_DISK_FULL, "disk full", session_id)
        return error_ack(500, E_ACCESSDENIED, f"server file error: {exc.strerror}", session_id)

    def reply(self, target: str) -> Path | None:
        """The reply file a GET target names, if its session is waiting for Close."""
        found = reply_target(target)
        if found is None:
            return None
        directory, session_id = found
        session = self.table.get(session_id)
        if session is None or session.reply_url is None or url_directory(session.url_path) != directory:
            return None
        return session.reply_file


class BitsRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "bits-server/0.1"
    server: "_HttpServer"
    headers = None  # until parse_request has read them

    def setup(self) -> None:
        self.timeout = self.server.bits.options.idle_timeout
        super().setup()

    def finish(self) -> None:
        self.server.bits._untrack(self)
        super().finish()

    def handle_one_request(self) -> None:
        self._started = time.monotonic()
        self.server.bits._arm(self, self._started + self.server.bits.options.idle_timeout)
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        # http.server collapses a leading '//' in self.path; safety checks need the target as sent
        words = self.requestline.split()
        self.target = words[1] if len(words) == 3 else getattr(self, "path", "-")
        self.server.bits._arm(self, time.monotonic() + self.server.bits.options.request_timeout)
        return ok

    def version_string(self) -> str:
        return self.server_version

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (header line over 64 KiB, too many headers) in BITS form."""
        if self.command == METHOD and code in (400, 431):
            self.close_connection = True
            self._send_ack(error_ack(400, E_INVALIDARG, message or "malformed request"), Body(self.rfile, 0), None)
            return
        super().send_error(code, message, explain)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (stdlib signature)
        self.server.bits._log_line(f"bits-server: {self.address_string()} {format % args}")

    def log_request(self, code="-", size="-") -> None:
        """Packets are logged by _record; the stdlib's access log would double them."""

    # --- BITS_POST ------------------------------------------------------------------------
    def do_BITS_POST(self) -> None:
        service = self.server.bits.service
        headers = HeaderView(self.headers)
        raw_type = headers.get(Header.PACKET_TYPE)
        packet = PacketType.parse(raw_type)
        body = Body(self.rfile, 0)
        ack = self._check_request(headers, body)
        if ack is None:
            if packet is None or packet is PacketType.ACK:
                ack = error_ack(400, E_INVALIDARG, f"unknown packet type {raw_type!r}")
            elif packet is not PacketType.FRAGMENT and body.remaining:
                ack = error_ack(400, E_INVALIDARG, f"body on {packet.value}")
            else:
                try:
                    ack = service.handle(packet, Request(self.target, headers, body))
                except ClientGone as exc:
                    self.close_connection = True
                    self._record(packet.value if packet else raw_type, headers.get(Header.SESSION_ID),
                                 0, None, None, f"dropped: {exc}")
                    return
        self._send_ack(ack, body, packet.value if packet else raw_type)

    def _check_request(self, headers: HeaderView, body: Body) -> Ack | None:
        """Checks common to every packet; sets the body length when it is sound."""
        denied = self._auth_challenge()
        if denied is not None:
            return denied
        for name, value in self.headers.items():
            if len(value) > MAX_HEADER_VALUE:
                self.close_connection = True
                return error_ack(400, E_INVALIDARG, f"{name} header over {MAX_HEADER_VALUE} bytes")
        if headers.get("Transfer-Encoding") is not None:
            self.close_connection = True
            return error_ack(400, E_INVALIDARG, "Transfer-Encoding instead of Content-Length")
        if headers.count(Header.CONTENT_LENGTH) != 1:
            self.close_connection = True
            return error_ack(400, E_INVALIDARG, "Content-Length missing or repeated")
        length = parse_decimal(headers.get(Header.CONTENT_LENGTH) or "")
        if length is None:
            self.close_connection = True
            return error_ack(400, E_INVALIDARG, "Content-Length not a number")
        body.remaining = length
        return None

    def _auth_challenge(self) -> Ack | None:
        credentials = self.server.bits.options.auth
        if credentials is None:
            return None
        offered = self.headers.get("Authorization", "")
        scheme, _, token = offered.strip().partition(" ")
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(token.strip(), validate=True)
            except (binascii.Error, ValueError):
                given = b""
            expected = f"{credentials[0]}:{credentials[1]}".encode("utf-8")
            if hmac.compare_digest(given, expected):
                return None
        return Ack(401, headers=[("WWW-Authenticate", 'Basic realm="bits-server"')],
                   note="credentials required" if not offered else "bad credentials")

    def _send_ack(self, ack: Ack, body: Body, packet: str | None) -> None:
        drain_limit = max(DRAIN_LIMIT, self.server.bits.options.max_fragment_size)
        if body.remaining and body.remaining <= drain_limit and not self.close_connection:
            try:
                for _ in body.chunks():
                    pass
            except ClientGone as gone:
                self.close_connection = True
                self._record(packet, ack.session_id, None, None, None, f"not answered: {gone}")
                return
        elif body.remaining:
            self.close_connection = True
        error_header = ERROR_HEADERS[self.server.bits.options.error_header]
        self.send_response(ack.status)
        is_bits = ack.status != 401
        if is_bits:
            self.send_header(Header.PACKET_TYPE, PacketType.ACK.value)
            if ack.session_id is None and self.command == METHOD and self.headers is not None:
                ack.session_id = self.headers.get(Header.SESSION_ID)
        if ack.session_id is not None:
            self.send_header(Header.SESSION_ID, ack.session_id.strip())
        if ack.received is not None:
            self.send_header(Header.RECEIVED_CONTENT_RANGE, str(ack.received))
        if ack.error is not None:
            self.send_header(error_header, format_hresult(ack.error.code))
            if ack.context is not None:
                self.send_header(Header.ERROR_CONTEXT, f"0x{int(ack.context):X}")
        for name, value in ack.headers:
            self.send_header(name, value)
        self.send_header(Header.CONTENT_LENGTH, "0")
        if self.close_connection:
            self.send_header("Connection", "close")
        # recorded before the answer leaves, so a client that has its answer sees the record
        self._record(packet, ack.session_id, ack.status, str(ack.error) if ack.error else None,
                     ack.received, ack.note)
        self.end_headers()

    # --- GET/HEAD: upload replies ----------------------------------------------------------
    def do_GET(self) -> None:
        self._serve_reply(send_body=True)

    def do_HEAD(self) -> None:
        self._serve_reply(send_body=False)

    def _serve_reply(self, send_body: bool) -> None:
        denied = self._auth_challenge()
        if denied is not None:
            self._send_ack(denied, Body(self.rfile, 0), None)
            return
        path = self.server.bits.service.reply(self.target)
        try:
            data = path.read_bytes() if path is not None else None
        except OSError:
            data = None
        if data is None:
            self._send_plain(404, b"", "no such reply")
            return
        status, first, last = 200, 0, len(data) - 1
        wanted = self.headers.get("Range")
        extra: list[tuple[str, str]] = []
        if wanted:
            parsed = _parse_byte_range(wanted, len(data))
            if parsed is None:
                self._send_plain(416, b"", "range not satisfiable", [("Content-Range", f"bytes */{len(data)}")])
                return
            status, (first, last) = 206, parsed
            extra.append(("Content-Range", f"bytes {first}-{last}/{len(data)}"))
        self._send_plain(status, data[first:last + 1], "reply", extra, send_body)

    def _send_plain(self, status: int, payload: bytes, note: str,
                    extra: list[tuple[str, str]] = (), send_body: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if status in (200, 206) else "text/plain")
        for name, value in extra:
            self.send_header(name, value)
        self.send_header(Header.CONTENT_LENGTH, str(len(payload)))
        self._record(None, None, status, None, None, note)
        self.end_headers()
        if send_body:
            self.wfile.write(payload)

    def _record(self, packet: str | None, session_id: str | None, status: int | None, error: str | None,
                received: int | None, note: str) -> None:
        self.server.bits._emit(PacketRecord(
            self._started, time.monotonic(), self.address_string(), self.command or "-",
            getattr(self, "target", "-"), packet, session_id, self.headers.get(Header.CONTENT_RANGE) if self.headers is not None else None,
            status, error, received, note))

    def address_string(self) -> str:
        host, port = self.client_address[:2]
        return f"{host}:{port}"


def _parse_byte_range(value: str, size: int) -> tuple[int, int] | None:
    """One `bytes=a-b`, `bytes=a-` or `bytes=-n` range, clipped to the size; None if unsatisfiable."""
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    start, dash, end = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if start == "":
            first, last = max(0, size - int(end)), size - 1
        else:
            first, last = int(start), min(int(end), size - 1) if end else size - 1
    except ValueError:
        return None
    if first > last or first >= size:
        return None
    return first, last


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    bits: "BitsServer"

    def server_bind(self) -> None:
        # HTTPServer.server_bind would resolve the host name (getfqdn): slow and pointless here
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # the client went away or timed out: an ordinary event
            return
        super().handle_error(request, client_address)


class BitsServer:
    """The reference server; see the module docstring. Options are ServerOptions fields."""

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0, *,
                 on_packet: Callable[[PacketRecord], None] | None = None,
                 log: TextIO | None = sys.stderr, max_records: int = 100_000, **options):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.options = ServerOptions(**options)
        self.service = UploadService(self.root, self.options)
        self.records: deque[PacketRecord] = deque(maxlen=max_records)
        self._on_packet = on_packet
        self._log = log
        self._log_lock = threading.Lock()
        self._host, self._port = host, port
        self._deadlines: dict[BitsRequestHandler, float] = {}
        self._deadline_lock = threading.Lock()
        self._http: _HttpServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # --- life cycle -----------------------------------------------------------------------
    def start(self) -> "BitsServer":
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        server_class = type("BitsHttpServer", (_HttpServer,), {"address_family": family})
        self._http = server_class((self._host, self._port), BitsRequestHandler)
        self._http.bits = self
        self._threads = [
            threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                             name="bits-server", daemon=True),
            threading.Thread(target=self._sweep, name="bits-server-sweeper", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        if self._http is None:
            return
        self._stopping.set()
        self._http.shutdown()
        self._http.server_close()
        with self._deadline_lock:
            handlers = list(self._deadlines)
        for handler in handlers:
            _shutdown(handler.connection)
        for thread in self._threads:
            thread.join(timeout=5)
        self._http = None

    def __enter__(self) -> "BitsServer":
        return self.start() if self._http is None else self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        assert self._http is not None, "start() the server first"
        return self._http.server_address[0], self._http.server_address[1]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def sessions(self) -> list[Session]:
        return self.service.table.sessions()

    # --- timeouts -------------------------------------------------------------------------
    def _arm(self, handler: BitsRequestHandler, deadline: float) -> None:
        with self._deadline_lock:
            self._deadlines[handler] = deadline

    def _untrack(self, handler: BitsRequestHandler) -> None:
        with self._deadline_lock:
            self._deadlines.pop(handler, None)

    def _sweep(self) -> None:
        """Drop connections past their deadline; purge sessions idle past the session timeout."""
        options = self.options
        tick = max(0.02, min(0.5, options.idle_timeout / 4, options.request_timeout / 4,
                             options.session_timeout / 4))
        while not self._stopping.wait(tick):
            now = time.monotonic()
            with self._deadline_lock:
                late = [h for h, deadline in self._deadlines.items() if deadline < now]
                for handler in late:
                    del self._deadlines[handler]
            for handler in late:
                self._log_line(f"bits-server: {handler.address_string()} timed out, connection dropped")
                _shutdown(handler.connection)
            for session in self.service.table.expire_idle():
                self._log_line(f"bits-server: session {session.id} expired after {options.session_timeout:g} s idle")

    # --- logging --------------------------------------------------------------------------
    def _emit(self, record: PacketRecord) -> None:
        self.records.append(record)
        self._log_line(record.line())
        if self._on_packet is not None:
            self._on_packet(record)

    def _log_line(self, line: str) -> None:
        if self._log is None:
            return
        with self._log_lock:
            self._log.write(line + "\n")
            self._log.flush()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
