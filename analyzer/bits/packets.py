"""Typed BITS packets from HTTP exchanges, with the checks one exchange can decide alone.

`classify(exchange)` sorts every exchange into a `BitsPacket` (a BITS_POST and its ack), a
`Download` (GET/HEAD with a `Microsoft BITS/` user agent: BITS downloads and upload-reply
fetches), or other HTTP. Malformed values never raise: they leave the field None and add an
anomaly to the packet (or to `Classified.anomalies` when there is no BITS packet to hold it).
Checks needing a session's history live in machine.py / sessions.py.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Callable

from bitstrace.analyzer.bits import protocol as p
from bitstrace.analyzer.basic_auth import is_basic
from bitstrace.analyzer.bits.catalogue import Anomaly, Severity, anomaly
from bitstrace.analyzer.bits.protocol import ContentRange, Header, PacketType
from bitstrace.analyzer.decode import format_addr, format_endpoint
from bitstrace.analyzer.http import Headers

SUCCESS = frozenset({200, 201})
RESYNC = 416
AUTH_CHALLENGES = frozenset({401, 407})
TOO_LARGE_STATUS = 413
DOWNLOAD_METHODS = frozenset({"GET", "HEAD"})
# Packets are kept for the whole run, so what repeats from packet to packet is made once per
# distinct input and shared. The caches are bounded: a capture of endless distinct values costs
# a miss per packet, never unbounded memory.
_SHARED_RECORDS = 8192


def is_bits_method(method: str | None) -> bool:
    """BITS_POST, compared case-insensitively (as classify does): `bits_post` is BITS too."""
    return (method or "").upper() == p.METHOD


@dataclass(frozen=True, slots=True)
class AckFields:
    """The BITS headers of a response, parsed; None when absent or unparsable."""

    type_raw: str | None
    session_id: str | None  # stripped
    protocol: str | None  # stripped; None when empty
    received_offset: int | None
    error_code: int | None
    error_context: int | None
    reply_url: str | None
    host_id: str | None  # stripped; None when empty
    fallback_timeout_s: int | None

    @property
    def session_not_found(self) -> bool:
        return p.is_session_not_found(self.error_code)


def parse_ack(get: Callable[[str], str | None]) -> AckFields:
    """Read an ack's BITS headers through `get`, a case-insensitive header lookup (first value).
    The one ack parser: the analyzer, the replay comparison and the client all use it."""
    session_id = get(Header.SESSION_ID)
    received = get(Header.RECEIVED_CONTENT_RANGE)
    code = _error_code_raw(get)
    context = get(Header.ERROR_CONTEXT)
    timeout = get(Header.HOST_ID_FALLBACK_TIMEOUT)
    return AckFields(
        type_raw=get(Header.PACKET_TYPE),
        session_id=session_id.strip() if session_id is not None else None,
        protocol=(get(Header.PROTOCOL) or "").strip() or None,
        received_offset=p.parse_decimal(received) if received is not None else None,
        error_code=p.parse_hresult(code) if code is not None else None,
        error_context=p.parse_hresult(context) if context is not None else None,
        reply_url=get(Header.REPLY_URL),
        host_id=(get(Header.HOST_ID) or "").strip() or None,
        fallback_timeout_s=p.parse_decimal(timeout) if timeout is not None else None,
    )


def _error_code_raw(get: Callable[[str], str | None]) -> str | None:
    """BITS-Error-Code (Win32, every implementation) or BITS-Error (MC-BUP): accept both."""
    value = get(Header.ERROR_CODE)
    return value if value is not None else get(Header.ERROR_CODE_MCBUP)


NO_ACK = AckFields(None, None, None, None, None, None, None, None, None)


@dataclass(frozen=True, slots=True)
class Peers:
    """A connection's two endpoints, formatted once and shared by every packet on it."""

    client: str  # "ip:port"
    client_ip: str
    server: str  # "ip:port"
    server_ip: str


