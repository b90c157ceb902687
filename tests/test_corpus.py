"""The capture corpus against captures/expected.json, with tshark as the independent reader.

- The committed captures: tshark's count of TCP connections, HTTP requests and responses in each
  file matches expected.json; formats, sizes and the session records are sound.
- As root with tcpdump: the generator runs again into a temporary directory and what does not vary
  between runs (sessions, file hashes, byte totals, counts, anomaly codes) comes out the same.
tshark 4.0 does not take `BITS_POST` for HTTP, so it reads a copy in which `BITS_POST /` is
replaced by the same-length `PROPPATCH /`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitstrace.analyzer.bits.protocol import is_guid
from tests.support import REPO

CAPTURES = REPO / "captures"
GENERATOR = CAPTURES / "make_captures.py"
COMMITTED = json.loads((CAPTURES / "expected.json").read_text())["captures"]
STABLE_SESSION_FIELDS = ("index", "url", "file", "final_state", "delivery", "total", "bytes_acknowledged",
                         "sha256", "acknowledged_sha256", "bytes_sent_contiguous", "sent_sha256",
                         "fragments_sent")
STABLE_CAPTURE_FIELDS = ("scenario", "format", "ip_version", "connections", "exchanges", "responses",
                         "anomalies", "anomalies_exhaustive")
VERDICTS = {"delivered", "not-delivered", "unknown"}
STATES = {"RECEIVE_FRAGMENTS", "WAIT_FOR_CLOSE", "COMPLETE", "CANCEL", "EXPIRED"}
PCAP_MAGICS = {b"\xd4\xc3\xb2\xa1": "pcap", b"\x4d\x3c\xb2\xa1": "pcap-ns", b"\x0a\x0d\x0d\x0a": "pcapng"}

needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")


def on_the_wire(capture: Path, port: int, scratch: Path) -> tuple[int, int, int]:
    """(TCP connections, HTTP requests, HTTP responses) as tshark counts them."""
    copy = scratch / f"tshark-{capture.name}"
    copy.write_bytes(capture.read_bytes().replace(b"BITS_POST /", b"PROPPATCH /"))
    rows = subprocess.run(
        ["tshark", "-n", "-r", str(copy), "-d", f"tcp.port=={port},http", "-o", "http.desegment_body:FALSE",
         "-T", "fields", "-e", "tcp.stream", "-e", "http.request.method", "-e", "http.response.code"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.splitlines()
    fields = [row.split("\t") for row in rows]
    streams = {f[0] for f in fields if f[0]}
    requests = sum(1 for f in fields if len(f) > 1 and f[1])
    responses = sum(1 for f in fields if len(f) > 2 and f[2])
    return len(streams), requests, responses


def check_capture_matches(directory: Path, name: str, entry: dict, scratch: Path) -> None:
    capture = directory / name
    magic = PCAP_MAGICS.get(capture.read_bytes()[:4])
    assert magic is not None and magic.split("-")[0] == entry["format"], f"{name}: {magic}"
    # tshark loses each response that follows bytes an earlier response did not announce (the
    # server's overruns), which the analyzer recovers (test_field_captures below)
    responses = entry["responses"] - len(entry.get("overruns", ()))
    assert on_the_wire(capture, entry["server_port"], scratch) == (
        entry["connections"], entry["exchanges"], responses), name


# --- the committed corpus -------------------------------------------------------------------------
def test_every_capture_is_described_and_every_description_has_its_capture():
    on_disk = {p.name for p in CAPTURES.iterdir() if p.suffix in (".pcap", ".pcapng")}
    assert on_disk == set(COMMITTED)


@needs_tshark
@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_committed_capture_matches_expected(name, tmp_path):
    check_capture_matches(CAPTURES, name, COMMITTED[name], tmp_path)


def test_corpus_stays_small_and_has_large_bodies():
    sizes = {name: (CAPTURES / name).stat().st_size for name in COMMITTED}
    assert sum(sizes.values()) < 20 * 2**20
    assert sum(size < 2**20 for size in sizes.values()) >= len(sizes) - 2
    assert max(s["total"] for e in COMMITTED.values() for s in e["sessions"]) >= 2**20
    assert COMMITTED["clean-multi-fragment.pcap"]["sessions"][0]["delivery"] == "delivered"
    assert {e["format"] for e in COMMITTED.values()} == {"pcap", "pcapng"}
    assert {e["ip_version"] for e in COMMITTED.values()} == {4, 6}
    assert PCAP_MAGICS[(CAPTURES / "ipv6.pcap").read_bytes()[:4]] == "pcap-ns"


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_session_records_are_consistent(name):
    entry = COMMITTED[name]
    assert entry["sessions"], name
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", code) for code in entry["anomalies"])
    for index, session in enumerate(entry["sessions"]):
        assert session["index"] == index and is_guid(session["id"])
        assert session["final_state"] in STATES and session["delivery"] in VERDICTS
        assert 0 <= session["bytes_acknowledged"] <= session["bytes_sent_contiguous"] <= session["total"]
        delivered = session["bytes_acknowledged"] == session["total"] and session["final_state"] in (
            "COMPLETE", "WAIT_FOR_CLOSE", "CANCEL")
        assert (session["delivery"] == "delivered") == delivered, (name, session)
        if session["bytes_acknowledged"] == session["total"]:
            assert session["acknowledged_sha256"] == session["sha256"]


def namespaces_work() -> bool:
    """Root is not enough in some containers: try to make (and remove) a network namespace."""
    if shutil.which("ip") is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    probe = f"bitsprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return made


needs_namespaces = pytest.mark.skipif(not namespaces_work(),
                                      reason="needs root and working network namespaces (ip netns)")


# --- regenerating it ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.needs_root
@needs_tshark
@needs_namespaces
@pytest.mark.skipif(shutil.which("tcpdump") is None or shutil.which("editcap") is None,
                    reason="needs tcpdump and editcap")
def test_regenerated_corpus_matches_the_committed_one(tmp_path):
    out = tmp_path / "corpus"
    proc = subprocess.Popen([sys.executable, str(GENERATOR), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    _, stderr = proc.communicate(timeout=110)
    assert proc.returncode == 0, stderr[-3000:]
    fresh = json.loads((out / "expected.json").read_text())["captures"]
    assert set(fresh) == set(COMMITTED)
    # Only this run's namespace: other generators (bench/, a parallel run) may be at work.
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    assert f"bitscap{proc.pid}" not in leftovers
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]
    for name, entry in fresh.items():
        committed = COMMITTED[name]
        for key in STABLE_CAPTURE_FIELDS:
            assert entry[key] == committed[key], (name, key)
        assert len(entry["sessions"]) == len(committed["sessions"]), name
        for new, old in zip(entry["sessions"], committed["sessions"]):
            assert {k: new[k] for k in STABLE_SESSION_FIELDS} == {k: old[k] for k in STABLE_SESSION_FIELDS}
            assert new["id"] != old["id"]  # fresh GUIDs every run: nothing is copied
        check_capture_matches(out, name, entry, tmp_path)


@pytest.mark.needs_root
@needs_namespaces
@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump")
def test_interrupted_generator_leaves_nothing_behind(tmp_path):
    out = tmp_path / "corpus"
    generator = subprocess.Popen([sys.executable, str(GENERATOR), "--out", str(out), "--only", "session-not-found"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    namespace = f"bitscap{generator.pid}"
    deadline = time.monotonic() + 30
    while not any(p.name.startswith(".staging") and any(p.iterdir()) for p in out.glob(".staging*")):
        assert time.monotonic() < deadline and generator.poll() is None, "the scenario never started"
        time.sleep(0.05)
    generator.send_signal(signal.SIGTERM)
    generator.communicate(timeout=30)
    assert generator.returncode != 0
    assert namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert list(out.iterdir()) == []
    assert processes_mentioning(str(out)) == []


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:  # the process ended meanwhile
            continue
        if any(text in word for word in words):
            found.append(" ".join(words))
    return found
