"""The text report of many sessions stays a page a person reads: each table keeps to TABLE_ROWS
rows, the sessions that need a look first, and says what it left out. And bits-analyze renders
no text at all when a report format (--json, --jsonl, --html) is asked for."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support import report_fixtures as fx
from bitstrace.analyzer.analysis import analyze
from bitstrace.analyzer.report.json import build_report
from bitstrace.analyzer.report.text import TABLE_ROWS, render_text
from tests.support import REPO

ROOT = REPO
SINGLE = ROOT / "captures" / "single-fragment.pcap"
BITS_ANALYZE = Path(sys.executable).parent / "bits-analyze"


def replicate_session() -> ModuleType:
    """captures/replicate_session.py (captures/ is a folder of scripts, not a package)."""
    module = sys.modules.get("replicate_session")
    if module is None:
        spec = importlib.util.spec_from_file_location("replicate_session", ROOT / "captures" / "replicate_session.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


def text_of(report: dict, **options) -> str:
    out = io.StringIO()
    render_text(report, out, color=False, **options)
    return out.getvalue()


def session_rows(text: str) -> list[str]:
    """The first lines of the sessions table's rows (a long URL folds onto indented lines)."""
    lines = text[text.index("Sessions ("):].splitlines()
    rule = next(n for n, line in enumerate(lines) if line.startswith("───"))
    rows = []
    for line in lines[rule + 1:]:
        if re.match(r"[0-9A-F]{8}…|\(no id\)", line):
            rows.append(line)
        elif not line.startswith(" "):
            break
    return rows


