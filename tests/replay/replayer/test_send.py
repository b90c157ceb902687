"""the replayer (replay.replayer) against the reference bits-server: rewrite, id substitution, modes, overlap.

Captures are crafted TCP conversations (see test_replay_plan.Conversation) answered the way
the reference server answers, so these tests do not depend on the corpus.
"""

from __future__ import annotations

import io
import json
import socket
import threading
from pathlib import Path

import pytest

from bitstrace.analyzer.bits.protocol import BG_E_SESSION_NOT_FOUND, MIN_FRAGMENT
from bitstrace.cli.replay import main
from bitstrace.replay.replayer.plan import build_plan
from bitstrace.replay.replayer.options import Options, Target, TargetError
from bitstrace.replay.replayer.schedule import dry_run, replay
from bitstrace.replay.server import BitsServer
from tests.replay.test_client import LoopbackServer, TlsFront
from tests.replay.replayer.test_plan import SID_A, SID_B, Conversation, ack, payload, request, upload


@pytest.fixture
def server(tmp_path: Path):
    with BitsServer(tmp_path / "root", log=None) as running:
        yield running


def options_for(server: BitsServer, **kwargs) -> Options:
    return Options(target=Target.parse(server.url), speed=0, timeout=10, **kwargs)


def test_target_parsing_and_path_rewrite() -> None:
    target = Target.parse("http://127.0.0.1:8080/base/")
    assert (target.host, target.port, target.prefix, target.netloc) == ("127.0.0.1", 8080, "/base", "127.0.0.1:8080")
    assert target.path_for("/up/f.bin?x=1") == "/base/up/f.bin?x=1"
    assert target.path_for("http://origin/up/f.bin") == "/base/up/f.bin"
    assert target.path_for("/vdir/up/f.bin", strip_prefix="/vdir") == "/base/up/f.bin"
    assert Target.parse("https://[::1]/").netloc == "[::1]"
    for bad in ("ftp://host/", "http:///path", "127.0.0.1:80"):
        with pytest.raises(TargetError):
            Target.parse(bad)


def test_dry_run_rewrites_host_and_shows_the_live_id_placeholder(tmp_path: Path) -> None:
    conv = Conversation()
    upload(conv, 0, SID_A, payload(2000, 1), 1000, start_ms=0, step_ms=500)
    with build_plan([conv.write(tmp_path / "c.pcap")]) as plan:
        options = Options(target=Target.parse("http://127.0.0.1:9/pre"), speed=2)
        (session,) = dry_run(plan, options)
    requests = session["requests"]
    assert requests[0]["url"] == "http://127.0.0.1:9/pre/up/file.bin"
    assert requests[0]["new_connection"] and not requests[1]["new_connection"]
    assert requests[3]["at_s"] == pytest.approx(0.75, abs=1e-3)  # 1.5 s in the capture, speed 2
    headers = dict(requests[2]["headers"])
    assert headers["Host"] == "127.0.0.1:9"
    assert headers["BITS-Session-Id"] == f"<live id of {SID_A}>"
    assert headers["Content-Range"] == "bytes 0-999/2000"
    assert [name for name, _ in requests[2]["headers"]] == [
        "Host", "User-Agent", "BITS-Packet-Type", "BITS-Session-Id", "Content-Range", "Content-Length"]


def test_faithful_clean_replay_has_no_differences_and_lands_the_file(tmp_path: Path, server) -> None:
    conv = Conversation()
    data = payload(50_000, 7)
    upload(conv, 0, SID_A, data, 16_384, start_ms=0)
    with build_plan([conv.write(tmp_path / "clean.pcap")]) as plan:
        result = replay(plan, options_for(server))
    (session,) = result.sessions
    assert result.faults == 0 and result.differences == 0
    assert all(o.sent for o in session.outcomes) and len(session.outcomes) == 7  # 4 fragments
    assert session.live_ids and session.live_ids[0] != SID_A
    assert (server.root / "up" / "file.bin").read_bytes() == data
    live_ids = {r.session_id for r in server.records if r.session_id}
    assert live_ids == set(session.live_ids)  # the captured id never reached the server


