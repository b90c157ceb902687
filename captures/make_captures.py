"""Regenerates the capture corpus: real kernel TCP on loopback, recorded with tcpdump.

Each scenario starts the reference server (replay.server.BitsServer), or for the field cases a
server that misbehaves on purpose (captures/misbehaving_server.py), drives it with the client
(replay.client.BitsClient) and records the traffic into one capture file. Everything runs in a
private network namespace whose loopback has an Ethernet MTU (1500) and no segmentation offload,
so the captures hold Ethernet-sized segments like a real network would.

    python captures/make_captures.py [--out DIR] [--only NAME ...] [--list]

Needs root, tcpdump, editcap (tshark package) and iproute2. Writes the captures, expected.json (what the
analyzer must find in each capture, derived from what the scenario did and cross-checked against
the files the server stored) and README.md into DIR (default: this directory). Namespaces and
processes are cleaned up even when a scenario fails or the run is interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitstrace.analyzer.bits.protocol import Header, PacketType, parse_content_range  # noqa: E402
from bitstrace.replay.client import BitsClient, Transaction  # noqa: E402
from bitstrace.replay.server import BitsServer  # noqa: E402
from captures.misbehaving_server import MisbehavingServer  # noqa: E402
from captures.netns import READY_TIMEOUT, run_in_namespace, wait_for  # noqa: E402
from captures.seeded_file import write_seeded_file  # noqa: E402

HERE = Path(__file__).resolve().parent
EXPECTED = "expected.json"
SCHEMA_VERSION = 1
#: Time for the last FIN/ACK exchange to pass the capture before it is stopped.
SETTLE = 0.3
#: Capture buffer: with the default 2 MiB the kernel drops packets of a fast loopback upload.
BUFFER_KIB = 64 * 1024
ATTEMPTS = 3


# --- scenario plumbing ----------------------------------------------------------------------
@dataclass
class Stage:
    """What a scenario gets: the server, deterministic files, and clients sharing one log."""

    server: BitsServer | MisbehavingServer
    workdir: Path
    files: dict[str, Path] = field(default_factory=dict)
    clients: list[BitsClient] = field(default_factory=list)
    log: list[Transaction] = field(default_factory=list)

    def file(self, name: str, size: int, seed: int) -> Path:
        """`size` seeded pseudo-random bytes (stable sha256 across runs)."""
        path = self.workdir / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.files[name] = write_seeded_file(path, size, seed)
        return path

    def settle(self) -> None:
        """Wait until the server has answered (or dropped) every request sent so far, so that a
        cut connection is over on the server's side before the client resumes on a new one."""
        deadline = time.monotonic() + READY_TIMEOUT
        while len(self.server.records) < len(self.log):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server saw {len(self.server.records)} of {len(self.log)} requests")
            time.sleep(0.01)

    def client(self, name: str, **options) -> BitsClient:
        client = BitsClient(self.server.url + "uploads/" + name, log=self.log, **options)
        self.clients.append(client)
        return client


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[Stage], None]
    what: str  # README: what happens in the capture
    anomalies: tuple[str, ...]  # docs/protocol.md section 9 codes the analyzer must report
    exhaustive: bool  # True: the analyzer must report these codes and no others
    server: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    format: str = "pcap"
    nanoseconds: bool = False  # pcap with nanosecond timestamps (magic 0xa1b23c4d)
    server_class: type = BitsServer  # MisbehavingServer for the field cases

    @property
    def filename(self) -> str:
        return f"{self.name}.{self.format}"


SCENARIOS: list[Scenario] = []


def scenario(what: str, anomalies: tuple[str, ...] = (), exhaustive: bool = True, **settings):
    def register(run: Callable[[Stage], None]) -> Callable[[Stage], None]:
        SCENARIOS.append(Scenario(run.__name__.replace("_", "-"), run, what, anomalies, exhaustive, **settings))
        return run
    return register