@dataclass(frozen=True, slots=True)
class RequestFields:
    """What a BITS_POST's start line and headers say that repeats from packet to packet of a
    session (everything but the range, the length and the body): one shared copy of each."""

    method: str
    target: str
    version: str
    host: str | None
    packet_type: PacketType | None
    type_raw: str | None
    session_id: str | None  # stripped
    content_name: str | None
    user_agent: str | None
    offered_protocols: tuple[str, ...]


@dataclass(slots=True)
class BitsPacket:
    """A BITS_POST request and its ack. Frames and times come from the HTTP messages; each
    frame number counts in the capture file its `*_capture` index names (rotated captures).

    Packets are kept until the end of the run, so what repeats lives in shared records
    (`peers`, `request`, `ack`) and the properties below read through them."""

    exchange: int
    connection: int
    peers: Peers
    request: RequestFields
    content_range: ContentRange | None
    content_length: int | None
    body_length: int
    body_digest: bytes | None  # sha256; None when the body is partial
    request_frame: int
    request_last_frame: int
    request_offset: int  # stream offset of the request: with `connection`, names its body chunks
    sent_ns: int
    flags: frozenset[str]
    request_capture: int  # of request_frame
    request_last_capture: int  # of request_last_frame
    # the ack; all None when the capture holds no response
    status: int | None = None
    reason: str | None = None
    ack: AckFields = NO_ACK  # shared by acks with the same headers, so its received_offset is None: see below
    received_offset: int | None = None
    response_frame: int | None = None
    response_capture: int | None = None  # of response_frame
    acked_ns: int | None = None
    anomalies: tuple[Anomaly, ...] = ()

    # the fields of the shared records, read as the packet's own
    client = property(attrgetter("peers.client"))
    client_ip = property(attrgetter("peers.client_ip"))
    server = property(attrgetter("peers.server"))
    server_ip = property(attrgetter("peers.server_ip"))
    method = property(attrgetter("request.method"))
    target = property(attrgetter("request.target"))
    version = property(attrgetter("request.version"))
    host = property(attrgetter("request.host"))
    packet_type = property(attrgetter("request.packet_type"))
    type_raw = property(attrgetter("request.type_raw"))
    session_id = property(attrgetter("request.session_id"))
    content_name = property(attrgetter("request.content_name"))
    user_agent = property(attrgetter("request.user_agent"))
    offered_protocols = property(attrgetter("request.offered_protocols"))
    ack_type_raw = property(attrgetter("ack.type_raw"))
    ack_session_id = property(attrgetter("ack.session_id"))
    protocol = property(attrgetter("ack.protocol"))
    error_code = property(attrgetter("ack.error_code"))
    error_context = property(attrgetter("ack.error_context"))
    reply_url = property(attrgetter("ack.reply_url"))
    host_id = property(attrgetter("ack.host_id"))
    fallback_timeout_s = property(attrgetter("ack.fallback_timeout_s"))

    @property
    def body_sha256(self) -> str | None:
        """Hex, as HttpMessage gives it."""
        return self.body_digest.hex() if self.body_digest is not None else None

    @property
    def answered(self) -> bool:
        return self.status is not None

    @property
    def succeeded(self) -> bool:
        return self.status in SUCCESS

    @property
    def is_final_ack(self) -> bool:
        """A fragment ack saying the whole entity is in: 200 with N == TOTAL."""
        return (
            self.request.packet_type is PacketType.FRAGMENT and self.status in SUCCESS
            and self.content_range is not None
            and self.received_offset == self.content_range.total
        )

    @property
    def session_not_found(self) -> bool:
        return self.ack.session_not_found

    @property
    def frames(self) -> tuple[int, ...]:
        if self.response_frame is None:
            return (self.request_frame,)
        return (self.request_frame, self.response_frame)

    @property
    def captures(self) -> tuple[int, ...]:
        """The capture index of each of `frames`."""
        if self.response_capture is None:
            return (self.request_capture,)
        return (self.request_capture, self.response_capture)

    @property
    def places(self) -> tuple[tuple[int, int], ...]:
        """(capture index, frame number) of each of `frames`."""
        return tuple(zip(self.captures, self.frames))

    @property
    def timestamps(self) -> tuple[int, ...]:
        if self.acked_ns is None:
            return (self.sent_ns,)
        return (self.sent_ns, self.acked_ns)

    @property
    def label(self) -> str:
        request = self.request
        name = request.packet_type.value if request.packet_type else repr(request.type_raw)
        if self.content_range is not None:
            name += f" {self.content_range}"
        return name

    def flag(self, code: str, message: str, **extra: Any) -> None:
        self.anomalies += (anomaly(
            code, message, session_id=self.request.session_id, frames=self.frames, captures=self.captures,
            timestamps=self.timestamps, connection=self.connection, **extra,
        ),)


