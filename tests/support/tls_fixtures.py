"""Real TLS byte streams for tests, and captures of them.

`plain_streams(capture)` reads a corpus capture's TCP byte streams (what each side sent, in
capture order). `tls_wire(...)` carries those bytes through real OpenSSL (Python's ssl module,
in memory: an SSLObject client and server joined by MemoryBIOs), pinned to a version and
cipher suite, writing an NSS key log; it returns the TLS bytes each side put on the wire, in
order. `write_pcap(...)` writes such wire chunks as the TCP segments of one or more
connections (scapy packets in a pcap), split at `mss` or at the given split points.
Tests that use these are marked in their docstrings as "built" (deterministic pcap of real
TLS bytes); tests recording with tcpdump say "recorded".
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import construct as cs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bitstrace.analyzer.capture import CaptureReader
from bitstrace.analyzer.decode import Decoder
from bitstrace.analyzer.tcp import TcpReassembler

from tests.support.craft import pcap_bytes
from tests.support import REPO

CORPUS = REPO / "captures"
Chunks = list[tuple[int, bytes]]  # (direction 0 client→server / 1 server→client, bytes)


class _Collect:
    def __init__(self) -> None:
        self.streams: dict[int, Chunks] = {}

    def on_open(self, conn) -> None:
        self.streams[conn.id] = []

    def on_data(self, conn, direction, data, frame, ts_ns) -> None:
        chunks = self.streams[conn.id]
        if chunks and chunks[-1][0] == direction:
            chunks[-1] = (direction, chunks[-1][1] + bytes(data))
        else:
            chunks.append((direction, bytes(data)))

    def on_gap(self, *args) -> None:
        raise AssertionError("corpus capture with a gap")

    def on_conflict(self, *args) -> None:
        pass

    def on_fin(self, *args) -> None:
        pass

    def on_rst(self, *args) -> None:
        pass

    def on_close(self, conn) -> None:
        pass


def plain_streams(capture: Path) -> dict[int, Chunks]:
    """Each connection's data, as alternating (direction, bytes) turns."""
    sink = _Collect()
    reassembler = TcpReassembler(sink)
    decoder = Decoder(file=str(capture))
    decoder.decode_into(CaptureReader(capture).records(), reassembler.receive)
    reassembler.finish()
    return sink.streams


@dataclass
class Credentials:
    cert: Path
    key: Path
    private_key: rsa.RSAPrivateKey


def make_credentials(directory: Path, name: str = "uploads.example.test") -> Credentials:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Credentials(cert_path, key_path, key)


@dataclass
class TlsOptions:
    version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    ciphers: str | None = None  # TLS 1.2 cipher list (OpenSSL syntax)
    suites: str | None = None  # TLS 1.3 suites: set through the server's set_ciphersuites when present
    no_ticket: bool = False
    server_groups: str | None = None  # e.g. "secp384r1": a group the client does not key-share first
    sni: str = "uploads.example.test"