def fragment_after_cancel(conv: Conversation) -> None:
    data = payload(2000, 8)
    conv.send(0, 0, request("Create-Session"), 0)
    conv.send(0, 1, ack(session=SID_A), 1)
    conv.send(0, 0, request("Fragment", session=SID_A, body=data[:1000], content_range="bytes 0-999/2000"), 10)
    conv.send(0, 1, ack(session=SID_A, received=1000), 11)
    conv.send(0, 0, request("Cancel-Session", session=SID_A), 20)
    conv.send(0, 1, ack(session=SID_A), 21)
    conv.send(0, 0, request("Fragment", session=SID_A, body=data[1000:], content_range="bytes 1000-1999/2000"), 30)
    conv.send(0, 1, ack(500, session=SID_A, error="0x8020001F", reason="Internal Server Error"), 31)


def test_faithful_replay_reproduces_session_not_found_after_cancel(tmp_path: Path, server) -> None:
    conv = Conversation()
    fragment_after_cancel(conv)
    with build_plan([conv.write(tmp_path / "fac.pcap")]) as plan:
        result = replay(plan, options_for(server))
    last = result.sessions[0].outcomes[-1]
    assert last.live.status == 500 and last.live.error_code == BG_E_SESSION_NOT_FOUND.code
    assert last.live.error_context == 5
    assert result.differences == 0


def test_each_generation_of_a_reissued_id_is_replayed_as_its_own_session(tmp_path: Path, server) -> None:
    conv = Conversation()
    first, second = payload(3000, 6), payload(2000, 7)
    upload(conv, 0, SID_A, first, 1000, start_ms=0)
    upload(conv, 1, SID_A, second, 1000, start_ms=500, target="/up/again.bin")
    with build_plan([conv.write(tmp_path / "reissued.pcap")]) as plan:
        result = replay(plan, options_for(server))
        described = dry_run(plan, options_for(server))
    assert [(s["captured_id"], s["generation"]) for s in described] == [(SID_A, 0), (SID_A, 1)]
    assert [(s.captured_id, s.generation) for s in result.sessions] == [(SID_A, 0), (SID_A, 1)]
    assert result.faults == 0 and result.differences == 0
    (one,), (two,) = (s.live_ids for s in result.sessions)
    assert one != two
    assert (server.root / "up" / "file.bin").read_bytes() == first
    assert (server.root / "up" / "again.bin").read_bytes() == second


def test_adaptive_replay_completes_a_resumed_upload(tmp_path: Path, server) -> None:
    data = payload(30_000, 9)
    conv = Conversation()
    conv.send(0, 0, request("Create-Session"), 0)
    conv.send(0, 1, ack(session=SID_A), 1)
    conv.send(0, 0, request("Fragment", session=SID_A, body=data[:10_000],
                            content_range="bytes 0-9999/30000"), 10)
    conv.send(0, 1, ack(session=SID_A, received=10_000), 11)
    # The connection breaks mid-fragment: the capture lost part of it, and no ack came.
    conv.send(0, 0, request("Fragment", session=SID_A, body=data[10_000:20_000],
                            content_range="bytes 10000-19999/30000"), 20, drop=3)
    # Resumed on a new connection: Ping, then the client starts over at the acknowledged offset.
    conv.send(1, 0, request("Ping"), 1000)
    conv.send(1, 1, ack(), 1001)
    for first in (10_000, 20_000):
        conv.send(1, 0, request("Fragment", session=SID_A, body=data[first:first + 10_000],
                                content_range=f"bytes {first}-{first + 9999}/30000"), 1010 + first / 1000)
        conv.send(1, 1, ack(session=SID_A, received=first + 10_000), 1011 + first / 1000)
    conv.send(1, 0, request("Close-Session", session=SID_A), 1100)
    conv.send(1, 1, ack(session=SID_A), 1101)
    with build_plan([conv.write(tmp_path / "resumed.pcap")]) as plan:
        result = replay(plan, options_for(server, mode="adaptive"))
    session = result.sessions[0]
    assert session.fault is None, session.fault
    assert [o.label for o in session.outcomes] == [
        "Create-Session", "Fragment bytes 0-9999/30000", "Fragment bytes 10000-19999/30000",
        "Fragment bytes 20000-29999/30000", "Close-Session"]
    assert (server.root / "up" / "file.bin").read_bytes() == data


