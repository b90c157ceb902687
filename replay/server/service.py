"""The BITS upload service: each packet's handling over the session table, without sockets.

The HTTP front hands it a Request (target, headers, body stream, client address) and sends the
Ack it returns; the service never sees a connection. Its rules are the module docstring of
bitstrace.replay.server.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Iterator, NamedTuple, Protocol

from bitstrace.analyzer.bits.protocol import (
    BG_E_SESSION_NOT_FOUND,
    BG_E_TOO_LARGE,
    E_ACCESSDENIED,
    E_INVALIDARG,
    ERROR_DISK_FULL,
    HTTP_ERROR_BASE,
    MAX_SUPPORTED_PROTOCOLS,
    PROTOCOL_GUID,
    S_OK,
    ContentRange,
    ErrorContext,
    Header,
    PacketType,
    describe_hresult,
    parse_content_range,
    split_protocols,
)
from bitstrace.analyzer.http import Headers
from bitstrace.replay.server.acks import Ack, error_ack
from bitstrace.replay.server.options import ServerOptions
from bitstrace.replay.server.paths import (
    UnsafePath,
    check_inside,
    filesystem_limits,
    reply_target,
    reply_url,
    upload_path,
    url_directory,
)
from bitstrace.replay.server.sessions import ENDED, UploadEvent, UploadSession, SessionTable, UploadState

_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: A Create over a session cap: 503 is a transient error to a BITS client, which retries the job
#: after its retry delay instead of failing it, and the HRESULT is the one the client itself
#: reports for a 503 (BG_E_HTTP_ERROR_503), so its error text and the status agree.
SERVER_BUSY = describe_hresult(HTTP_ERROR_BASE + 503)
RETRY_AFTER_S = 60


class ClientGone(Exception):
    """The request body ended early or stalled; the connection is dropped without an answer."""


class RequestBody(Protocol):
    """The request body as a bounded stream, read by the service as it needs it."""

    remaining: int  # bytes not yet read

    def chunks(self) -> Iterator[bytes | memoryview]:
        """The rest of the body, piece by piece (raises ClientGone)."""
        ...

    def skip(self, count: int) -> None:
        """Read and drop `count` bytes (the already-received head of an overlapping fragment)."""
        ...

    def abort(self) -> None:
        """Cut the body from another thread: its reader gets ClientGone."""
        ...


class Request(NamedTuple):
    target: str  # as sent
    headers: Headers
    body: RequestBody
    client: str = ""  # the client's address, without the port
    method_override: bool = False  # sent as POST with X-Http-Method-Override: BITS_POST (OneDrive)


class UploadService:
    """The BITS packet logic, independent of the HTTP plumbing."""

    def __init__(self, root: Path, options: ServerOptions):
        self.root = root
        self.options = options
        self.table = SessionTable(root, options.session_timeout)
        self._name_max, self._path_max = filesystem_limits(root)

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

    def _session_for(self, request: Request) -> tuple[UploadSession, str] | Ack:
        """The request's session, its lock taken; or the answer when there is none to take."""
        session_id = request.headers.get(Header.SESSION_ID)
        if not session_id:
            return error_ack(400, E_INVALIDARG, "no BITS-Session-Id")
        session = self.table.get(session_id)
        if session is None:
            return error_ack(500, BG_E_SESSION_NOT_FOUND, "unknown or ended session", session_id)
        if not session.lock.acquire(timeout=self.options.request_timeout):
            return error_ack(500, BG_E_SESSION_NOT_FOUND, "session busy", session_id)
        if session.state in ENDED:
            session.lock.release()
            return error_ack(500, BG_E_SESSION_NOT_FOUND, "session ended", session_id)
        return session, session_id

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
            destination, url_path = upload_path(self.root, request.target, self._name_max, self._path_max)
        except UnsafePath as exc:
            return error_ack(400, E_INVALIDARG, f"bad upload URL: {exc}")
        refused = self._refuse_existing(destination) or self._refuse_over_cap(request.client)
        if refused is not None:
            return refused
        try:
            session = self.table.create(destination, url_path, PROTOCOL_GUID, hashed=self.options.reply,
                                        client=request.client)
        except OSError as exc:
            return self._os_error_ack(exc, None)
        headers = [(Header.PROTOCOL, session.protocol), (Header.ACCEPT_ENCODING, "identity")]
        if self.options.host_id is not None:
            headers.append((Header.HOST_ID, self.options.host_id))
            if self.options.host_id_fallback_timeout is not None:
                headers.append((Header.HOST_ID_FALLBACK_TIMEOUT, str(self.options.host_id_fallback_timeout)))
        # OneDrive's form is answered as OneDrive answers it (issue 16; README, bits-server)
        status = 201 if request.method_override else self.options.create_status
        return Ack(status, session_id=session.id, headers=headers, note=f"new session for {url_path}")

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
        found = self._session_for(request)
        if isinstance(found, Ack):
            return found
        session, session_id = found
        try:
            ack = self._fragment_locked(session, session_id, content_range, request.body)
            if session.cancel_requested:
                return error_ack(500, BG_E_SESSION_NOT_FOUND, "cancelled while the fragment streamed", session_id)
            return ack
        finally:
            if session.cancel_requested and session.state not in ENDED:
                self.table.end(session, UploadEvent.CANCEL)
            self.table.touch(session)
            session.lock.release()

    def _fragment_locked(self, session: UploadSession, session_id: str, content_range: ContentRange,
                         body: RequestBody) -> Ack:
        if session.total is not None and content_range.total != session.total:
            return error_ack(400, E_INVALIDARG, f"total changed from {session.total}", session_id)
        if content_range.total > self.options.max_upload_size:
            return error_ack(500, BG_E_TOO_LARGE, f"{content_range.total} bytes is over the limit", session_id)
        session.total = content_range.total
        if session.state is UploadState.WAIT_FOR_CLOSE:
            session.fire(UploadEvent.FRAGMENT)
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
            session.fire(UploadEvent.FRAGMENT)
            return Ack(200, session_id=session_id, received=session.received, note="already received")
        body.skip(session.received - first)
        try:
            self._append(session, body)
        except OSError as exc:
            return self._os_error_ack(exc, session_id)
        if session.received == session.total:
            return self._complete(session, session_id)
        session.fire(UploadEvent.FRAGMENT)
        return Ack(200, session_id=session_id, received=session.received)

    def _resync(self, session: UploadSession, session_id: str, why: str) -> Ack:
        return Ack(416, session_id=session_id, received=session.received, error=S_OK,
                   context=ErrorContext.REMOTE_FILE, note=why)

    def _append(self, session: UploadSession, body: RequestBody) -> None:
        """Stream the body onto the request file; on any failure roll back to the last ack."""
        digest = session.digest.copy() if session.digest is not None else None
        written = session.received
        fd = os.open(session.data_file, os.O_WRONLY)
        with session.guard:
            session.streaming = body
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
            with session.guard:
                session.streaming = None
        if not session.cancel_requested:
            session.digest, session.received = digest, written

    def _complete(self, session: UploadSession, session_id: str) -> Ack:
        session.fire(UploadEvent.LAST_BYTE)
        if self.options.reply:
            try:
                self._write_receipt(session)
            except OSError as exc:
                session.fire(UploadEvent.NOTIFY_FAILED)
                ack = self._os_error_ack(exc, session_id)
                ack.context = ErrorContext.REMOTE_APPLICATION
                return ack
            session.reply_url = reply_url(session.id)
        session.fire(UploadEvent.NOTIFIED)
        return self._final_ack(session, session_id, "complete")

    def _write_receipt(self, session: UploadSession) -> None:
        assert session.digest is not None, "reply mode keeps every session's digest"
        receipt = {"session_id": session.id, "path": session.url_path, "size": session.received,
                   "sha256": session.digest.hexdigest()}
        session.reply_dir.mkdir(parents=True, exist_ok=True)
        partial = session.reply_file.with_suffix(".partial")
        partial.write_text(json.dumps(receipt, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(partial, session.reply_file)

    def _final_ack(self, session: UploadSession, session_id: str | None, note: str) -> Ack:
        headers = [(Header.REPLY_URL, session.reply_url)] if session.reply_url else []
        return Ack(200, session_id=session_id, received=session.total, headers=headers, note=note)

    def close(self, request: Request) -> Ack:
        found = self._session_for(request)
        if isinstance(found, Ack):
            return found
        session, session_id = found
        try:
            if session.state is UploadState.RECEIVE_FRAGMENTS:
                self.table.end(session, UploadEvent.CLOSE)
                return Ack(200, session_id=session_id, note="closed before the last byte: discarded")
            if not session.data_file.is_file():
                self.table.end(session, UploadEvent.CLOSE)
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
            self.table.end(session, UploadEvent.CLOSE)
            return Ack(200, session_id=session_id, note=f"published {session.url_path}")
        finally:
            session.lock.release()

    def cancel(self, request: Request) -> Ack:
        """Does not wait for a fragment streaming on another connection: that body is cut, and
        its holder ends the session (the data goes when the fragment's write has stopped)."""
        streamed = self.table.get(request.headers.get(Header.SESSION_ID) or "")
        if streamed is not None:
            with streamed.guard:
                streaming = streamed.streaming
                streamed.cancel_requested |= streaming is not None
            if streaming is not None:
                self.table.forget(streamed)
                streaming.abort()
                return Ack(200, session_id=request.headers.get(Header.SESSION_ID),
                           note="cancelled; the fragment streaming on another connection is cut")
        found = self._session_for(request)
        if isinstance(found, Ack):
            return found
        session, session_id = found
        try:
            self.table.end(session, UploadEvent.CANCEL)
            return Ack(200, session_id=session_id, note="cancelled")
        finally:
            session.lock.release()

    # --- helpers --------------------------------------------------------------------------
    def _refuse_existing(self, destination: Path, session_id: str | None = None) -> Ack | None:
        if self.options.overwrite or not destination.exists():
            return None
        return error_ack(self.options.exists_status, E_ACCESSDENIED, "destination exists", session_id)

    def _refuse_over_cap(self, client: str) -> Ack | None:
        options = self.options
        if len(self.table) >= options.max_sessions:
            why = f"the server holds its maximum of {options.max_sessions} sessions"
        elif self.table.held_by(client) >= options.max_sessions_per_client:
            why = f"{client} holds its maximum of {options.max_sessions_per_client} sessions"
        else:
            return None
        return error_ack(503, SERVER_BUSY, why, headers=[("Retry-After", str(RETRY_AFTER_S))])

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
