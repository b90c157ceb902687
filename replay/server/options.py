"""bits-server's options: one frozen record, checked once; every field is a command-line option."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bitstrace.analyzer.bits.protocol import (
    DEFAULT_SESSION_TIMEOUT,
    MAX_FRAGMENT,
    MAX_HOST_ID,
    MAX_UPLOAD_SIZE,
    Header,
)

ERROR_HEADERS = {"win32": Header.ERROR_CODE, "mcbup": Header.ERROR_CODE_MCBUP}

#: Live sessions the server holds at most, and one client address at most. A BITS client keeps
#: one session per upload job, so a thousand from one address is a flood, not an office behind
#: one NAT address; the server-wide figure bounds the directories kept for the session timeout.
DEFAULT_MAX_SESSIONS = 10_000
DEFAULT_MAX_SESSIONS_PER_CLIENT = 1_000


@dataclass(frozen=True)
class ServerOptions:
    """Where [MC-BUP] and Windows differ, the IIS behaviour is the default."""

    overlap: Literal["trim", "reject"] = "trim"  # trim: keep only new bytes, 200 (IIS); reject: 416
    overwrite: bool = True  # False: an existing destination is refused with exists_status
    exists_status: Literal[409, 403] = 409  # 409 (Win32 Ack page) or 403 (MC-BUP)
    create_status: Literal[200, 201] = 200
    error_header: Literal["win32", "mcbup"] = "win32"  # BITS-Error-Code or BITS-Error
    max_upload_size: int = MAX_UPLOAD_SIZE
    max_fragment_size: int = MAX_FRAGMENT
    session_timeout: float = DEFAULT_SESSION_TIMEOUT
    host_id: str | None = None
    host_id_fallback_timeout: int | None = None
    reply: bool = False  # upload-reply: a JSON receipt served at BITS-Reply-URL
    auth: tuple[str, str] | None = None  # Basic credentials required on every request
    idle_timeout: float = 60.0  # seconds without a byte from the client
    request_timeout: float = 600.0  # seconds for one request, from its first byte to its answer
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_sessions_per_client: int = DEFAULT_MAX_SESSIONS_PER_CLIENT
    # None: as many as the descriptor limit leaves room for (lifecycle.connection_cap)
    max_connections: int | None = None
    tls_cert: str | None = None  # PEM certificate (chain) file: serve HTTPS
    tls_key: str | None = None  # PEM private key file of tls_cert
    tls_self_signed: bool = False  # serve HTTPS with a fresh self-signed certificate
    tls_keylog: str | None = None  # append the TLS secrets in NSS key log format to this file

    def __post_init__(self) -> None:
        if self.overlap not in ("trim", "reject"):
            raise ValueError("overlap must be 'trim' or 'reject'")
        if self.exists_status not in (409, 403) or self.create_status not in (200, 201):
            raise ValueError("exists_status must be 409/403 and create_status 200/201")
        if self.error_header not in ERROR_HEADERS:
            raise ValueError("error_header must be 'win32' or 'mcbup'")
        if min(self.session_timeout, self.idle_timeout, self.request_timeout) <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_upload_size < 1 or self.max_fragment_size < 1:
            raise ValueError("size limits must be positive")
        if min(self.max_sessions, self.max_sessions_per_client, self.max_connections or 1) < 1:
            raise ValueError("session and connection limits must be positive")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_self_signed and self.tls_cert is not None:
            raise ValueError("tls_self_signed or tls_cert/tls_key, not both")
        if self.tls_keylog is not None and not self.tls:
            raise ValueError("tls_keylog needs tls_cert/tls_key or tls_self_signed")
        if self.host_id_fallback_timeout is not None and self.host_id is None:
            raise ValueError("host_id_fallback_timeout needs host_id")
        if self.host_id is not None and not 0 < len(self.host_id) <= MAX_HOST_ID:
            raise ValueError(f"host_id must be 1-{MAX_HOST_ID} characters")

    @property
    def tls(self) -> bool:
        return self.tls_self_signed or self.tls_cert is not None