@dataclass(slots=True)
class Download:
    """A GET/HEAD sent with a BITS user agent (download job or upload-reply fetch)."""

    exchange: int
    connection: int
    client: str
    client_ip: str
    server: str
    method: str
    target: str
    host: str | None
    user_agent: str
    status: int | None
    bytes: int
    range: str | None
    frame: int
    sent_ns: int
    capture: int = 0  # of frame
    reply_of: str | None = None  # the upload-reply session whose reply this fetches (set by the tracker)


@dataclass(slots=True)
class Classified:
    """What one exchange turned out to be; at most one of packet/download is set."""

    packet: BitsPacket | None = None
    download: Download | None = None
    anomalies: list[Anomaly] = field(default_factory=list)  # those with no packet to hold them


def _has_bits_headers(headers: Headers) -> bool:
    return any(name.startswith(p.BITS_HEADER_PREFIX) for name in headers.by_name)


@functools.lru_cache(maxsize=_SHARED_RECORDS)
def _peers(client: tuple[bytes, int], server: tuple[bytes, int]) -> Peers:
    (caddr, cport), (saddr, sport) = client, server
    caddr, saddr = bytes(caddr), bytes(saddr)
    return Peers(format_endpoint(caddr, cport), format_addr(caddr), format_endpoint(saddr, sport), format_addr(saddr))


def _connection_peers(connection: Any) -> Peers:
    return _peers(connection.client, connection.server)


_REQUEST_HEADERS = (Header.HOST, Header.PACKET_TYPE, Header.SESSION_ID, Header.CONTENT_NAME, Header.USER_AGENT,
                    Header.SUPPORTED_PROTOCOLS)
_REQUEST_KEYS = tuple(name.lower() for name in _REQUEST_HEADERS)


@functools.lru_cache(maxsize=_SHARED_RECORDS)
def _request_fields(method: str, target: str, version: str, values: tuple[str | None, ...]) -> RequestFields:
    """The fields of one combination of start line and `_REQUEST_HEADERS` values."""
    host, type_raw, session_id, content_name, user_agent, protocols_raw = map(_shared, values)
    return RequestFields(
        method=_shared(method), target=_shared(target), version=_shared(version), host=host,
        packet_type=PacketType.parse(type_raw), type_raw=type_raw,
        session_id=_shared(session_id.strip()) if session_id is not None else None,
        content_name=content_name, user_agent=user_agent,
        offered_protocols=tuple(map(_shared, p.split_protocols(protocols_raw))) if protocols_raw else (),
    )


# Sessions of one file size send the same ranges and lengths (and get the same offsets back):
# each distinct value is parsed once, and its ContentRange (immutable) shared.
_content_range = functools.lru_cache(maxsize=_SHARED_RECORDS)(p.parse_content_range)
_decimal = functools.lru_cache(maxsize=_SHARED_RECORDS)(p.parse_decimal)


def _request_fields_of(request: Any, h: Headers) -> RequestFields:
    return _request_fields(request.method, request.target, request.version or "", tuple(map(h.by_name.get, _REQUEST_KEYS)))


