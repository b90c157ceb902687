"""TLS between TCP and HTTP: record streams in, decrypted application data out (sans-I/O).

A `TlsConnection` is made for a TCP connection whose first bytes are a TLS record (a
ClientHello, whatever the port). Its two `TlsDirection`s stand where the HTTP parsers stand
for a plain connection and answer the same calls (`feed`, `gap`, `eof`, `position`...): each
reassembles its direction's records (a record may span many segments, a segment many records),
follows the handshake far enough to know the version, cipher suite, both randoms, SNI and
resumption, and once the keys are known hands the decrypted application data to the HTTP
parser it wraps. So HTTP offsets count in the decrypted stream (the bytes tshark's
`follow,tls` shows) and each piece of plaintext names the frame that completed its record,
as tshark does.

Keys come from `TlsKeys`: NSS key log lines (a key log file, SSLKEYLOGFILE, a pcapng
Decryption Secrets Block) and RSA private keys for TLS 1.2 RSA key exchange. Records that need
keys not yet known wait (up to WAIT_LIMIT bytes a direction), so secrets that arrive later in
the capture still decrypt them. Every primitive is `cryptography`'s: AEAD, AES-CBC, HMAC, HKDF
(HKDF-Expand-Label) and the TLS 1.2 PRF on its HMAC, RSA.

Nothing is guessed: a record whose AEAD tag, MAC or padding does not verify is a Problem
(frame, stream, offset), and that direction decrypts nothing more. A capture gap in a record
stream ends decryption of that direction too (record boundaries and sequence numbers are lost).
"""

from __future__ import annotations

import re
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from bitstrace.analyzer.http import BodyChunk, Event, HttpParser
from bitstrace.analyzer.problems import Problem

# cryptography is imported where it is used, at the first TLS connection: a run over plain
# captures does not pay its import time and memory (about 10 MB).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

CHANGE_CIPHER_SPEC, ALERT, HANDSHAKE, APPLICATION_DATA = 20, 21, 22, 23
_CLIENT_HELLO, _SERVER_HELLO, _NEW_SESSION_TICKET = 1, 2, 4
_CLIENT_KEY_EXCHANGE, _FINISHED, _KEY_UPDATE = 16, 20, 24
_EXT_SNI, _EXT_ENCRYPT_THEN_MAC, _EXT_EXTENDED_MASTER_SECRET = 0, 22, 23
_EXT_SESSION_TICKET, _EXT_PRE_SHARED_KEY, _EXT_SUPPORTED_VERSIONS = 35, 41, 43
TLS12, TLS13 = 0x0303, 0x0304
#: SHA-256("HelloRetryRequest"): the ServerHello random of a HelloRetryRequest (RFC 8446 4.1.3).
HELLO_RETRY_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
#: TLS 1.3 records that may fail to verify under the application secret, when the handshake
#: secret is unknown, before the first that does (the encrypted handshake is a few records).
TRIAL_LIMIT = 16
#: Bytes of records a direction keeps while it waits for its keys.
WAIT_LIMIT = 8 << 20
_MAX_RECORD = (1 << 14) + 2048  # RFC 8446 5.2: the largest TLSCiphertext fragment
_HEADER = struct.Struct(">BHH")
VERSION_NAMES = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", TLS12: "TLS 1.2", TLS13: "TLS 1.3"}


class CipherSuite(NamedTuple):
    name: str
    cipher: Literal["gcm", "chacha", "cbc"]
    key_length: int
    mac: str | None  # CBC suites: the HMAC hash
    prf: str  # the PRF / HKDF hash
    rsa_key_exchange: bool = False


