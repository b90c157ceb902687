"""bits-server's HTTPS: the TLS context of its listening socket, and a self-signed certificate.

TLS 1.2 and 1.3 only (the versions Windows' BITS client and IIS speak today). The key log, when
asked for, is the NSS format OpenSSL writes through ssl.SSLContext.keylog_filename, which
bits-analyze --tls-keylog and Wireshark read. The self-signed certificate is made with the
`cryptography` package (the one TLS library of the project) for a quick start: clients must be
told to trust it, and BITS itself never does.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path

SELF_SIGNED_DAYS = 30


def self_signed_certificate(host: str) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of a fresh self-signed certificate naming `host`
    (and localhost) as subject alternative names; an EC P-256 key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host or "localhost")])
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for candidate in {host, "127.0.0.1", "::1"}:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(candidate)))
        except ValueError:
            if candidate:
                names.append(x509.DNSName(candidate))
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


class TlsUnusable(ValueError):
    """The certificate, key or key log cannot be used; the message names which and why."""


def server_context(cert: str | None, key: str | None, self_signed_host: str | None,
                   keylog: str | None) -> tuple[ssl.SSLContext, bytes | None]:
    """The TLS context for a certificate and key (PEM files), or for a fresh self-signed
    certificate naming `self_signed_host`; and that certificate's PEM (None for given files).
    Raises TlsUnusable when a file cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    certificate_pem = None
    if self_signed_host is not None:
        certificate_pem, key_pem = self_signed_certificate(self_signed_host)
        # load_cert_chain reads files only: a private directory, removed once they are loaded
        with tempfile.TemporaryDirectory(prefix="bits-server-tls-") as directory:
            cert_file, key_file = Path(directory) / "cert.pem", Path(directory) / "key.pem"
            cert_file.write_bytes(certificate_pem)
            key_file.touch(mode=0o600)
            key_file.write_bytes(key_pem)
            context.load_cert_chain(cert_file, key_file)
    else:
        assert cert is not None and key is not None, "a certificate and its key, or self-signed"
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise TlsUnusable(f"cannot use --tls-cert {cert!r} with --tls-key {key!r}: {exc.reason or exc}") from None
        except OSError as exc:
            raise TlsUnusable(f"cannot read {exc.filename or cert!r}: {exc.strerror}") from None
    if keylog is not None:
        try:
            with open(keylog, "a", encoding="ascii"):  # fails here, at start, when it cannot be written
                pass
            os.chmod(keylog, 0o600)
        except OSError as exc:
            raise TlsUnusable(f"cannot write --tls-keylog {keylog!r}: {exc.strerror}") from None
        context.keylog_filename = keylog
    return context, certificate_pem