def skipping_ahead(conv: Conversation, data: bytes, create: bool) -> None:
    """A session whose first fragment skips ahead (416, N=0), then uploads 0..end."""
    if create:
        conv.send(0, 0, request("Create-Session"), 0)
        conv.send(0, 1, ack(session=SID_A), 1)
    conv.send(0, 0, request("Fragment", session=SID_A, body=data[1000:2000],
                            content_range="bytes 1000-1999/3000"), 5)
    conv.send(0, 1, ack(416, session=SID_A, received=0, error="0", reason="Range Not Satisfiable"), 6)
    for first in (0, 1000, 2000):
        conv.send(0, 0, request("Fragment", session=SID_A, body=data[first:first + 1000],
                                content_range=f"bytes {first}-{first + 999}/3000"), 10 + first)
        conv.send(0, 1, ack(session=SID_A, received=first + 1000), 11 + first)
    conv.send(0, 0, request("Close-Session", session=SID_A), 4000)
    conv.send(0, 1, ack(session=SID_A), 4001)


def test_adaptive_follows_the_live_offset_on_416(tmp_path: Path, server) -> None:
    data = payload(3000, 10)
    conv = Conversation()
    skipping_ahead(conv, data, create=True)
    with build_plan([conv.write(tmp_path / "skip.pcap")]) as plan:
        result = replay(plan, options_for(server, mode="adaptive"))
    session = result.sessions[0]
    assert session.fault is None, session.fault
    assert [(o.label, o.live.status, o.live.received) for o in session.outcomes[1:5]] == [
        ("Fragment bytes 1000-1999/3000", 416, 0), ("Fragment bytes 0-999/3000", 200, 1000),
        ("Fragment bytes 1000-1999/3000", 200, 2000), ("Fragment bytes 2000-2999/3000", 200, 3000)]
    assert result.differences == 0
    assert (server.root / "up" / "file.bin").read_bytes() == data


def test_adaptive_recreates_a_session_the_server_does_not_know(tmp_path: Path, server) -> None:
    data = payload(3000, 10)
    conv = Conversation()
    skipping_ahead(conv, data, create=False)  # the session began before the capture
    path = conv.write(tmp_path / "recreate.pcap")
    with build_plan([path]) as plan:
        result = replay(plan, options_for(server, mode="adaptive"))
    session = result.sessions[0]
    assert session.fault is None, session.fault
    assert [o.label for o in session.outcomes[:3]] == [
        "Fragment bytes 1000-1999/3000", "Create-Session (recreated)", "Fragment bytes 0-999/3000"]
    assert session.outcomes[0].live.error_code == BG_E_SESSION_NOT_FOUND.code
    assert (server.root / "up" / "file.bin").read_bytes() == data
    with build_plan([path]) as plan:  # faithful replay reproduces the unknown session instead
        faithful = replay(plan, options_for(server))
    assert all(o.live.error_code == BG_E_SESSION_NOT_FOUND.code for o in faithful.sessions[0].outcomes)


def test_adaptive_shrinks_fragments_on_413(tmp_path: Path) -> None:
    data = payload(4 * MIN_FRAGMENT, 11)
    conv = Conversation()
    upload(conv, 0, SID_A, data, 2 * MIN_FRAGMENT, start_ms=0)
    with BitsServer(tmp_path / "root", log=None, max_fragment_size=MIN_FRAGMENT) as small, \
            build_plan([conv.write(tmp_path / "big.pcap")]) as plan:
        result = replay(plan, options_for(small, mode="adaptive"))
        session = result.sessions[0]
        assert session.fault is None, session.fault
        statuses = [o.live.status for o in session.outcomes if o.label.startswith("Fragment")]
        assert statuses == [413, 200, 200, 200, 200]
        assert (small.root / "up" / "file.bin").read_bytes() == data


