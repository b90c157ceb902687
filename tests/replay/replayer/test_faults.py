"""bits-replay against servers that fail: each fault gives a clear message, no traceback, and
the results so far. The fake servers listen on 127.0.0.1:0 and stop with the test."""

from __future__ import annotations

import io
import os
import signal
import json
import socket
import threading
from pathlib import Path
from typing import Callable

import pytest

from bitstrace.cli.common import Exit
from bitstrace.cli.replay import main
from tests.replay.test_client import LoopbackServer
from tests.replay.replayer.test_plan import SID_A, Conversation, payload, upload

FRAGMENT = 1 << 20  # larger than what a loopback socket buffers, so a reset hits mid-send


class FakeServer(LoopbackServer):
    """Answers Ping and Create like a BITS server; `on_fragment(conn, body_bytes_read)` decides
    the rest."""

    def __init__(self, on_fragment: Callable[[socket.socket, int], None]) -> None:
        self.on_fragment = on_fragment
        super().__init__()

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handle(self, conn: socket.socket) -> None:
        buffered = b""
        while (read := self.read_head(conn, buffered)) is not None:
            head, buffered = read
            if b"BITS-Packet-Type: Fragment" in head:
                self.on_fragment(conn, len(buffered))
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nBITS-Packet-Type: Ack\r\nBITS-Session-Id: "
                         b"{99999999-9999-9999-9999-999999999999}\r\nContent-Length: 0\r\n\r\n")


def close_mid_body(conn: socket.socket, read: int) -> None:
    conn.recv(1000)
    conn.close()  # unread data → the kernel resets the connection


def never_answer(conn: socket.socket, read: int) -> None:
    while conn.recv(65536):
        pass


def answer_garbage(conn: socket.socket, read: int) -> None:
    while read < FRAGMENT:  # take the whole body first, then answer nonsense
        read += len(conn.recv(65536))
    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01garbage\r\n\r\n")
    conn.close()


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    conv = Conversation()
    upload(conv, 0, SID_A, payload(FRAGMENT, 1), FRAGMENT, start_ms=0)
    return conv.write(tmp_path_factory.mktemp("faults") / "upload.pcap")


def run(capture: Path, target: str, *extra: str) -> tuple[int, dict, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([str(capture), "--target", target, "--speed", "0", "--json", *extra], out=out, err=err)
    return code, json.loads(out.getvalue()), err.getvalue()


def fault_of(report: dict) -> tuple[str, list[dict]]:
    (session,) = report["sessions"]
    return session["fault"], session["packets"]


def assert_reported_so_far(packets: list[dict]) -> None:
    """Ping and Create went through before the fault; the fault stopped the session there."""
    assert [p["label"] for p in packets] == ["Ping", "Create-Session", f"Fragment bytes 0-{FRAGMENT - 1}/{FRAGMENT}"]
    assert [p["live"]["status"] for p in packets[:2]] == [200, 200]
    assert packets[2]["live"] is None and packets[2]["fault"]


def test_target_down(capture: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, report, err = run(capture, f"http://127.0.0.1:{port}/")
    fault, packets = fault_of(report)
    assert code == Exit.INCOMPLETE and "Traceback" not in err
    assert fault == f"cannot connect to 127.0.0.1:{port}: connection refused (nothing listens there)"
    assert len(packets) == 1 and packets[0]["fault"] == fault and not packets[0]["sent"]
    assert report["summary"]["packets_sent"] == 0
    assert report["sessions"][0]["notes"] == ["3 later captured request(s) not sent"]


def test_connection_reset_mid_fragment(capture: Path) -> None:
    with FakeServer(close_mid_body) as fake:
        code, report, err = run(capture, fake.url)
    fault, packets = fault_of(report)
    assert code == Exit.INCOMPLETE and "Traceback" not in err
    assert fault.startswith(f"127.0.0.1:{fake.port} reset the connection after ")
    assert fault.endswith(f"of {FRAGMENT} body bytes")
    assert_reported_so_far(packets)


def test_server_that_stops_answering(capture: Path) -> None:
    with FakeServer(never_answer) as fake:
        code, report, err = run(capture, fake.url, "--timeout", "0.5")
    fault, packets = fault_of(report)
    assert code == Exit.INCOMPLETE and "Traceback" not in err
    assert fault == f"127.0.0.1:{fake.port} did not answer within 0.5 s"
    assert_reported_so_far(packets)


def test_server_that_answers_garbage(capture: Path) -> None:
    with FakeServer(answer_garbage) as fake:
        code, report, err = run(capture, fake.url)
    fault, packets = fault_of(report)
    assert code == Exit.INCOMPLETE and "Traceback" not in err
    # The connection carried Ping and Create answers first: what follows a complete answer and
    # begins no status line is skipped as extra bytes (analyzer/http.py), and named when no
    # answer comes after them.
    assert fault == (f"127.0.0.1:{fake.port} sent a malformed HTTP answer: 34 bytes that begin no "
                     "status line (byte 0 of the answer), then closed the connection")
    assert_reported_so_far(packets)


def test_text_output_names_the_fault(capture: Path) -> None:
    with FakeServer(answer_garbage) as fake:
        out, err = io.StringIO(), io.StringIO()
        code = main([str(capture), "--target", fake.url, "--speed", "0"], out=out, err=err)
    assert code == Exit.INCOMPLETE and "Traceback" not in err.getvalue()
    assert "sent a malformed HTTP answer: 34 bytes that begin no status line" in out.getvalue()
    assert "1 fault(s)" in out.getvalue()


def test_usage_errors_are_plain(capture: Path) -> None:
    err = io.StringIO()
    assert main([str(capture), "--target", "ftp://127.0.0.1/"], out=io.StringIO(), err=err) == 2
    assert err.getvalue() == "bits-replay: --target must be an http:// or https:// URL, not 'ftp://127.0.0.1/'\n"


def test_ctrl_c_stops_the_replay_and_keeps_the_results_so_far(tmp_path: Path) -> None:
    conv = Conversation()
    upload(conv, 0, SID_A, payload(3000, 2), 1000, start_ms=0, step_ms=2000)  # 2 s between packets
    out, err = io.StringIO(), io.StringIO()
    with FakeServer(never_answer) as fake:
        # A real SIGINT, as Ctrl-C sends: it also wakes the main thread's blocking waits.
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        code = main([str(conv.write(tmp_path / "slow.pcap")), "--target", fake.url, "--json"],
                    out=out, err=err)
        timer.join()
    report = json.loads(out.getvalue())
    assert code == 130 and report["interrupted"]
    assert err.getvalue() == "bits-replay: interrupted; the results so far follow\n"
    fault, packets = fault_of(report)
    # The Ping was answered; the Create, 2 s later in the capture, never left.
    assert [(p["label"], p["sent"]) for p in packets] == [("Ping", True), ("Create-Session", False)]
    assert packets[0]["live"]["status"] == 200
    assert fault == packets[1]["fault"] == "interrupted before this request"
