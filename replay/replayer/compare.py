"""Captured against live answers: what each ack said, and where the two differ.

An ack is reduced to the facts a replay can be judged on (status, packet type, error code and
context, received offset, reply URL present); session ids are left out on purpose, since a
live server always issues new ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from bitstrace.analyzer.bits.packets import AckFields, parse_ack
from bitstrace.analyzer.bits.protocol import describe_hresult, format_hresult, is_session_not_found


@dataclass(frozen=True, slots=True)
class AckSummary:
    """What one response to a BITS request said, as far as comparison goes."""

    status: int
    packet_type: str | None
    error_code: int | None
    error_context: int | None
    received: int | None
    reply_url: bool
    session_id: str | None = None
    host_id: str | None = None

    @property
    def session_not_found(self) -> bool:
        return is_session_not_found(self.error_code)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["error_code"] = format_hresult(self.error_code) if self.error_code is not None else None
        data["error_name"] = describe_hresult(self.error_code).name if self.error_code is not None else None
        return data

    def describe(self) -> str:
        parts = [str(self.status)]
        if self.error_code is not None:
            parts.append(f"{describe_hresult(self.error_code).name}")
        if self.error_context is not None:
            parts.append(f"ctx 0x{self.error_context:X}")
        if self.received is not None:
            parts.append(f"N={self.received}")
        if self.reply_url:
            parts.append("reply-url")
        return " ".join(parts)


def summarize(status: int, get: Callable[[str], str | None]) -> AckSummary:
    """Summarise a response from its status and a case-insensitive header lookup, read as the
    analyzer reads acks (analyzer.bits.packets.parse_ack)."""
    ack = parse_ack(get)
    return summarize_ack(status, ack, ack.received_offset)


def summarize_ack(status: int, ack: AckFields, received: int | None) -> AckSummary:
    """Summarise an ack the analyzer already parsed (a BitsPacket's `status`, `ack` and
    `received_offset`: its shared `ack` record leaves the offset to the packet)."""
    return AckSummary(
        status=status,
        packet_type=ack.type_raw.strip() if ack.type_raw is not None else None,
        error_code=ack.error_code,
        error_context=ack.error_context,
        received=received,
        reply_url=ack.reply_url is not None,
        session_id=ack.session_id,
        host_id=ack.host_id,
    )


@dataclass(frozen=True)
class Difference:
    field: str
    captured: object
    live: object

    def to_json(self) -> dict[str, object]:
        return {"field": self.field, "captured": _jsonable(self.field, self.captured),
                "live": _jsonable(self.field, self.live)}


def _jsonable(field: str, value: object) -> object:
    if field == "error_code" and isinstance(value, int):
        return format_hresult(value)
    return value


def _same_packet_type(captured: object, live: object) -> bool:
    if isinstance(captured, str) and isinstance(live, str):
        return captured.lower() == live.lower()
    return captured is None and live is None


#: The compared fields and how two values are judged equal.
COMPARED: tuple[tuple[str, Callable[[object, object], bool]], ...] = (
    ("status", lambda a, b: a == b),
    ("packet_type", _same_packet_type),
    ("error_code", lambda a, b: a == b),
    ("error_context", lambda a, b: a == b),
    ("received", lambda a, b: a == b),
    ("reply_url", lambda a, b: a == b),
)


def compare(captured: AckSummary | None, live: AckSummary | None) -> list[Difference]:
    """The differences between a captured and a live answer to the same request.

    A request that had no answer in the capture is not judged (there is nothing to compare to);
    one that had an answer there but none live differs in every sense, reported as `response`.
    """
    if captured is None:
        return []
    if live is None:
        return [Difference("response", captured.describe(), None)]
    return [
        Difference(name, getattr(captured, name), getattr(live, name))
        for name, same in COMPARED
        if not same(getattr(captured, name), getattr(live, name))
    ]

