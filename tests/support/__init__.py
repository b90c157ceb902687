"""What the tests share: paths, crafted packets (craft), BITS exchanges built from real objects
(bits_fixtures), report records (report_fixtures), disordered copies of captures (disorder), TLS
traffic (tls_fixtures, tls_recorded) and headless Chromium (headless_chromium)."""

from pathlib import Path

#: The repository: the tests find the corpus, the generators and the sources from it.
REPO = Path(__file__).resolve().parents[2]
CAPTURES = REPO / "captures"