# Every header parse_ack reads but the received offset, which changes with every fragment.
_ACK_HEADERS = (Header.PACKET_TYPE, Header.SESSION_ID, Header.PROTOCOL, Header.ERROR_CODE, Header.ERROR_CODE_MCBUP,
                Header.ERROR_CONTEXT, Header.REPLY_URL, Header.HOST_ID, Header.HOST_ID_FALLBACK_TIMEOUT)
_ACK_KEYS = tuple(name.lower() for name in _ACK_HEADERS)
_CONTENT_RANGE = Header.CONTENT_RANGE.lower()
_CONTENT_LENGTH = Header.CONTENT_LENGTH.lower()
_RECEIVED_CONTENT_RANGE = Header.RECEIVED_CONTENT_RANGE.lower()
_CONTENT_ENCODING = Header.CONTENT_ENCODING.lower()


@functools.lru_cache(maxsize=_SHARED_RECORDS)
def _ack_fields(values: tuple[str | None, ...]) -> AckFields:
    """parse_ack over one combination of `_ACK_HEADERS` values (so received_offset is None)."""
    return parse_ack(dict(zip(_ACK_HEADERS, map(_shared, values))).get)


def classify(exchange: Any) -> Classified:
    """Sort one Exchange (analyzer.exchanges contract) into BITS packet, download or other."""
    request, response = exchange.request, exchange.response
    if request is None:
        if response is not None and _has_bits_headers(response.headers):
            return Classified(anomalies=[anomaly(
                "orphan-response",
                f"HTTP {response.status} response carrying BITS headers with no request in the capture",
                frames=(response.first_frame,), captures=(response.first_capture,),
                timestamps=(response.first_ts_ns,), connection=exchange.connection.id,
            )])
        return Classified()
    h = request.headers
    if is_bits_method(request.method):
        return Classified(packet=_packet(exchange, h))
    out = Classified()
    if _has_bits_headers(h):
        out.anomalies.append(anomaly(
            "wrong-method-or-version",
            f"{request.method} {request.target} carries BITS headers; BITS requests use {p.METHOD}",
            frames=(request.first_frame,), captures=(request.first_capture,),
            timestamps=(request.first_ts_ns,), connection=exchange.connection.id,
        ))
    method = (request.method or "").upper()
    user_agent = h.get(Header.USER_AGENT)
    if method in DOWNLOAD_METHODS and user_agent and user_agent.startswith(p.USER_AGENT_PREFIX):
        out.download = _download(exchange, method, user_agent, h)
        basic = _basic_credentials(request, h)
        if basic is not None:
            out.anomalies.append(anomaly("basic-auth-cleartext", basic, frames=(request.first_frame,),
                                         captures=(request.first_capture,), timestamps=(request.first_ts_ns,),
                                         connection=exchange.connection.id))
    return out


def fragment_head(request: Any) -> tuple[str, ContentRange] | None:
    """The session id (stripped) and range of a Fragment request, parsed as `classify` parses
    them, from its head alone (the extractor stores the body before the exchange completes);
    None for any other request and for a Fragment without both."""
    if not is_bits_method(request.method):
        return None
    h = request.headers
    fields = _request_fields_of(request, h)
    range_raw = h.by_name.get(_CONTENT_RANGE)
    if fields.packet_type is not PacketType.FRAGMENT or not fields.session_id or range_raw is None:
        return None
    rng = _content_range(range_raw)
    return (fields.session_id, rng) if rng is not None else None


def _download(exchange: Any, method: str, user_agent: str, h: Headers) -> Download:
    request, response = exchange.request, exchange.response
    peers = _connection_peers(exchange.connection)
    return Download(
        exchange=exchange.index, connection=exchange.connection.id, client=peers.client,
        client_ip=peers.client_ip, server=peers.server, method=method, target=request.target,
        host=h.get(Header.HOST), user_agent=user_agent,
        status=response.status if response else None,
        bytes=response.body_length if response else 0,
        range=h.get("Range"), frame=request.first_frame, sent_ns=request.first_ts_ns,
        capture=request.first_capture,
    )


