"""Protocol facts of the BITS upload protocol ([MC-BUP] and the Win32 BITS pages), written once.

The analyzer, the reference server, the client and the reports all import these names; no
other module spells a BITS header, packet type, GUID or HRESULT itself.
Reference: ../shared/bits-protocol.md (sections 1-4 and 7).
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

METHOD = "BITS_POST"

#: "BITS 1.5 Upload Protocol", the only protocol GUID ever defined (MC-BUP 1.7.1).
PROTOCOL_GUID = "{7df0354d-249b-430f-820d-3d2a9bef4931}"

USER_AGENT_PREFIX = "Microsoft BITS/"


class Header:
    """Header names as Windows writes them. Compare case-insensitively (use `.lower()`)."""

    PACKET_TYPE = "BITS-Packet-Type"
    SUPPORTED_PROTOCOLS = "BITS-Supported-Protocols"
    SESSION_ID = "BITS-Session-Id"
    PROTOCOL = "BITS-Protocol"
    RECEIVED_CONTENT_RANGE = "BITS-Received-Content-Range"
    REPLY_URL = "BITS-Reply-URL"
    HOST_ID = "BITS-Host-Id"
    HOST_ID_FALLBACK_TIMEOUT = "BITS-Host-Id-Fallback-Timeout"
    ERROR_CODE = "BITS-Error-Code"  # Win32 pages and every implementation
    ERROR_CODE_MCBUP = "BITS-Error"  # as [MC-BUP] 2.2.1.2 writes it
    ERROR_CONTEXT = "BITS-Error-Context"
    CONTENT_NAME = "Content-Name"
    CONTENT_RANGE = "Content-Range"
    CONTENT_LENGTH = "Content-Length"
    CONTENT_ENCODING = "Content-Encoding"
    ACCEPT_ENCODING = "Accept-Encoding"
    USER_AGENT = "User-Agent"
    HOST = "Host"


#: Every header whose name starts with "BITS-" is a BITS header; used to spot BITS traffic
#: sent with another method.
BITS_HEADER_PREFIX = "bits-"


class PacketType(enum.Enum):
    """The six packet types. `.value` is the Windows spelling; parse with `PacketType.parse`."""

    PING = "Ping"
    CREATE_SESSION = "Create-Session"
    FRAGMENT = "Fragment"
    CLOSE_SESSION = "Close-Session"
    CANCEL_SESSION = "Cancel-Session"
    ACK = "Ack"

    @classmethod
    def parse(cls, value: str | None) -> "PacketType | None":
        """Case-insensitive lookup (MC-BUP writes CREATE-SESSION, Windows Create-Session)."""
        if value is None:
            return None
        return _PACKET_TYPES_BY_LOWER.get(value.strip().lower())


_PACKET_TYPES_BY_LOWER = {p.value.lower(): p for p in PacketType}

REQUEST_TYPES = frozenset(PacketType) - {PacketType.ACK}
#: Request packets that must not carry a body.
BODYLESS_PACKETS = REQUEST_TYPES - {PacketType.FRAGMENT}


class ErrorContext(enum.IntEnum):
    """BG_ERROR_CONTEXT values; only REMOTE_FILE and REMOTE_APPLICATION appear on the wire."""

    NONE = 0
    UNKNOWN = 1
    GENERAL_QUEUE_MANAGER = 2
    QUEUE_MANAGER_NOTIFICATION = 3
    LOCAL_FILE = 4
    REMOTE_FILE = 5
    GENERAL_TRANSPORT = 6
    REMOTE_APPLICATION = 7


WIRE_ERROR_CONTEXTS = frozenset({ErrorContext.REMOTE_FILE, ErrorContext.REMOTE_APPLICATION})


@dataclass(frozen=True)
class HResult:
    code: int
    name: str
    meaning: str

    def __str__(self) -> str:
        return f"0x{self.code:08X} {self.name}"


S_OK = HResult(0x00000000, "S_OK", "no error (the form used on 416 resynchronisation acks)")
E_ACCESSDENIED = HResult(0x80070005, "E_ACCESSDENIED", "access denied, or the destination exists and overwriting is off")
E_INVALIDARG = HResult(0x80070057, "E_INVALIDARG", "malformed request: bad header, range, packet type, protocol or body")
ERROR_DISK_FULL = HResult(0x80070112, "ERROR_DISK_FULL", "the server's disk is full")
BG_E_INVALID_SERVER_RESPONSE = HResult(0x8020001B, "BG_E_INVALID_SERVER_RESPONSE", "the server's answer broke the protocol")
BG_E_TOO_MANY_FILES = HResult(0x8020001C, "BG_E_TOO_MANY_FILES", "upload jobs hold exactly one file")
BG_E_LOCAL_FILE_CHANGED = HResult(0x8020001D, "BG_E_LOCAL_FILE_CHANGED", "the local file changed during the upload")
BG_E_ERROR_CONTEXT_REMOTE_APPLICATION = HResult(0x8020001E, "BG_E_ERROR_CONTEXT_REMOTE_APPLICATION", "the server application failed")
BG_E_SESSION_NOT_FOUND = HResult(0x8020001F, "BG_E_SESSION_NOT_FOUND", "the session id is unknown or expired on the server")
BG_E_TOO_LARGE = HResult(0x80200020, "BG_E_TOO_LARGE", "the upload exceeds the server's maximum upload size")
BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH = HResult(0x80200022, "BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH", "no protocol GUID in common")
BG_E_SERVER_EXECUTE_ENABLE = HResult(0x80200023, "BG_E_SERVER_EXECUTE_ENABLE", "the virtual directory allows scripts or execution")
BG_E_NO_PROGRESS = HResult(0x80200024, "BG_E_NO_PROGRESS", "the job made no progress within its timeout")

HRESULTS: dict[int, HResult] = {
    h.code: h
    for h in (
        S_OK, E_ACCESSDENIED, E_INVALIDARG, ERROR_DISK_FULL, BG_E_INVALID_SERVER_RESPONSE,
        BG_E_TOO_MANY_FILES, BG_E_LOCAL_FILE_CHANGED, BG_E_ERROR_CONTEXT_REMOTE_APPLICATION,
        BG_E_SESSION_NOT_FOUND, BG_E_TOO_LARGE, BG_E_CLIENT_SERVER_PROTOCOL_MISMATCH,
        BG_E_SERVER_EXECUTE_ENABLE, BG_E_NO_PROGRESS,
    )
}

#: Raw HTTP failures surface on the client as 0x80190000 + status (BG_E_HTTP_ERROR_xxx).
HTTP_ERROR_BASE = 0x80190000


def describe_hresult(code: int) -> HResult:
    """The known HRESULT, or a generic one (HTTP-status HRESULTs get a readable name)."""
    known = HRESULTS.get(code)
    if known is not None:
        return known
    if HTTP_ERROR_BASE + 100 <= code <= HTTP_ERROR_BASE + 599:
        status = code - HTTP_ERROR_BASE
        return HResult(code, f"BG_E_HTTP_ERROR_{status}", f"the server answered HTTP {status}")
    return HResult(code, "unknown", "not a documented BITS or Win32 code")


# --- limits (bits-protocol.md 1, 2.1, 7) ----------------------------------------------------
MAX_HEADER_VALUE = 4096
MAX_CONTENT_NAME = 260
CONTENT_NAME_FORBIDDEN = frozenset('\\/:*?"<>|')
MAX_SUPPORTED_PROTOCOLS = 100
MAX_SESSION_ID = 100
MAX_REPLY_URL = 2200
MAX_HOST_ID = 300
MAX_UPLOAD_SIZE = 1844674407370955
MIN_FRAGMENT = 5 * 1024
MAX_FRAGMENT = 13 * 1024 * 1024
DEFAULT_SESSION_TIMEOUT = 1_209_600  # seconds, BITSSessionTimeout


# --- value syntax -----------------------------------------------------------------------------
_GUID = re.compile(r"\{[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}")
# Digit counts are bounded: a 5,000-digit number from a hostile capture is malformed, not a
# ValueError from int() (Python caps str-to-int conversions at 4,300 digits).
_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d{1,20})-(\d{1,20})/(\d{1,20})\s*", re.IGNORECASE)
_HRESULT = re.compile(r"\s*(?:0?[xX])?([0-9a-fA-F]{1,8})\s*")
_DECIMAL = re.compile(r"\s*(\d{1,20})\s*")


def is_guid(value: str) -> bool:
    """True for a brace GUID `{8-4-4-4-12}` (any case)."""
    return _GUID.fullmatch(value.strip()) is not None


@functools.lru_cache(maxsize=8192)  # every packet of a session asks again; bounded
def session_key(session_id: str) -> str:
    """The key a session id is known by: GUID-shaped ids case-insensitively (folded to lower
    case), others verbatim; surrounding whitespace is not part of the id. The one session-id
    rule of the analyzer, the client, the replayer and the server."""
    sid = session_id.strip()
    return sid.lower() if is_guid(sid) else sid


def same_id(a: str, b: str) -> bool:
    """Two session ids (or protocol GUIDs) naming the same thing: equal keys."""
    return session_key(a) == session_key(b)


def is_session_not_found(error_code: int | None) -> bool:
    """An ack's BITS-Error-Code saying the server no longer knows the session: the client
    creates a new one (MC-BUP 3.1.5.2.1)."""
    return error_code == BG_E_SESSION_NOT_FOUND.code


def split_protocols(value: str) -> list[str]:
    """BITS-Supported-Protocols: GUIDs separated by spaces (Win32) or commas (MC-BUP)."""
    return [item for item in re.split(r"[\s,]+", value.strip()) if item]


@dataclass(frozen=True, slots=True)
class ContentRange:
    first: int
    last: int
    total: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"bytes {self.first}-{self.last}/{self.total}"


def parse_content_range(value: str) -> ContentRange | None:
    """`bytes S-E/T` (unit case-insensitive), with S <= E < T; None when malformed."""
    match = _CONTENT_RANGE.fullmatch(value)
    if match is None:
        return None
    first, last, total = map(int, match.groups())
    if first > last or last >= total:
        return None
    return ContentRange(first, last, total)


def parse_hresult(value: str) -> int | None:
    """Hex HRESULT in the forms seen on the wire: `0x80070057`, `80070057`, `x8020001F`, `0`."""
    match = _HRESULT.fullmatch(value)
    return int(match.group(1), 16) if match else None


def parse_decimal(value: str) -> int | None:
    """A non-negative decimal integer (BITS-Received-Content-Range, fallback timeout)."""
    match = _DECIMAL.fullmatch(value)
    return int(match.group(1)) if match else None


def format_hresult(code: int) -> str:
    return f"0x{code:08X}"