def test_adaptive_reads_a_413_the_server_sent_before_the_body_ended(tmp_path: Path) -> None:
    """A captured 12 MiB fragment to a server whose limit is 400,000 bytes: bits-server answers
    413 at once and closes, and the unread body makes the connection reset under the replay's
    sends. The 413 that came is read (not a fault), and the fragments shrink until they fit."""
    size = 12 << 20  # more than the loopback socket buffers hold
    data = payload(size, 12)
    conv = Conversation()
    upload(conv, 0, SID_A, data, size, start_ms=0)
    with BitsServer(tmp_path / "root", log=None, max_fragment_size=400_000) as small, \
            build_plan([conv.write(tmp_path / "huge.pcap")]) as plan:
        result = replay(plan, options_for(small, mode="adaptive"))
        session = result.sessions[0]
        assert session.fault is None, session.fault
        fragments = [o for o in session.outcomes if o.label.startswith("Fragment")]
        assert fragments[0].live is not None and fragments[0].live.status == 413
        assert fragments[0].bytes_sent < size
        statuses = [o.live.status for o in fragments if o.live is not None]
        assert statuses[:5] == [413] * 5 and set(statuses[5:]) == {200}
        assert (small.root / "up" / "file.bin").read_bytes() == data


def test_overlapping_sessions_are_in_flight_together(tmp_path: Path) -> None:
    conv = Conversation()
    upload(conv, 0, SID_A, payload(4000, 1), 1000, start_ms=0, step_ms=60)
    upload(conv, 1, SID_B, payload(4000, 2), 1000, start_ms=30, step_ms=60, target="/up/b.bin")
    path = conv.write(tmp_path / "overlap.pcap")

    def spans(concurrency: int | None) -> dict[str, tuple[float, float]]:
        with BitsServer(tmp_path / f"root{concurrency}", log=None) as srv, build_plan([path]) as plan:
            replay(plan, Options(target=Target.parse(srv.url), speed=1, concurrency=concurrency))
            by_path: dict[str, list] = {}
            for record in srv.records:
                by_path.setdefault(record.target, []).append(record)
        return {p: (min(r.started for r in rs), max(r.finished for r in rs)) for p, rs in by_path.items()}

    together = spans(None)
    (a_start, a_end), (b_start, _) = together["/up/file.bin"], together["/up/b.bin"]
    assert a_start < b_start < a_end  # B began while A was still uploading
    one_at_a_time = spans(1)
    assert one_at_a_time["/up/b.bin"][0] >= one_at_a_time["/up/file.bin"][1]


def test_cli_json_and_fail_on_diff(tmp_path: Path, server) -> None:
    conv = Conversation()
    fragment_after_cancel(conv)
    # Captured as a success, the final fragment draws session-not-found live: a difference.
    data = payload(1000, 12)
    conv.send(1, 0, request("Create-Session"), 100)
    conv.send(1, 1, ack(session=SID_B), 101)
    conv.send(1, 0, request("Cancel-Session", session=SID_B), 110)
    conv.send(1, 1, ack(session=SID_B), 111)
    conv.send(1, 0, request("Fragment", session=SID_B, body=data, content_range="bytes 0-999/1000"), 120)
    conv.send(1, 1, ack(session=SID_B, received=1000), 121)
    path = conv.write(tmp_path / "diff.pcap")
    out = io.StringIO()
    code = main([str(path), "--target", server.url, "--speed", "0", "--json", "--fail-on-diff"],
                out=out, err=io.StringIO())
    report = json.loads(out.getvalue())
    assert code == 1
    assert report["summary"]["differences"] == 1
    (diffed,) = [p for s in report["sessions"] for p in s["packets"] if p["differences"]]
    assert {d["field"] for d in diffed["differences"]} == {"status", "error_code", "error_context", "received"}
    assert diffed["live"]["error_code"] == "0x8020001F"
    text = io.StringIO()
    assert main([str(path), "--target", server.url, "--speed", "0", "--session", SID_A],
                out=text, err=io.StringIO()) == 0
    assert "0 difference(s)" in text.getvalue()


