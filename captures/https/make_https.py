"""Records the small HTTPS captures of captures/https/ (see README.md there).

    sudo .venv/bin/python captures/https/make_https.py

Needs root, tcpdump and editcap. The corpus's single-fragment upload (captures/single-fragment.pcap,
its client's bytes and the server's recorded answers) is sent over real TLS sockets on
127.0.0.1 (Python's ssl module, OpenSSL), recorded with tcpdump on lo (tests/support/tls_recorded.py),
with the client's NSS key log written beside it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests"))

import tls_fixtures as fx  # noqa: E402
import tls_recorded  # noqa: E402


def main() -> int:
    reason = tls_recorded.missing()
    if reason:
        print(f"make_https.py: {reason}", file=sys.stderr)
        return 1
    turns = fx.plain_streams(fx.CORPUS / "single-fragment.pcap")[0]
    with tempfile.TemporaryDirectory() as scratch:
        creds = fx.make_credentials(Path(scratch))
        tls_recorded.record_bits_upload(HERE, creds.cert, creds.key, turns, HERE / "tls13-upload.keys",
                                        name="tls13-upload.pcap")
        keys = Path(scratch) / "tls12.keys"
        raw = tls_recorded.record_bits_upload(Path(scratch), creds.cert, creds.key, turns, keys,
                                              tls12_cipher="ECDHE-RSA-AES128-GCM-SHA256", name="tls12.pcap")
        subprocess.run(["editcap", "--inject-secrets", f"tls,{keys}", str(raw),
                        str(HERE / "tls12-embedded-secrets.pcapng")], check=True, capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
