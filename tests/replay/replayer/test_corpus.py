"""bits-replay over the corpus in captures/, each capture against a bits-server set up the way
its scenario's server was (captures/make_captures.py). Runs over whatever captures exist."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from bitstrace.analyzer.bits.protocol import BG_E_SESSION_NOT_FOUND
from bitstrace.replay.replayer.plan import build_plan
from bitstrace.replay.replayer.options import Options, Target
from bitstrace.replay.replayer.schedule import replay
from bitstrace.replay.server import BitsServer
from tests.support import REPO

CAPTURES = REPO / "captures"
CORPUS = sorted(p.name for p in CAPTURES.glob("*.pcap*") if p.is_file())
EXPECTED = (json.loads((CAPTURES / "expected.json").read_text())["captures"]
            if (CAPTURES / "expected.json").is_file() else {})


def _scenario_settings() -> dict[str, dict]:
    """Server settings per capture file, from the generator's scenario table."""
    path = CAPTURES / "make_captures.py"
    if not path.is_file():
        return {}
    module = sys.modules.get("make_captures")
    if module is None:
        spec = importlib.util.spec_from_file_location("make_captures", path)
        module = sys.modules["make_captures"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # registered first: its dataclasses look it up
    return {s.filename: dict(s.server) for s in module.SCENARIOS}


SETTINGS = _scenario_settings()
pytestmark = pytest.mark.skipif(not CORPUS, reason="no captures in captures/")


def run(name: str, tmp_path: Path, mode: str = "faithful", speed: float = 1.0):
    settings = SETTINGS.get(name, {})
    auth = settings.get("auth")
    with BitsServer(tmp_path / "root", log=None, **settings) as server, \
            build_plan([CAPTURES / name]) as plan:
        result = replay(plan, Options(target=Target.parse(server.url), mode=mode, speed=speed,
                                      timeout=10, auth=auth))
        return result, server, list(server.records)


def delivered(name: str) -> list[dict]:
    return [s for s in EXPECTED.get(name, {}).get("sessions", [])
            if s["delivery"] == "delivered" and s["final_state"] == "COMPLETE"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# The reference server answers as the captured one did, except where that one misbehaved on
# purpose (captures/misbehaving_server.py: its entries say what it did).
FAITHFUL = [name for name in CORPUS if "overruns" not in EXPECTED.get(name, {})]


@pytest.mark.parametrize("name", FAITHFUL)
def test_faithful_replay_matches_the_capture(name: str, tmp_path: Path) -> None:
    """At the capture's own pace, every live answer is the captured one (clean and anomalous
    captures alike), and every delivered file lands byte for byte."""
    result, server, _ = run(name, tmp_path)
    assert result.faults == 0, [s.fault for s in result.sessions]
    assert result.differences == 0, [(o.label, o.differences) for s in result.sessions
                                     for o in s.outcomes if o.differences]
    for session in delivered(name):
        assert sha256(server.root / session["url"].lstrip("/")) == session["sha256"]


@pytest.mark.skipif("fragment-after-cancel.pcap" not in CORPUS, reason="capture not in the corpus")
def test_fragment_after_cancel_reproduces_session_not_found(tmp_path: Path) -> None:
    result, _, records = run("fragment-after-cancel.pcap", tmp_path, speed=0)
    last = result.sessions[0].outcomes[-1]
    assert last.label.startswith("Fragment")
    assert last.live.status == 500 and last.live.error_code == BG_E_SESSION_NOT_FOUND.code
    assert records[-1].packet == "Fragment" and records[-1].status == 500


@pytest.mark.skipif("connection-cut-resume.pcap" not in CORPUS, reason="capture not in the corpus")
def test_adaptive_replay_completes_the_resumed_upload(tmp_path: Path) -> None:
    name = "connection-cut-resume.pcap"
    result, server, _ = run(name, tmp_path, mode="adaptive", speed=0)
    (expected,) = delivered(name)
    assert result.faults == 0
    assert sha256(server.root / expected["url"].lstrip("/")) == expected["sha256"]
    fragments = [o for o in result.sessions[0].outcomes if o.label.startswith("Fragment")]
    assert all(o.live.status == 200 for o in fragments)  # no resend, no 416: a clean upload


@pytest.mark.skipif("two-sessions-interleaved.pcap" not in CORPUS, reason="capture not in the corpus")
def test_overlapping_sessions_overlap_on_the_server(tmp_path: Path) -> None:
    # A tenth of the capture's speed keeps the overlap well above thread scheduling noise.
    result, _, records = run("two-sessions-interleaved.pcap", tmp_path, speed=0.1)
    assert result.faults == 0 and len(result.sessions) == 2
    spans = {}
    for record in records:
        first, last = spans.get(record.target, (record.started, record.finished))
        spans[record.target] = (min(first, record.started), max(last, record.finished))
    (a_start, a_end), (b_start, b_end) = sorted(spans.values())
    assert b_start < a_end  # the second session began before the first ended