def _packet(exchange: Any, h: Headers) -> BitsPacket:
    request, response = exchange.request, exchange.response
    by_name = h.by_name
    range_raw = by_name.get(_CONTENT_RANGE)
    length_raw = by_name.get(_CONTENT_LENGTH)
    body_length = request.body_length
    content_length = _decimal(length_raw) if length_raw is not None else None
    if content_length == body_length:
        content_length = body_length  # one int object for both
    pkt = BitsPacket(
        exchange.index, exchange.connection.id, _connection_peers(exchange.connection), _request_fields_of(request, h),
        _content_range(range_raw) if range_raw is not None else None,
        content_length, body_length,
        bytes.fromhex(request.body_sha256) if request.body_sha256 is not None else None,
        request.first_frame, request.last_frame, request.stream_offset, request.first_ts_ns,
        frozenset(exchange.flags) if exchange.flags else NO_FLAGS,
        request.first_capture, request.last_capture,
    )
    ack = response.headers if response is not None else None
    if ack is not None:
        _read_ack(pkt, response, ack)
    _check_request(pkt, h, range_raw, length_raw)
    basic = _basic_credentials(request, h)
    if basic is not None:
        pkt.flag("basic-auth-cleartext", basic)
    if ack is not None:
        _check_ack(pkt, response, ack)
    _check_capture(pkt, exchange)
    return pkt


def _read_ack(pkt: BitsPacket, response: Any, h: Headers) -> None:
    pkt.status = response.status
    pkt.reason = _shared(response.reason)
    pkt.response_frame = response.first_frame
    pkt.response_capture = response.first_capture
    pkt.acked_ns = response.first_ts_ns
    by_name = h.by_name
    pkt.ack = _ack_fields(tuple(map(by_name.get, _ACK_KEYS)))
    received = by_name.get(_RECEIVED_CONTENT_RANGE)
    pkt.received_offset = _decimal(received) if received is not None else None


NO_FLAGS: frozenset[str] = frozenset()  # shared: an empty frozenset costs 216 bytes a packet


def _shared(value: str | None) -> str | None:
    """One copy of each repeated header value."""
    return sys.intern(value) if value is not None else None


# --- request checks ---------------------------------------------------------------------------

# (name, the name lowercased as Headers.by_name keys it)
_REQUIRED: dict[PacketType, tuple[tuple[str, str], ...]] = {
    kind: tuple((name, name.lower()) for name in names) for kind, names in {
        PacketType.PING: (Header.CONTENT_LENGTH,),
        PacketType.CREATE_SESSION: (Header.SUPPORTED_PROTOCOLS, Header.CONTENT_LENGTH),
        PacketType.FRAGMENT: (Header.SESSION_ID, Header.CONTENT_RANGE, Header.CONTENT_LENGTH),
        PacketType.CLOSE_SESSION: (Header.SESSION_ID, Header.CONTENT_LENGTH),
        PacketType.CANCEL_SESSION: (Header.SESSION_ID, Header.CONTENT_LENGTH),
    }.items()
}
_CREDENTIALS = tuple((name, name.lower()) for name in ("Authorization", "Proxy-Authorization"))


