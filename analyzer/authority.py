"""The authority of an HTTP URL or Host header (RFC 3986 3.2.2, RFC 9110 7.2): a host, IPv6
literals in brackets, and a port left out when it is the scheme's default.

One rule for every place that writes or reads one: the client's and the replayer's Host header,
the server's URL, the `ip:port` endpoints of the reports.
"""

from __future__ import annotations

import functools

#: The port an authority leaves out, per URL scheme.
DEFAULT_PORTS = {"http": 80, "https": 443}


def bracketed(host: str) -> str:
    """`host`, in brackets when it is an IPv6 literal (it holds a colon)."""
    return f"[{host}]" if ":" in host else host


def format_authority(host: str, port: int, default_port: int | None = None) -> str:
    """`host:port`, IPv6 in brackets (`[::1]:8080`); the port left out when it is
    `default_port`."""
    host = bracketed(host)
    return host if port == default_port else f"{host}:{port}"


def url_authority(scheme: str, host: str, port: int) -> str:
    """The authority of a `scheme://` URL: the scheme's default port left out."""
    return format_authority(host, port, DEFAULT_PORTS.get(scheme))


@functools.lru_cache(maxsize=4096)  # a capture repeats its few Host values
def host_name(host: str | None) -> str | None:
    """The host of a Host header value, without the port and IPv6 brackets, lowercased."""
    if not host:
        return None
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host