def _suites() -> dict[int, CipherSuite]:
    table: dict[int, CipherSuite] = {
        0x1301: CipherSuite("TLS_AES_128_GCM_SHA256", "gcm", 16, None, "sha256"),
        0x1302: CipherSuite("TLS_AES_256_GCM_SHA384", "gcm", 32, None, "sha384"),
        0x1303: CipherSuite("TLS_CHACHA20_POLY1305_SHA256", "chacha", 32, None, "sha256"),
    }
    # TLS 1.2: (code, key exchange, bulk cipher, MAC or AEAD hash)
    rows = [
        (0x009C, "RSA", "AES_128_GCM", "SHA256"), (0x009D, "RSA", "AES_256_GCM", "SHA384"),
        (0x009E, "DHE_RSA", "AES_128_GCM", "SHA256"), (0x009F, "DHE_RSA", "AES_256_GCM", "SHA384"),
        (0xC02B, "ECDHE_ECDSA", "AES_128_GCM", "SHA256"), (0xC02C, "ECDHE_ECDSA", "AES_256_GCM", "SHA384"),
        (0xC02F, "ECDHE_RSA", "AES_128_GCM", "SHA256"), (0xC030, "ECDHE_RSA", "AES_256_GCM", "SHA384"),
        (0xCCA8, "ECDHE_RSA", "CHACHA20_POLY1305", "SHA256"),
        (0xCCA9, "ECDHE_ECDSA", "CHACHA20_POLY1305", "SHA256"),
        (0xCCAA, "DHE_RSA", "CHACHA20_POLY1305", "SHA256"),
        (0x002F, "RSA", "AES_128_CBC", "SHA"), (0x0035, "RSA", "AES_256_CBC", "SHA"),
        (0x003C, "RSA", "AES_128_CBC", "SHA256"), (0x003D, "RSA", "AES_256_CBC", "SHA256"),
        (0x0033, "DHE_RSA", "AES_128_CBC", "SHA"), (0x0039, "DHE_RSA", "AES_256_CBC", "SHA"),
        (0x0067, "DHE_RSA", "AES_128_CBC", "SHA256"), (0x006B, "DHE_RSA", "AES_256_CBC", "SHA256"),
        (0xC009, "ECDHE_ECDSA", "AES_128_CBC", "SHA"), (0xC00A, "ECDHE_ECDSA", "AES_256_CBC", "SHA"),
        (0xC013, "ECDHE_RSA", "AES_128_CBC", "SHA"), (0xC014, "ECDHE_RSA", "AES_256_CBC", "SHA"),
        (0xC023, "ECDHE_ECDSA", "AES_128_CBC", "SHA256"), (0xC024, "ECDHE_ECDSA", "AES_256_CBC", "SHA384"),
        (0xC027, "ECDHE_RSA", "AES_128_CBC", "SHA256"), (0xC028, "ECDHE_RSA", "AES_256_CBC", "SHA384"),
    ]
    for code, exchange, bulk, digest in rows:
        kind: Literal["gcm", "chacha", "cbc"] = (
            "gcm" if bulk.endswith("GCM") else "chacha" if bulk.startswith("CHACHA") else "cbc")
        key_length = 32 if "256" in bulk or kind == "chacha" else 16
        prf = "sha384" if digest == "SHA384" else "sha256"
        mac = {"SHA": "sha1", "SHA256": "sha256", "SHA384": "sha384"}[digest] if kind == "cbc" else None
        table[code] = CipherSuite(f"TLS_{exchange}_WITH_{bulk}_{digest}", kind, key_length, mac, prf,
                                  exchange == "RSA")
    return table


CIPHER_SUITES = _suites()
_NO_SUITE = CipherSuite("", "gcm", 0, None, "sha256")
_DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48}


def _hash(name: str) -> hashes.HashAlgorithm:
    from cryptography.hazmat.primitives import hashes

    if name == "sha1":
        return hashes.SHA1()
    return hashes.SHA256() if name == "sha256" else hashes.SHA384()


# -- key derivation (RFC 8446 7.1, RFC 5246 5) ------------------------------------------------

def hkdf_expand_label(secret: bytes, label: str, context: bytes, length: int, digest: str) -> bytes:
    full = b"tls13 " + label.encode()
    info = struct.pack(">HB", length, len(full)) + full + bytes([len(context)]) + context
    from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

    return HKDFExpand(_hash(digest), length, info).derive(secret)


def tls12_prf(secret: bytes, label: bytes, seed: bytes, length: int, digest: str) -> bytes:
    """P_hash of RFC 5246 section 5 on cryptography's HMAC."""
    from cryptography.hazmat.primitives import hmac

    def mac(data: bytes) -> bytes:
        h = hmac.HMAC(secret, _hash(digest))
        h.update(data)
        return h.finalize()

    seed = label + seed
    out = bytearray()
    a = seed
    while len(out) < length:
        a = mac(a)
        out += mac(a + seed)
    return bytes(out[:length])


# -- keys -------------------------------------------------------------------------------------

# The key is the client random (64 hex digits), or for the label RSA the first 8 bytes of the
# encrypted premaster secret (16 hex digits), whose secret is then the premaster secret.
_KEYLOG_LINE = re.compile(r"([A-Z_0-9]+) ([0-9a-fA-F]{64}|[0-9a-fA-F]{16}) ([0-9a-fA-F]+)")


