"""One HTTP/1.1 connection over a socket (plain TCP, or TLS through `ssl`), for the client and
the replayer: requests go out as the caller wrote them, byte for byte, and answers are framed
by the project's own parser (analyzer.http.HttpParser, role "response"): the bytes received
are fed to it and its events taken, so an answer is read exactly as bits-analyze reads it in a
capture.

Every failure is a `TransportError` of one vocabulary, phrased for the user and naming the
peer: `ConnectFailed` (refused, unresolvable, unreachable: nothing was sent), `Reset`,
`TimedOut`, `ClosedBeforeAnswer`, `MalformedAnswer` (what the parser found, and at which byte
of the answers on this connection) and `TlsFailed`.
"""

from __future__ import annotations

import select
import socket
import ssl
from dataclasses import dataclass
from typing import Callable, Iterable

from bitstrace.analyzer.authority import format_authority
from bitstrace.analyzer.http import (
    BodyChunk,
    Event,
    ExtraBytes,
    Headers,
    HttpParser,
    MessageEnd,
    ParseError,
    ResponseHead,
)

RECEIVE_SIZE = 1 << 16


class TransportError(Exception):
    """The exchange failed below HTTP's own answers. `reached_server` is False when nothing
    went out (no connection); `answered` is True when some bytes of an answer had come.
    `stale`: the connection had carried earlier answers and broke (reset, or closed by the
    server) before any byte of this one: a kept-alive connection the server had closed
    meanwhile, which the request never reached, so it may go again, once, on a fresh one."""

    reached_server = True

    def __init__(self, message: str, *, answered: bool = False, stale: bool = False) -> None:
        super().__init__(message)
        self.answered = answered
        self.stale = stale


class ConnectFailed(TransportError):
    reached_server = False


class Reset(TransportError):
    pass


class TimedOut(TransportError):
    pass


class ClosedBeforeAnswer(TransportError):
    pass


class MalformedAnswer(TransportError):
    pass


class TlsFailed(TransportError):
    pass