# --- the scenarios --------------------------------------------------------------------------
@scenario("Create-Session, six 256 KiB fragments of a 1,500,000-byte file, Close-Session: the "
          "clean case and the README's demo capture.")
def clean_multi_fragment(stage: Stage) -> None:
    stage.client("clean.bin").upload(stage.file("clean.bin", 1_500_000, 1), fragment_size=256 * 1024)


@scenario("A 4,892-byte file (the size of the MC-BUP 4.1 sample) in one fragment, then Close.")
def single_fragment(stage: Stage) -> None:
    stage.client("rfc2119.txt").upload(stage.file("rfc2119.txt", 4892, 2))


@scenario("Upload-reply: the final fragment's ack carries a relative backslash BITS-Reply-URL; the "
          "client fetches the reply with HEAD and a ranged GET, then sends Close.",
          server={"reply": True})
def upload_reply(stage: Stage) -> None:
    stage.client("report.bin").upload(stage.file("report.bin", 40_000, 3), fragment_size=16 * 1024)


@scenario("Two 16 KiB fragments of a 100,000-byte file, then Cancel-Session.")
def cancel_mid_upload(stage: Stage) -> None:
    client = stage.client("cancelled.bin")
    client.create_session()
    client.send_file(stage.file("cancelled.bin", 100_000, 4), 16 * 1024, until=32 * 1024)
    client.cancel()


@scenario("Two fragments, Cancel-Session, then a third fragment for the cancelled session: the "
          "server answers 500 BG_E_SESSION_NOT_FOUND.",
          anomalies=("fragment-after-cancel", "error-response"))
def fragment_after_cancel(stage: Stage) -> None:
    client = stage.client("cancelled.bin")
    path = stage.file("cancelled.bin", 100_000, 5)
    client.create_session()
    client.send_file(path, 16 * 1024, until=32 * 1024)
    client.cancel()
    client.fragment(path, 32 * 1024, 48 * 1024 - 1)


@scenario("A complete upload and Close-Session, then the final fragment resent exactly for the "
          "closed session: 500 BG_E_SESSION_NOT_FOUND.",
          anomalies=("fragment-after-close", "error-response"), exhaustive=False)
def fragment_after_close(stage: Stage) -> None:
    client = stage.client("closed.bin")
    path = stage.file("closed.bin", 40_000, 6)
    client.upload(path, fragment_size=16 * 1024)
    client.fragment(path, 32 * 1024, 40_000 - 1)


@scenario("Every fragment acknowledged, then Cancel-Session instead of Close: under IIS semantics the "
          "file is already in place (this server discards it, as MC-BUP says).",
          anomalies=("cancel-after-complete",))
def cancel_after_complete(stage: Stage) -> None:
    client = stage.client("regret.bin")
    client.create_session()
    client.send_file(stage.file("regret.bin", 40_000, 20), 16 * 1024)
    client.cancel()


@scenario("Two fragments of a 100,000-byte file, then Close-Session: the server discards the partial "
          "upload.", anomalies=("close-incomplete",))
def close_incomplete(stage: Stage) -> None:
    client = stage.client("partial.bin")
    client.create_session()
    client.send_file(stage.file("partial.bin", 100_000, 21), 16 * 1024, until=32 * 1024)
    client.close()


@scenario("Two fragments of a 100,000-byte file, then the capture ends with the session neither "
          "closed nor cancelled: verdict unknown.", anomalies=("never-finished",))
def never_finished(stage: Stage) -> None:
    client = stage.client("orphan.bin")
    client.create_session()
    client.send_file(stage.file("orphan.bin", 100_000, 22), 16 * 1024, until=32 * 1024)


@scenario("Fragment 0-16383, then 32768-49151 (a gap): 416 with BITS-Received-Content-Range 16384; "
          "the client follows the server's offset and completes the upload.",
          anomalies=("range-gap", "out-of-sync"))