def _check_request(pkt: BitsPacket, h: Headers, range_raw: str | None, length_raw: str | None) -> None:
    fields = pkt.request
    kind = fields.packet_type
    if fields.version != "HTTP/1.1" and fields.version.upper() != "HTTP/1.1":
        pkt.flag("wrong-method-or-version", f"{fields.method} sent as {fields.version or 'an unknown version'}; BITS requires HTTP/1.1")
    if kind is None or kind is PacketType.ACK:
        what = "no BITS-Packet-Type header" if fields.type_raw is None else f"BITS-Packet-Type {fields.type_raw!r} is not a request type"
        pkt.flag("unknown-packet-type", f"{p.METHOD} with {what}")
        return
    by_name = h.by_name
    missing = [name for name, key in _REQUIRED[kind] if key not in by_name]
    if missing:
        pkt.flag("missing-header", f"{kind.value} lacks {', '.join(missing)}")
    if length_raw is not None and pkt.content_length is None:
        pkt.flag("length-mismatch", f"Content-Length {length_raw!r} is not a decimal length")
    if kind is PacketType.FRAGMENT:
        _check_fragment(pkt, h, range_raw)
    elif kind in p.BODYLESS_PACKETS and (pkt.body_length or pkt.content_length):
        pkt.flag("unexpected-body", f"{kind.value} carries a body "
                 f"(Content-Length {length_raw}, {pkt.body_length} body bytes)")
    _check_limits(pkt, h)
    if kind is PacketType.CREATE_SESSION:
        odd = [g for g in fields.offered_protocols if not p.is_guid(g)]
        if odd:
            pkt.flag("nonstandard-id", f"offered protocol id(s) {', '.join(odd)} not in {{8-4-4-4-12}} form")


def _check_fragment(pkt: BitsPacket, h: Headers, range_raw: str | None) -> None:
    rng, content_length = pkt.content_range, pkt.content_length
    if range_raw is not None and rng is None:
        pkt.flag("range-malformed", f"Content-Range {range_raw!r} is not `bytes S-E/T` with S <= E < T")
    if rng is not None and content_length is not None and content_length != rng.length:
        pkt.flag("length-mismatch", f"Content-Length {content_length} but {rng} holds {rng.length} bytes")
    if (content_length is not None and pkt.body_length != content_length
            and "partial" not in pkt.flags and "gap" not in pkt.flags):
        pkt.flag("length-mismatch", f"body of {pkt.body_length} bytes but Content-Length {content_length}")
    encoding = h.by_name.get(_CONTENT_ENCODING)
    if encoding is not None and encoding.strip().lower() != "identity":
        pkt.flag("content-encoding", f"fragment sent with Content-Encoding {encoding!r}; only identity is allowed")


def _check_limits(pkt: BitsPacket, h: Headers) -> None:
    for name, value in h:
        if len(value) > p.MAX_HEADER_VALUE:
            pkt.flag("header-limits", f"{name} value of {len(value)} characters exceeds {p.MAX_HEADER_VALUE}")
    fields = pkt.request
    name = fields.content_name
    if name is not None:
        if len(name) > p.MAX_CONTENT_NAME:
            pkt.flag("header-limits", f"Content-Name of {len(name)} characters exceeds {p.MAX_CONTENT_NAME}")
        if not p.CONTENT_NAME_FORBIDDEN.isdisjoint(name):
            bad = sorted(set(name) & p.CONTENT_NAME_FORBIDDEN)
            pkt.flag("header-limits", f"Content-Name {name[:80]!r} contains forbidden {''.join(bad)!r}")
    if fields.session_id is not None and len(fields.session_id) > p.MAX_SESSION_ID:
        pkt.flag("header-limits", f"BITS-Session-Id of {len(fields.session_id)} characters exceeds {p.MAX_SESSION_ID}")
    if len(fields.offered_protocols) > p.MAX_SUPPORTED_PROTOCOLS:
        pkt.flag("header-limits", f"{len(fields.offered_protocols)} protocol GUIDs offered; Windows parses at most {p.MAX_SUPPORTED_PROTOCOLS}")


def _basic_credentials(request: Any, h: Headers) -> str | None:
    """A message when the request carries Basic credentials (plain HTTP: we could read them)."""
    for header, key in _CREDENTIALS:
        value = h.by_name.get(key)
        if value is not None and is_basic(value):
            return f"{header}: Basic credentials sent in clear text on {request.method} {request.target}"
    return None


