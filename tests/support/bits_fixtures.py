"""Builders of BITS exchanges for the BITS-layer tests.

A `Wire` plays a capture: each builder makes one real `analyzer.exchanges.Exchange` (with
real `HttpMessage`, `Headers` and `analyzer.tcp.Connection` objects),
streams the request body to the extractor in two chunks (as ExchangeAssembler's on_body
does), then hands the Exchange to the tracker. Frames and timestamps advance as on a wire.
"""

from __future__ import annotations

import hashlib
from typing import Any

from bitstrace.analyzer.bits.extract import Extractor
from bitstrace.analyzer.bits.protocol import PROTOCOL_GUID, Header
from bitstrace.analyzer.bits.sessions import BitsSummary, SessionTracker
from bitstrace.analyzer.exchanges import Exchange, HttpMessage
from bitstrace.analyzer.http import Headers
from bitstrace.analyzer.tcp import Connection

SID = "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}"
SID2 = "{C85B4E0A-1D2E-4F6A-9B8C-0D1E2F3A4B5C}"
UA = "Microsoft BITS/7.8"
CLIENT = (bytes([192, 0, 2, 10]), 50412)
SERVER = (bytes([192, 0, 2, 1]), 80)
START_NS = 1_700_000_000 * 1_000_000_000
MS = 1_000_000
S = 1_000_000_000