def gap(stage: Stage) -> None:
    client = stage.client("gap.bin")
    path = stage.file("gap.bin", 80_000, 7)
    client.create_session()
    client.send_file(path, 16 * 1024, until=16 * 1024)
    client.fragment(path, 32 * 1024, 48 * 1024 - 1)
    client.send_file(path, 16 * 1024)
    client.close()


@scenario("Fragment 0-16383 sent twice with the same bytes; the server (IIS overlap policy: trim) "
          "acks the resend 200 with offset 16384; the upload completes.",
          anomalies=("range-resend",))
def identical_resend(stage: Stage) -> None:
    client = stage.client("resent.bin")
    path = stage.file("resent.bin", 80_000, 8)
    client.create_session()
    client.send_file(path, 16 * 1024, until=16 * 1024)
    client.fragment(path, 0, 16 * 1024 - 1)
    client.send_file(path, 16 * 1024)
    client.close()


@scenario("Fragment 0-16383, then the same range with different bytes; the server (MC-BUP overlap "
          "policy: reject) answers 416 with offset 16384 and keeps the first copy; the upload completes.",
          anomalies=("range-resend", "resend-conflict", "out-of-sync"), server={"overlap": "reject"})
def conflicting_resend(stage: Stage) -> None:
    client = stage.client("conflict.bin")
    path = stage.file("conflict.bin", 80_000, 9)
    client.create_session()
    client.send_file(path, 16 * 1024, until=16 * 1024)
    client.fragment(path, 0, 16 * 1024 - 1, body=random.Random(90).randbytes(16 * 1024))
    client.send_file(path, 16 * 1024)
    client.close()


@scenario("The second fragment claims a total 4,096 bytes larger than the first: 400 E_INVALIDARG; "
          "the client resends it with the right total and completes the upload.",
          anomalies=("total-changed", "error-response"))
def changed_total(stage: Stage) -> None:
    client = stage.client("total.bin")
    path = stage.file("total.bin", 80_000, 10)
    client.create_session()
    client.send_file(path, 16 * 1024, until=16 * 1024)
    client.fragment(path, 16 * 1024, 32 * 1024 - 1, total=80_000 + 4096)
    client.send_file(path, 16 * 1024)
    client.close()


@scenario("Connection 0: Create, fragment 0-32767, then fragment 32768-65535 cut after 10,000 body "
          "bytes (the server drops the partial fragment). Connection 1: Ping, the fragment again (200), "
          "then fragment 65536-98303 sent whole, its ack arrives, but the client closes the connection "
          "without reading it (an ack lost, as the client sees it). "
          "Connection 2: Ping, the same fragment again: 416 with offset 98304 (overlap policy reject); "
          "the client continues from there and completes.",
          anomalies=("no-response", "range-resend", "out-of-sync"), exhaustive=False,
          server={"overlap": "reject"})
def connection_cut_resume(stage: Stage) -> None:
    client = stage.client("resumed.bin")
    path = stage.file("resumed.bin", 160_000, 11)
    fragment = 32 * 1024
    client.create_session()
    client.send_file(path, fragment, until=fragment)
    client.fragment(path, fragment, 2 * fragment - 1, cut_after=10_000)
    stage.settle()
    client.send_file(path, fragment, until=2 * fragment)
    client.fragment(path, 2 * fragment, 3 * fragment - 1, abandon=True)
    stage.settle()
    client.send_file(path, fragment)
    client.close()


@scenario("One fragment, then the client stays idle past the server's session timeout (0.5 s); the "
          "next fragment draws 500 BG_E_SESSION_NOT_FOUND, and the client creates a new session and "
          "starts over from offset 0.",
          anomalies=("session-recreated", "error-response"), exhaustive=False,
          server={"session_timeout": 0.5})
def session_not_found(stage: Stage) -> None:
    client = stage.client("recreated.bin")
    path = stage.file("recreated.bin", 64_000, 12)
    client.create_session()
    client.send_file(path, 16 * 1024, until=16 * 1024)
    time.sleep(1.5)
    client.send_file(path, 16 * 1024)
    client.close()


