"""HTTP Basic credentials (RFC 7617): the Authorization value a client sends, and the check a
server makes of it. Written once for the client, the replayer, the server and the analyzer."""

from __future__ import annotations

import base64
import binascii
import hmac

AUTHORIZATION = "Authorization"
BASIC = "basic"


def auth_scheme(value: str) -> str:
    """The scheme of an Authorization value, lowercased (`basic`, `ntlm`, ...); "" for none."""
    words = value.split(None, 1)
    return words[0].lower() if words else ""


def is_basic(value: str) -> bool:
    """The Authorization value carries Basic credentials (readable by anyone on plain HTTP)."""
    return auth_scheme(value) == BASIC


def basic_authorization(user: str, password: str) -> str:
    """The Authorization value for `user` and `password` (UTF-8, RFC 7617 2.1)."""
    token = base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")
    return f"Basic {token}"


def basic_credentials(value: str) -> bytes | None:
    """The `user:password` bytes a Basic Authorization value carries; None when the value is
    another scheme or its token is not valid base64."""
    if not is_basic(value):
        return None
    words = value.split(None, 1)
    token = words[1].strip() if len(words) > 1 else ""
    try:
        return base64.b64decode(token, validate=True)
    except (binascii.Error, ValueError):
        return None


def credentials_match(value: str | None, user: str, password: str) -> bool:
    """`value` (an Authorization header, or None) carries exactly these Basic credentials;
    compared in constant time."""
    given = basic_credentials(value) if value is not None else None
    expected = f"{user}:{password}".encode("utf-8")
    return given is not None and hmac.compare_digest(given, expected)