def _check_capture(pkt: BitsPacket, exchange: Any) -> None:
    if exchange.response is None or "no-response" in exchange.flags:
        pkt.flag("no-response", f"{pkt.label} got no ack in the capture")
    if "gap" in exchange.flags:  # "partial" alone is a cut connection, not a capture gap
        pkt.flag("capture-gap", f"{pkt.label}: bytes of the exchange are missing from the capture")


# --- ack checks -------------------------------------------------------------------------------

def _check_ack(pkt: BitsPacket, response: Any, h: Headers) -> None:
    status, ack, fields = pkt.status, pkt.ack, pkt.request
    is_bits_ack = status in SUCCESS or status == RESYNC or _has_bits_headers(h)
    if is_bits_ack and PacketType.parse(ack.type_raw) is not PacketType.ACK:
        got = "no BITS-Packet-Type" if ack.type_raw is None else f"BITS-Packet-Type {ack.type_raw!r}"
        pkt.flag("ack-malformed", f"HTTP {status} answer to {pkt.label} has {got}, not Ack")
    if is_bits_ack and response.body_length:
        pkt.flag("ack-malformed", f"HTTP {status} answer to {pkt.label} carries a {response.body_length}-byte body")
    if (ack.session_id is not None and fields.session_id is not None
            and not p.same_id(ack.session_id, fields.session_id)):
        pkt.flag("ack-session-mismatch", f"ack carries BITS-Session-Id {ack.session_id} for a request of {fields.session_id}")
    _check_errors(pkt, h)
    if fields.packet_type is PacketType.CREATE_SESSION:
        _check_create_ack(pkt)
    elif fields.packet_type is PacketType.FRAGMENT:
        _check_fragment_ack(pkt, h)
    if ack.reply_url is not None and not pkt.is_final_ack:
        pkt.flag("reply-url-misplaced", f"BITS-Reply-URL {ack.reply_url[:120]!r} on the ack of {pkt.label}, which does not complete the entity")
    for name, value, limit in ((Header.REPLY_URL, ack.reply_url, p.MAX_REPLY_URL), (Header.HOST_ID, ack.host_id, p.MAX_HOST_ID)):
        if value is not None and len(value) > limit:
            pkt.flag("header-limits", f"{name} of {len(value)} characters exceeds {limit}")
    if ack.fallback_timeout_s is not None and ack.host_id is None:
        pkt.flag("host-id-ignored", f"BITS-Host-Id-Fallback-Timeout {ack.fallback_timeout_s} given without a BITS-Host-Id")
    if status in AUTH_CHALLENGES:
        pkt.flag("auth-challenge", f"HTTP {status} {pkt.reason or ''} challenge to {pkt.label}".replace("  ", " "))
    elif status == TOO_LARGE_STATUS or ack.error_code == p.BG_E_TOO_LARGE.code:
        size = f" ({pkt.content_range.length} bytes)" if pkt.content_range else ""
        pkt.flag("fragment-too-large", f"HTTP {status} to {pkt.label}{size}: too large for the server")
    elif status == RESYNC:
        pkt.flag("out-of-sync", f"416 to {pkt.label}: the server wants offset {pkt.received_offset}")


_ERROR_CODE, _ERROR_CODE_MCBUP, _ERROR_CONTEXT = (
    Header.ERROR_CODE.lower(), Header.ERROR_CODE_MCBUP.lower(), Header.ERROR_CONTEXT.lower())


