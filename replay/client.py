"""A BITS upload client that looks like a Windows client on the wire (bits-protocol.md 5.2, 8).

Built on replay.transport (one socket per connection, plain or TLS, answers framed by the
project's own HTTP parser) over persistent HTTP/1.1 connections, so that callers control
connection boundaries: the corpus and the tests need "cut the connection mid-fragment" and
"two sessions on two connections". File bodies are streamed from disk in chunks, never held
whole in memory.

Layers, low to high:
- `send_packet` sends one request exactly as told (any packet type, headers overridden or
  removed, a body cut short) and returns the response as a `Response` record;
- `ping`, `create_session`, `fragment`, `close`, `cancel`, `fetch_reply` send the well-formed
  packets and keep the session state (id, Host-Id, acknowledged offset, reply URL);
- `send_file` runs the fragment loop with Windows' recovery rules (replay.fragment_loop: follow
  the server's offset on 200/416, shrink after 413, new session after BG_E_SESSION_NOT_FOUND;
  Ping and resend after a broken connection), and `upload` does a whole upload.
A request that finds its kept-alive connection closed by the server before any byte of an
answer is sent again at once on a fresh connection, as HTTP clients do (servers that answer
one request per connection and close without `Connection: close` need it); only when that
fails too does `send_file` Ping before resending.
Every request sent is also recorded in `BitsClient.log` (connection index, packet, response).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from http import HTTPStatus
from operator import attrgetter
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import quote, urljoin, urlsplit

from bitstrace.analyzer.authority import DEFAULT_PORTS, format_authority
from bitstrace.analyzer.basic_auth import AUTHORIZATION, basic_authorization
from bitstrace.analyzer.bits.packets import SUCCESS, AckFields, parse_ack
from bitstrace.analyzer.bits.protocol import (
    METHOD,
    MIN_FRAGMENT,
    PROTOCOL_GUID,
    USER_AGENT_PREFIX,
    ContentRange,
    Header,
    PacketType,
)
from bitstrace.analyzer.http import Headers
from bitstrace.replay.fragment_loop import FragmentLoop, GiveUp, Step, follows_offset
from bitstrace.replay.transport import (
    Answer,
    Connection,
    TransportError,
    request_head,
    tls_context,
)

#: BITS 10.x (Windows 10/11), qmgr.dll 7.8.
DEFAULT_USER_AGENT = USER_AGENT_PREFIX + "7.8"
DEFAULT_FRAGMENT_SIZE = 64 * 1024
CHUNK_SIZE = 64 * 1024


class UploadError(Exception):
    """The server refused the upload, or broke the protocol, in a way the client cannot recover."""

    def __init__(self, message: str, response: "Response | None" = None) -> None:
        super().__init__(message)
        self.response = response


@dataclass(frozen=True)
class FileSlice:
    """`length` bytes of a file from `offset`, read in chunks when sent."""

    path: Path
    offset: int
    length: int

    def chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.length
            while left > 0:
                data = f.read(min(CHUNK_SIZE, left))
                if not data:
                    raise ValueError(f"{self.path} is shorter than {self.offset + self.length} bytes")
                left -= len(data)
                yield data


PacketBody = bytes | FileSlice


def _body_length(body: PacketBody) -> int:
    return len(body) if isinstance(body, bytes) else body.length


def _body_chunks(body: PacketBody) -> Iterator[bytes]:
    if isinstance(body, bytes):
        for start in range(0, len(body), CHUNK_SIZE):
            yield body[start:start + CHUNK_SIZE]
    else:
        yield from body.chunks()


@dataclass(frozen=True)
class Response:
    """One HTTP response, with the BITS ack fields parsed (None when absent or unparsable)."""

    version: str
    status: int
    reason: str
    headers: Headers
    body: bytes = b""

    @classmethod
    def of(cls, answer: Answer) -> "Response":
        return cls(answer.version, answer.status, answer.reason, answer.headers, answer.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def packet_type(self) -> PacketType | None:
        return PacketType.parse(self.header(Header.PACKET_TYPE))

    @cached_property
    def ack(self) -> AckFields:
        """The BITS ack headers, read as the analyzer reads them."""
        return parse_ack(self.header)

    # the ack's fields, read as the response's own
    session_id = property(attrgetter("ack.session_id"))
    received_offset = property(attrgetter("ack.received_offset"))
    error_code = property(attrgetter("ack.error_code"))
    error_context = property(attrgetter("ack.error_context"))
    reply_url = property(attrgetter("ack.reply_url"))
    host_id = property(attrgetter("ack.host_id"))

    @property
    def ok(self) -> bool:
        return self.status in SUCCESS

    @property
    def session_not_found(self) -> bool:
        return self.ack.session_not_found


@dataclass
class Transaction:
    """One request as sent, and its response (None when the connection broke or was cut)."""

    connection: int  # index of the TCP connection, 0-based, in order of opening
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body_sent: int  # body bytes actually sent (less than Content-Length when cut)
    response: Response | None = None

    def header(self, name: str) -> str | None:
        return Headers(self.headers).get(name)

    @property
    def packet_type(self) -> str | None:
        return self.header(Header.PACKET_TYPE)


@dataclass
class UploadResult:
    session_ids: list[str]  # every session created for the upload, the last one finished it
    total: int
    acknowledged: int
    reply: bytes | None
    close: Response | None

    @property
    def session_id(self) -> str:
        return self.session_ids[-1]


def resolve_reply_url(upload_url: str, reply_url: str) -> str:
    """IIS hands out relative reply URLs with backslashes; resolve them like the client does."""
    return urljoin(upload_url, quote(reply_url.replace("\\", "/"), safe="/:?=&%@+,;~"))


def _overridden(ordered: list[tuple[str, str]],
                overrides: Mapping[str, str | None]) -> list[tuple[str, str]]:
    """`ordered` with each override's value put in place of the header's, the header removed
    (None), or, for a header not there, added before Content-Length (or Connection), where
    Windows keeps its extras."""
    present = Headers(ordered)
    changes = {name.lower(): value for name, value in overrides.items()}
    added = [(name, value) for name, value in overrides.items()
             if value is not None and name not in present]
    anchor = next((name.lower() for name in (Header.CONTENT_LENGTH, "Connection")
                   if name in present), None)
    out: list[tuple[str, str]] = []
    for name, value in ordered:
        key = name.lower()
        if key == anchor:
            out += added
            added = []
        if key in changes:
            replacement = changes.pop(key)
            if replacement is None:
                continue
            value = replacement
        out.append((name, value))
    return out + added


class BitsClient:
    """One BITS upload job's client side, talking to `url` (an http:// or https:// URL).

    `credentials` (user, password) answer a Basic challenge: the challenged request is resent
    with Authorization, and later requests carry it from the start. `content_name` is what
    Fragment and Close packets carry in Content-Name (default: the uploaded file's name).
    `resolve` maps host names to the addresses to connect to (like curl's --resolve), for a
    BITS-Host-Id naming a farm node that is not in DNS. `log` lets several clients share one
    request log, so that their requests appear in the order they were sent. Over https,
    `verify_tls` False accepts any certificate, and `tls_keylog` names a file the TLS secrets
    are appended to (the NSS key log format, for bits-analyze --tls-keylog).
    """

    def __init__(
        self,
        url: str,
        *,
        user_agent: str = DEFAULT_USER_AGENT,
        credentials: tuple[str, str] | None = None,
        protocols: tuple[str, ...] = (PROTOCOL_GUID,),
        content_name: str | None = None,
        min_fragment: int = MIN_FRAGMENT,
        timeout: float = 10.0,
        resolve: Mapping[str, str] | None = None,
        log: list[Transaction] | None = None,
        verify_tls: bool = True,
        tls_keylog: str | os.PathLike[str] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"only http:// and https:// URLs are supported: {url!r}")
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or DEFAULT_PORTS[parts.scheme]
        self._tls = (tls_context(verify_tls, os.fspath(tls_keylog) if tls_keylog else None)
                     if parts.scheme == "https" else None)
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.user_agent = user_agent
        self.credentials = credentials
        self.protocols = protocols
        self.content_name = content_name
        self.min_fragment = min_fragment
        self.timeout = timeout

        self.session_id: str | None = None
        self.host_id: str | None = None
        self.reply_url: str | None = None
        self.offset = 0  # the server's last acknowledged offset (BITS-Received-Content-Range)
        self.session_ids: list[str] = []  # every session this client created, in order
        self.resolve = dict(resolve or {})
        self.log: list[Transaction] = [] if log is None else log
        self.connections_opened = 0
        self._authorization: str | None = None
        self._connection: Connection | None = None
        self._connection_index = -1
        self._resume_with_ping = False
        self._file_name: str | None = None

    # --- connections ----------------------------------------------------------------------
    def _connect(self, name: str, port: int) -> Connection:
        host = self.resolve.get(name, name)
        current = self._connection
        if current is not None and (not current.is_open or (current.host, current.port) != (host, port)):
            self.disconnect()
        if self._connection is None:
            connection = Connection(host, port, self.timeout, tls=self._tls, server_name=name)
            connection.open()
            self._connection = connection
            self._connection_index = self.connections_opened
            self.connections_opened += 1
        return self._connection

    def disconnect(self) -> None:
        """Close the current TCP connection (the next request opens a new one)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _lost(self) -> None:
        self.disconnect()
        self._resume_with_ping = True

    @property
    def authority(self) -> str:
        """What goes into Host: the origin, or the Host-Id once the server named one."""
        return format_authority(self.host_id or self.host, self.port, DEFAULT_PORTS[self.scheme])

    # --- one request ------------------------------------------------------------------------
    def send_packet(
        self,
        packet_type: PacketType | str | None,
        *,
        session_id: str | None = None,
        content_name: str | None = None,
        content_range: ContentRange | str | None = None,
        body: PacketBody = b"",
        headers: Mapping[str, str | None] | None = None,
        cut_after: int | None = None,
        abandon: bool = False,
        method: str = METHOD,
        target: str | None = None,
    ) -> Response | None:
        """Send one request exactly as told and return its response.

        Headers go in Windows' order (bits-protocol.md 8). `headers` then replaces a header's
        value in place, removes it (None), or adds new ones before Content-Length; so misbehaviour
        is spelled here: a missing or garbled header, an unknown packet type, a wrong length.
        `cut_after` sends only that many body bytes and closes the connection: no response is
        read and None is returned. `abandon` sends the whole request, waits until the answer
        arrives and closes the connection without reading it (an ack lost on the way, as the
        client sees it; the ack is on the wire) and returns None. A 401 is answered once with
        Basic credentials when the client has them. A kept-alive connection the server closed
        before answering is replaced by a fresh one and the request sent again, once. Raises
        a replay.transport TransportError when the connection breaks otherwise; the
        next request then opens a new one (and `send_file` Pings first).
        """
        overrides = headers or {}
        ordered = _overridden(
            self._headers(packet_type, session_id, content_name, content_range, body), overrides)
        response = self._exchange(method, target or self.target, ordered, body, cut_after, abandon)
        if (
            response is not None
            and response.status == HTTPStatus.UNAUTHORIZED
            and self.credentials is not None
            and self._authorization is None
        ):
            self._authorization = basic_authorization(*self.credentials)
            ordered = _overridden(
                self._headers(packet_type, session_id, content_name, content_range, body), overrides)
            response = self._exchange(method, target or self.target, ordered, body, cut_after, abandon)
        return response

    def _headers(self, packet_type: PacketType | str | None, session_id: str | None,
                 content_name: str | None, content_range: ContentRange | str | None,
                 body: PacketBody) -> list[tuple[str, str]]:
        ordered = [("Accept", "*/*")]
        if isinstance(packet_type, PacketType):
            packet_type = packet_type.value
        if packet_type is not None:
            ordered.append((Header.PACKET_TYPE, packet_type))
        if PacketType.parse(packet_type) is PacketType.CREATE_SESSION:
            ordered.append((Header.SUPPORTED_PROTOCOLS, " ".join(self.protocols)))
        if session_id is not None:
            ordered.append((Header.SESSION_ID, session_id))
        if content_name is not None:
            ordered.append((Header.CONTENT_NAME, content_name))
        if content_range is not None:
            ordered.append((Header.CONTENT_RANGE, str(content_range)))
        if self._authorization is not None:
            ordered.append((AUTHORIZATION, self._authorization))
        ordered += [
            (Header.USER_AGENT, self.user_agent),
            (Header.HOST, self.authority),
            (Header.CONTENT_LENGTH, str(_body_length(body))),
            ("Connection", "Keep-Alive"),
        ]
        return ordered

    def _exchange(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: PacketBody,
        cut_after: int | None,
        abandon: bool,
    ) -> Response | None:
        connection = self._connect(self.host_id or self.host, self.port)
        record = Transaction(self._connection_index, method, target, tuple(headers), 0)
        self.log.append(record)
        limit = _body_length(body) if cut_after is None else cut_after

        def chunks() -> Iterator[bytes]:
            for chunk in _body_chunks(body):
                chunk = chunk[: limit - record.body_sent]
                if not chunk:
                    return
                record.body_sent += len(chunk)
                yield chunk

        try:
            connection.send_request(request_head(method, target, headers), chunks())
            if abandon:
                connection.wait_readable()
            if cut_after is not None or abandon:
                self._lost()
                return None
            answer = connection.read_answer(method)
        except TransportError as failure:
            self._lost()
            if failure.stale:
                # The server had closed the kept-alive connection: this request never reached
                # it. Send it again on a fresh connection (no Ping: the server may allow only
                # one request per connection); a fresh one is never stale, so this is once.
                self._resume_with_ping = False
                return self._exchange(method, target, headers, body, cut_after, abandon)
            raise
        record.response = response = Response.of(answer)
        if not connection.is_open:
            self.disconnect()
        return response

    # --- the packets ------------------------------------------------------------------------
    def ping(self) -> Response:
        response = self.send_packet(PacketType.PING)
        assert response is not None
        return response

    def create_session(self) -> Response:
        """Create-Session; on success store the id and Host-Id and reset the offset.

        With a Host-Id the client moves to that host on a new connection and Pings it first,
        as Windows does (bits-protocol.md 5.2).
        """
        response = self.send_packet(PacketType.CREATE_SESSION)
        assert response is not None
        if response.ok and response.session_id:
            self.session_id = response.session_id
            self.session_ids.append(response.session_id)
            self.offset = 0
            self.reply_url = None
            if response.host_id and response.host_id != (self.host_id or self.host):
                self.host_id = response.host_id
                self.disconnect()
                self.ping()
        return response

    def fragment(
        self,
        path: str | os.PathLike[str],
        first: int,
        last: int,
        *,
        total: int | None = None,
        body: bytes | None = None,
        session_id: str | None = None,
        cut_after: int | None = None,
        abandon: bool = False,
        headers: Mapping[str, str | None] | None = None,
    ) -> Response | None:
        """Send bytes first..last of the file. `total` (default: the file's size), `body` (default:
        the file's bytes) and `session_id` can be overridden to misbehave on purpose."""
        path = Path(path)
        self._file_name = path.name
        total = path.stat().st_size if total is None else total
        payload: PacketBody = FileSlice(path, first, last - first + 1) if body is None else body
        response = self.send_packet(
            PacketType.FRAGMENT,
            session_id=session_id or self._session(),
            content_name=self.content_name or path.name,
            content_range=ContentRange(first, last, total),
            body=payload,
            headers=headers,
            cut_after=cut_after,
            abandon=abandon,
        )
        if response is None:
            return None
        received = response.received_offset
        # An offset past the total is not progress: send_file gives up on it (fragment_loop).
        if received is not None and received <= total and follows_offset(response.status):
            self.offset = received
            if response.reply_url:
                self.reply_url = response.reply_url
        self._resume_with_ping = False
        return response

    def close(self, content_name: str | None = None) -> Response:
        response = self.send_packet(
            PacketType.CLOSE_SESSION,
            session_id=self._session(),
            content_name=content_name or self.content_name or self._file_name,
        )
        assert response is not None
        return response

    def cancel(self) -> Response:
        response = self.send_packet(PacketType.CANCEL_SESSION, session_id=self._session())
        assert response is not None
        return response

    def _session(self) -> str:
        if self.session_id is None:
            raise RuntimeError("no session: call create_session() first")
        return self.session_id

    def fetch_reply(self) -> bytes:
        """The upload-reply's reply: HEAD, then GET with a Range, before Close (bits-protocol.md 6)."""
        if self.reply_url is None:
            raise RuntimeError("the server gave no BITS-Reply-URL")
        url = urlsplit(resolve_reply_url(self.url, self.reply_url))
        if (url.hostname not in (self.host, self.host_id)
                or (url.port or DEFAULT_PORTS.get(url.scheme)) != self.port):
            raise UploadError(f"reply URL points to another server: {self.reply_url!r}")
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        plain: dict[str, str | None] = {Header.CONTENT_LENGTH: None}
        head = self.send_packet(None, method="HEAD", target=target, headers=plain)
        if head is None or head.status != HTTPStatus.OK:
            raise UploadError("the reply is not there", head)
        length = int(head.header(Header.CONTENT_LENGTH) or 0)
        ranged = dict(plain, Range=f"bytes=0-{length - 1}") if length else plain
        ranged[Header.ACCEPT_ENCODING] = "identity"
        response = self.send_packet(None, method="GET", target=target, headers=ranged)
        if response is None or response.status not in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            raise UploadError("fetching the reply failed", response)
        return response.body

    # --- whole uploads ----------------------------------------------------------------------
    def send_file(
        self,
        path: str | os.PathLike[str],
        fragment_size: int = DEFAULT_FRAGMENT_SIZE,
        *,
        until: int | None = None,
    ) -> int:
        """The fragment loop from the acknowledged offset until the server has the whole file
        (or at least `until` bytes). Returns the acknowledged offset.

        Recovery as Windows does it (replay.fragment_loop), and after a broken connection,
        Ping on a new connection and resend.
        """
        path = Path(path)
        total = path.stat().st_size
        if total == 0:
            raise UploadError("zero-byte uploads cannot be expressed in Content-Range")
        loop = FragmentLoop(total, self.offset, stop=until, min_fragment=self.min_fragment)
        while not loop.done:
            wanted = loop.next_range(fragment_size)
            try:
                if self._resume_with_ping:
                    self.ping()
                response = self.fragment(path, wanted.first, wanted.last)
            except TransportError:
                response = None  # the next round Pings on a new connection and resends
            try:
                step = loop.lost() if response is None else loop.answer(
                    response.status, response.received_offset, response.session_not_found)
            except GiveUp as why:
                raise UploadError(str(why), response) from None
            if step is Step.NEW_SESSION:
                created = self.create_session()
                if not created.ok:
                    raise UploadError("Create-Session failed after the session was lost", created)
                loop.restart()
        return self.offset

    def upload(self, path: str | os.PathLike[str], fragment_size: int = DEFAULT_FRAGMENT_SIZE) -> UploadResult:
        """Create a session, send the file, fetch the reply if the server gave one, Close."""
        created = self.create_session()
        if not created.ok:
            raise UploadError(f"Create-Session refused: HTTP {created.status}", created)
        first_session = len(self.session_ids) - 1
        total = self.send_file(path, fragment_size)
        session_ids = self.session_ids[first_session:]
        reply = self.fetch_reply() if self.reply_url else None
        close = self.close()
        if not close.ok:
            raise UploadError(f"Close-Session refused: HTTP {close.status}", close)
        return UploadResult(session_ids, total, self.offset, reply, close)