def contexts(creds: Credentials, keylog: Path, options: TlsOptions) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(creds.cert, creds.key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.keylog_filename = str(keylog)
    for context in (server, client):
        context.minimum_version = context.maximum_version = options.version
        if options.ciphers:
            context.set_ciphers(options.ciphers)
        if options.no_ticket:
            context.options |= ssl.OP_NO_TICKET
    if options.suites:
        setter = getattr(server, "set_ciphersuites", None)
        if setter is None:
            raise RuntimeError("this Python cannot pin TLS 1.3 suites")
        setter(options.suites)
    if options.server_groups:
        setter = getattr(server, "set_groups", None) or getattr(server, "set_ecdh_curve")
        setter(options.server_groups)
    return client, server


class TlsPair:
    """An in-memory TLS client and server: what each writes appears as wire chunks."""

    def __init__(self, client: ssl.SSLContext, server: ssl.SSLContext, sni: str,
                 session: ssl.SSLSession | None = None) -> None:
        self.bios = [(ssl.MemoryBIO(), ssl.MemoryBIO()) for _ in range(2)]  # (incoming, outgoing)
        self.ends = [client.wrap_bio(*self.bios[0], server_side=False, server_hostname=sni, session=session),
                     server.wrap_bio(*self.bios[1], server_side=True)]
        self.wire: Chunks = []
        self.received: list[bytearray] = [bytearray(), bytearray()]  # plaintext each end read

    def _move(self) -> bool:
        moved = False
        for side in (0, 1):
            data = self.bios[side][1].read()
            if data:
                moved = True
                self.wire.append((side, data))
                self.bios[1 - side][0].write(data)
        return moved

    def _read(self, side: int) -> None:
        while True:
            try:
                data = self.ends[side].read(1 << 16)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except ssl.SSLZeroReturnError:
                return
            if not data:
                return
            self.received[side] += data

    def handshake(self) -> None:
        done = [False, False]
        for _ in range(50):
            for side in (0, 1):
                if not done[side]:
                    try:
                        self.ends[side].do_handshake()
                        done[side] = True
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        pass
            if not self._move() and all(done):
                break
        self.settle()

    def settle(self) -> None:
        for _ in range(50):
            for side in (0, 1):
                self._read(side)
            if not self._move():
                return

    def send(self, side: int, data: bytes) -> None:
        self.ends[side].write(data)
        self.settle()

    def close(self) -> None:
        for side in (0, 1):
            try:
                self.ends[side].unwrap()
            except (ssl.SSLWantReadError, ssl.SSLError):
                pass
            self._move()


def tls_wire(turns: Iterable[tuple[int, bytes]], creds: Credentials, keylog: Path, options: TlsOptions,
             session: ssl.SSLSession | None = None,
             between: Callable[[TlsPair, int], None] | None = None) -> TlsPair:
    """Run the turns (each side's plaintext, in order) through a TLS connection."""
    client, server = contexts(creds, keylog, options)
    pair = TlsPair(client, server, options.sni, session)
    pair.handshake()
    for index, (side, data) in enumerate(turns):
        pair.send(side, data)
        if between is not None:
            between(pair, index)
    pair.close()
    return pair


@dataclass
class Flow:
    wire: Chunks
    client: tuple[str, int] = ("127.0.0.1", 50000)
    server: tuple[str, int] = ("127.0.0.1", 443)
    splits: Sequence[int] | None = field(default=None)  # stream offsets to cut segments at, per direction


def write_pcap(path: Path, flows: Sequence[Flow], mss: int = 1448) -> Path:
    """The flows as TCP connections, one after another; each direction's bytes in segments of
    `mss` (or cut at the flow's `splits` offsets, which apply to both directions' streams)."""
    records = []
    ts = 1_700_000_000 * 10**9
    for number, flow in enumerate(flows):
        (cip, cport), (sip, sport) = flow.client, flow.server
        cport += number
        seq = [1000, 5000]

        def packet(side: int, flags: str, payload: bytes = b"") -> Ether:
            src, dst = ((cip, cport), (sip, sport)) if side == 0 else ((sip, sport), (cip, cport))
            return (Ether() / IP(src=src[0], dst=dst[0]) /
                    TCP(sport=src[1], dport=dst[1], flags=flags, seq=seq[side], ack=seq[1 - side]) / payload)

        def add(pkt: Ether) -> None:
            nonlocal ts
            ts += 1000
            records.append((ts, pkt))

        add(packet(0, "S"))
        seq[0] += 1
        add(packet(1, "SA"))
        seq[1] += 1
        add(packet(0, "A"))
        offsets = [0, 0]
        for side, data in flow.wire:
            cuts = sorted({0, len(data)} | ({s - offsets[side] for s in flow.splits
                                               if 0 < s - offsets[side] < len(data)} if flow.splits else
                                              set(range(0, len(data), mss))))
            for start, end in zip(cuts, cuts[1:]):
                add(packet(side, "PA", data[start:end]))
                seq[side] += end - start
            offsets[side] += len(data)
        add(packet(0, "FA"))
        seq[0] += 1
        add(packet(1, "FA"))
        seq[1] += 1
        add(packet(0, "A"))
    path.write_bytes(pcap_bytes(records))
    return path


#: A pcapng Decryption Secrets Block body (pcapng spec 4.7), declaratively: the block type and
#: lengths around it come from craft.block.
DSB_BODY = cs.Struct(
    "secrets_type" / cs.Const(0x544C534B, cs.Int32ul),
    "secrets_length" / cs.Rebuild(cs.Int32ul, cs.len_(cs.this.secrets)),
    "secrets" / cs.Bytes(cs.this.secrets_length),
    cs.Padding(-cs.this.secrets_length % 4),
)


DSB_BODY_BE = cs.Struct(  # the same in a big-endian section
    "secrets_type" / cs.Const(0x544C534B, cs.Int32ub),
    "secrets_length" / cs.Rebuild(cs.Int32ub, cs.len_(cs.this.secrets)),
    "secrets" / cs.Bytes(cs.this.secrets_length),
    cs.Padding(-cs.this.secrets_length % 4),
)


def struct_pack_dsb(secrets: bytes) -> bytes:
    return DSB_BODY.build(dict(secrets=secrets))


def joined(chunks: Chunks, side: int) -> bytes:
    return b"".join(data for s, data in chunks if s == side)


# -- scenarios: a capture and its key log --------------------------------------------------------

#: TLS 1.3 suites Python's ssl cannot pin itself (it has no set_ciphersuites): pinned through
#: an OpenSSL configuration file in a child process.
TLS13_SUITES = {"aes128": "TLS_AES_128_GCM_SHA256", "aes256": "TLS_AES_256_GCM_SHA384",
                "chacha": "TLS_CHACHA20_POLY1305_SHA256"}
OP_NO_ENCRYPT_THEN_MAC = 1 << 19  # OpenSSL 3's SSL_OP_NO_ENCRYPT_THEN_MAC; the ssl module has no name for it
TLS12_SUITES = {
    # name: (OpenSSL cipher, extra options)
    "ecdhe-aes128-gcm": ("ECDHE-RSA-AES128-GCM-SHA256", 0),
    "ecdhe-aes256-gcm": ("ECDHE-RSA-AES256-GCM-SHA384", 0),
    "ecdhe-chacha": ("ECDHE-RSA-CHACHA20-POLY1305", 0),
    "ecdhe-aes128-sha-etm": ("ECDHE-RSA-AES128-SHA", 0),
    "ecdhe-aes256-sha-mte": ("ECDHE-RSA-AES256-SHA", OP_NO_ENCRYPT_THEN_MAC),
    "ecdhe-aes128-sha256-mte": ("ECDHE-RSA-AES128-SHA256", OP_NO_ENCRYPT_THEN_MAC),
    "ecdhe-aes128-sha256-etm": ("ECDHE-RSA-AES128-SHA256", 0),
    "ecdhe-aes256-sha384-etm": ("ECDHE-RSA-AES256-SHA384", 0),
    "ecdhe-aes256-sha384-mte": ("ECDHE-RSA-AES256-SHA384", OP_NO_ENCRYPT_THEN_MAC),
    "rsa-aes256-gcm": ("AES256-GCM-SHA384", 0),
    "rsa-aes128-sha256-mte": ("AES128-SHA256", OP_NO_ENCRYPT_THEN_MAC),
}
SOURCE = "single-fragment.pcap"  # the BITS upload the scenarios carry


@dataclass
class Built:
    pcap: Path
    keylog: Path
    creds: Credentials
    plain: list[Chunks]  # per connection: the plaintext turns carried


def _run(turns: Chunks, creds: Credentials, keylog: Path, options: TlsOptions, extra_options: int = 0,
         session: ssl.SSLSession | None = None) -> TlsPair:
    client, server = contexts(creds, keylog, options)
    for context in (client, server):
        context.options |= extra_options
    pair = TlsPair(client, server, options.sni, session)
    pair.handshake()
    for side, data in turns:
        pair.send(side, data)
    return pair


def build(scenario: str, directory: Path, creds: Credentials | None = None) -> Built:
    """Record `scenario` (see SCENARIOS) into directory/SCENARIO.pcap with its key log."""
    directory.mkdir(parents=True, exist_ok=True)
    creds = creds or make_credentials(directory)
    keylog = directory / f"{scenario}.keys"
    keylog.unlink(missing_ok=True)
    turns = plain_streams(CORPUS / SOURCE)[0]
    pcap = directory / f"{scenario}.pcap"
    kind, _, variant = scenario.partition(":")
    if kind == "tls13" and variant in TLS13_SUITES:
        _child(scenario, directory, creds, variant)
        return Built(pcap, keylog, creds, [turns])
    pairs: list[TlsPair] = []
    if kind == "tls13":
        pairs.append(_run(turns, creds, keylog, TlsOptions()))
    elif kind == "tls12":
        cipher, extra = TLS12_SUITES[variant]
        pairs.append(_run(turns, creds, keylog, TlsOptions(ssl.TLSVersion.TLSv1_2, cipher), extra))
    elif kind == "resume":
        version = ssl.TLSVersion.TLSv1_3 if variant == "psk" else ssl.TLSVersion.TLSv1_2
        cipher = None if variant == "psk" else "AES256-GCM-SHA384" if variant.startswith("rsa") \
            else "ECDHE-RSA-AES128-GCM-SHA256"
        options = TlsOptions(version, cipher, no_ticket=variant.endswith("session-id"))
        client, server = contexts(creds, keylog, options)
        first = TlsPair(client, server, options.sni)
        first.handshake()
        for side, data in turns[:2]:
            first.send(side, data)
        second = TlsPair(client, server, options.sni, session=first.ends[0].session)
        second.handshake()
        for side, data in turns[2:]:
            second.send(side, data)
        assert second.ends[0].session_reused, "OpenSSL did not resume"
        pairs += [first, second]
        for pair in pairs:
            pair.close()
        write_pcap(pcap, [Flow(pair.wire) for pair in pairs])
        return Built(pcap, keylog, creds, [turns[:2], turns[2:]])
    elif kind == "hrr":
        pairs.append(_run(turns, creds, keylog, TlsOptions(server_groups="secp384r1")))
    else:
        raise ValueError(scenario)
    for pair in pairs:
        pair.close()
    write_pcap(pcap, [Flow(pair.wire) for pair in pairs])
    return Built(pcap, keylog, creds, [turns])


SCENARIOS = ([f"tls13:{name}" for name in TLS13_SUITES] + ["tls13"] + [f"tls12:{name}" for name in TLS12_SUITES]
             + ["resume:session-id", "resume:ticket", "resume:psk", "resume:rsa-session-id", "resume:rsa-ticket", "hrr"])


def _child(scenario: str, directory: Path, creds: Credentials, suite: str) -> None:
    import os
    import subprocess
    import sys

    config = directory / f"{suite}.cnf"
    config.write_text("openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n[ssl_sect]\n"
                      "system_default = system_default_sect\n[system_default_sect]\n"
                      f"Ciphersuites = {TLS13_SUITES[suite]}\n")
    env = {**os.environ, "OPENSSL_CONF": str(config)}
    subprocess.run([sys.executable, "-m", "tests.support.tls_fixtures", scenario, str(directory), str(creds.cert),
                    str(creds.key)], env=env, check=True, cwd=Path(__file__).resolve().parents[2])


def _child_main(scenario: str, directory: str, cert: str, key: str) -> None:
    pem = Path(key).read_bytes()
    private = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    creds = Credentials(Path(cert), Path(key), private)
    out = Path(directory)
    keylog = out / f"{scenario}.keys"
    turns = plain_streams(CORPUS / SOURCE)[0]
    pair = _run(turns, creds, keylog, TlsOptions())
    assert pair.ends[0].cipher()[0] == TLS13_SUITES[scenario.partition(":")[2]], pair.ends[0].cipher()
    pair.close()
    write_pcap(out / f"{scenario}.pcap", [Flow(pair.wire)])


if __name__ == "__main__":
    import sys

    _child_main(*sys.argv[1:5])