@pytest.fixture(scope="module")
def thirty_thousand(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Issue 13's capture: single-fragment.pcap's session 30,000 times (237 MB, about 9 MB gzip)."""
    path = tmp_path_factory.mktemp("many") / "30000-sessions.pcap.gz"
    replicate_session().write_replicated(path, 30_000)
    return path


@pytest.mark.slow
def test_text_of_30000_sessions_is_bounded_and_says_what_it_left_out(thirty_thousand: Path) -> None:
    # As in a log: no COLUMNS (readline, imported in this process, exports its own to children).
    log = {name: value for name, value in os.environ.items() if name != "COLUMNS"}
    run = subprocess.run([BITS_ANALYZE, "--no-progress", thirty_thousand], capture_output=True, text=True,
                         timeout=600, env=log)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "30,000 BITS upload sessions: 30,000 delivered, 0 not delivered, 0 unknown" in text
    assert "Sessions (30,000)" in text
    rows = session_rows(text)
    assert len(rows) == TABLE_ROWS
    # the first ones, in capture order (all are healthy)
    assert [row.split()[0] for row in rows[:3]] == ["00000000…", "00000001…", "00000002…"]
    assert "29,800 more healthy sessions (delivered, no warning or error) not shown; --json for all." in text
    assert "need a look" not in text  # none was left out
    assert len(text.splitlines()) < TABLE_ROWS + 40


def test_replicated_sessions_are_the_template_session_again(tmp_path: Path) -> None:
    template = build_report(analyze([SINGLE]))["sessions"][0]
    path = tmp_path / "three.pcap"
    replicate_session().write_replicated(path, 3)
    report = build_report(analyze([path]))
    assert not report["problems"] and report["captures"][0]["frames"] == 3 * 19
    varying = {"id", "client", "first_time", "first_ts", "last_time", "last_ts", "connections", "packets",
               "verdict_reason"}  # names a frame
    for number, session in enumerate(report["sessions"]):
        assert session["id"] == "{%08X-0000-4000-8000-%012X}" % (number, number)
        assert session["client"] == f"127.0.0.1:{10000 + number}"
        assert session["verdict_reason"] == f"final fragment acknowledged (frame {number * 19 + 14})"
        assert {k: v for k, v in session.items() if k not in varying} == \
            {k: v for k, v in template.items() if k not in varying}
        assert [p["request"]["body_sha256"] for p in session["packets"]] == \
            [p["request"]["body_sha256"] for p in template["packets"]]


def test_sessions_that_need_a_look_come_first_then_healthy_ones_fill_the_rows() -> None:
    report = fx.many_sessions(TABLE_ROWS + 100)  # every fifth one cancelled, some with an info anomaly
    cancelled = [s for s in report["sessions"] if s["verdict"] == "not-delivered"]
    healthy = [s for s in report["sessions"] if s["verdict"] == "delivered"]
    text = text_of(report)
    rows = session_rows(text)
    assert len(rows) == TABLE_ROWS
    shown = [row.split()[0].rstrip("…") for row in rows]
    for session in cancelled:  # every one, wherever it is in the capture
        assert session["id"][1:9] in shown
    # then the healthy ones, the first of them, the table in capture order
    expected = sorted(cancelled + healthy[:TABLE_ROWS - len(cancelled)], key=lambda s: s["first_ts"])
    assert shown == [s["id"][1:9] for s in expected]
    left = len(healthy) - (TABLE_ROWS - len(cancelled))
    assert f"{left:,} more healthy sessions (delivered, no warning or error) not shown; --json for all." in text
    assert "need a look" not in text


def test_sessions_that_need_a_look_are_capped_too_and_counted() -> None:
    report = fx.many_sessions(TABLE_ROWS * 2)
    for session in report["sessions"][: TABLE_ROWS + 30]:
        session["verdict"] = "unknown"
    flagged = sum(1 for s in report["sessions"] if s["verdict"] != "delivered")
    text = text_of(report)
    rows = session_rows(text)
    assert len(rows) == TABLE_ROWS and not any(" delivered " in row for row in rows)
    assert (f"{flagged - TABLE_ROWS} more sessions that need a look (not delivered, or a warning or an error) "
            "not shown; --json for all.") in " ".join(text.split())
    assert f"{len(report['sessions']) - flagged:,} more healthy sessions" in text


def test_anomalies_are_capped_worst_first_and_counted_by_severity() -> None:
    builder = fx.SessionBuilder(fx.ID_CLEAN).create()
    packet = builder.fragment(0, 99, 100)
    for n in range(TABLE_ROWS + 50):
        builder.flag(packet, "range-resend", "info", f"resend number {n}")
    for n in range(20):
        builder.flag(packet, "range-gap", "error", f"gap number {n}")
    report = fx.report(captures=[fx.capture("c.pcap", frames=9)],
                       sessions=[builder.build(state="closed", verdict="delivered")])
    text = text_of(report)
    section = text[text.index("Anomalies ("):text.index("\nCounts")]
    assert f"Anomalies ({TABLE_ROWS + 70}), worst first" in section
    assert section.count("gap number") == 20  # the errors first, all of them
    assert section.count("resend number") == TABLE_ROWS - 20
    assert "70 more anomalies (70 info) not shown; --json for all." in section
    # with --min-severity the hidden ones are still said, and nothing is capped
    errors = text_of(report, min_severity="error")
    assert f"{TABLE_ROWS + 50:,} anomalies below error not shown." in errors
    assert "more anomalies" not in errors


def test_incomplete_extracted_files_come_first() -> None:
    report = fx.many_sessions(TABLE_ROWS + 10)
    for n, session in enumerate(report["sessions"]):
        complete = n < TABLE_ROWS  # the incomplete ones are the last ten of the capture
        session["extracted"] = {"path": f"out/file-{n}.bin", "complete": complete,
                                "sha256": "ab" * 32 if complete else None, "coverage": []}
    wide = text_of(report)
    table = wide[wide.index("Extracted files ("):]
    for n in range(TABLE_ROWS, TABLE_ROWS + 10):
        assert f"out/file-{n}.bin" in table
    assert "10 more complete extracted files not shown; --json for all." in table


def test_a_small_report_is_not_capped_and_one_row_more_is_said() -> None:
    text = text_of(fx.many_sessions(TABLE_ROWS))
    assert len(session_rows(text)) == TABLE_ROWS
    assert "not shown" not in text
    one_more = text_of(fx.many_sessions(TABLE_ROWS + 1))
    assert len(session_rows(one_more)) == TABLE_ROWS
    assert "1 more healthy session (delivered, no warning or error) not shown; --json for all." in one_more


@pytest.mark.parametrize("option", ["--json", "--jsonl", "--html"])
def test_no_text_when_a_report_goes_to_a_file(tmp_path: Path, option: str) -> None:
    out = tmp_path / "report"
    run = subprocess.run([BITS_ANALYZE, "--no-progress", option, out, SINGLE], capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == b""
    assert run.stderr == b""  # the capture has no problem to report
    assert out.stat().st_size > 1000


def test_extract_alone_still_reports_what_it_wrote(tmp_path: Path) -> None:
    """--extract is no report format: without one, the text says which files are whole."""
    run = subprocess.run([BITS_ANALYZE, "--no-progress", "--extract", tmp_path / "files", SINGLE],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    table = run.stdout[run.stdout.index("Extracted files (1)"):]
    written = list((tmp_path / "files").iterdir())
    assert len(written) == 1 and written[0].name.startswith("7CA17E07")
    assert re.search(r"^7CA17E07… .* yes ", table, re.MULTILINE), table
    with_json = subprocess.run([BITS_ANALYZE, "--no-progress", "--extract", tmp_path / "again", "--json",
                                tmp_path / "r.json", SINGLE], capture_output=True, timeout=120)
    assert with_json.returncode == 0 and with_json.stdout == b""
    assert json.loads((tmp_path / "r.json").read_text())["sessions"][0]["extracted"]["complete"] is True
