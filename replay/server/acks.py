"""The BITS answer the service gives and the header fields it carries on the wire (docs/protocol.md 2.2)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bitstrace.analyzer.bits.protocol import ErrorContext, Header, HResult, PacketType, format_hresult


@dataclass
class Ack:
    """A BITS answer: always `BITS-Packet-Type: Ack` and `Content-Length: 0` (but a 401
    challenge, which is HTTP's, not BITS')."""

    status: int
    session_id: str | None = None
    received: int | None = None
    error: HResult | None = None
    context: ErrorContext | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""

    def fields(self, error_header: str) -> list[tuple[str, str]]:
        """The header fields of this answer, Content-Length excepted; `error_header` names the
        HRESULT's field (BITS-Error-Code or BITS-Error)."""
        fields = [] if self.status == 401 else [(Header.PACKET_TYPE, PacketType.ACK.value)]
        if self.session_id is not None:
            fields.append((Header.SESSION_ID, self.session_id.strip()))
        if self.received is not None:
            fields.append((Header.RECEIVED_CONTENT_RANGE, str(self.received)))
        if self.error is not None:
            fields.append((error_header, format_hresult(self.error.code)))
            if self.context is not None:
                fields.append((Header.ERROR_CONTEXT, f"0x{int(self.context):X}"))
        fields.extend(self.headers)
        return fields


def error_ack(status: int, error: HResult | None, note: str, session_id: str | None = None,
              context: ErrorContext | None = ErrorContext.REMOTE_FILE,
              headers: list[tuple[str, str]] | None = None) -> Ack:
    return Ack(status, session_id=session_id, error=error,
               context=context if error is not None else None, note=note, headers=headers or [])
