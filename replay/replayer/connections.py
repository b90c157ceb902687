"""The live connections of a replay: one per captured TCP connection, over replay.transport,
opened when its first request goes and closed after its last, so the live TCP boundaries
follow the capture's. A request goes out as the plan holds it (method, target, version, header
names, order and case, body bytes); its answer is read by the project's HTTP parser and
summarised as the analyzer reads acks.
"""

from __future__ import annotations

import ssl
import threading
from typing import Callable, Iterable, Iterator

from bitstrace.replay.replayer.compare import AckSummary, summarize
from bitstrace.replay.replayer.options import Options
from bitstrace.replay.replayer.plan import Plan
from bitstrace.replay.replayer.results import Fault
from bitstrace.replay.transport import Connection, Reset, TransportError, request_head, tls_context

#: Bound on what is read of a response body (acks have none; a garbage server may send plenty).
MAX_RESPONSE_BODY = 1 << 20

BodySource = Callable[[], Iterable[bytes]]  # a fresh iterator over the body on each call


class ByteCounter:
    """Body bytes of one request as they go out, reported to `report` as well."""

    def __init__(self, expected: int, report: Callable[[int], None]) -> None:
        self.expected = expected
        self.request_bytes = 0
        self._report = report

    def add(self, count: int) -> None:
        self.request_bytes += count
        self._report(count)


class LiveConnection:
    """A live connection standing for one captured connection. `lock` serialises its
    requests (several sessions may share a captured connection)."""

    def __init__(self, options: Options, tls: ssl.SSLContext | None) -> None:
        target = options.target
        self.lock = threading.Lock()
        self.last_peer: str | None = None  # the address the last request went to
        self.transport = Connection(target.host, target.port, options.timeout, tls=tls)

    def close(self) -> None:
        self.transport.close()

    @property
    def peer_address(self) -> str | None:
        return self.transport.peer_address

    def exchange(self, method: str, path: str, version: str, headers: list[tuple[str, str]],
                 body: BodySource, counter: ByteCounter) -> AckSummary:
        """Send one request, streaming its body; return the summary of the answer.

        A kept-alive connection that the server had closed meanwhile (no byte of an answer
        came) is reopened and the request sent again once, as any client does; a failure on a
        fresh connection is a fault.
        """
        head = request_head(method, path, headers, version)
        try:
            return self._exchange(method, head, body(), counter)
        except TransportError as failure:
            if not failure.stale:
                raise self._fault(failure, counter) from None
        self.transport.close()
        counter.request_bytes = 0
        try:
            return self._exchange(method, head, body(), counter)
        except TransportError as failure:
            raise self._fault(failure, counter) from None

    def _exchange(self, method: str, head: bytes, body: Iterable[bytes],
                  counter: ByteCounter) -> AckSummary:
        self.transport.send_request(head, body, counter.add)
        self.last_peer = self.transport.peer_address
        answer = self.transport.read_answer(method, MAX_RESPONSE_BODY)
        return summarize(answer.status, answer.headers.get)

    def _fault(self, failure: TransportError, counter: ByteCounter) -> Fault:
        self.transport.close()
        if isinstance(failure, Reset) and not failure.answered:
            return Fault(f"{self.transport.where} reset the connection after "
                         f"{counter.request_bytes} of {counter.expected} body bytes")
        return Fault(str(failure), reached_server=failure.reached_server)


class Connections:
    """Live connections keyed by the captured connection they stand for; each is closed when
    the last planned request of its captured connection is done, so TCP boundaries follow the
    capture's."""

    def __init__(self, plan: Plan, options: Options) -> None:
        self.options = options
        self._tls: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        self._live: dict[int, LiveConnection] = {}
        self._remaining: dict[int, int] = {}
        for session in plan.sessions:
            for key in session.connections:
                self._remaining[key] = self._remaining.get(key, 0) + 1

    def get(self, key: int) -> LiveConnection:
        with self._lock:
            live = self._live.get(key)
            if live is None:
                if self.options.target.scheme == "https" and self._tls is None:
                    self._tls = tls_context(self.options.verify_tls, self.options.tls_keylog)
                live = self._live[key] = LiveConnection(self.options, self._tls)
            return live

    def done(self, key: int) -> None:
        """One planned request of `key` is over (sent, skipped or abandoned)."""
        with self._lock:
            self._remaining[key] -= 1
            if self._remaining[key] <= 0:
                live = self._live.pop(key, None)
                if live is not None:
                    live.close()

    def discard(self, key: int) -> None:
        with self._lock:
            live = self._live.pop(key, None)
        if live is not None:
            live.close()

    def close_all(self) -> None:
        with self._lock:
            for live in self._live.values():
                live.close()
            self._live.clear()


def chunked(body: BodySource) -> BodySource:
    """`body` in chunked transfer coding (the capture holds bodies de-chunked)."""
    def chunks() -> Iterator[bytes]:
        for chunk in body():
            if chunk:
                yield b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        yield b"0\r\n\r\n"
    return chunks
