"""bits-replay's command line: bad arguments are usage errors with one plain line, exit codes
follow the shared scheme, and an unexpected error in one session is reported, not lost."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitstrace import __version__
from bitstrace.cli.common import Exit
from bitstrace.cli.replay import main
from bitstrace.replay.replayer.plan import build_plan
from bitstrace.replay.replayer.options import Options, Target
from bitstrace.replay.replayer.schedule import dry_run, replay
from bitstrace.replay.server import BitsServer
from tests.replay.replayer.test_plan import SID_A, SID_B, Conversation, payload, upload
from tests.support import REPO

CAPTURES = REPO / "captures"


@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> Path:
    conv = Conversation()
    upload(conv, 0, SID_A, payload(2000, 1), 1000, start_ms=0, step_ms=10)
    upload(conv, 1, SID_B, payload(2000, 2), 1000, start_ms=100, step_ms=10)
    return conv.write(tmp_path_factory.mktemp("cli") / "two.pcap")


@pytest.mark.parametrize("target, says", [
    ("http://[::1", "is not a usable URL: Invalid IPv6 URL"),
    ("http://127.0.0.1:0/", "port 0 cannot be connected to"),
    ("http://127.0.0.1:99999/", "is not a usable URL: Port out of range"),
    ("http://127.0.0.1:http/", "is not a usable URL: Port could not be cast"),
])
def test_unusable_targets_are_usage_errors(capture: Path, target: str, says: str) -> None:
    err = io.StringIO()
    assert main([str(capture), "--target", target], out=io.StringIO(), err=err) == Exit.USAGE
    assert err.getvalue().startswith(f"bits-replay: --target {target!r}")
    assert says in err.getvalue() and err.getvalue().count("\n") == 1


@pytest.mark.parametrize("option, value", [
    ("--speed", "nan"), ("--speed", "inf"), ("--speed", "-1"), ("--speed", "fast"),
    ("--timeout", "inf"), ("--timeout", "nan"), ("--timeout", "0"), ("--timeout", "1e300"),
    ("--concurrency", "0"), ("--concurrency", "two"),
])
def test_numbers_must_be_finite_and_in_range(capture: Path, option: str, value: str,
                                             capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main([str(capture), "--target", "http://127.0.0.1:9/", option, value])
    assert stop.value.code == Exit.USAGE
    err = capsys.readouterr().err
    assert f"error: argument {option}: {value!r}" in err and "Traceback" not in err


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"bits-replay {__version__}\n"


def test_unreadable_capture_is_exit_3_and_unknown_session_exit_2(capture: Path,
                                                                 tmp_path: Path) -> None:
    err = io.StringIO()
    missing = tmp_path / "missing.pcap"
    assert main([str(missing), "--target", "http://127.0.0.1:9/"], out=io.StringIO(), err=err) == Exit.INCOMPLETE
    assert "cannot open" in err.getvalue()
    assert main([str(capture), "--target", "http://127.0.0.1:9/", "--session", "{nope}",
                 "--dry-run"], out=io.StringIO(), err=io.StringIO()) == Exit.USAGE


class _BrokenObserver:
    """Fails while the first session sends its body: an error the replayer does not foresee."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    def on_session_start(self, session) -> None:
        pass

    def on_bytes(self, session, count: int) -> None:
        if session.key == SID_A:
            raise RuntimeError("observer broke")

    def on_session_end(self, session, result) -> None:
        self.ended.append(session.key)