@scenario("The server takes fragments of at most 40,000 bytes: the first 65,536-byte fragment draws "
          "413, and the client continues with 32,768-byte fragments.",
          anomalies=("fragment-too-large",), exhaustive=False, server={"max_fragment_size": 40_000})
def fragment_too_large(stage: Stage) -> None:
    stage.client("large.bin").upload(stage.file("large.bin", 100_000, 13), fragment_size=64 * 1024)


@scenario("The server wants Basic credentials: Create-Session draws 401 with WWW-Authenticate, the "
          "client resends it with Authorization and sends it on every later request.",
          anomalies=("auth-challenge", "basic-auth-cleartext"), server={"auth": ("bits", "secret")})
def basic_auth(stage: Stage) -> None:
    client = stage.client("auth.bin", credentials=("bits", "secret"))
    client.upload(stage.file("auth.bin", 40_000, 14), fragment_size=16 * 1024)


@scenario("Two clients upload two files to two URLs at once, each on its own connection, their "
          "fragments alternating.")
def two_sessions_interleaved(stage: Stage) -> None:
    first, second = stage.client("first.bin"), stage.client("second.bin")
    jobs = [(first, stage.file("first.bin", 60_000, 15)), (second, stage.file("second.bin", 50_000, 16))]
    for client, _ in jobs:
        client.create_session()
    while any(client.offset < path.stat().st_size for client, path in jobs):
        for client, path in jobs:
            if client.offset < path.stat().st_size:
                client.send_file(path, 16 * 1024, until=client.offset + 1)
    for client, _ in jobs:
        client.close()


@scenario("A clean three-fragment upload over IPv6 (::1); a pcap with nanosecond timestamps.",
          host="::1", nanoseconds=True)
def ipv6(stage: Stage) -> None:
    stage.client("v6.bin").upload(stage.file("v6.bin", 70_000, 17), fragment_size=32 * 1024)


@scenario("The Create ack names BITS-Host-Id bitsnode1: the client moves to that host (Host: "
          "bitsnode1:PORT, resolved to 127.0.0.1) on a new connection, Pings it, and uploads there. "
          "Stored as pcapng.",
          anomalies=("host-redirect",), server={"host_id": "bitsnode1"}, format="pcapng")
def host_id_redirect(stage: Stage) -> None:
    client = stage.client("farm.bin", resolve={"bitsnode1": "127.0.0.1"})
    client.upload(stage.file("farm.bin", 50_000, 18), fragment_size=16 * 1024)


@scenario("After Create: a Fragment without Content-Range, one with the range `bytes 16383-0/50000`, "
          "a packet of type Frobnicate and a BITS_POST without BITS-Packet-Type, each refused 400 "
          "E_INVALIDARG; then a clean upload in the same session.",
          anomalies=("missing-header", "range-malformed", "unknown-packet-type", "error-response"),
          exhaustive=False)
def malformed_requests(stage: Stage) -> None:
    client = stage.client("malformed.bin")
    path = stage.file("malformed.bin", 50_000, 19)
    client.create_session()
    client.fragment(path, 0, 16 * 1024 - 1, headers={Header.CONTENT_RANGE: None})
    client.fragment(path, 0, 16 * 1024 - 1, headers={Header.CONTENT_RANGE: "bytes 16383-0/50000"})
    client.send_packet("Frobnicate", session_id=client.session_id)
    client.send_packet(None, session_id=client.session_id)
    client.send_file(path, 16 * 1024)
    client.close()


@scenario("A third-party server's framing bug (captures/misbehaving_server.py): after the "
          "`Content-Length: 0` ack of the first fragment it writes a 24-byte HTML body it did not "
          "announce; the next status line follows it on the same connection. The client skips the "
          "extra bytes, uploads six 16 KiB fragments of a 90,000-byte file on that connection and closes.",
          anomalies=("response-overrun",), server_class=MisbehavingServer,
          server={"overrun": b"<html>Fragment OK</html>", "overrun_after": 1})