class TlsKeys:
    """Secrets by client random (NSS key log labels) and RSA private keys.

    `generation` grows with every secret added, so a direction waiting for keys looks again
    only when something new came."""

    def __init__(self) -> None:
        self.secrets: dict[bytes, dict[str, bytes]] = {}
        self.rsa_keys: list[rsa.RSAPrivateKey] = []
        self.generation = 0
        self.problems: list[Problem] = []
        self.sources: list[str] = []

    def add_keylog(self, text: str | bytes, source: str) -> int:
        """Add the lines of an NSS key log; returns how many secrets were read."""
        if isinstance(text, bytes):
            text = text.decode("ascii", "replace")
        added = bad = 0
        first_bad = None
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = _KEYLOG_LINE.fullmatch(line)
            if match is None:
                bad += 1
                first_bad = first_bad or number
                continue
            label, random, secret = match.groups()
            self.secrets.setdefault(bytes.fromhex(random), {})[label] = bytes.fromhex(secret)
            added += 1
        if bad:
            self.problems.append(Problem(
                "tls-keylog-line", f"{bad} line(s) are not 'LABEL CLIENT_RANDOM SECRET' "
                f"(first: line {first_bad}); they were skipped", file=source))
        if added:
            self.generation += 1
            self.sources.append(source)
        return added

    def add_rsa_key(self, pem: bytes, source: str) -> None:
        """Raises ValueError when `pem` holds no RSA private key."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as error:  # not PEM, or encrypted
            raise ValueError(f"{source}: cannot load a private key: {error}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"{source}: not an RSA private key")
        self.rsa_keys.append(key)
        self.generation += 1

    def get(self, client_random: bytes, label: str) -> bytes | None:
        return self.secrets.get(client_random, {}).get(label)


# -- record protection ------------------------------------------------------------------------

class _Undecryptable(Exception):
    """A record failed to verify: the message names why."""


class _Protection:
    """Decrypts one direction's records under one set of keys (sequence numbers from 0)."""

    def __init__(self, suite: CipherSuite, version: int, key: bytes, iv: bytes,
                 mac_key: bytes = b"", encrypt_then_mac: bool = False) -> None:
        self.suite = suite
        self.version = version
        self.seq = 0
        self.key = key
        self.iv = iv
        self.mac_key = mac_key
        self.encrypt_then_mac = encrypt_then_mac
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

        self._invalid_tag = InvalidTag
        self.aead: AESGCM | ChaCha20Poly1305 | None = (
            AESGCM(key) if suite.cipher == "gcm" else ChaCha20Poly1305(key) if suite.cipher == "chacha" else None)
        self._iv_int = int.from_bytes(iv, "big") if suite.cipher == "chacha" or version == TLS13 else 0

    def decrypt(self, ctype: int, version: int, fragment: bytes | memoryview) -> tuple[int, bytes | memoryview]:
        """(content type, plaintext) of one record."""
        seq = self.seq
        InvalidTag = self._invalid_tag
        self.seq += 1
        if self.version == TLS13:
            nonce = (self._iv_int ^ seq).to_bytes(12, "big")
            header = _HEADER.pack(ctype, version, len(fragment))
            assert self.aead is not None
            try:
                inner = self.aead.decrypt(nonce, fragment, header)
            except InvalidTag:
                raise _Undecryptable("AEAD tag does not verify") from None
            end = len(inner)
            while end and inner[end - 1] == 0:
                end -= 1
            if not end:
                raise _Undecryptable("decrypted record has no content type")
            return inner[end - 1], memoryview(inner)[:end - 1]
        if self.suite.cipher == "cbc":
            return ctype, self._cbc(seq, ctype, version, bytes(fragment))
        assert self.aead is not None
        if self.suite.cipher == "gcm":
            if len(fragment) < 24:
                raise _Undecryptable("record too short for AES-GCM")
            nonce = self.iv + bytes(fragment[:8])
            body = fragment[8:]
        else:
            nonce = (self._iv_int ^ seq).to_bytes(12, "big")
            body = fragment
        aad = struct.pack(">QBHH", seq, ctype, version, len(body) - 16)
        try:
            return ctype, self.aead.decrypt(nonce, body, aad)
        except InvalidTag:
            raise _Undecryptable("AEAD tag does not verify") from None

    def _cbc(self, seq: int, ctype: int, version: int, fragment: bytes) -> bytes:
        assert self.suite.mac is not None
        mac_length = _DIGEST_SIZES[self.suite.mac]
        if self.encrypt_then_mac:
            if len(fragment) < 32 + mac_length or (len(fragment) - mac_length) % 16:
                raise _Undecryptable("record length impossible for AES-CBC with encrypt-then-MAC")
            sealed, tag = fragment[:-mac_length], fragment[-mac_length:]
            self._verify(tag, seq, ctype, version, sealed)
            plain = self._cbc_decrypt(sealed)
            return self._unpad(plain)
        if len(fragment) < 32 or len(fragment) % 16:
            raise _Undecryptable("record length impossible for AES-CBC")
        content = self._unpad(self._cbc_decrypt(fragment))
        if len(content) < mac_length:
            raise _Undecryptable("record shorter than its MAC")
        data, tag = content[:-mac_length], content[-mac_length:]
        self._verify(tag, seq, ctype, version, data)
        return data

    def _cbc_decrypt(self, sealed: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        decryptor = Cipher(algorithms.AES(self.key), modes.CBC(sealed[:16])).decryptor()
        return decryptor.update(sealed[16:]) + decryptor.finalize()

    @staticmethod
    def _unpad(plain: bytes) -> bytes:
        pad = plain[-1]
        if pad + 1 > len(plain) or plain[-pad - 1:] != bytes([pad]) * (pad + 1):
            raise _Undecryptable("CBC padding does not verify")
        return plain[:-pad - 1]

    def _verify(self, tag: bytes, seq: int, ctype: int, version: int, data: bytes) -> None:
        assert self.suite.mac is not None
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hmac

        h = hmac.HMAC(self.mac_key, _hash(self.suite.mac))
        h.update(struct.pack(">QBHH", seq, ctype, version, len(data)) + data)
        try:
            h.verify(tag)
        except InvalidSignature:
            raise _Undecryptable("record MAC does not verify") from None


def _tls13_protection(suite: CipherSuite, secret: bytes) -> _Protection:
    key = hkdf_expand_label(secret, "key", b"", suite.key_length, suite.prf)
    iv = hkdf_expand_label(secret, "iv", b"", 12, suite.prf)
    return _Protection(suite, TLS13, key, iv)


def _next_secret(suite: CipherSuite, secret: bytes) -> bytes:
    return hkdf_expand_label(secret, "traffic upd", b"", _DIGEST_SIZES[suite.prf], suite.prf)


# -- handshake reading ------------------------------------------------------------------------

class _Reader:
    """Bounds-checked reads of a handshake message; IndexError when it runs out."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise IndexError("handshake message too short")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int) -> bytes:
        return self.take(self.number(length_size))

    def extensions(self) -> dict[int, bytes]:
        if self.pos >= len(self.data):
            return {}
        block = _Reader(self.vector(2))
        found = {}
        while block.pos < len(block.data):
            kind = block.number(2)
            found[kind] = block.vector(2)
        return found


def _server_name(extension: bytes) -> str | None:
    names = _Reader(extension)
    listing = _Reader(names.vector(2))
    while listing.pos < len(listing.data):
        kind = listing.number(1)
        name = listing.vector(2)
        if kind == 0:
            return name.decode("ascii", "replace")
    return None


# -- the connection ---------------------------------------------------------------------------

@dataclass
class TlsFacts:
    """What the report says of one TLS connection."""

    connection: int
    client: tuple[bytes, int]
    server: tuple[bytes, int]
    first_frame: int  # as the pipeline numbers frames (capture index in the high bits)
    version: int | None = None
    cipher_suite: int | None = None
    sni: str | None = None
    resumed: str | None = None  # "session-id", "ticket", "psk" or None
    hello_retry: bool = False
    encrypt_then_mac: bool = False  # TLS 1.2 CBC suites: RFC 7366 negotiated
    client_random: bytes | None = None
    decrypted: bool = False
    reason: str | None = None  # why not decrypted
    records: list[int] = field(default_factory=lambda: [0, 0])  # records per direction
    decrypted_bytes: list[int] = field(default_factory=lambda: [0, 0])

    @property
    def version_name(self) -> str | None:
        return None if self.version is None else VERSION_NAMES.get(self.version, f"0x{self.version:04x}")

    @property
    def suite_name(self) -> str | None:
        if self.cipher_suite is None:
            return None
        known = CIPHER_SUITES.get(self.cipher_suite)
        return known.name if known else f"0x{self.cipher_suite:04X}"


ProblemSink = Callable[[Problem], None]
PeerEvents = Callable[[int, list[Event]], None]


def looks_like_tls(data: bytes | memoryview) -> bool:
    """The first bytes of a direction are a TLS record header (content type 20-23, major
    version 3). No HTTP message begins with such bytes."""
    return len(data) >= 2 and 20 <= data[0] <= 23 and data[1] == 3


def is_client_hello(data: bytes | memoryview) -> bool:
    return len(data) >= 6 and data[0] == HANDSHAKE and data[1] == 3 and data[5] == _CLIENT_HELLO


class TlsConnection:
    """The TLS state of one TCP connection: the handshake both directions share, and keys."""

    def __init__(self, facts: TlsFacts, keys: TlsKeys, resumption: dict[bytes, bytes],
                 problems: ProblemSink, handshake_seen: bool) -> None:
        self.facts = facts
        self.keys = keys
        self._resumption = resumption  # session id / ticket -> TLS 1.2 master secret (RSA runs)
        self._problems = problems
        self.server_random: bytes | None = None
        self.session_id_offered = b""
        self.ticket_offered = False
        self.encrypt_then_mac = False
        self.extended_master_secret = False
        self.transcript = bytearray()  # TLS 1.2 handshake messages until ClientKeyExchange
        self.session_hash: bytes | None = None
        self.encrypted_premaster: bytes | None = None
        self.master_secret: bytes | None = None
        self.handshake_seen = handshake_seen
        self._offered_etm = self._offered_ems = False
        self._ticket = b""  # the session ticket the ClientHello offered
        self._session_id = b""  # the ServerHello's session id (TLS 1.2)
        #: Grows with every handshake message: a direction waiting for the ServerHello looks again.
        self.revision = 0
        self.directions: tuple[TlsDirection, TlsDirection] = ()  # type: ignore[assignment]  # set by attach
        self.peer_events: PeerEvents | None = None

    def release(self) -> None:
        """Records that waited for keys (from a secrets block later in the capture, or the
        other direction's handshake) are read in capture order across both directions, so
        each request still comes before its answer; their events go to `peer_events`."""
        if self.peer_events is None:
            return
        blocked: set[int] = set()
        while True:
            ready = [d for d in self.directions
                     if d._waiting and d.direction not in blocked and d.may_proceed()]
            if not ready:
                return
            side = min(ready, key=lambda d: (d._waiting[0].frame, d.direction))
            before = len(side._waiting)
            events = side.take_waiting()
            if len(side._waiting) == before and side._waiting:
                blocked.add(side.direction)
            if events:
                self.peer_events(side.direction, events)

    def attach(self, request: HttpParser, response: HttpParser) -> tuple[TlsDirection, TlsDirection]:
        self.directions = (TlsDirection(self, 0, request), TlsDirection(self, 1, response))
        return self.directions

    @property
    def suite(self) -> CipherSuite | None:
        return None if self.facts.cipher_suite is None else CIPHER_SUITES.get(self.facts.cipher_suite)

    def problem(self, kind: str, message: str, frame: int, offset: int | None) -> None:
        self._problems(Problem(kind, message, frame=frame, offset=offset, connection=self.facts.connection))

    def fail(self, reason: str) -> None:
        if self.facts.reason is None:
            self.facts.reason = reason

    # -- handshake messages --

    def handshake(self, direction: int, kind: int, message: bytes, frame: int, offset: int) -> None:
        self.revision += 1
        try:
            if kind == _CLIENT_HELLO and direction == 0:
                self._client_hello(message)
            elif kind == _SERVER_HELLO and direction == 1:
                self._server_hello(message)
            elif kind == _CLIENT_KEY_EXCHANGE and direction == 0 and self.suite and self.suite.rsa_key_exchange:
                self.encrypted_premaster = _Reader(message[4:]).vector(2)
            elif kind == _NEW_SESSION_TICKET and direction == 1 and self.facts.version == TLS12:
                self._remember_ticket(_Reader(message[4:]))
        except IndexError:
            self.problem("tls-handshake", f"handshake message type {kind} is too short", frame, offset)
        if self.facts.version != TLS13 and self.session_hash is None:
            self.transcript += message
            if kind == _CLIENT_KEY_EXCHANGE and self.suite is not None:
                from cryptography.hazmat.primitives import hashes

                digest = hashes.Hash(_hash(self.suite.prf))
                digest.update(bytes(self.transcript))
                self.session_hash = digest.finalize()
                self.transcript = bytearray()

    def _client_hello(self, message: bytes) -> None:
        hello = _Reader(message[4:])
        hello.take(2)
        self.facts.client_random = hello.take(32)
        self.session_id_offered = hello.vector(1)
        hello.vector(2)
        hello.vector(1)
        extensions = hello.extensions()
        if _EXT_SNI in extensions:
            self.facts.sni = _server_name(extensions[_EXT_SNI])
        self.ticket_offered = bool(extensions.get(_EXT_SESSION_TICKET))
        self._offered_etm = _EXT_ENCRYPT_THEN_MAC in extensions
        self._offered_ems = _EXT_EXTENDED_MASTER_SECRET in extensions
        self._ticket = extensions.get(_EXT_SESSION_TICKET, b"")
        self.transcript = bytearray()

    def _server_hello(self, message: bytes) -> None:
        hello = _Reader(message[4:])
        version = hello.number(2)
        random = hello.take(32)
        session_id = hello.vector(1)
        suite = hello.number(2)
        hello.take(1)
        extensions = hello.extensions()
        if _EXT_SUPPORTED_VERSIONS in extensions:
            version = int.from_bytes(extensions[_EXT_SUPPORTED_VERSIONS][:2], "big")
        self.facts.version = version
        self.facts.cipher_suite = suite
        if random == HELLO_RETRY_RANDOM:
            self.facts.hello_retry = True  # the real ServerHello follows the second ClientHello
            return
        self.server_random = random
        if version == TLS13:
            if _EXT_PRE_SHARED_KEY in extensions:
                self.facts.resumed = "psk"
        else:
            self.encrypt_then_mac = self._offered_etm and _EXT_ENCRYPT_THEN_MAC in extensions
            self.facts.encrypt_then_mac = self.encrypt_then_mac and CIPHER_SUITES.get(suite, _NO_SUITE).cipher == "cbc"
            self.extended_master_secret = self._offered_ems and _EXT_EXTENDED_MASTER_SECRET in extensions
            if session_id and session_id == self.session_id_offered:
                self.facts.resumed = "ticket" if self.ticket_offered else "session-id"
            self._session_id = session_id
        if CIPHER_SUITES.get(suite) is None:
            self.fail(f"cipher suite 0x{suite:04X} is not supported")
        elif version not in (TLS12, TLS13):
            self.fail(f"{VERSION_NAMES.get(version, hex(version))} is not supported")

    def _remember_ticket(self, body: _Reader) -> None:
        body.take(4)
        ticket = body.vector(2)
        master = self._master_secret(self.suite) if self.suite is not None and self.server_random else None
        if master is not None and ticket:
            self._resumption[b"T" + ticket] = master

    # -- keys --

    def protection(self, direction: int, phase: str) -> _Protection | None:
        """The keys of `direction` for `phase` ("handshake", "application": TLS 1.3; TLS 1.2
        has only "application"), or None while they are unknown."""
        suite, random = self.suite, self.facts.client_random
        if (suite is None or random is None or self.server_random is None
                or self.facts.version not in (TLS12, TLS13)):
            return None
        if self.facts.version == TLS13:
            side = "CLIENT" if direction == 0 else "SERVER"
            label = (f"{side}_HANDSHAKE_TRAFFIC_SECRET" if phase == "handshake" else f"{side}_TRAFFIC_SECRET_0")
            secret = self.keys.get(random, label)
            return None if secret is None else _tls13_protection(suite, secret)
        master = self._master_secret(suite)
        if master is None:
            return None
        mac_length = _DIGEST_SIZES[suite.mac] if suite.mac else 0
        iv_length = {"gcm": 4, "chacha": 12, "cbc": 16}[suite.cipher]
        block = tls12_prf(master, b"key expansion", self.server_random + random,
                          2 * (mac_length + suite.key_length + iv_length), suite.prf)
        macs = block[:mac_length], block[mac_length:2 * mac_length]
        at = 2 * mac_length
        keys = block[at:at + suite.key_length], block[at + suite.key_length:at + 2 * suite.key_length]
        at += 2 * suite.key_length
        ivs = block[at:at + iv_length], block[at + iv_length:at + 2 * iv_length]
        return _Protection(suite, TLS12, keys[direction], ivs[direction], macs[direction],
                           self.encrypt_then_mac and suite.cipher == "cbc")

    def _master_secret(self, suite: CipherSuite) -> bytes | None:
        if self.master_secret is not None:
            return self.master_secret
        assert self.facts.client_random is not None and self.server_random is not None
        master = self.keys.get(self.facts.client_random, "CLIENT_RANDOM")
        if master is None and self.facts.resumed:
            master = self._resumption.get(b"S" + self._session_id)
            if master is None and self._ticket:
                master = self._resumption.get(b"T" + self._ticket)
        if master is None and self.encrypted_premaster:
            logged = self.keys.get(self.encrypted_premaster[:8], "RSA")
            if logged is not None:
                master = self._master_from_premaster(logged, suite)
            elif self.keys.rsa_keys:
                master = self._rsa_master(suite)
        if master is not None:
            self.master_secret = master
            if self._session_id:
                self._resumption[b"S" + self._session_id] = master
        return master

    def _rsa_master(self, suite: CipherSuite) -> bytes | None:
        from cryptography.hazmat.primitives.asymmetric import padding

        assert self.encrypted_premaster is not None
        for key in self.keys.rsa_keys:
            try:
                premaster = key.decrypt(self.encrypted_premaster, padding.PKCS1v15())
            except ValueError:
                continue
            if len(premaster) == 48:
                return self._master_from_premaster(premaster, suite)
        return None

    def _master_from_premaster(self, premaster: bytes, suite: CipherSuite) -> bytes | None:
        assert self.facts.client_random is not None and self.server_random is not None
        if self.extended_master_secret:  # RFC 7627
            if self.session_hash is None:
                return None
            return tls12_prf(premaster, b"extended master secret", self.session_hash, 48, suite.prf)
        return tls12_prf(premaster, b"master secret", self.facts.client_random + self.server_random,
                         48, suite.prf)

    def missing_key_reason(self) -> str:
        """Why a direction waiting for keys never got them."""
        if self.facts.reason:
            return self.facts.reason
        if not self.handshake_seen or self.facts.client_random is None:
            return "the capture began after the TLS handshake (no ClientHello)"
        if self.server_random is None:
            return "no ServerHello was captured"
        suite = self.suite
        if self.facts.version == TLS12 and suite is not None and suite.rsa_key_exchange:
            if self.keys.rsa_keys:
                return "no key for their client random, and the RSA key given does not decrypt the premaster secret"
            return "no key for their client random (RSA key exchange: or give --tls-rsa-key PEM)"
        return "no key for their client random"

    def finish(self) -> None:
        """At the connection's end: decrypted means every protected record captured was read
        (a connection that never got past its handshake has nothing unseen)."""
        self.facts.decrypted = all(
            not d.stopped and not d.waiting_bytes and (not d.encrypted or d.protection is not None)
            and not (d._trial and d._trial_skips)  # nothing verified under the secret given
            for d in self.directions)
        if not self.facts.decrypted and self.facts.reason is None:
            self.facts.reason = self.missing_key_reason()


class _Record(NamedTuple):
    ctype: int
    version: int
    fragment: bytes | memoryview
    frame: int
    ts_ns: int
    offset: int  # stream offset of the record header


#: _Record(...) from one tuple, without the NamedTuple's Python-level __new__ (as http.py does).
_new_record: Callable[[tuple[int, int, bytes | memoryview, int, int, int]], _Record] = partial(tuple.__new__, _Record)


class TlsDirection:
    """One direction of a TLS connection, in the HTTP parser's place (see the module doc)."""

    def __init__(self, connection: TlsConnection, direction: int, http: HttpParser) -> None:
        self.connection = connection
        self.direction = direction
        self.http = http
        self._buffer = bytearray()
        self._buffer_offset = 0  # stream offset of _buffer[0]
        self._missing = 0  # bytes the record begun in _buffer still lacks (0: not known)
        self._first_frame = 0  # the frame that carried the first byte of _buffer
        self._handshake = bytearray()
        self.encrypted = False  # this direction has sent protected records
        self.protection: _Protection | None = None
        self.phase = "plain"  # "plain", "handshake", "application" (TLS 1.3), "stopped"
        self._waiting: deque[_Record] = deque()
        self.waiting_bytes = 0
        self.stopped = False
        self._events: list[Event] = []
        self._generation: tuple[int, int] = (-1, -1)  # keys and handshake when it began to wait
        self._trial = False  # TLS 1.3 without the handshake secret: see _keys
        self._trial_skips = 0
        self._secret: bytes | None = None  # TLS 1.3 traffic secret after a KeyUpdate

    # -- the HTTP parser's interface --

    @property
    def position(self) -> int:
        return self.http.position

    @property
    def in_message(self) -> bool:
        return self.http.in_message

    @property
    def message_start(self) -> int | None:
        return self.http.message_start

    @property
    def body_offset(self) -> int:
        return self.http.body_offset

    def expect_response_to(self, method: str) -> list[Event]:
        return self.http.expect_response_to(method)

    def release(self) -> list[Event]:
        return self.http.release()

    def feed_body(self, data: bytes | bytearray | memoryview, frame: int, ts_ns: int) -> bool:
        return False  # every byte goes through the record layer

    def feed(self, data: bytes | bytearray | memoryview, frame: int, ts_ns: int) -> list[Event]:
        size = len(data)
        if size < self._missing:  # the bulk of a record: only kept until it is whole
            self._buffer += data
            self._missing -= size
            return []
        if self.stopped:
            return []
        if self._waiting or self._peer._waiting:
            self.connection.release()
        events = self._events = []
        buffer = self._buffer
        if buffer:
            buffer += data
            view = memoryview(buffer)
        else:
            view = memoryview(data).cast("B")
            self._first_frame = frame
        pos, end = 0, len(view)
        header = _HEADER.unpack_from
        base = self._buffer_offset
        # Records are views of `view`: the buffer is never resized while they live (the rest
        # goes to a new buffer), and records kept waiting are copied (_wait).
        while end - pos >= 5:
            ctype, version, length = header(view, pos)
            if length > _MAX_RECORD or not 20 <= ctype <= 24:
                self._stop_framing(frame, base + pos, f"bytes that are not a TLS record "
                                   f"(type {ctype}, length {length})")
                pos = end
                break
            stop = pos + 5 + length
            if stop > end:
                break
            if ctype == APPLICATION_DATA and self.phase == "application" and self.protection is not None \
                    and not self._waiting:  # the bulk of a connection: straight to decryption
                self.connection.facts.records[self.direction] += 1
                self._decrypt(ctype, version, view[pos + 5:stop], frame, ts_ns, base + pos)
            else:
                self._record(_new_record((ctype, version, view[pos + 5:stop], frame, ts_ns, base + pos)))
            pos = stop
        self._buffer_offset = base + pos
        rest = end - pos
        if self.stopped or not rest:
            self._buffer = bytearray()
            self._missing = 0
            return events
        self._buffer = bytearray(view[pos:])
        self._missing = 5 + header(view, pos)[2] - rest if rest >= 5 else 0
        if pos:
            self._first_frame = frame
        return events

    def gap(self, size: int, frame: int, ts_ns: int) -> list[Event]:
        if self._waiting or self._peer._waiting:
            self.connection.release()
        events = self._events = []
        if not self.stopped:
            self.connection.problem("tls-gap", f"a {size}-byte capture gap cuts the TLS record stream: "
                                    "the rest of this direction cannot be decrypted", frame,
                                    self._buffer_offset + len(self._buffer))
            self.connection.fail("a capture gap cut the TLS record stream")
            self._stop()
        events.extend(self.http.gap(size, frame, ts_ns))
        return events

    def eof(self, frame: int, ts_ns: int, clean: bool = True) -> list[Event]:
        if self._waiting or self._peer._waiting:
            self.connection.release()
        events = self._events = []
        if self._buffer and not self.stopped:
            self.connection.problem(
                "tls-truncated-record", f"the stream ends inside a TLS record ({len(self._buffer)} bytes "
                "of it seen)", self._first_frame, self._buffer_offset)
            self._buffer = bytearray()
        events.extend(self.http.eof(frame, ts_ns, clean))
        return events

    # -- records --

    @property
    def _peer(self) -> TlsDirection:
        return self.connection.directions[1 - self.direction]

    def may_proceed(self) -> bool:
        """Something this direction's first waiting record waited for may have come."""
        return self.protection is not None or self._generation != self._readiness()

    def take_waiting(self) -> list[Event]:
        """Process the first waiting record (the caller knows there is one); its events."""
        record = self._waiting[0]
        self._events = []
        if self._process(record):
            if self._waiting and self._waiting[0] is record:
                self._waiting.popleft()
                self.waiting_bytes -= len(record.fragment)
        else:
            self._generation = self._readiness()
        events, self._events = self._events, []
        return events

    def _readiness(self) -> tuple[int, int]:
        return self.connection.keys.generation, self.connection.revision

    def _wait(self, record: _Record) -> None:
        self._generation = self._readiness()
        if not isinstance(record.fragment, bytes):  # a view of a buffer or capture chunk
            record = record._replace(fragment=bytes(record.fragment))
        if self.waiting_bytes + len(record.fragment) > WAIT_LIMIT:
            self.connection.fail(f"no keys came within the first {WAIT_LIMIT:,} bytes of encrypted records; "
                                 + self.connection.missing_key_reason())
            self._stop()
            return
        self._waiting.append(record)
        self.waiting_bytes += len(record.fragment)

    def _record(self, record: _Record) -> None:
        if self.stopped:
            return
        if self._waiting or not self._process(record):
            self._wait(record)

    def _process(self, record: _Record) -> bool:
        """Read one record; False when it needs keys not known yet (it is left untouched)."""
        if self.stopped:
            return True
        self.connection.facts.records[self.direction] += 1
        ctype = record.ctype
        connection = self.connection
        if self.phase == "plain":
            if ctype == HANDSHAKE:
                self._handshake_bytes(record.fragment, record.frame, record.offset)
                return True
            if ctype == CHANGE_CIPHER_SPEC:
                if connection.facts.version != TLS13:  # TLS 1.3: middlebox compatibility (RFC 8446 D.4)
                    self.phase = "application"
                    self.encrypted = True
                return True
            if ctype == ALERT:
                return True
            if ctype == APPLICATION_DATA and connection.facts.version == TLS13:
                self.phase = "handshake"
                self.encrypted = True
            elif ctype == APPLICATION_DATA and connection.facts.version is None:
                self.encrypted = True  # protected records before any ServerHello we saw
                self.phase = "handshake" if not connection.handshake_seen else "application"
            else:
                connection.problem("tls-record", f"unexpected TLS record type {ctype} before encryption",
                                   record.frame, record.offset)
                return True
        if self.protection is None:
            self.protection = self._keys()
            if self.protection is None:
                connection.facts.records[self.direction] -= 1
                return False
        self._decrypt(*record)
        return True

    def _keys(self) -> _Protection | None:
        connection = self.connection
        if connection.facts.version == TLS13 and self.phase == "handshake":
            protection = connection.protection(self.direction, "handshake")
            if protection is None:
                # Without the handshake secret the first record that verifies under the
                # application secret ends the handshake (the tag decides; nothing is guessed).
                application = connection.protection(self.direction, "application")
                if application is not None:
                    self._trial = True
                return application
            return protection
        return connection.protection(self.direction, "application")

    def _decrypt(self, record_type: int, version: int, fragment: bytes | memoryview, frame: int, ts_ns: int,
                 offset: int) -> None:
        protection = self.protection
        assert protection is not None
        connection = self.connection
        try:
            ctype, plain = protection.decrypt(record_type, version, fragment)
        except _Undecryptable as error:
            if self._trial and self.phase == "handshake" and self._trial_skips < TRIAL_LIMIT:
                protection.seq -= 1  # an encrypted handshake record: skipped
                self._trial_skips += 1
                return
            side = "client" if self.direction == 0 else "server"
            connection.problem("tls-decrypt", f"{side} TLS record does not decrypt: {error} (wrong key, "
                               "or the capture damaged it); this direction decrypts no further",
                               frame, offset)
            connection.fail(f"a record did not decrypt ({error}): wrong key or damaged capture")
            self._stop()
            return
        if self._trial and self.phase == "handshake":
            self._trial = False
            self.phase = "application"
        if ctype == APPLICATION_DATA:
            connection.facts.decrypted_bytes[self.direction] += len(plain)
            http = self.http
            if http.feed_body(plain, frame, ts_ns):
                self._events.append(BodyChunk(memoryview(plain), frame, ts_ns))
            else:
                self._events.extend(http.feed(plain, frame, ts_ns))
        elif ctype == HANDSHAKE:
            self._handshake_bytes(plain, frame, offset)

    def _handshake_bytes(self, data: bytes | memoryview, frame: int, offset: int) -> None:
        self._handshake += data
        buf = self._handshake
        while len(buf) >= 4:
            length = int.from_bytes(buf[1:4], "big")
            if len(buf) < 4 + length:
                break
            kind = buf[0]
            message = bytes(buf[:4 + length])
            del buf[:4 + length]
            self.connection.handshake(self.direction, kind, message, frame, offset)
            self._after_message(kind, message)

    def _after_message(self, kind: int, message: bytes) -> None:
        connection = self.connection
        if connection.facts.version != TLS13 or self.phase == "plain":
            return
        suite = connection.suite
        if kind == _FINISHED and self.phase == "handshake":
            self.phase = "application"
            self.protection = connection.protection(self.direction, "application")
        elif kind == _KEY_UPDATE and self.phase == "application" and suite is not None:
            random = connection.facts.client_random
            label = "CLIENT_TRAFFIC_SECRET_0" if self.direction == 0 else "SERVER_TRAFFIC_SECRET_0"
            current = self._secret or (connection.keys.get(random, label) if random else None)
            if current is not None:
                self._secret = _next_secret(suite, current)
                self.protection = _tls13_protection(suite, self._secret)

    def _stop_framing(self, frame: int, offset: int, what: str) -> None:
        if not self.stopped:
            self.connection.problem("tls-record", f"{what}: the rest of this direction is not read",
                                    frame, offset)
            self.connection.fail("the TLS record stream is damaged")
            self._stop()

    def _stop(self) -> None:
        self._missing = 0
        self.stopped = True
        self.phase = "stopped"
        self._waiting = deque()
        self.waiting_bytes = 0
        self._buffer = bytearray()


def facts_record(facts: TlsFacts, format_endpoint: Callable[[bytes, int], str]) -> dict[str, Any]:
    """One TLS connection as the report's `tls` entry (schema.md)."""
    return {
        "connection": facts.connection, "client": format_endpoint(*facts.client),
        "server": format_endpoint(*facts.server), "version": facts.version_name,
        "cipher_suite": facts.suite_name, "sni": facts.sni, "resumed": facts.resumed,
        "hello_retry": facts.hello_retry, "encrypt_then_mac": facts.encrypt_then_mac,
        "client_random": None if facts.client_random is None else facts.client_random.hex(),
        "decrypted": facts.decrypted, "reason": facts.reason,
        "records": list(facts.records), "decrypted_bytes": list(facts.decrypted_bytes),
    }


def undecrypted_summary(facts: Iterable[TlsFacts], format_endpoint: Callable[[bytes, int], str]) -> list[str]:
    """One sentence per (server, SNI, reason) of the connections that were not decrypted."""
    groups: dict[tuple[str, str | None, str], int] = {}
    for item in facts:
        if not item.decrypted:
            key = (format_endpoint(*item.server), item.sni, item.reason or "unknown")
            groups[key] = groups.get(key, 0) + 1
    sentences = []
    for (server, sni, reason), count in groups.items():
        noun = "TLS connection" if count == 1 else "TLS connections"
        where = f" (SNI {sni})" if sni else ""
        advice = "; give --tls-keylog FILE" if reason.startswith("no key") else ""
        sentences.append(f"{count} {noun} to {server}{where} could not be decrypted: {reason}{advice}")
    return sentences
