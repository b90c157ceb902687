"""bits-server's HTTP front: one connection's requests read with our parser, answers written back.

Requests are framed by bitstrace.analyzer.http in its strict mode (RFC 9112 5.1, 5.2): a
malformed field line, obsolete line folding, a start line that is not a request line or a head
over the parser's limits is answered 400 (in BITS form: E_INVALIDARG) and the connection closes,
so no byte after it is ever read as a request. Bodies are never held whole: the service pulls
them piece by piece (BodyReader) and writes each piece to disk before asking for the next.

Deadlines, per connection and enforced by its own socket timeouts: `idle_timeout` for any wait
for bytes (between requests too), and `request_timeout` from a request's first byte to its answer,
which covers slow heads (slowloris) as well as slow bodies.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import deque
from email.utils import formatdate
from http import HTTPStatus
from typing import Callable, Iterable, Iterator

from bitstrace.analyzer.basic_auth import AUTHORIZATION, credentials_match
from bitstrace.analyzer.bits.protocol import E_INVALIDARG, MAX_HEADER_VALUE, METHOD, Header, PacketType, parse_decimal
from bitstrace.analyzer.http import BodyChunk, Event, Headers, HttpParser, MessageEnd, ParseError, RequestHead
from bitstrace.replay.server.acks import Ack, error_ack
from bitstrace.replay.server.byte_range import parse_byte_range
from bitstrace.replay.server.log import PacketRecord, ServerLog
from bitstrace.replay.server.options import ERROR_HEADERS, ServerOptions
from bitstrace.replay.server.service import ClientGone, Request, UploadService

SERVER_NAME = "bits-server/0.1"
#: Bytes asked of the socket at once: body pieces go to disk as they arrive, so this bounds what
#: one connection holds, and a large read takes all the kernel has ready in one call.
RECV_SIZE = 256 * 1024
#: An unread body up to this size (or the fragment limit) is drained to keep the connection;
#: a larger one closes it.
DRAIN_LIMIT = 1 << 20
#: OneDrive's form of BITS: POST with this header naming BITS_POST (issue 16; README).
METHOD_OVERRIDE = "X-Http-Method-Override"


class TimedOut(ClientGone):
    """A deadline passed: the connection is dropped without an answer."""


def response_head(status: int, fields: Iterable[tuple[str, str]]) -> bytes:
    """The status line and header block of an answer, the empty line included."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {status} {reason}", f"Server: {SERVER_NAME}", f"Date: {formatdate(usegmt=True)}"]
    lines.extend(f"{name}: {value}" for name, value in fields)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Connection:
    """One client connection, served on its own thread by `serve`."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], service: UploadService, log: ServerLog,
                 on_close: Callable[["Connection"], None]) -> None:
        self.sock = sock
        self.host = str(address[0])
        self.client = f"{address[0]}:{address[1]}"
        self.service = service
        self.options: ServerOptions = service.options
        self.log = log
        self._on_close = on_close
        self.parser = HttpParser("request", strict=True)
        self.events: deque[Event] = deque()
        #: since when the connection has waited for a request (None: one is being handled);
        #: the lifecycle evicts the longest waiting first when the connections are at their cap
        self.waiting_since: float | None = time.monotonic()
        self._evicted = False
        self._state_lock = threading.Lock()  # waiting_since against evict()
        self._deadline: float | None = None  # of the request being read
        self._timeout: float | None = None  # the socket's, as last set
        # one buffer for the connection's reads: a fresh object per read of this size costs a
        # mapping and its page faults each time
        self._view = memoryview(bytearray(RECV_SIZE))
        self._started = 0.0
        self._close = False
        self._head: RequestHead | None = None

    # --- bytes in --------------------------------------------------------------------------
    def _recv(self) -> memoryview:
        """The next bytes, in the connection's buffer (empty at the end of the stream);
        TimedOut past a deadline. Each call reuses the buffer: when it is made, every event of
        the last bytes has been taken and every body piece written (the reader asks for more
        only then)."""
        wait = self.options.idle_timeout
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise TimedOut("request timeout")
            wait = min(wait, left)
        if wait != self._timeout:  # settimeout is a system call: made only when the wait changes
            self.sock.settimeout(wait)
            self._timeout = wait
        try:
            return self._view[:self.sock.recv_into(self._view)]
        except TimeoutError:
            raise TimedOut("request timeout" if wait < self.options.idle_timeout else "idle timeout") from None
        except OSError as exc:
            raise ClientGone(f"read failed: {exc.strerror or exc}") from None

    def _next_head(self) -> RequestHead | ParseError | None:
        """The next request head (or why there is none); None when the client closed cleanly."""
        self.waiting_since = time.monotonic()
        self._deadline = None
        self._head = None
        while True:
            while self.events:
                event = self.events.popleft()
                if isinstance(event, RequestHead | ParseError):
                    if self._deadline is None:
                        self._begin_request()
                    return event
                # BodyChunk/MessageEnd: the rest of a message already answered (drained)
            if self._deadline is None and self.parser.message_start is not None:
                self._begin_request()  # a head begun in bytes read with the last request
            data = self._recv()
            if not data:
                ended = self.parser.eof(0, 0)
                return next((e for e in ended if isinstance(e, ParseError)), None)
            if self._deadline is None:
                self._begin_request()
            self.events.extend(self.parser.feed(data, 0, 0))

    def _begin_request(self) -> None:
        """The request's first byte is in: its deadline runs."""
        self._started = time.monotonic()
        self._deadline = self._started + self.options.request_timeout

    # --- requests ----------------------------------------------------------------------------
    def serve(self) -> None:
        try:
            if isinstance(self.sock, ssl.SSLSocket):
                self._handshake(self.sock)
            while not self._close:
                head = self._next_head()
                if head is None:
                    break
                with self._state_lock:
                    if self._evicted:  # its head came in as it was chosen: too late
                        break
                    self.waiting_since = None
                if isinstance(head, ParseError):
                    self._close = True
                    self._send_ack(error_ack(400, E_INVALIDARG, f"malformed request: {head.message}"), None)
                    break
                self._head = head
                self._request(head)
        except TimedOut as exc:
            self.log.line(f"bits-server: {self.client} {exc}, connection dropped")
        except ssl.SSLError as exc:
            self.log.line(f"bits-server: {self.client} TLS failed: {exc.reason or exc}, connection dropped")
        except ClientGone:
            pass
        except OSError:  # the answer could not be written: the client went away
            pass
        finally:
            self.shutdown()
            self.sock.close()
            self._on_close(self)

    def _handshake(self, sock: ssl.SSLSocket) -> None:
        """The TLS handshake, within the idle timeout (a request's deadline starts after it)."""
        sock.settimeout(self.options.idle_timeout)
        self._timeout = self.options.idle_timeout
        try:
            sock.do_handshake()
        except TimeoutError:
            raise TimedOut("TLS handshake timeout") from None

    def evict(self) -> bool:
        """Close the connection to make room, if it is still waiting for a request."""
        with self._state_lock:
            if self.waiting_since is None:
                return False
            self._evicted = True
        self.shutdown()
        return True

    def shutdown(self) -> None:
        """Wake the connection's thread (from another thread): its next read ends."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _request(self, head: RequestHead) -> None:
        headers = head.headers
        if self.events and isinstance(self.events[0], ParseError):  # the head's framing is broken
            self._close = True
            self._send_ack(error_ack(400, E_INVALIDARG, f"malformed request: {self.events[0].message}"), None)
            return
        connection = (headers.get("Connection") or "").lower()
        if "close" in connection or (head.version == "HTTP/1.0" and "keep-alive" not in connection):
            self._close = True
        if headers.get("Transfer-Encoding") is not None:  # never read: nothing after it is either
            self._close = True
        if (headers.get("Expect") or "").lower() == "100-continue" and head.version != "HTTP/1.0":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        override = head.method == "POST" and (headers.get(METHOD_OVERRIDE) or "").upper() == METHOD
        if head.method == METHOD or override:
            self._bits_post(head, override)
        elif head.method in ("GET", "HEAD"):
            self._serve_reply(head)
        else:
            body = BodyReader(self, _declared_length(headers))
            self._send_plain(501, b"", f"method {head.method} not implemented", body)

    def _bits_post(self, head: RequestHead, override: bool) -> None:
        headers = head.headers
        raw_type = headers.get(Header.PACKET_TYPE)
        packet = PacketType.parse(raw_type)
        packet_name = packet.value if packet else raw_type
        ack, length = self._check_request(headers)
        body = BodyReader(self, length)
        if ack is None:
            if packet is None or packet is PacketType.ACK:
                ack = error_ack(400, E_INVALIDARG, f"unknown packet type {raw_type!r}")
            elif packet is not PacketType.FRAGMENT and body.remaining:
                ack = error_ack(400, E_INVALIDARG, f"body on {packet.value}")
            else:
                try:
                    ack = self.service.handle(packet, Request(head.target, headers, body, self.host, override))
                except ClientGone as exc:
                    self._close = True
                    self._record(packet_name, headers.get(Header.SESSION_ID), None, None, None, f"dropped: {exc}")
                    return
        if ack.session_id is None and ack.status != 401:
            ack.session_id = headers.get(Header.SESSION_ID)
        self._send_ack(ack, packet_name, body)

    def _check_request(self, headers: Headers) -> tuple[Ack | None, int]:
        """Checks common to every packet; the body length when it is sound."""
        denied = self._auth_challenge(headers)
        if denied is not None:
            return denied, _declared_length(headers)
        for name, value in headers:
            if len(value) > MAX_HEADER_VALUE:
                self._close = True
                return error_ack(400, E_INVALIDARG, f"{name} header over {MAX_HEADER_VALUE} bytes"), 0
        if headers.get("Transfer-Encoding") is not None:
            self._close = True
            return error_ack(400, E_INVALIDARG, "Transfer-Encoding instead of Content-Length"), 0
        lengths = headers.get_all(Header.CONTENT_LENGTH)
        if len(lengths) != 1:
            self._close = True
            return error_ack(400, E_INVALIDARG, "Content-Length missing or repeated"), 0
        length = parse_decimal(lengths[0])
        if length is None:
            self._close = True
            return error_ack(400, E_INVALIDARG, "Content-Length not a number"), 0
        return None, length

    def _auth_challenge(self, headers: Headers) -> Ack | None:
        credentials = self.options.auth
        if credentials is None:
            return None
        offered = headers.get(AUTHORIZATION)
        if credentials_match(offered, *credentials):
            return None
        return Ack(401, headers=[("WWW-Authenticate", 'Basic realm="bits-server"')],
                   note="credentials required" if not offered else "bad credentials")

    # --- answers out ---------------------------------------------------------------------------
    def _drain(self, body: "BodyReader | None", packet: str | None, session_id: str | None) -> bool:
        """Read what the handler left of the body, when that is cheap enough to keep the
        connection; False when the client went away meanwhile (recorded as not answered)."""
        if body is None or not body.remaining:
            return True
        if self._close or body.remaining > max(DRAIN_LIMIT, self.options.max_fragment_size):
            self._close = True
            return True
        try:
            for _ in body.chunks():
                pass
        except ClientGone as gone:
            self._close = True
            self._record(packet, session_id, None, None, None, f"not answered: {gone}")
            return False
        return True

    def _send_ack(self, ack: Ack, packet: str | None, body: "BodyReader | None" = None) -> None:
        if not self._drain(body, packet, ack.session_id):
            return
        fields = ack.fields(ERROR_HEADERS[self.options.error_header])
        fields.append((Header.CONTENT_LENGTH, "0"))
        if self._close:
            fields.append(("Connection", "close"))
        # recorded before the answer leaves, so a client that has its answer sees the record
        self._record(packet, ack.session_id, ack.status, str(ack.error) if ack.error else None,
                     ack.received, ack.note)
        self._send(response_head(ack.status, fields))

    def _send_plain(self, status: int, payload: bytes, note: str, body: "BodyReader | None" = None,
                    extra: Iterable[tuple[str, str]] = (), send_body: bool = True) -> None:
        if not self._drain(body, None, None):
            return
        fields = [("Content-Type", "application/json" if status in (200, 206) else "text/plain"), *extra,
                  (Header.CONTENT_LENGTH, str(len(payload)))]
        if self._close:
            fields.append(("Connection", "close"))
        self._record(None, None, status, None, None, note)
        self._send(response_head(status, fields) + (payload if send_body else b""))

    def _send(self, data: bytes) -> None:
        if self._timeout != self.options.idle_timeout:
            self.sock.settimeout(self.options.idle_timeout)
            self._timeout = self.options.idle_timeout
        self.sock.sendall(data)

    def _serve_reply(self, head: RequestHead) -> None:
        """GET/HEAD of an upload reply (reply mode), with one byte range at most."""
        body = BodyReader(self, _declared_length(head.headers))
        denied = self._auth_challenge(head.headers)
        if denied is not None:
            self._send_ack(denied, None, body)
            return
        path = self.service.reply(head.target)
        try:
            data = path.read_bytes() if path is not None else None
        except OSError:
            data = None
        if data is None:
            self._send_plain(404, b"", "no such reply", body)
            return
        status, first, last = 200, 0, len(data) - 1
        wanted = head.headers.get("Range")
        extra: list[tuple[str, str]] = []
        if wanted:
            parsed = parse_byte_range(wanted, len(data))
            if parsed is None:
                self._send_plain(416, b"", "range not satisfiable", body, [("Content-Range", f"bytes */{len(data)}")])
                return
            status, (first, last) = 206, parsed
            extra.append(("Content-Range", f"bytes {first}-{last}/{len(data)}"))
        self._send_plain(status, data[first:last + 1], "reply", body, extra, send_body=head.method != "HEAD")

    def _record(self, packet: str | None, session_id: str | None, status: int | None, error: str | None,
                received: int | None, note: str) -> None:
        head = self._head
        self.log.record(PacketRecord(
            self._started, time.monotonic(), self.client, head.method if head else "-",
            head.target if head else "-", packet, session_id,
            head.headers.get(Header.CONTENT_RANGE) if head else None, status, error, received, note))


def _declared_length(headers: Headers) -> int:
    """The body length a head declares, for draining; 0 when it declares none or an unusable
    one (the connection then closes after the answer)."""
    value = headers.get(Header.CONTENT_LENGTH)
    length = parse_decimal(value) if value is not None else None
    return length or 0


class BodyReader:
    """The body of the request a connection is handling, pulled from its parser's events."""

    def __init__(self, connection: Connection, length: int) -> None:
        self._connection = connection
        self.remaining = length
        self._left_over = memoryview(b"")  # the part of a piece that skip() did not take

    def _piece(self) -> memoryview:
        if self._left_over:
            piece, self._left_over = self._left_over, memoryview(b"")
            return piece
        connection = self._connection
        events = connection.events
        while True:
            while events:
                event = events[0]
                if isinstance(event, BodyChunk):
                    events.popleft()
                    self.remaining -= len(event.data)
                    return event.data
                if isinstance(event, MessageEnd):
                    events.popleft()
                    continue
                raise ClientGone(f"body ended {self.remaining} bytes early")  # a ParseError or the next head
            data = connection._recv()
            if not data:
                raise ClientGone(f"body ended {self.remaining} bytes early")
            if connection.parser.feed_body(data, 0, 0):
                self.remaining -= len(data)
                return data
            events.extend(connection.parser.feed(data, 0, 0))

    def chunks(self) -> Iterator[memoryview]:
        while self.remaining or self._left_over:
            yield self._piece()

    def skip(self, count: int) -> None:
        while count:
            piece = self._piece()
            if len(piece) > count:
                self._left_over = piece[count:]
                return
            count -= len(piece)

    def abort(self) -> None:
        self._connection.shutdown()