def payload(total: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking entity bytes."""
    out = bytearray()
    counter = 0
    while len(out) < total:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:total])


class Wire:
    def __init__(self, extract_dir: Any = None, **tracker_options: Any) -> None:
        self.extractor = Extractor(extract_dir) if extract_dir is not None else None
        self.tracker = SessionTracker(self.extractor, **tracker_options)
        self.now = START_NS
        self.frame = 0
        self.capture = 0  # the capture file the frames count in
        self.index = 0
        self.connections: list[Connection] = []
        self.offsets: dict[int, int] = {}
        #: how far the server→client stamps run ahead of the client→server ones (two taps
        #: whose clocks are apart); negative: behind
        self.server_clock_ns = 0
        self.connect()

    # --- wire mechanics ---------------------------------------------------------------------
    def connect(self, client: tuple[bytes, int] | None = None, server: tuple[bytes, int] | None = None) -> Connection:
        client = client or (CLIENT[0], CLIENT[1] + len(self.connections))
        conn = Connection(len(self.connections), client, server or SERVER, self.frame + 1, self.now)
        self.connections.append(conn)
        self.offsets[conn.id] = 0
        self.conn = conn
        return conn

    def rotate(self) -> None:
        """The capture goes on in the next file, whose frames count from 1 again."""
        self.capture += 1
        self.frame = 0

    def wait(self, seconds: float) -> None:
        self.now += int(seconds * S)

    def _next_frame(self) -> int:
        self.frame += 1
        return self.frame

    def exchange(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"",
        status: int | None = 200, ack: list[tuple[str, str]] | None = None, response_body: int = 0,
        version: str = "HTTP/1.1", flags: set[str] | None = None, orphan: bool = False,
        chunks: int = 2, overlap: bool = False, ack_after: float = 0.001, extra_before: int = 0,
    ) -> Exchange:
        conn = self.conn
        flags = set(flags or ())
        request = None
        if not orphan:
            frame = self._next_frame()
            request = HttpMessage(
                True, method, target, version, None, None, Headers(headers), len(body),
                hashlib.sha256(body).hexdigest() if "partial" not in flags else None,
                frame, frame, self.now, self.now, "partial" in flags, self.offsets[conn.id],
                first_capture=self.capture, last_capture=self.capture,
            )
            self.offsets[conn.id] += 200 + len(body)
            if self.extractor is not None and body:
                step = max(1, -(-len(body) // chunks))
                for at in range(0, len(body), step):
                    self.extractor.on_body(conn, request, memoryview(body)[at:at + step], at)
            if len(body) > 1400:
                request.last_frame = self._next_frame()
        response = None
        if status is not None:
            frame = self._next_frame()
            # overlap: the ack comes after the next request has left
            acked = self.now + (S if overlap else int(ack_after * S))
            stamped = acked + self.server_clock_ns
            response = HttpMessage(False, None, None, "HTTP/1.1", status, "OK" if status < 300 else "Error",
                                   Headers(ack or []), response_body, None, frame, frame, stamped, stamped,
                                   first_capture=self.capture, last_capture=self.capture)
            if extra_before:  # bytes the previous response did not announce, in a frame of their own
                response.extra_before, response.extra_frame = extra_before, frame
                response.first_frame = response.last_frame = self._next_frame()
            if not overlap:
                self.now = acked
        elif not orphan:
            flags.add("no-response")
        exchange = Exchange(self.index, conn, request, response, flags=flags)
        self.index += 1
        conn.last_frame, conn.last_ts_ns = self.frame, self.now
        self.now += 10 * MS
        self.tracker.on_exchange(exchange)
        return exchange

    def finish(self, **bounds: Any) -> BitsSummary:
        return self.tracker.finish(**bounds)

    # --- BITS packets -----------------------------------------------------------------------
    def _request_headers(self, packet_type: str, extra: list[tuple[str, str]], length: int,
                         host: str = "uploads.example", user_agent: str = UA) -> list[tuple[str, str]]:
        return [("Accept", "*/*"), (Header.PACKET_TYPE, packet_type), *extra,
                ("User-Agent", user_agent), ("Host", host), ("Content-Length", str(length))]

    def _ack(self, session: str | None, extra: list[tuple[str, str]], echo: bool) -> list[tuple[str, str]]:
        headers = [(Header.PACKET_TYPE, "Ack"), ("Content-Length", "0")]
        if echo and session is not None:
            headers.append((Header.SESSION_ID, session))
        return headers + extra

    def create(self, session: str | None = SID, status: int = 200, offered: str = PROTOCOL_GUID,
               chosen: str | None = PROTOCOL_GUID, url: str = "/upload/report.bin", host: str = "uploads.example",
               headers: list[tuple[str, str]] = (), ack: list[tuple[str, str]] | None = None,
               user_agent: str = UA, packet_type: str = "Create-Session", **kw: Any) -> Exchange:
        request = self._request_headers(packet_type, [(Header.SUPPORTED_PROTOCOLS, offered), *headers], 0, host, user_agent)
        if ack is None:
            ack = [(Header.PACKET_TYPE, "Ack"), ("Content-Length", "0")]
            if status in (200, 201):
                if chosen is not None:
                    ack.append((Header.PROTOCOL, chosen))
                if session is not None:
                    ack.append((Header.SESSION_ID, session))
                ack.append(("Accept-Encoding", "identity"))
        return self.exchange("BITS_POST", url, request, status=status, ack=ack, **kw)

    def fragment(self, session: str, first: int, last: int, total: int, body: bytes | None = None,
                 status: int | None = 200, received: int | None | str = "auto", echo: bool = True,
                 content_name: str | None = "report.bin", url: str = "/upload/report.bin",
                 host: str = "uploads.example", headers: list[tuple[str, str]] = (),
                 ack: list[tuple[str, str]] = (), content_length: int | None = None,
                 content_range: str | None = None, user_agent: str = UA, seed: int = 0,
                 packet_type: str = "Fragment", **kw: Any) -> Exchange:
        if body is None:
            body = payload(total, seed)[first:last + 1]
        extra = [(Header.SESSION_ID, session)]
        if content_name is not None:
            extra.append((Header.CONTENT_NAME, content_name))
        extra.append((Header.CONTENT_RANGE, f"bytes {first}-{last}/{total}" if content_range is None else content_range))
        extra += list(headers)
        request = self._request_headers(packet_type, extra, len(body) if content_length is None else content_length,
                                        host, user_agent)
        if received == "auto":
            received = last + 1 if status in (200, 201) else None
        ack_headers = list(ack)
        if received is not None:
            ack_headers.insert(0, (Header.RECEIVED_CONTENT_RANGE, str(received)))
        return self.exchange("BITS_POST", url, request, body, status=status,
                             ack=self._ack(session, ack_headers, echo), **kw)

    def _bodyless(self, packet_type: str, session: str | None, status: int | None, echo: bool,
                  url: str, host: str, ack: list[tuple[str, str]], headers: list[tuple[str, str]],
                  body: bytes, **kw: Any) -> Exchange:
        extra = ([(Header.SESSION_ID, session)] if session is not None else []) + list(headers)
        request = self._request_headers(packet_type, extra, len(body), host)
        return self.exchange("BITS_POST", url, request, body, status=status,
                             ack=self._ack(session, list(ack), echo), **kw)

    def close(self, session: str = SID, status: int | None = 200, echo: bool = True, url: str = "/upload/report.bin",
              host: str = "uploads.example", ack: list[tuple[str, str]] = (), headers: list[tuple[str, str]] = (),
              body: bytes = b"", **kw: Any) -> Exchange:
        return self._bodyless("Close-Session", session, status, echo, url, host, ack, headers, body, **kw)

    def cancel(self, session: str = SID, status: int | None = 200, echo: bool = True, url: str = "/upload/report.bin",
               host: str = "uploads.example", ack: list[tuple[str, str]] = (), headers: list[tuple[str, str]] = (),
               body: bytes = b"", **kw: Any) -> Exchange:
        return self._bodyless("Cancel-Session", session, status, echo, url, host, ack, headers, body, **kw)

    def ping(self, session: str | None = None, status: int | None = 200, url: str = "/upload/report.bin",
             host: str = "uploads.example", ack: list[tuple[str, str]] = (), headers: list[tuple[str, str]] = (),
             body: bytes = b"", **kw: Any) -> Exchange:
        return self._bodyless("Ping", session, status, False, url, host, ack, headers, body, **kw)

    def upload(self, session: str = SID, total: int = 12_000, size: int = 5_120, seed: int = 0,
               echo: bool = True, close: bool = True, **kw: Any) -> None:
        """A clean Windows-like upload: Create, contiguous Fragments, Close."""
        self.create(session, **kw)
        for first in range(0, total, size):
            self.fragment(session, first, min(first + size, total) - 1, total, echo=echo, seed=seed)
        if close:
            self.close(session, echo=echo)


def codes(anomalies: list[Any]) -> list[str]:
    return [a.code for a in anomalies]


def all_codes(summary: BitsSummary) -> list[str]:
    return sorted(codes(summary.anomalies) + [c for s in summary.sessions for c in codes(s.anomalies)])
