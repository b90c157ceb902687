"""What a replay is asked to do: the target to send to, the mode, pacing and limits."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from bitstrace.analyzer.authority import DEFAULT_PORTS, url_authority

MODES = ("faithful", "adaptive")


class TargetError(ValueError):
    """The --target URL cannot be used."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    prefix: str  # path prefix, without a trailing slash ("" for none)

    @classmethod
    def parse(cls, url: str) -> "Target":
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:  # "[::1" (unclosed bracket), a port out of 0..65535, not a number
            raise TargetError(f"--target {url!r} is not a usable URL: {exc}") from None
        if parts.scheme not in DEFAULT_PORTS:
            raise TargetError(f"--target must be an http:// or https:// URL, not {url!r}")
        if not parts.hostname:
            raise TargetError(f"--target {url!r} names no host")
        if port == 0:
            raise TargetError(f"--target {url!r}: port 0 cannot be connected to (1-65535)")
        if port is None:
            port = DEFAULT_PORTS[parts.scheme]
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def netloc(self) -> str:
        return url_authority(self.scheme, self.host, self.port)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.prefix}"

    def path_for(self, captured_target: str, strip_prefix: str = "") -> str:
        """The live request target: the captured path (absolute form reduced to origin form),
        less `strip_prefix`, under the target's own prefix."""
        parts = urlsplit(captured_target)
        path = parts.path if parts.scheme else captured_target.split("?", 1)[0]
        query = parts.query if parts.scheme else (captured_target.split("?", 1)[1]
                                                  if "?" in captured_target else "")
        if strip_prefix and path.startswith(strip_prefix.rstrip("/")):
            path = path[len(strip_prefix.rstrip("/")):]
        if not path.startswith("/"):
            path = "/" + path
        return self.prefix + path + (f"?{query}" if query else "")


@dataclass
class Options:
    target: Target
    mode: str = "faithful"
    speed: float = 1.0  # 1 = the capture's own gaps, 2 = twice as fast, 0 = no waiting
    concurrency: int | None = None  # sessions in flight at once; None = as in the capture
    timeout: float = 30.0  # seconds to wait for the server at any one step
    auth: tuple[str, str] | None = None
    follow_host_id: bool = False
    strip_prefix: str = ""
    verify_tls: bool = True
    tls_keylog: str | None = None  # https: append the TLS secrets here (NSS key log format)