def framing_overrun(stage: Stage) -> None:
    stage.client("overrun.bin").upload(stage.file("overrun.bin", 90_000, 23), fragment_size=16 * 1024)


@scenario("A server that hangs up (captures/misbehaving_server.py): four times it reads fragment "
          "16384-32767 at the acknowledged offset and closes the connection without answering; each "
          "time the client sends the same fragment again on a new connection, Pinging first after a "
          "resend that also went unanswered. The fifth "
          "time it answers, and the upload of the 50,000-byte file completes.",
          anomalies=("no-progress", "no-response"), server_class=MisbehavingServer,
          server={"silent": 4, "silent_at": 16 * 1024})
def no_progress(stage: Stage) -> None:
    stage.client("stuck.bin").upload(stage.file("stuck.bin", 50_000, 24), fragment_size=16 * 1024)



# --- what a scenario did --------------------------------------------------------------------
def sha256_file(path: Path, limit: int | None = None) -> str:
    """sha256 of the file, or of its first `limit` bytes."""
    digest = hashlib.sha256()
    left = path.stat().st_size if limit is None else limit
    with open(path, "rb") as f:
        while left and (chunk := f.read(min(1 << 20, left))):
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def _packet(t: Transaction) -> PacketType | None:
    return PacketType.parse(t.packet_type) if t.method == "BITS_POST" else None


def contiguous_sent(transactions: list[Transaction]) -> int:
    """How far from offset 0 the fragment bodies on the wire cover the file without a hole, acked
    or not (a cut fragment counts with the bytes it carried)."""
    spans = []
    for t in transactions:
        placed = parse_content_range(t.header(Header.CONTENT_RANGE) or "")
        if _packet(t) is PacketType.FRAGMENT and placed is not None:
            spans.append((placed.first, placed.first + t.body_sent))
    spans.sort()
    covered = 0
    for start, end in spans:
        if start > covered:
            break
        covered = max(covered, end)
    return covered


def describe_sessions(stage: Stage, root: Path) -> list[dict]:
    """Sessions in order of creation, from the client log, checked against the server's files."""
    sessions = []
    for t in stage.log:
        if _packet(t) is PacketType.CREATE_SESSION and t.response is not None and t.response.ok:
            sessions.append(_describe(stage, root, t, len(sessions)))
    return sessions


def _describe(stage: Stage, root: Path, create: Transaction, index: int) -> dict:
    session_id = create.response.session_id
    mine = [t for t in stage.log if t.header(Header.SESSION_ID) == session_id]
    total = acknowledged = None
    state, delivery, name = "RECEIVE_FRAGMENTS", "unknown", None
    for t in mine:
        packet, response = _packet(t), t.response
        if packet is PacketType.FRAGMENT:
            name = name or t.header(Header.CONTENT_NAME)
        if response is None or state in ("COMPLETE", "CANCEL", "EXPIRED"):
            continue
        if response.session_not_found:
            state, delivery = "EXPIRED", "not-delivered"
        elif packet is PacketType.FRAGMENT and response.status in (200, 416):
            total = total or int(t.header(Header.CONTENT_RANGE).rsplit("/", 1)[1])
            acknowledged = response.received_offset
            if response.status == 200 and acknowledged == total:
                state, delivery = "WAIT_FOR_CLOSE", "delivered"
        elif packet is PacketType.CANCEL_SESSION and response.ok:
            state = "CANCEL"
            delivery = "delivered" if delivery == "delivered" else "not-delivered"
        elif packet is PacketType.CLOSE_SESSION and response.ok:
            state = "COMPLETE"
            delivery = "delivered" if delivery == "delivered" else "not-delivered"
    source = stage.files[name]
    destination = root / create.target.lstrip("/")
    stored = destination.is_file() and state == "COMPLETE"
    if stored and sha256_file(destination) != sha256_file(source):
        raise RuntimeError(f"{destination}: the stored file differs from {source}")
    if (delivery == "delivered" and state == "COMPLETE") != stored:
        raise RuntimeError(f"session {session_id}: delivery {delivery} but stored={stored}")
    return {
        "index": index,
        "id": session_id,
        "url": create.target,
        "file": name,
        "final_state": state,
        "delivery": delivery,
        "total": total,
        "bytes_acknowledged": acknowledged or 0,
        "sha256": sha256_file(source),
        "acknowledged_sha256": sha256_file(source, acknowledged or 0),
        "bytes_sent_contiguous": (sent := contiguous_sent(mine)),
        "sent_sha256": sha256_file(source, sent),
        "fragments_sent": sum(1 for t in mine if _packet(t) is PacketType.FRAGMENT),
    }


