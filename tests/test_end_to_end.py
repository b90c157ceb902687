"""Every capture in captures/ yields exactly what captures/expected.json says: sessions, verdicts,
byte counts, the sha256 of each delivered file, and the anomaly codes (nothing missing, nothing
extra). expected.json is written by the corpus generator from what each scenario did, checked
against the files the server stored: it never comes from the analyzer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitstrace.analyzer.analysis import analyze
from bitstrace.analyzer.report.json import build_report
from tests.support import REPO

ROOT = REPO
EXPECTED = json.loads((ROOT / "captures" / "expected.json").read_text())["captures"]


def codes_of(report: dict) -> set[str]:
    return ({a["code"] for s in report["sessions"] for a in s["anomalies"]}
            | {a["code"] for a in report["anomalies"]})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_capture_matches_expected(name: str, tmp_path: Path) -> None:
    expected = EXPECTED[name]
    report = build_report(analyze([ROOT / "captures" / name], extract_dir=tmp_path))

    assert report["captures"][0]["complete"]
    assert report["captures"][0]["connections"] == expected["connections"]
    assert report["captures"][0]["exchanges"] == expected["exchanges"]
    if expected.get("anomalies_exhaustive", True):
        assert codes_of(report) == set(expected["anomalies"])
    else:
        assert codes_of(report) >= set(expected["anomalies"])

    sessions = report["sessions"]
    assert len(sessions) == len(expected["sessions"])
    for got, want in zip(sessions, expected["sessions"]):
        assert (got["id"] or "").lower() == (want["id"] or "").lower()
        assert got["verdict"] == want["delivery"]
        assert type(got["verdict"]) is str and type(got["state"]) is str  # plain values, not enums
        assert got["total"] == want["total"]
        assert got["acknowledged"] == want["bytes_acknowledged"]
        assert got["fragments"] == want["fragments_sent"]
        if want["delivery"] == "delivered":
            extracted = got["extracted"]
            assert extracted["complete"] and extracted["sha256"] == want["sha256"]
            data = (tmp_path / Path(extracted["path"]).name).read_bytes()
            assert len(data) == want["total"]


def test_clean_capture_has_no_anomaly_and_cli_exit_status() -> None:
    capture = ROOT / "captures" / "clean-multi-fragment.pcap"
    clean = subprocess.run([sys.executable, "-m", "bitstrace.cli.analyze", "--fail-on", "warning", str(capture)],
                           capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "1 BITS upload session: 1 delivered" in clean.stdout
    assert "No anomalies." in clean.stdout

    broken = ROOT / "captures" / "fragment-after-cancel.pcap"
    failing = subprocess.run([sys.executable, "-m", "bitstrace.cli.analyze", "--fail-on", "error", "--json", "-",
                              str(broken)], capture_output=True, text=True)
    assert failing.returncode == 1
    report = json.loads(failing.stdout)
    assert report["schema"] == "bitstrace.report" and report["version"] == 1
    assert "fragment-after-cancel" in codes_of(report)


def test_session_filter_and_min_severity() -> None:
    capture = ROOT / "captures" / "two-sessions-interleaved.pcap"
    full = build_report(analyze([capture]))
    assert len(full["sessions"]) == 2
    wanted = full["sessions"][1]["id"]
    run = subprocess.run([sys.executable, "-m", "bitstrace.cli.analyze", "--json", "-", "--session", wanted.lower(),
                          "--min-severity", "error", str(capture)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    only = json.loads(run.stdout)
    assert [s["id"] for s in only["sessions"]] == [wanted]
    assert only["summary"]["sessions"] == 1


def test_field_captures_report_what_the_server_did() -> None:
    """The misbehaving server's captures: the bytes it wrote past an ack cost no later answer, and
    the fragment it never answered is no-progress."""
    name = "framing-overrun.pcap"
    report = build_report(analyze([ROOT / "captures" / name]))
    [session] = report["sessions"]
    fragments = [pkt for pkt in session["packets"] if pkt["type"] == "Fragment"]
    assert [pkt["response"]["received"] for pkt in fragments] == [
        pkt["request"]["range"]["last"] + 1 for pkt in fragments]  # each ack with its own request
    [overrun] = [a for a in session["anomalies"] if a["code"] == "response-overrun"]
    assert overrun["message"].startswith(f"{EXPECTED[name]['overruns'][0]} bytes ")
    assert overrun["frames"][-1] == fragments[1]["response"]["frame"]

    name = "no-progress.pcap"
    report = build_report(analyze([ROOT / "captures" / name]))
    [session] = report["sessions"]
    unanswered = [pkt for pkt in session["packets"] if pkt["type"] == "Fragment" and pkt["response"] is None]
    assert len(unanswered) == EXPECTED[name]["unanswered"]
    [stuck] = [a for a in session["anomalies"] if a["code"] == "no-progress"]
    assert stuck["frames"] == [unanswered[2]["request"]["frame"]]  # the third attempt in a row