@dataclass(frozen=True)
class Answer:
    """One final HTTP response as the parser framed it. `body` holds at most the bytes the
    reader asked to keep; `truncated` says more followed (the connection was then closed)."""

    version: str
    status: int
    reason: str
    headers: Headers
    body: bytes = b""
    truncated: bool = False

    @property
    def keeps_alive(self) -> bool:
        """The server keeps the connection open for the next request (RFC 9112 9.3)."""
        tokens = {t.strip().lower() for t in (self.headers.get("Connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


def request_head(method: str, target: str, headers: Iterable[tuple[str, str]],
                 version: str = "HTTP/1.1") -> bytes:
    """A request's start line and header block exactly as given: names in their case and
    order, values as they are (latin-1, byte for character, as the parser decodes them)."""
    lines = [f"{method} {target} {version}\r\n"]
    lines += [f"{name}: {value}\r\n" for name, value in headers]
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def tls_context(verify: bool = True, keylog: str | None = None) -> ssl.SSLContext:
    """A client TLS context: certificates verified (unless `verify` is False), TLS secrets
    appended to `keylog` in the NSS key log format when given."""
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if keylog is not None:
        context.keylog_filename = keylog
    return context


class Connection:
    """One connection to `host`:`port`, opened by `open()` (or the first `send`)."""

    def __init__(self, host: str, port: int, timeout: float, *,
                 tls: ssl.SSLContext | None = None, server_name: str | None = None) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.tls = tls
        self.server_name = server_name or host
        self.where = format_authority(host, port)
        self.sock: socket.socket | None = None
        self._parser = HttpParser("response")
        self._events: list[Event] = []
        self._received = 0  # answer bytes received on this connection
        self._answer_start = 0  # what `_received` was when the answer being read began
        self._closed = False  # the peer has closed its side
        self._answers = 0  # answers read on this socket
        self._send_failure: Reset | None = None  # the reset that cut the last request short

    @property
    def is_open(self) -> bool:
        return self.sock is not None

    @property
    def peer_address(self) -> str | None:
        """The address actually connected to (an IP literal), None before connecting."""
        if self.sock is None:
            return None
        try:
            return str(self.sock.getpeername()[0])
        except OSError:
            return None

    def open(self) -> None:
        if self.sock is not None:
            return
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except ConnectionRefusedError:
            raise ConnectFailed(f"cannot connect to {self.where}: connection refused "
                                "(nothing listens there)") from None
        except socket.gaierror as exc:
            raise ConnectFailed(f"cannot resolve {self.host}: {exc.strerror}") from None
        except (TimeoutError, socket.timeout):
            raise ConnectFailed(f"cannot connect to {self.where}: no answer within "
                                f"{self.timeout:g} s") from None
        except (OSError, UnicodeError) as exc:
            raise ConnectFailed(f"cannot connect to {self.where}: "
                                f"{getattr(exc, 'strerror', None) or exc}") from None
        # Requests go out whole (head and body in large writes): Nagle's algorithm would only
        # hold back the tail of each, waiting for the peer's delayed ACK.
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=self.server_name)
            except ssl.SSLError as exc:
                sock.close()
                raise TlsFailed(f"TLS with {self.where} failed: {exc.reason or exc}") from None
            except OSError as exc:
                sock.close()
                raise self._failure(exc, "during the TLS handshake") from None
        self.sock = sock

    def close(self) -> None:
        """Close the connection; a thread blocked on it wakes. The next `send` opens anew."""
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._parser = HttpParser("response")
        self._events = []
        self._received = 0
        self._closed = False
        self._answers = 0

    # -- sending

    def send(self, data: bytes | memoryview) -> None:
        self.open()
        assert self.sock is not None
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise self._failure(exc, "while sending") from None

    def send_request(self, head: bytes, body: Iterable[bytes] = (),
                     sent: Callable[[int], None] | None = None) -> None:
        """Send a request head and its body chunks (the head goes out with the first chunk);
        `sent` is told the size of each chunk once it is out.

        A server may answer before the body has ended (413 for a fragment over its limit) and
        close, and the body it leaves unread makes its kernel reset the connection under our
        sends. The answer is then in our receive buffer, readable still: so a reset while
        sending stops the sending without raising, and `read_answer` reads that answer, or
        raises the reset when none had come."""
        self._send_failure = None
        pending: bytes | None = head
        try:
            for chunk in body:
                if not chunk:
                    continue
                self.send(pending + chunk if pending is not None else chunk)
                pending = None
                if sent is not None:
                    sent(len(chunk))
            if pending is not None:
                self.send(pending)
        except Reset as failure:
            self._send_failure = failure

    def wait_readable(self) -> None:
        """Until the peer's answer (or its close) has begun to arrive."""
        if self.sock is None:
            raise ClosedBeforeAnswer(f"{self.where}: no connection to wait on")
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return
        if not select.select([self.sock], [], [], self.timeout)[0]:
            raise TimedOut(f"{self.where} did not answer within {self.timeout:g} s")

    # -- receiving

    def read_answer(self, method: str, max_body: int | None = None) -> Answer:
        """The final answer to the request with `method` just sent (1xx answers are skipped).
        Keeps at most `max_body` body bytes; past them the connection is closed (the rest is
        not read into the next answer) and the answer is `truncated`."""
        cut_short, self._send_failure = self._send_failure, None
        if self.sock is None:
            raise cut_short or ClosedBeforeAnswer(
                f"{self.where} closed the connection without answering")
        self._parser.expect_response_to(method)
        self._answer_start = self._received
        head: ResponseHead | None = None
        body = bytearray()
        truncated = False
        junk: ExtraBytes | None = None  # bytes that began no answer (the parser skips them)
        while True:
            try:
                event = self._next_event(answered=head is not None)
            except ClosedBeforeAnswer as failure:
                self.close()
                if junk is not None and head is None and cut_short is None:
                    raise MalformedAnswer(f"{self.where} sent a malformed HTTP answer: {junk.size} bytes "
                                          f"that begin no status line (byte {junk.offset - self._answer_start} "
                                          "of the answer), then closed the connection", answered=True) from None
                raise (cut_short or failure) from None
            except TransportError as failure:
                self.close()  # what follows on it could only be read out of step
                raise (cut_short or failure) from None
            if isinstance(event, ExtraBytes):
                junk = event
                continue
            if isinstance(event, ParseError):
                at = event.offset - self._answer_start
                closed = self._closed
                self.close()
                if closed:
                    raise ClosedBeforeAnswer(f"{self.where} closed the connection in the middle "
                                             f"of its answer ({event.message})", answered=True)
                raise MalformedAnswer(f"{self.where} sent a malformed HTTP answer: "
                                      f"{event.message} (byte {at} of the answer)", answered=True)
            if isinstance(event, ResponseHead):
                head = None if event.informational else event
            elif isinstance(event, BodyChunk):
                if max_body is not None and len(body) + len(event.data) > max_body:
                    body += event.data[:max_body - len(body)]
                    truncated = True
                    break
                body += event.data
            elif isinstance(event, MessageEnd) and head is not None:
                if event.partial:
                    self.close()
                    raise ClosedBeforeAnswer(
                        f"{self.where} closed the connection in the middle of its answer "
                        f"({len(body)} body bytes read)", answered=True)
                break
        assert head is not None  # the loop ends on a final answer's body or end
        answer = Answer(head.version, head.status, head.reason, head.headers, bytes(body),
                        truncated)
        self._answers += 1
        self._answer_start = self._received  # bytes past it would belong to the next answer
        if truncated or self._closed or cut_short or not answer.keeps_alive:
            self.close()
        return answer

    def _next_event(self, answered: bool) -> Event:
        while not self._events:
            assert self.sock is not None
            if self._closed:
                raise ClosedBeforeAnswer(f"{self.where} closed the connection without answering",
                                         answered=answered, stale=self._stale(answered))
            try:
                data = self.sock.recv(RECEIVE_SIZE)
            except OSError as exc:
                raise self._failure(exc, "while waiting for the answer",
                                    answered=answered or self._received > self._answer_start
                                    ) from None
            if data:
                self._received += len(data)
                # The events' body slices point into `data`, which is not reused: safe to keep.
                self._events = self._parser.feed(data, 0, 0)
            else:
                self._closed = True
                self._events = self._parser.eof(0, 0)
                if not self._events:
                    raise ClosedBeforeAnswer(
                        f"{self.where} closed the connection without answering",
                        answered=answered, stale=self._stale(answered))
        return self._events.pop(0)

    def _failure(self, exc: OSError, when: str, answered: bool = False) -> TransportError:
        if isinstance(exc, (TimeoutError, socket.timeout)):
            return TimedOut(f"{self.where} did not answer within {self.timeout:g} s",
                            answered=answered)
        if isinstance(exc, ssl.SSLError):
            return TlsFailed(f"TLS with {self.where} failed: {exc.reason or exc}",
                             answered=answered)
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return Reset(f"{self.where} reset the connection {when}", answered=answered,
                         stale=self._stale(answered))
        return TransportError(f"talking to {self.where} failed {when}: {exc.strerror or exc}",
                              answered=answered)

    def _stale(self, answered: bool) -> bool:
        return self._answers > 0 and not answered and self._received == self._answer_start