def test_host_id_is_followed_only_when_asked_and_only_to_the_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--follow-host-id looks no name up: a Host-Id is followed only when it is the target's
    own address (an IP literal) or host name as given. A stub resolver fails the test when
    asked for anything but the target's literal 127.0.0.1 (which the connection itself
    passes to getaddrinfo, a lookup that sends no query)."""
    conv = Conversation()
    upload(conv, 0, SID_A, payload(1000, 13), 1000, start_ms=0)
    path = conv.write(tmp_path / "c.pcap")
    real_getaddrinfo = socket.getaddrinfo
    asked: list[object] = []

    def resolver(host: object, *args: object, **kwargs: object) -> object:
        if host != "127.0.0.1":
            asked.append(host)
            raise AssertionError(f"the replay looked up {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    not_followed = ("BITS-Host-Id {} is neither the target's host nor its address (no name is "
                    "looked up): not followed (nothing is sent anywhere but the target)")
    for host_id, follow, note in (
            ("127.0.0.1", True, "following BITS-Host-Id 127.0.0.1 (it is the target's own address)"),
            ("localhost", True, not_followed.format("localhost")),
            ("bitsnode1.invalid", True, not_followed.format("bitsnode1.invalid")),
            ("localhost", False, "the server gave BITS-Host-Id localhost; not followed (use "
                                 "--follow-host-id)")):
        with BitsServer(tmp_path / "root", log=None, host_id=host_id) as srv, build_plan([path]) as plan:
            with monkeypatch.context() as patch:
                patch.setattr(socket, "getaddrinfo", resolver)
                result = replay(plan, Options(target=Target.parse(srv.url), speed=0,
                                              follow_host_id=follow))
            assert asked == []
            assert result.sessions[0].notes == [note]
            assert result.differences == 0 and result.faults == 0
            # Every packet went to the target: the server saw them all.
            assert len(srv.records) == len(result.sessions[0].outcomes)


def test_host_id_naming_the_target_host_is_followed_without_a_lookup() -> None:
    from bitstrace.replay.replayer.session import names_target

    assert names_target("BitsNode1", "bitsnode1", None)
    assert names_target("127.0.0.1", "localhost", "127.0.0.1")
    assert names_target("[::1]", "::1", None) and names_target("::1", "localhost", "::1")
    assert not names_target("bitsnode1", "bitsnode2", "127.0.0.1")
    assert not names_target("10.0.0.1", "127.0.0.1", "127.0.0.1") and not names_target("", "x", None)


def test_captured_ntlm_is_dropped_and_said_so_and_basic_is_replaced(tmp_path: Path) -> None:
    conv = Conversation()
    conv.send(0, 0, request("Ping", extra="Authorization: NTLM TlRMTVNTUAABAAAAB4IIog=="), 0)
    conv.send(0, 1, ack(), 1)
    conv.send(0, 0, request("Create-Session", extra="Authorization: Basic d3Jvbmc6d3Jvbmc="), 10)
    conv.send(0, 1, ack(session=SID_A), 11)
    conv.send(0, 0, request("Cancel-Session", session=SID_A,
                            extra="Authorization: Basic d3Jvbmc6d3Jvbmc="), 20)
    conv.send(0, 1, ack(session=SID_A), 21)
    path = conv.write(tmp_path / "auth.pcap")
    out = io.StringIO()
    assert main([str(path), "--target", "http://127.0.0.1:9/", "--dry-run"], out=out,
                err=io.StringIO()) == 0
    text = out.getvalue()
    assert "NTLM authentication, which cannot be replayed" in text
    assert "Authorization: NTLM" not in text
    assert "the capture's Basic credentials are sent as captured" in text
    with BitsServer(tmp_path / "root", log=None, auth=("bits", "secret")) as srv, \
            build_plan([path]) as plan:
        refused = replay(plan, options_for(srv))
        assert [o.live.status for o in refused.sessions[0].outcomes] == [401, 401, 401]
        result = replay(plan, options_for(srv, auth=("bits", "secret")))
    # --auth stands in for the NTLM that cannot be replayed and the Basic that was wrong.
    assert [o.live.status for o in result.sessions[0].outcomes] == [200, 200, 200]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_on_a_terminal_only(tmp_path: Path, server) -> None:
    conv = Conversation()
    upload(conv, 0, SID_A, payload(3000, 14), 1000, start_ms=0)
    path = conv.write(tmp_path / "c.pcap")
    quiet, shown = io.StringIO(), Terminal()
    assert main([str(path), "--target", server.url, "--speed", "0"], out=io.StringIO(), err=quiet) == 0
    assert quiet.getvalue() == ""
    assert main([str(path), "--target", server.url, "--speed", "0"], out=io.StringIO(), err=shown) == 0
    assert "sessions done" in shown.getvalue() and "3000/3000" in shown.getvalue()


def test_a_chunked_request_body_is_sent_chunked_again(tmp_path: Path) -> None:
    data = payload(3000, 15)
    chunked = b"".join(b"%x\r\n" % len(data[i:i + 1000]) + data[i:i + 1000] + b"\r\n"
                       for i in range(0, 3000, 1000)) + b"0\r\n\r\n"
    conv = Conversation()
    head = request("Fragment", session=SID_A, content_range="bytes 0-2999/3000",
                   extra="Transfer-Encoding: chunked").replace(b"Content-Length: 0\r\n", b"")
    conv.send(0, 0, head + chunked, 0)
    conv.send(0, 1, ack(session=SID_A, received=3000), 1)
    received = bytearray()

    def recorder(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            while not received.endswith(b"0\r\n\r\n"):
                data_in = conn.recv(65536)
                if not data_in:
                    return
                received.extend(data_in)
            conn.sendall(ack(session=SID_A, received=3000))

    with socket.create_server(("127.0.0.1", 0)) as listener, \
            build_plan([conv.write(tmp_path / "chunked.pcap")]) as plan:
        fragment = plan.sessions[0].requests[0]
        assert fragment.body.length == 3000 and fragment.body.complete
        thread = threading.Thread(target=recorder, args=(listener,), daemon=True)
        thread.start()
        port = listener.getsockname()[1]
        result = replay(plan, Options(target=Target.parse(f"http://127.0.0.1:{port}/"), speed=0,
                                      timeout=5))
        thread.join(5)
    assert result.faults == 0 and result.differences == 0
    sent_head, _, sent_body = bytes(received).partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in sent_head and b"Content-Length" not in sent_head
    # Re-chunked as the spool reads it (one chunk here), decoding to the captured bytes.
    assert sent_body == b"%x\r\n" % 3000 + data + b"\r\n0\r\n\r\n"


def test_sessions_that_did_not_overlap_do_not_overlap_even_at_full_speed(tmp_path: Path) -> None:
    conv = Conversation()
    after_a = upload(conv, 0, SID_A, payload(20_000, 16), 5000, start_ms=0)
    upload(conv, 1, SID_B, payload(20_000, 17), 5000, start_ms=after_a, target="/up/b.bin")
    with BitsServer(tmp_path / "root", log=None) as srv, \
            build_plan([conv.write(tmp_path / "sequential.pcap")]) as plan:
        result = replay(plan, Options(target=Target.parse(srv.url), speed=0))
        records = list(srv.records)
    assert result.faults == 0 and result.differences == 0
    a_end = max(r.finished for r in records if r.target == "/up/file.bin")
    b_start = min(r.started for r in records if r.target == "/up/b.bin")
    assert b_start >= a_end


def test_an_ipv6_target(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    conv = Conversation()
    data = payload(5000, 18)
    upload(conv, 0, SID_A, data, 2000, start_ms=0)
    with BitsServer(tmp_path / "root", host="::1", log=None) as srv, \
            build_plan([conv.write(tmp_path / "c.pcap")]) as plan:
        assert srv.url.startswith("http://[::1]:")
        result = replay(plan, Options(target=Target.parse(srv.url), speed=0))
    assert result.faults == 0 and result.differences == 0
    assert (srv.root / "up" / "file.bin").read_bytes() == data


def test_adaptive_gives_up_after_the_server_forgot_the_session_too_often_in_all(tmp_path: Path) -> None:
    """The recreation limit holds for the whole session, not for each upload loop: twice during
    the fragments, once at Close, once more in the upload after it is one too many (the limit
    once restarted with every fragment run, and the recreation at Close was never counted)."""
    from bitstrace.analyzer.bits.protocol import PacketType
    from bitstrace.replay.fragment_loop import MAX_RECREATES
    from bitstrace.replay.server import error_ack

    assert MAX_RECREATES == 3
    forget = {PacketType.FRAGMENT: {1, 2, 6}, PacketType.CLOSE_SESSION: {1}}
    seen = {PacketType.FRAGMENT: 0, PacketType.CLOSE_SESSION: 0}
    data = payload(3000, 12)
    conv = Conversation()
    upload(conv, 0, SID_A, data, 1000, start_ms=0)
    with BitsServer(tmp_path / "root", log=None) as forgetful, \
            build_plan([conv.write(tmp_path / "forgotten.pcap")]) as plan:
        handle = forgetful.service.handle

        def answer(packet: PacketType, request):
            if packet in seen:
                seen[packet] += 1
                if seen[packet] in forget[packet]:
                    return error_ack(500, BG_E_SESSION_NOT_FOUND, "forgotten")
            return handle(packet, request)

        forgetful.service.handle = answer
        result = replay(plan, options_for(forgetful, mode="adaptive"))
    session = result.sessions[0]
    assert [o.label for o in session.outcomes].count("Create-Session (recreated)") == MAX_RECREATES
    assert session.fault and f"forgot the session {MAX_RECREATES} times" in session.fault


def test_adaptive_upload_keeps_inside_the_first_total_when_the_client_changed_it(tmp_path: Path, server) -> None:
    """The captured client sent bytes 0-999/2000, then bytes 1000-2999/3000 (refused). The
    adaptive replay uploads the 2000-byte file it began, in valid ranges (it once sent
    `bytes 1000-2999/2000`, which the server refused as malformed)."""
    data = payload(3000, 13)
    conv = Conversation()
    conv.send(0, 0, request("Create-Session"), 0)
    conv.send(0, 1, ack(session=SID_A), 1)
    conv.send(0, 0, request("Fragment", session=SID_A, body=data[:1000],
                            content_range="bytes 0-999/2000"), 10)
    conv.send(0, 1, ack(session=SID_A, received=1000), 11)
    conv.send(0, 0, request("Fragment", session=SID_A, body=data[1000:],
                            content_range="bytes 1000-2999/3000"), 20)
    conv.send(0, 1, ack(400, session=SID_A, error="0x80070057", reason="Bad Request"), 21)
    conv.send(0, 0, request("Close-Session", session=SID_A), 30)
    conv.send(0, 1, ack(session=SID_A), 31)
    with build_plan([conv.write(tmp_path / "changed.pcap")]) as plan:
        result = replay(plan, options_for(server, mode="adaptive"))
    session = result.sessions[0]
    assert session.fault is None, session.fault
    assert [(o.label, o.live.status) for o in session.outcomes] == [
        ("Create-Session", 200), ("Fragment bytes 0-999/2000", 200),
        ("Fragment bytes 1000-1999/2000", 200), ("Close-Session", 200)]
    assert (server.root / "up" / "file.bin").read_bytes() == data[:2000]


def test_https_replay_writes_its_key_log(tmp_path: Path) -> None:
    """bits-replay to an https:// target (through a TLS front on 127.0.0.1) lands every
    session, and --tls-keylog FILE holds the secrets of its connections."""

    conv = Conversation()
    upload(conv, 0, SID_A, payload(3000, 21), 1000, start_ms=0)
    upload(conv, 1, SID_B, payload(2000, 22), 1000, start_ms=5)
    path = conv.write(tmp_path / "c.pcap")
    keylog = tmp_path / "replay-keys.log"
    with BitsServer(tmp_path / "root", log=None) as srv:
        front = TlsFront(srv.address, tmp_path)
        try:
            out, err = io.StringIO(), io.StringIO()
            code = main([str(path), "--target", front.url, "--speed", "0", "--json", "--insecure",
                         "--tls-keylog", str(keylog)], out=out, err=err)
        finally:
            front.close()
    report = json.loads(out.getvalue())
    assert code == 0, err.getvalue()
    assert report["summary"]["faults"] == 0 and report["summary"]["differences"] == 0
    assert report["summary"]["sessions"] == 2
    labels = [line.split()[0] for line in keylog.read_text().splitlines() if line.strip()]
    assert {"CLIENT_RANDOM", "CLIENT_TRAFFIC_SECRET_0"} & set(labels)


def test_unwritable_key_log_is_a_usage_error(tmp_path: Path) -> None:
    conv = Conversation()
    upload(conv, 0, SID_A, payload(1000, 23), 1000, start_ms=0)
    path = conv.write(tmp_path / "c.pcap")
    err = io.StringIO()
    code = main([str(path), "--target", "https://127.0.0.1:9/", "--tls-keylog",
                 str(tmp_path / "missing" / "keys.log")], out=io.StringIO(), err=err)
    assert code == 2
    assert err.getvalue() == (f"bits-replay: --tls-keylog {tmp_path / 'missing' / 'keys.log'}: "
                              "No such file or directory\n")


class RecordingServer(LoopbackServer):
    """Records every request it reads, bytes exactly (head up to the empty line, then
    Content-Length bytes of body), and answers each with a BITS ack issuing SID_B."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        super().__init__()

    def handle(self, conn: socket.socket) -> None:
        buffered = b""
        while (read := self.read_head(conn, buffered)) is not None:
            head, buffered = read
            length = int(next((line.split(b":", 1)[1] for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), b"0"))
            while len(buffered) < length:
                buffered += conn.recv(65536)
            self.received.append(head + b"\r\n\r\n" + buffered[:length])
            buffered = buffered[length:]
            conn.sendall(ack(session=SID_B))


