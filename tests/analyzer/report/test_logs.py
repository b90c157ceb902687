"""--logs DIR: one Zeek-style log per record type, read back and compared with the JSON report."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bitstrace.analyzer.report.logs import LOGS
from tests.support import REPO

ROOT = REPO
CAPTURES = [ROOT / "captures" / name for name in (
    "gap.pcap", "upload-reply.pcap", "malformed-requests.pcap", "two-sessions-interleaved.pcap")]


def run(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "bitstrace.cli.analyze", *map(str, args)],
                          capture_output=True, cwd=ROOT, timeout=120)


def read_zeek(path: Path) -> tuple[list[str], list[str], list[list[str]]]:
    fields: list[str] = []
    types: list[str] = []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#fields\t"):
            fields = line.split("\t")[1:]
        elif line.startswith("#types\t"):
            types = line.split("\t")[1:]
        elif not line.startswith("#"):
            rows.append(line.split("\t"))
    return fields, types, rows


def unescape(value: str) -> str:
    return value.encode("latin-1").decode("unicode_escape") if "\\x" in value else value


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    zeek = tmp_path_factory.mktemp("zeek")
    table = tmp_path_factory.mktemp("csv")
    assert run("-q", "--logs", zeek, *CAPTURES).returncode == 0
    assert run("-q", "--logs", table, "--logs-format", "csv", *CAPTURES).returncode == 0
    report = json.loads(run("--json", "-", *CAPTURES).stdout)
    return report, zeek, table


def expected_rows(report: dict[str, Any]) -> dict[str, int]:
    sessions = report["sessions"]
    return {"captures": len(report["captures"]), "problems": len(report["problems"]),
            "sessions": len(sessions), "packets": sum(len(s["packets"]) for s in sessions),
            "anomalies": sum(len(s["anomalies"]) for s in sessions) + len(report["anomalies"]),
            "downloads": len(report["downloads"])}


def test_zeek_logs_hold_one_row_per_record(written: tuple[dict[str, Any], Path, Path]) -> None:
    report, zeek, _ = written
    counts = expected_rows(report)
    assert counts["downloads"] and counts["anomalies"] and counts["packets"] > counts["sessions"] > 1
    for name, columns in LOGS.items():
        fields, types, rows = read_zeek(zeek / f"{name}.log")
        assert fields == [c.name for c in columns] and types == [c.zeek_type for c in columns]
        assert len(rows) == counts[name], name
        assert all(len(row) == len(fields) for row in rows)


def test_zeek_values_are_the_reports(written: tuple[dict[str, Any], Path, Path]) -> None:
    report, zeek, _ = written
    fields, _, rows = read_zeek(zeek / "sessions.log")
    by_id = {s["id"]: s for s in report["sessions"]}
    for row in rows:
        value = dict(zip(fields, row))
        session = by_id[value["session"]]
        assert value["verdict"] == session["verdict"] and value["state"] == session["state"]
        assert value["total"] == ("-" if session["total"] is None else str(session["total"]))
        assert value["before_capture"] == ("T" if session["before_capture"] else "F")
        assert value["connections"] == ",".join(map(str, session["connections"]))
        assert unescape(value["verdict_reason"]) == session["verdict_reason"]
        assert value["anomalies"] == str(len(session["anomalies"]))
    fields, _, rows = read_zeek(zeek / "packets.log")
    packets = [(s["id"], p) for s in report["sessions"] for p in s["packets"]]
    for row, (session_id, packet) in zip(rows, packets):
        value = dict(zip(fields, row))
        assert value["session"] == session_id and value["frame"] == str(packet["request"]["frame"])
        status = packet["response"]["status"] if packet["response"] else None
        assert value["status"] == ("-" if status is None else str(status))
        assert value["anomalies"] == (",".join(packet["anomalies"]) or "(empty)")
        assert value["capture_file"] == report["captures"][packet["request"]["capture"]]["file"]


def test_every_scalar_field_of_the_report_has_a_column(written: tuple[dict[str, Any], Path, Path]) -> None:
    """A field added to the report and forgotten here fails this test."""
    report, _, _ = written
    covered = {name: {".".join(c.path) for c in columns} for name, columns in LOGS.items()}
    left_out = {"first_time", "last_time", "time"}  # the ISO twins of the *_ts columns

    def leaves(record: dict[str, Any], prefix: str = "") -> set[str]:
        found = set()
        for key, value in record.items():
            if isinstance(value, dict):
                found |= leaves(value, f"{prefix}{key}.")
            elif key not in left_out:
                found.add(prefix + key)
        return found

    missing = []
    for log, records, skip in (
            ("sessions", report["sessions"], {"packets", "anomalies", "extracted.coverage"}),
            ("packets", [p for s in report["sessions"] for p in s["packets"]], {"request.capture",
                                                                                  "request.last_capture",
                                                                                  "response.capture"}),
            ("anomalies", [a for s in report["sessions"] for a in s["anomalies"]], {"captures", "session"}),
            ("problems", report["problems"], {"file"}),
            ("downloads", report["downloads"], {"capture"}),
    ):
        for record in records:
            missing += [f"{log}: {leaf}" for leaf in leaves(record) - covered[log] - skip
                        if not any(path.startswith(leaf + ".") for path in covered[log])]  # null objects
    assert sorted(set(missing)) == []


def test_csv_loads_into_pandas_with_integers_as_integers(written: tuple[dict[str, Any], Path, Path]) -> None:
    pandas = pytest.importorskip("pandas")
    report, _, table = written
    packets = pandas.read_csv(table / "packets.csv", dtype_backend="numpy_nullable")
    sessions = pandas.read_csv(table / "sessions.csv", dtype_backend="numpy_nullable")
    assert len(packets) == expected_rows(report)["packets"] and len(sessions) == len(report["sessions"])
    for column in ("frame", "status", "received", "range_total", "body_length"):
        assert str(packets[column].dtype) == "Int64", column
    assert str(sessions["before_capture"].dtype) == "boolean"
    joined = packets.merge(sessions, on="session")
    assert len(joined) == len(packets)
    with open(table / "captures.csv", newline="") as stream:
        assert [row["capture_file"] for row in csv.DictReader(stream)] == [str(c) for c in CAPTURES]


def test_logs_directory_that_cannot_be_made_is_a_usage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("--logs", blocker / "logs", CAPTURES[0])
    assert result.returncode == 2 and b"cannot write" in result.stderr and b"Traceback" not in result.stderr


def test_zeek_escaping_keeps_each_value_in_its_field(tmp_path: Path) -> None:
    from bitstrace.analyzer.report.logs import write_logs

    record = {"file": "a\tb\\c, d", "kind": "-", "message": "", "frame": None, "offset": 3,
              "connection": 0, "fatal": True}
    write_logs([("problems", record)], tmp_path)
    fields, _, rows = read_zeek(tmp_path / "problems.log")
    (row,) = rows
    value = dict(zip(fields, row))
    assert value["capture_file"] == "a\\x09b\\x5cc, d" and unescape(value["capture_file"]) == record["file"]
    assert (value["kind"], value["message"], value["frame"], value["fatal"]) == ("\\x2d", "(empty)", "-", "T")