class PacketsLost(RuntimeError):
    """The capture is incomplete; the scenario is run again."""


# --- recording ----------------------------------------------------------------------------
@contextmanager
def recording(path: Path, port: int, fmt: str, nanoseconds: bool) -> Iterator[None]:
    """tcpdump on lo, filtered to the server's port; ready on entry, flushed and stopped on exit.

    pcapng is converted from tcpdump's pcap with editcap: dumpcap announces "Capturing on" before
    it really captures and loses the last packets on SIGINT here, so it is not used.
    """
    raw = path.with_suffix(".pcap") if fmt == "pcapng" else path
    command = ["tcpdump", "-i", "lo", "-n", "-U", "--immediate-mode", "-Z", "root", "-B", str(BUFFER_KIB)]
    if nanoseconds:
        command += ["--time-stamp-precision", "nano"]
    recorder = subprocess.Popen([*command, "-w", str(raw), f"tcp port {port}"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        banner = wait_for(recorder, "listening on")
        yield
        time.sleep(SETTLE)
        recorder.send_signal(signal.SIGINT)
        _, tail = recorder.communicate(timeout=READY_TIMEOUT)
        dropped = re.search(r"(\d+) packets dropped by kernel", tail)
        if dropped is None or int(dropped.group(1)):
            raise PacketsLost(f"{path.name}: packets lost or tcpdump failed:\n{banner}{tail}")
    finally:
        if recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    if fmt == "pcapng":
        subprocess.run(["editcap", "-F", "pcapng", str(raw), str(path)], check=True,
                       stdin=subprocess.DEVNULL, capture_output=True)
        raw.unlink()


def run_scenario(item: Scenario, out: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bits-{item.name}-") as tmp:
        workdir = Path(tmp)
        root = workdir / "root"
        server = item.server_class(root, host=item.host, port=0, log=None, **item.server)
        server.start()
        port = server.address[1]
        stage = Stage(server, workdir)
        try:
            with recording(out / item.filename, port, item.format, item.nanoseconds):
                try:
                    item.run(stage)
                finally:
                    for client in stage.clients:
                        client.disconnect()
                    time.sleep(SETTLE)
                    server.stop()
        finally:
            server.stop()
        deadline = time.monotonic() + READY_TIMEOUT  # handler threads may still be logging
        while len(server.records) < len(stage.log) and time.monotonic() < deadline:
            time.sleep(0.05)
        answered = len(server.records)
        if answered != len(stage.log):
            seen = "\n".join(record.line() for record in server.records)
            raise RuntimeError(f"{item.name}: the client sent {len(stage.log)} requests, the server saw "
                               f"{answered}:\n{seen}")
        return {
            "scenario": item.name,
            "what": item.what,
            "format": item.format,
            "ip_version": 6 if ":" in item.host else 4,
            "server_port": port,
            "connections": sum(client.connections_opened for client in stage.clients),
            "exchanges": len(stage.log),
            "responses": sum(1 for record in server.records if record.status),
            "anomalies": sorted(item.anomalies),
            "anomalies_exhaustive": item.exhaustive,
            "sessions": describe_sessions(stage, root),
            "size": (out / item.filename).stat().st_size,
            **misbehaviour(server),
        }


def misbehaviour(server: BitsServer | MisbehavingServer) -> dict:
    """What a misbehaving server did on purpose, from its own records: `unanswered` requests it
    hung up on, `overruns`: bytes it wrote after acks beyond their Content-Length, per ack in the
    order sent (nothing for the reference server)."""
    if not isinstance(server, MisbehavingServer):
        return {}
    return {"unanswered": sum(1 for record in server.records if record.status is None),
            "overruns": [record.extra for record in server.records if record.extra]}


# --- outputs ----------------------------------------------------------------------------------
def tool_versions() -> dict[str, str]:
    def first_line(command: list[str]) -> str:
        result = subprocess.run(command, capture_output=True, text=True)
        return (result.stdout or result.stderr).splitlines()[0].strip().rstrip(".")
    return {
        "tcpdump": first_line(["tcpdump", "--version"]),
        "editcap": first_line(["editcap", "--version"]),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def write_outputs(out: Path, captures: dict[str, dict]) -> None:
    expected_path = out / EXPECTED
    previous = json.loads(expected_path.read_text()) if expected_path.is_file() else {}
    merged = dict(previous.get("captures", {}))
    merged.update(captures)
    known = {item.filename for item in SCENARIOS}
    merged = {name: merged[name] for name in sorted(merged) if name in known}
    document = {
        "schema": SCHEMA_VERSION,
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "generator": "captures/make_captures.py",
        "tools": tool_versions(),
        "captures": merged,
    }
    expected_path.write_text(json.dumps(document, indent=2) + "\n")
    (out / "README.md").write_text(render_readme(document))


def render_readme(document: dict) -> str:
    tools = document["tools"]
    lines = [
        "# The capture corpus",
        "",
        "Real BITS upload traffic: the reference server (`replay/server/`) driven by the client",
        "(`replay/client.py`) over real kernel TCP, recorded with tcpdump; the pcapng file is tcpdump's",
        "pcap converted with `editcap -F pcapng`. The field cases (`framing-overrun`, `no-progress`)",
        "come from a server that misbehaves on purpose as third-party servers were seen to",
        "(`captures/misbehaving_server.py`).",
        "Generated by `captures/make_captures.py` (`make captures`, as root); do not edit by hand.",
        "",
        "## Provenance",
        "",
        f"- Made {document['generated']} by `captures/make_captures.py`, run as root.",
        f"- Tools: {tools['tcpdump']}; {tools['editcap']}; Linux {tools['kernel']}; Python {tools['python']}.",
        "- Each scenario runs in its own network namespace whose loopback has MTU 1500 and no",
        "  segmentation offload (`gso_max_segs 1`), so TCP segments are Ethernet-sized (1514-byte",
        "  frames, link type EN10MB). Server on 127.0.0.1 (or ::1) on a port it picks; the capture",
        "  filter is `tcp port PORT`; the recorder is ready before any traffic and is stopped with",
        "  SIGINT after the connections are closed.",
        "- The TCP is the kernel's own, untouched: a capture may hold the odd out-of-order segment,",
        "  retransmission or duplicate ACK that loopback produced under load.",
        "- File contents are seeded pseudo-random bytes, so their sha256 values are the same on every",
        "  run; session ids, ports and timestamps differ between runs.",
        "- The client looks like Windows BITS 10.x on the wire: `User-Agent: Microsoft BITS/7.8`,",
        "  Windows' header order, `Content-Name` on fragments and Close, lowercase `bytes`, keep-alive.",
        "",
        "## Captures",
        "",
        "| file | conns | exchanges | sessions | anomalies the analyzer must report | what happens |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in document["captures"].items():
        codes = ", ".join(f"`{c}`" for c in entry["anomalies"]) or "none"
        if not entry["anomalies_exhaustive"]:
            codes += " (and possibly others)"
        sessions = "; ".join(f"{s['final_state']} {s['delivery']}" for s in entry["sessions"])
        lines.append(f"| `{name}` | {entry['connections']} | {entry['exchanges']} | {sessions} | "
                     f"{codes} | {entry['what']} |")
    lines += [
        "",
        "## expected.json",
        "",
        "One entry per capture, keyed by file name:",
        "",
        "- `connections`: TCP connections (tshark's `tcp.stream` count); `exchanges`: HTTP requests",
        "  sent, including one cut mid-body; `responses`: responses on the wire (including one the",
        "  client never read because it had closed the connection).",
        "- `anomalies`: anomaly codes (section 9 of docs/protocol.md), verbatim, that the analyzer",
        "  must report for this capture. `anomalies_exhaustive: true` means it must report no other",
        "  code; `false` means other codes are debatable there and are not checked.",
        "- `sessions`, in order of creation: `id` (this capture's session id), `url`, `file`",
        "  (Content-Name), `final_state` (server state machine of docs/protocol.md 5.1: COMPLETE after",
        "  Close, CANCEL, WAIT_FOR_CLOSE, RECEIVE_FRAGMENTS, or EXPIRED when the server answered",
        "  BG_E_SESSION_NOT_FOUND), `delivery` (section 9 verdict), `total`, `bytes_acknowledged`",
        "  (the last BITS-Received-Content-Range), `sha256` of the whole file the client uploaded,",
        "  `acknowledged_sha256` of its first `bytes_acknowledged` bytes (what an extractor that keeps",
        "  only acknowledged bytes rebuilds), `bytes_sent_contiguous` and `sent_sha256`: how far from",
        "  offset 0 the fragment bodies on the wire cover the file without a hole, acknowledged or not",
        "  (refused fragments and the bytes of a cut one count), and the sha256 of that prefix (what an",
        "  extractor that keeps every byte sent rebuilds). The first copy of a resent range is always",
        "  the original. `fragments_sent`: Fragment requests, including refused and cut ones.",
        "  For every delivered and closed session the generator checked that the server stored a",
        "  file with that sha256.",
        "- `server_port`, `ip_version`, `format`, `size` (bytes) describe the file itself.",
        "- Captures of the misbehaving server (`captures/misbehaving_server.py`) also have",
        "  `unanswered` (requests it read and hung up on without answering) and `overruns` (bytes it",
        "  wrote after acks beyond their `Content-Length: 0`, one entry per such ack), from its records.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: captures/)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="regenerate only these scenarios")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [item.name for item in SCENARIOS]
    if args.list:
        print("\n".join(names))
        return 0
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(names)}")
    if not args.inside:
        if os.geteuid() != 0:
            parser.exit(2, "make_captures.py: needs root (network namespaces, packet capture)\n")
        args.out.mkdir(parents=True, exist_ok=True)
        forwarded = ["--out", str(args.out.resolve())] + (["--only", *args.only] if args.only else [])
        return run_in_namespace(__file__, forwarded, prefix="bitscap")
    # SIGTERM from the outer process: unwind, so tcpdump is stopped and the staging dir removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    selected = [item for item in SCENARIOS if not args.only or item.name in args.only]
    captures = {}
    # a failed run leaves the corpus as it was: captures move into place only when all succeeded
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=args.out))
    try:
        for item in selected:
            started = time.monotonic()
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    captures[item.filename] = run_scenario(item, staging)
                    break
                except PacketsLost as exc:
                    if attempt == ATTEMPTS:
                        raise
                    print(f"{exc}; running {item.name} again", file=sys.stderr, flush=True)
            entry = captures[item.filename]
            print(f"{item.filename}: {entry['size']} bytes, {entry['connections']} connections, "
                  f"{entry['exchanges']} exchanges, {time.monotonic() - started:.1f} s", flush=True)
        for name in captures:
            os.replace(staging / name, args.out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_outputs(args.out, captures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
