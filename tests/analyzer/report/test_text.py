"""The terminal report, rendered from schema-v1 report dicts (tests/support/report_fixtures.py)."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from tests.support import report_fixtures as fx
from bitstrace.analyzer.bits.catalogue import CATALOGUE
from bitstrace.analyzer.report.text import render_text

ANSI = re.compile(r"\x1b\[")


def text_of(report: dict, **options) -> str:
    out = io.StringIO()
    render_text(report, out, color=options.pop("color", False), **options)
    return out.getvalue()


def anomaly_section(text: str) -> str:
    """The lines of the anomalies table (between its title and the next section)."""
    start = text.index("Anomalies (")
    end = min(i for i in (text.find("Downloads (", start), text.find("\nCounts", start)) if i > 0)
    return text[start:end]


def test_every_session_and_anomaly_appears():
    report = fx.corpus_report()
    text = text_of(report)
    wide = Console(record=True, width=200, color_system=None, file=io.StringIO())
    render_text(report, wide, color=False)
    wide_text = wide.export_text()
    for session in report["sessions"]:
        assert session["url"] in wide_text
        assert session["verdict"] in text
    # Two ids share their first 8 hex digits: both are lengthened until they differ.
    assert "A0FF5911-4…" in text and "A0FF5911-7…" in text
    for short in ("0D9E8F7A…", "5C2E1B90…", "C85B4E0A…", "E1D2C3B4…"):
        assert short in text
    every = [a for s in report["sessions"] for a in s["anomalies"]] + report["anomalies"]
    section = anomaly_section(text)
    for anomaly in every:
        assert anomaly["code"] in section
    assert len(every) == 9
    assert "Anomalies (9)" in text


def test_every_catalogue_code_is_shown_whole():
    builder = fx.SessionBuilder(fx.ID_CLEAN).create()
    packet = builder.fragment(0, 99, 100)
    for code, kind in CATALOGUE.items():
        builder.flag(packet, code, kind.severity.value, f"message for {code}")
    text = text_of(fx.report(captures=[fx.capture("c.pcap", frames=9)],
                             sessions=[builder.build(state="closed", verdict="delivered")]))
    section = anomaly_section(text)
    for code in CATALOGUE:
        assert re.search(rf"\s{re.escape(code)}\s", section), code
        assert f"message for {code}" in section


def test_min_severity_filters_anomalies_and_says_so():
    report = fx.corpus_report()
    warning = anomaly_section(text_of(report, min_severity="warning"))
    assert "session-before-capture" not in warning and "out-of-sync" not in warning
    for code in ("fragment-after-cancel", "range-gap", "orphan-response", "never-finished"):
        assert code in warning
    assert "2 anomalies below warning not shown" in warning

    errors = anomaly_section(text_of(report, min_severity="error"))
    assert {"fragment-after-cancel", "error-response", "range-gap"} <= set(re.findall(r"[a-z]+(?:-[a-z]+)+", errors))
    for code in ("orphan-response", "capture-gap", "no-response", "never-finished", "out-of-sync"):
        assert code not in errors
    assert "6 anomalies below error not shown" in errors

    with pytest.raises(ValueError):
        text_of(report, min_severity="debug")


def test_anomalies_worst_first_then_by_time():
    lines = anomaly_section(text_of(fx.corpus_report())).splitlines()
    rows = [line.split()[:2] for line in lines if line.split()[:1] and line.split()[0] in ("error", "warning", "info")]
    severities = [severity for severity, _ in rows]
    assert severities == sorted(severities, key=("error", "warning", "info").index)
    codes = [code for _, code in rows]
    # Warnings: the orphan response (0.2 s into the capture) comes before those of the
    # truncated session (3 s in).
    assert codes.index("orphan-response") < codes.index("capture-gap") < codes.index("never-finished")
    assert codes.index("fragment-after-cancel") < codes.index("range-gap")  # 0.6 s before 1.0 s


def test_no_escape_codes_without_colour_and_the_width_of_a_log(monkeypatch):
    report = fx.hostile_report()
    report["sessions"][0]["url"] += "\x1b[31m"
    monkeypatch.delenv("COLUMNS", raising=False)
    plain = text_of(report)
    assert not ANSI.search(plain) and "\x1b" not in plain
    # Not a terminal, no COLUMNS: nothing folds, each row is one line however long.
    rows = [line for line in plain.splitlines() if line.startswith("<script>…")]
    assert len(rows) == 1 and "/up/<script>alert('url')</script>?a=1&b=\"2\"\\x1b[31m" in rows[0]
    assert "[link=http://evil.example]x[/link]" in next(line for line in plain.splitlines()
                                                         if line.startswith("info ") and "client-fingerprint" in line)
    # The control character is shown, escaped, and rich markup in capture strings stays text.
    assert "\\x1b[31m" in plain
    assert "[link=http://evil.example]x[/link]" in plain
    coloured = text_of(report, color=True)
    assert ANSI.search(coloured)
    assert "\\x1b[31m" in coloured  # the capture's own escape stays escaped with colour on
    monkeypatch.setenv("COLUMNS", "120")
    assert max(len(line) for line in text_of(report).splitlines()) <= 120


def test_colour_marks_verdicts():
    coloured = text_of(fx.corpus_report(), color=True)
    assert re.search(r"\x1b\[[0-9;]*32m(\s*)delivered", coloured)  # green
    assert re.search(r"\x1b\[[0-9;]*31m(\s*)not-delivered", coloured)  # red
    assert re.search(r"\x1b\[[0-9;]*33m(\s*)unknown", coloured)  # yellow


def test_header_downloads_counts_and_problems():
    text = text_of(fx.corpus_report())
    header = text.split("\n\n")[0]
    assert "captures/clean-multi-fragment.pcap: complete" in header
    assert "captures/truncated.pcap: INCOMPLETE (2 problems, 1 fatal)" in " ".join(header.split())
    assert "6 BITS upload sessions: 4 delivered, 1 not delivered, 1 unknown" in text
    assert "Downloads (2)" in text and "/files/update.cab" in text
    assert "HTTP exchanges 36: 33 BITS, 3 other" in text
    problems = text[text.index("Problems reading the input (2)"):]
    assert "truncated-record (fatal)" in problems and "frame 311" in problems


def test_given_console_is_used_and_wide_ones_show_start_times():
    console = Console(record=True, width=160, color_system=None, file=io.StringIO())
    render_text(fx.corpus_report(), console, color=False)
    text = console.export_text()
    assert "Start" in text.split("Sessions (6)")[1].splitlines()[1]
    assert "11:10:40.510" in text  # the cancelled session's start


def test_empty_and_many(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    assert "No BITS upload sessions in the capture." in text_of(fx.empty_report())
    assert "No anomalies." in text_of(fx.empty_report())
    many = fx.many_sessions(50)
    text = text_of(many)
    for session in many["sessions"]:
        assert session["id"][1:9] in text
    assert max(len(line) for line in text.splitlines()) <= 120


def test_sparse_values_and_extracted_files():
    text = text_of(fx.sparse_report())
    assert "(no id)" in text and "0B/?" in text  # no file size known
    extracted = text[text.index("Extracted files (1)"):]
    assert "out/A0FF5911_report.bin" in extracted and "NO" in extracted


def test_narrow_terminal_keeps_the_essentials_within_its_width():
    report = fx.corpus_report()
    console = Console(record=True, width=80, color_system=None, file=io.StringIO())
    render_text(report, console, color=False)
    text = console.export_text()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    for short in ("A0FF5911-4…", "A0FF5911-7…", "0D9E8F7A…", "5C2E1B90…", "C85B4E0A…", "E1D2C3B4…"):
        assert short in text
    for session in report["sessions"]:
        assert session["url"] in text and session["verdict"] in text
    for anomaly in [a for s in report["sessions"] for a in s["anomalies"]] + report["anomalies"]:
        assert f"{anomaly['severity']} {anomaly['code']} " in text


def wide_character_report() -> dict:
    report = fx.many_sessions(12)
    for n, session in enumerate(report["sessions"]):
        session["url"] = ["/uploads/報告書-月次.bin", "/up/😀😀😀.log", "/u/x", "/uploads/" + "長" * 30][n % 4]
        session["client"] = "[2001:db8:85a3::8a2e:370:7334]:50412" if n == 5 else session["client"]
    return report


@pytest.mark.parametrize("make", [fx.corpus_report, lambda: fx.many_sessions(30), fx.hostile_report,
                                  fx.sparse_report, wide_character_report])
def test_tables_of_one_line_rows_read_as_rich_lays_them_out_row_by_row(make, monkeypatch):
    """Without colour, rows that each fit on one line go to rich as one row of multi-line cells
    (fast); the page must be what rich's row-by-row layout gives, at every width."""
    import bitstrace.analyzer.report.text as text

    report = make()
    fits = text._one_line_rows
    taken = []
    monkeypatch.setattr(text, "_one_line_rows", lambda *args: taken.append(fits(*args)) or taken[-1])

    def page(width: int) -> str:
        console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
        render_text(report, console, color=False)
        return console.file.getvalue()

    widths = range(60, 150, 3)
    fast = [page(width) for width in widths]
    monkeypatch.setattr(text, "_one_line_rows", lambda *args: False)
    assert fast == [page(width) for width in widths]
    assert True in taken and False in taken
