"""bits-server's log: one PacketRecord per answered request, kept in memory and written as a line."""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable, NamedTuple, TextIO


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


class ServerLog:
    """The records (the newest `max_records`), the log stream (None: silent) and the callback
    every record is handed to, called from the connection's thread."""

    def __init__(self, stream: TextIO | None, on_packet: Callable[[PacketRecord], None] | None,
                 max_records: int) -> None:
        self.records: deque[PacketRecord] = deque(maxlen=max_records)
        self._stream = stream
        self._on_packet = on_packet
        self._lock = threading.Lock()

    def record(self, record: PacketRecord) -> None:
        self.records.append(record)
        self.line(record.line())
        if self._on_packet is not None:
            self._on_packet(record)

    def line(self, text: str) -> None:
        if self._stream is None:
            return
        with self._lock:
            self._stream.write(text + "\n")
            self._stream.flush()