def test_an_unexpected_error_is_a_fault_of_its_session_and_the_others_go_on(
        capture: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    with BitsServer(tmp_path / "root", log=None) as server, build_plan([capture]) as plan:
        options = Options(target=Target.parse(server.url), speed=0, timeout=10)
        result = replay(plan, options, _BrokenObserver())
        assert capsys.readouterr().err == ""  # no traceback unless asked for
        monkeypatch.setenv("BITSTRACE_DEBUG", "1")
        again = replay(plan, options, _BrokenObserver())
        assert "Traceback" in capsys.readouterr().err
    assert [s.key for s in result.sessions] == [SID_A, SID_B]
    broken, fine = result.sessions
    assert broken.fault == "unexpected error: RuntimeError: observer broke"
    assert fine.fault is None and fine.live_ids and result.faults == 1
    assert again.faults == 1


def test_credentials_outside_latin1_are_sent_as_utf8() -> None:
    with build_plan([CAPTURES / "basic-auth.pcap"]) as plan:
        options = Options(target=Target.parse("http://127.0.0.1:9/"), auth=("jürgen€", "pw"))
        sessions = dry_run(plan, options)
    headers = dict(next(r for s in sessions for r in s["requests"]
                        if any(k == "Authorization" for k, _ in r["headers"]))["headers"])
    expected = base64.b64encode("jürgen€:pw".encode("utf-8")).decode("ascii")
    assert headers["Authorization"] == f"Basic {expected}"


@pytest.mark.parametrize("json_output", [False, True])
def test_a_reader_that_goes_away_is_not_an_error(json_output: bool) -> None:
    """`bits-replay --dry-run x.pcap | head`: the pipe is closed before anything is written."""
    command = [sys.executable, "-m", "bitstrace.cli.replay", "--dry-run",
               str(CAPTURES / "clean-multi-fragment.pcap"), "--target", "http://127.0.0.1:9/"]
    process = subprocess.Popen(command + (["--json"] if json_output else []),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(60) == Exit.OK, err
    assert err == ""


def test_json_output_is_one_document(capture: Path) -> None:
    out = io.StringIO()
    assert main([str(capture), "--target", "http://127.0.0.1:9/", "--dry-run", "--json"],
                out=out, err=io.StringIO()) == Exit.OK
    assert json.loads(out.getvalue())["dry_run"] is True


class _FailingOutput(io.StringIO):
    """Standard output whose writes fail as a Ctrl-C or a vanished reader makes them fail."""

    def __init__(self, error: type[BaseException]) -> None:
        super().__init__()
        self.error = error

    def write(self, text: str) -> int:
        raise self.error


@pytest.mark.parametrize("error, code", [(KeyboardInterrupt, 130), (BrokenPipeError, Exit.OK)])
@pytest.mark.parametrize("json_output", [False, True])
def test_output_interrupted_or_cut_short(capture: Path, error: type[BaseException], code: int,
                                         json_output: bool) -> None:
    err = io.StringIO()
    arguments = [str(capture), "--target", "http://127.0.0.1:9/", "--dry-run"]
    assert main(arguments + (["--json"] if json_output else []), out=_FailingOutput(error),
                err=err) == code
    assert err.getvalue() == ("bits-replay: interrupted\n" if code == 130 else "")


def test_reports_are_streamed_a_session_at_a_time_and_read_as_plain_json(tmp_path: Path) -> None:
    """--json and --dry-run --json write their sessions one by one as they are made
    (report.Streamed); the text is byte for byte what json.dump writes for the same document
    held whole, and each session's dict is made only when the writer reaches it."""
    from bitstrace.replay.replayer.report import Streamed, dry_run_json, result_json, write_json
    from bitstrace.replay.replayer.schedule import describe

    conv = Conversation()
    upload(conv, 0, SID_A, payload(3000, 41), 1000, start_ms=0)
    upload(conv, 1, SID_B, payload(2000, 42), 1000, start_ms=5)
    path = conv.write(tmp_path / "two.pcap")
    made: list[str] = []

    def noted(sessions):
        for session in sessions:
            made.append(session["captured_id"])
            yield session

    with BitsServer(tmp_path / "root", log=None) as srv, build_plan([path]) as plan:
        options = Options(target=Target.parse(srv.url), speed=0)
        streamed, whole = io.StringIO(), io.StringIO()
        document = dry_run_json(noted(describe(plan, options)), len(plan.sessions), "t", [])
        assert made == []  # nothing made before it is written
        write_json(document, streamed)
        assert made == [SID_A, SID_B]
        json.dump(dry_run_json(dry_run(plan, options), 2, "t", []) | {
            "sessions": dry_run(plan, options)}, whole, indent=2)
        assert streamed.getvalue() == whole.getvalue() + "\n"
        result = replay(plan, options)
        streamed, whole = io.StringIO(), io.StringIO()
        write_json(result_json(result, plan, []), streamed)
        document = result_json(result, plan, [])
        json.dump(document | {"sessions": list(document["sessions"])}, whole, indent=2)
    assert streamed.getvalue() == whole.getvalue() + "\n"
    assert json.loads(streamed.getvalue())["summary"]["faults"] == 0
    empty = io.StringIO()
    write_json({"sessions": Streamed(iter(()), 0)}, empty)
    assert empty.getvalue() == '{\n  "sessions": []\n}\n'
