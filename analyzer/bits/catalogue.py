"""The anomaly catalogue of docs/protocol.md section 9, as data, and the Anomaly record.

The codes are the analyzer's public identifiers (users grep for them): spelled here once and
looked up everywhere else through `CATALOGUE` or `anomaly()`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from itertools import chain, repeat


class Severity(str, enum.Enum):
    ERROR = "error"  # the protocol was broken or data was lost
    WARNING = "warning"  # legal but suspicious or harmful
    INFO = "info"  # worth knowing


@dataclass(frozen=True, slots=True)
class AnomalyKind:
    code: str
    severity: Severity
    meaning: str
    rule: str


E, W, I = Severity.ERROR, Severity.WARNING, Severity.INFO

_ROWS: tuple[tuple[str, Severity, str, str], ...] = (
    ("fragment-after-cancel", E, "FRAGMENT for a session after its CANCEL-SESSION", "MC-BUP 2.2.10, 3.2.5.2.8"),
    ("fragment-after-close", E, "FRAGMENT after a successful CLOSE-SESSION", "MC-BUP 2.2.8"),
    ("cancel-after-complete", W, "CANCEL-SESSION after the final fragment was acknowledged: the upload may have landed", "Win32 Cancel-Session remarks, MC-BUP 3.2.5.2.8"),
    ("packet-after-end", W, "PING/CLOSE/CANCEL for a session that already ended", "MC-BUP 3.2.5.1"),
    ("unknown-session", E, "FRAGMENT/CLOSE/CANCEL with an id no Create ack issued", "MC-BUP 3.2.5.2.3"),
    ("session-before-capture", I, "session already running when the capture began", "-"),
    ("range-gap", E, "fragment starts past the acknowledged offset", "MC-BUP 3.2.5.2.6"),
    ("range-resend", I, "fragment starts before the acknowledged offset (normal after a lost ack or on resume)", "MC-BUP 2.2.6"),
    ("no-progress", W, "repeated resends or 416s without the offset advancing", "client BG_E_NO_PROGRESS"),
    ("resend-conflict", E, "resent bytes differ from the bytes first sent for that range", "MC-BUP 2.2.6"),
    ("fragment-after-complete", W, "new data after the entity was fully acknowledged", "MC-BUP 3.2.5.1.4"),
    ("total-changed", E, "TOTAL in Content-Range differs between fragments of a session", "MC-BUP 2.2.1.2"),
    ("range-malformed", E, "Content-Range not `bytes S-E/T`, S > E, E >= T", "RFC 2616 14.16"),
    ("length-mismatch", E, "Content-Length != E-S+1, or body length != Content-Length", "MC-BUP 2.2.6"),
    ("ack-offset-mismatch", W, "200 ack whose received offset != E+1 (server trimmed or ignored data)", "MC-BUP 2.2.7.2"),
    ("ack-offset-invalid", E, "received offset missing on a 200/416 fragment ack, or greater than TOTAL", "MC-BUP 2.2.7.2"),
    ("ack-regressed", W, "acknowledged offset moves backwards", "MC-BUP 3.2.5.2.6"),
    ("ack-session-mismatch", E, "ack's BITS-Session-Id differs from the request's", "MC-BUP 2.2.1.2"),
    ("ack-malformed", E, "a BITS ack without `BITS-Packet-Type: Ack`, or with a body", "MC-BUP 2.2.1"),
    ("close-incomplete", W, "CLOSE-SESSION before all TOTAL bytes were acknowledged", "MC-BUP 1.3.2"),
    ("never-finished", W, "capture ends with the session neither closed nor cancelled", "MC-BUP 3.2.2.1"),
    ("duplicate-create", W, "a second CREATE-SESSION from the same client for the same URL while an earlier session is open", "MC-BUP 3.2.5.2.4"),
    ("session-recreated", I, "BG_E_SESSION_NOT_FOUND followed by a new CREATE-SESSION for the same URL", "MC-BUP 3.1.5.2.1"),
    ("error-response", E, "an ack with an error status or BITS error header (severity follows the status)", "MC-BUP 2.2.1.2"),
    ("error-header-misuse", E, "error code on a 200, context without code, context other than 0x5/0x7, non-hex code", "MC-BUP 2.2.1.2"),
    ("protocol-mismatch", E, "BITS-Protocol not among the offered GUIDs, present on a failed ack, or missing on a successful Create ack", "MC-BUP 1.7.1"),
    ("nonstandard-id", W, "a session id or protocol GUID not in {8-4-4-4-12} form", "MC-BUP 2.2.1.2"),
    ("missing-header", E, "a required header absent", "MC-BUP 2.2"),
    ("unexpected-body", E, "body or non-zero Content-Length on CREATE/PING/CLOSE/CANCEL", "MC-BUP 2.2.x.3"),
    ("unknown-packet-type", E, "BITS-Packet-Type absent on a BITS_POST, or not one of the six values", "MC-BUP 2.2.1.2"),
    ("header-limits", W, "header value over 4 KiB, Content-Name over 260 chars or with forbidden characters, more than 100 GUIDs", "MC-BUP 2.2.1, note 2"),
    ("wrong-method-or-version", W, "BITS headers on a method other than BITS_POST, or HTTP/1.0", "MC-BUP 2.2.1"),
    ("content-encoding", W, "Content-Encoding other than identity on a fragment", "MC-BUP 2.2.6.1"),
    ("concurrent-requests", W, "a second request of a session sent before the first was acked", "MC-BUP 3.1.5"),
    ("reply-url-misplaced", W, "BITS-Reply-URL on a non-final ack, missing on the final ack of an upload-reply session, or reply fetched after CLOSE-SESSION", "MC-BUP 2.2.7.2, 1.3.3"),
    ("host-id-ignored", W, "the client keeps using the origin host after a BITS-Host-Id ack, or a fallback timeout without Host-Id", "MC-BUP 1.3.4.2"),
    ("host-redirect", I, "BITS-Host-Id given; later packets go to another host", "MC-BUP 1.3.4.2"),
    ("no-response", W, "request with no ack in the capture (reset, capture gap)", "-"),
    ("orphan-response", W, "response with no matching request", "-"),
    ("out-of-sync", I, "a 416 resynchronisation", "MC-BUP 3.2.5.2.6"),
    ("fragment-too-large", I, "413 or BG_E_TOO_LARGE", "MC-BUP 3.1.5.2.4"),
    ("auth-challenge", I, "401/407 challenge", "MC-BUP 2.1"),
    ("basic-auth-cleartext", I, "Basic credentials over plain HTTP", "MC-BUP 2.1"),
    ("client-fingerprint", I, "User-Agent not `Microsoft BITS/...`, or fragments outside 5 KiB-13 MiB other than the last (MITRE ATT&CK T1197)", "MC-BUP note 10"),
    ("stalled", W, "no progress on a session for longer than a threshold", "MC-BUP 3.1.2"),
    ("capture-gap", W, "bytes of a message missing from the capture; the message is partial", "-"),
    ("response-overrun", E, "bytes after a response beyond the length its framing announced (a body after Content-Length: 0), before the next status line", "RFC 9112 6.3"),
    ("ack-beyond-sent", E, "200 ack whose received offset is past the bytes the client had sent without a hole: the server acknowledged bytes it cannot have received", "MC-BUP 2.2.7.2, 3.2.5.2.6"),
    ("ack-session-id-absent", I, "Close-Session or Cancel-Session success ack without BITS-Session-Id (MC-BUP requires it; IIS omits it)", "MC-BUP 2.2.1.2"),
)

CATALOGUE: dict[str, AnomalyKind] = {code: AnomalyKind(code, sev, meaning, rule) for code, sev, meaning, rule in _ROWS}


@dataclass(slots=True)
class Anomaly:
    """One finding. `message` names the values involved; times are ns since the epoch."""

    code: str
    severity: Severity
    message: str
    session_id: str | None = None
    frames: tuple[int, ...] = ()  # frame numbers, each counted in its own capture file
    timestamps: tuple[int, ...] = ()
    connection: int | None = None
    captures: tuple[int, ...] = ()  # the capture file index of each of `frames` (parallel)

    @property
    def places(self) -> tuple[tuple[int, int], ...]:
        """(capture index, frame number) of each frame."""
        return tuple(zip(chain(self.captures, repeat(0)), self.frames))

    @property
    def kind(self) -> AnomalyKind:
        return CATALOGUE[self.code]

    def __str__(self) -> str:
        where = f" (frames {', '.join(map(str, self.frames))})" if self.frames else ""
        return f"{self.severity.value} {self.code}: {self.message}{where}"


def anomaly(
    code: str,
    message: str,
    *,
    session_id: str | None = None,
    frames: tuple[int, ...] | list[int] = (),
    timestamps: tuple[int, ...] | list[int] = (),
    connection: int | None = None,
    severity: Severity | None = None,
    captures: tuple[int | None, ...] | list[int | None] = (),
) -> Anomaly:
    """An Anomaly of a catalogued code (KeyError for a code that is not in the catalogue).
    `captures` gives the capture file index of each of `frames` (none given: all in file 0)."""
    kind = CATALOGUE[code]
    places = sorted({(capture or 0, frame) for capture, frame in zip(chain(captures, repeat(0)), frames)
                     if frame is not None})
    return Anomaly(
        code, severity or kind.severity, message, session_id,
        tuple(frame for _, frame in places),
        tuple(t for t in timestamps if t is not None), connection,
        tuple(capture for capture, _ in places),
    )


def frame_name(capture: int | None, frame: int | None, several: bool) -> str:
    """A frame as a message sentence names it: `431`, or `2:431` (frame 431 of the second capture
    file) when the run reads several files: the reports write frames the same way."""
    return f"{(capture or 0) + 1}:{frame}" if several else f"{frame}"