def _check_errors(pkt: BitsPacket, h: Headers) -> None:
    status = pkt.status or 0
    ack = pkt.ack
    by_name = h.by_name
    header_name, code_raw = Header.ERROR_CODE, by_name.get(_ERROR_CODE)
    if code_raw is None:
        header_name, code_raw = Header.ERROR_CODE_MCBUP, by_name.get(_ERROR_CODE_MCBUP)
    context_raw = by_name.get(_ERROR_CONTEXT)
    if code_raw is not None and ack.error_code is None:
        pkt.flag("error-header-misuse", f"{header_name} {code_raw!r} is not a hex HRESULT")
    if context_raw is not None and ack.error_context is None:
        pkt.flag("error-header-misuse", f"BITS-Error-Context {context_raw!r} is not hex")
    if status in SUCCESS and (code_raw is not None or context_raw is not None):
        pkt.flag("error-header-misuse", f"HTTP {status} success ack carries BITS error headers "
                 f"({header_name} {code_raw!r}, BITS-Error-Context {context_raw!r})")
    if context_raw is not None and code_raw is None:
        pkt.flag("error-header-misuse", f"BITS-Error-Context {context_raw} without an error code")
    if ack.error_context is not None and ack.error_context not in p.WIRE_ERROR_CONTEXTS:
        pkt.flag("error-header-misuse", f"BITS-Error-Context 0x{ack.error_context:X} is neither 0x5 (remote file) nor 0x7 (remote application)")
    if status in SUCCESS or status == RESYNC or status in AUTH_CHALLENGES or status == TOO_LARGE_STATUS:
        return
    failed = status >= 400
    if not failed and not ack.error_code:
        return
    if ack.error_code:
        h_result = p.describe_hresult(ack.error_code)
        detail = f"{h_result}: {h_result.meaning}"
        if ack.error_context is not None:
            detail += f", context 0x{ack.error_context:X}"
    else:
        detail = "no BITS error code"
    severity = Severity.ERROR if failed else Severity.WARNING
    pkt.flag("error-response", f"HTTP {status} {pkt.reason or ''} to {pkt.label} ({detail})".replace("  ", " "),
             severity=severity)


def _check_create_ack(pkt: BitsPacket) -> None:
    if pkt.succeeded:
        if pkt.ack_session_id is None:
            pkt.flag("missing-header", f"successful Create-Session ack lacks {Header.SESSION_ID}")
        elif not p.is_guid(pkt.ack_session_id):
            pkt.flag("nonstandard-id", f"session id {pkt.ack_session_id[:120]!r} not in {{8-4-4-4-12}} form")
        if pkt.protocol is None:
            pkt.flag("protocol-mismatch", f"successful Create-Session ack lacks {Header.PROTOCOL}")
        else:
            if not any(p.same_id(pkt.protocol, g) for g in pkt.offered_protocols):
                offered = " ".join(pkt.offered_protocols) or "nothing"
                pkt.flag("protocol-mismatch", f"server chose {pkt.protocol} but the client offered {offered}")
            if not p.is_guid(pkt.protocol):
                pkt.flag("nonstandard-id", f"chosen protocol {pkt.protocol!r} not in {{8-4-4-4-12}} form")
    elif pkt.protocol is not None:
        pkt.flag("protocol-mismatch", f"BITS-Protocol {pkt.protocol} on a failed (HTTP {pkt.status}) Create-Session ack")


def _check_fragment_ack(pkt: BitsPacket, h: Headers) -> None:
    if pkt.status not in SUCCESS and pkt.status != RESYNC:
        return
    raw = h.by_name.get(_RECEIVED_CONTENT_RANGE)
    rng = pkt.content_range
    if pkt.received_offset is None:
        what = "no BITS-Received-Content-Range" if raw is None else f"BITS-Received-Content-Range {raw!r} (not decimal)"
        pkt.flag("ack-offset-invalid", f"HTTP {pkt.status} ack to {pkt.label} with {what}")
        return
    if rng is None:
        return
    if pkt.received_offset > rng.total:
        pkt.flag("ack-offset-invalid", f"received offset {pkt.received_offset} exceeds TOTAL {rng.total} of {pkt.label}")
    elif pkt.status in SUCCESS and pkt.received_offset != rng.last + 1:
        pkt.flag("ack-offset-mismatch", f"200 ack to {pkt.label} says offset {pkt.received_offset}, expected {rng.last + 1}")