def test_captured_requests_go_out_byte_for_byte(tmp_path: Path) -> None:
    """A target with a space (which http.client refuses), header names in odd case and order,
    an HTTP/1.0 request line:
    the live server reads exactly the captured bytes, but for Host and the session id (and
    the optional whitespace around a value, which is not part of it: one space after the
    colon, none after the value)."""
    odd = (b"BITS_POST /up/my file.bin HTTP/1.1\r\nuser-agent: Microsoft BITS/7.8\r\n"
           b"HOST: origin.example:8080\r\nbits-packet-type: Ping\r\nX-Odd: two  spaces\r\n"
           b"Content-Length: 0\r\n\r\n")
    create = request("Create-Session", "/up/my file.bin").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    body = payload(1500, 31)
    fragment = request("Fragment", "/up/my file.bin", SID_A, body, "bytes 0-1499/1500")
    conv = Conversation()
    conv.send(0, 0, odd, 0)
    conv.send(0, 1, ack(), 1)
    conv.send(0, 0, create, 10)
    conv.send(0, 1, ack(session=SID_A), 11)
    conv.send(0, 0, fragment, 20)
    conv.send(0, 1, ack(session=SID_A, received=1500), 21)
    path = conv.write(tmp_path / "odd.pcap")
    server = RecordingServer()
    try:
        with build_plan([path]) as plan:
            result = replay(plan, Options(target=Target.parse(server.url), speed=0))
    finally:
        server.close()
    assert result.faults == 0, [s.fault for s in result.sessions]
    live_host = server.url[len("http://"):-1].encode()
    as_live = [odd, create, fragment.replace(SID_A.encode(), SID_B.encode())]
    assert server.received == [raw.replace(b"origin.example:8080", live_host) for raw in as_live]
