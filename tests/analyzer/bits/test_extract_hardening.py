"""Extraction under hostile or unlucky conditions: no file with a hole is ever certified complete,
file names Windows cannot hold are never written, temp files never outlive their run."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitstrace.analyzer.bits.extract import PARTIAL_SUFFIX, entity_name
from tests.support.bits_fixtures import SID, Wire, payload
from tests.support import REPO

NAME = "A0FF5911-4144-45B3-BF27-27AFC8EC8A67_report.bin"


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def holes(entity) -> list[tuple[int, int]]:
    return [(hole.first, hole.last) for hole in entity.holes]


# --- 1. complete means: acknowledged without a hole over the final TOTAL ----------------------

def test_a_changed_total_never_certifies_the_hole_between_fragments(tmp_path: Path) -> None:
    """0-29/50 acknowledged, then 40-59/70: 30 + 20 acknowledged bytes equal the first TOTAL, but
    bytes 30-39 were never sent."""
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 29, 50)
    w.fragment(SID, 40, 59, 70)
    entity = w.finish().sessions[0].entity
    assert not entity.complete and entity.sha256 is None
    assert files(tmp_path) == [NAME + PARTIAL_SUFFIX]
    assert entity.total == 70
    assert holes(entity) == [(30, 39), (60, 69)]
    changed, = [p for p in w.extractor.problems if p.kind == "extract-total-changed"]
    assert "50" in changed.message and "70" in changed.message and SID in changed.message
    assert changed.frame is not None  # located: the fragment that changed it


def test_a_changed_total_is_judged_on_the_final_total_and_said(tmp_path: Path) -> None:
    """Every byte of the final TOTAL acknowledged: complete, cut to that TOTAL, and the change named."""
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 69, 70)
    w.fragment(SID, 0, 49, 50)
    entity = w.finish().sessions[0].entity
    assert entity.complete and entity.total == 50 and holes(entity) == []
    data = (tmp_path / NAME).read_bytes()
    assert data == payload(70)[:50] and entity.sha256 == hashlib.sha256(data).hexdigest()
    changed, = [p for p in w.extractor.problems if p.kind == "extract-total-changed"]
    assert "TOTAL 70" in changed.message and "TOTAL 50" in changed.message


def test_the_final_total_is_that_of_the_last_acknowledged_fragment(tmp_path: Path) -> None:
    """A conformant server refuses a fragment whose TOTAL changed (400): the session's TOTAL stays."""
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 29, 50)
    w.fragment(SID, 30, 69, 70, status=400)
    w.fragment(SID, 30, 49, 50)
    entity = w.finish().sessions[0].entity
    assert entity.complete and entity.total == 50 and (tmp_path / NAME).read_bytes() == payload(50)


def test_unacknowledged_fragment_with_a_new_total_leaves_the_entity_partial(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 49, 50, status=None)
    w.fragment(SID, 0, 29, 30, status=None)
    entity = w.finish().sessions[0].entity
    assert not entity.complete and entity.total == 30 and holes(entity) == [(0, 29)]


def test_bytes_past_the_final_total_do_not_fill_a_hole_below_it(tmp_path: Path) -> None:
    """Acknowledged bytes 0-19 and 40-99 (of TOTAL 100) count 80 bytes; the final TOTAL is 80."""
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 19, 100)
    w.fragment(SID, 40, 99, 100)
    w.fragment(SID, 0, 9, 80)
    entity = w.finish().sessions[0].entity
    assert not entity.complete and entity.total == 80 and holes(entity) == [(20, 39)]
    assert entity.acknowledged_bytes == 60  # 0-19 and 40-79: what lies past the TOTAL is not counted


def test_an_empty_body_acknowledged_as_the_rest_is_not_coverage(tmp_path: Path) -> None:
    """A Fragment 10-19/20 with no body, which the server acknowledges up to 20."""
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 9, 20)
    w.fragment(SID, 10, 19, 20, body=b"")
    entity = w.finish().sessions[0].entity
    assert not entity.complete and holes(entity) == [(10, 19)]


def test_overlapping_and_conflicting_resends_keep_complete_honest(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 59, 100)
    w.fragment(SID, 30, 79, 100, seed=4, status=500, received=None)  # refused: 60-79 stay provisional
    w.fragment(SID, 90, 99, 100)
    entity = w.finish().sessions[0].entity
    assert not entity.complete and holes(entity) == [(60, 89)]


def test_a_complete_entity_has_no_holes(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.upload(total=12_000)
    entity = w.finish().sessions[0].entity
    assert entity.complete and holes(entity) == [] and entity.total == 12_000


# --- 3. Windows reserved names, on the final file name -------------------------------------

_RESERVED = ({"con", "prn", "aux", "nul", "conin$", "conout$"}
             | {f"{port}{n}" for port in ("com", "lpt") for n in (*"0123456789", "¹", "²", "³")})


def windows_reserved(name: str) -> bool:
    """Win32 "Naming Files": a reserved device name, alone or followed by an extension, matched
    without case; Windows drops trailing dots and spaces (of the name and of the part before the dot)."""
    stem = name.rstrip(" .").split(".", 1)[0].rstrip(" ")
    return stem.lower() in _RESERVED


@pytest.mark.parametrize("session_id", [
    "{CON}", "{nul}", "{COM1}", "LPT1", "CON.txt", "{CON.}", "{CON }", "{ CON }", "{con.tar.gz}",
    "{AUX. .}", "{COM¹}", "{lpt³}", "{CONIN$}", "{PRN}...", "NUL .txt", "{COM0}",
])
@pytest.mark.parametrize("partial", [False, True])
def test_a_reserved_session_id_never_becomes_a_reserved_file_name(tmp_path: Path, session_id: str,
                                                                  partial: bool) -> None:
    w = Wire(tmp_path)
    w.create(session_id)
    w.fragment(session_id, 0, 99, 100 if not partial else 200, content_name=None)
    w.close(session_id)
    w.finish()
    written, = files(tmp_path)
    assert not windows_reserved(written), written
    assert written.endswith(PARTIAL_SUFFIX) == partial
    assert not written.endswith((" ", ".")) and not written.startswith(" ")
    assert (tmp_path / written).read_bytes()[:100] == payload(100 if not partial else 200)[:100]


@pytest.mark.parametrize("session_id,content_name", [
    ("{CON}", None), ("{CON}", "\x00"), ("{CON}", ".."), ("{nul}", " . "), ("{x}", "CON"), ("{}", "NUL.txt"),
    ("{COM1.}", None), ("{..}", "lpt1"),
])
def test_entity_name_is_never_reserved(session_id: str, content_name: str | None) -> None:
    name = entity_name(session_id, content_name)
    assert name and not windows_reserved(name) and not windows_reserved(name + PARTIAL_SUFFIX)
    assert "/" not in name and not name.endswith((" ", "."))


# --- 2. temp files never outlive their run --------------------------------------------------

ROOT = REPO
CLEAN = ROOT / "captures" / "clean-multi-fragment.pcap"
PCAP_HEADER = 24


def temp_files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(".bitstrace-"))


def pcap_records(path: Path) -> tuple[bytes, list[bytes]]:
    """The global header and the records of a little-endian pcap."""
    data = path.read_bytes()
    records, at = [], PCAP_HEADER
    while at < len(data):
        length = int.from_bytes(data[at + 8:at + 12], "little")
        records.append(data[at:at + 16 + length])
        at += 16 + length
    return data[:PCAP_HEADER], records


def bits_analyze(*args: str | os.PathLike, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitstrace.cli.analyze", "--no-progress", *map(str, args)],
                          capture_output=True, cwd=ROOT, timeout=120, **kw)


class MidExtraction:
    """A real bits-analyze reading standard input, fed the first half of a corpus upload and then
    kept waiting for the rest: its temp file is on disk, the entity half rebuilt."""

    def __init__(self, out: Path, report: Path) -> None:
        header, records = pcap_records(CLEAN)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bitstrace.cli.analyze", "--no-progress", "--extract", str(out),
             "--json", str(report), "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=ROOT)
        self.proc.stdin.write(header + b"".join(records[:len(records) // 2]))
        self.proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not [n for n in temp_files(out) if n.endswith(".tmp")]:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no temp file appeared"
            time.sleep(0.02)
        self.temps = [n for n in temp_files(out) if n.endswith(".tmp")]
        assert all(f"-{self.proc.pid}-" in n for n in self.temps)

    def stop(self, signum: int) -> tuple[int, str]:
        self.proc.send_signal(signum)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()
            raise
        return self.proc.returncode, err.decode()


@pytest.mark.parametrize("signum,status", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM),
                                           (signal.SIGHUP, 128 + signal.SIGHUP)])
def test_a_signal_mid_extraction_removes_the_temp_files(tmp_path: Path, signum: int, status: int) -> None:
    out = tmp_path / "out"
    run = MidExtraction(out, tmp_path / "report.json")
    code, err = run.stop(signum)
    assert code == status, err
    assert "Traceback" not in err, err
    assert temp_files(out) == [], err


def test_a_killed_run_leaves_temp_files_the_next_run_removes_and_names(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = MidExtraction(out, tmp_path / "report.json")
    code, _ = run.stop(signal.SIGKILL)  # nothing of the process runs: its files stay
    assert code == -signal.SIGKILL and set(run.temps) <= set(temp_files(out))
    left = temp_files(out)
    after = bits_analyze("--extract", out, "--json", "-", ROOT / "captures" / "single-fragment.pcap")
    assert after.returncode == 0, after.stderr.decode()
    assert temp_files(out) == []
    stale, = [p for p in json.loads(after.stdout)["problems"] if p["kind"] == "extract-stale-temp-removed"]
    assert f"pid {run.proc.pid}" in stale["message"]
    assert all(name in stale["message"] for name in left if name.endswith(".tmp"))
    assert stale["message"] in after.stderr.decode()  # said on stderr too


def test_a_live_run_keeps_its_temp_files_while_another_run_uses_the_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = MidExtraction(out, tmp_path / "report.json")
    try:
        other = bits_analyze("--extract", out, "--json", "-", ROOT / "captures" / "single-fragment.pcap")
        assert other.returncode == 0, other.stderr.decode()
        assert set(first.temps) <= set(temp_files(out))
        assert "extract-stale-temp-removed" not in other.stdout.decode()
    finally:
        code, err = first.stop(signal.SIGTERM)
    assert temp_files(out) == [], err


def test_temp_files_of_a_pid_no_longer_alive_are_removed(tmp_path: Path) -> None:
    """Left by a run that had no lock file to hold (or lost it): the pid alone tells."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / f".bitstrace-{gone.pid}-0.tmp").write_bytes(b"x" * 1000)
    alive = out / f".bitstrace-{os.getpid()}-0.tmp"  # this pytest process: alive, not ours to touch
    alive.write_bytes(b"y")
    after = bits_analyze("--extract", out, "--json", "-", ROOT / "captures" / "single-fragment.pcap")
    assert after.returncode == 0, after.stderr.decode()
    assert temp_files(out) == [alive.name]
    stale, = [p for p in json.loads(after.stdout)["problems"] if p["kind"] == "extract-stale-temp-removed"]
    assert f".bitstrace-{gone.pid}-0.tmp" in stale["message"] and "1,000 bytes" in stale["message"]


def test_an_exception_mid_extraction_removes_the_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitstrace.analyzer import analysis
    from bitstrace.analyzer.bits.sessions import SessionTracker

    real = SessionTracker.on_exchange
    seen = []

    def failing(self, exchange):
        seen.append(exchange)
        if len(seen) == 4:  # fragments are being stored: temp files exist
            assert temp_files(tmp_path)
            raise RuntimeError("a bug somewhere above the extractor")
        return real(self, exchange)

    monkeypatch.setattr(SessionTracker, "on_exchange", failing)
    with pytest.raises(RuntimeError):
        analysis.analyze([CLEAN], extract_dir=tmp_path)
    assert temp_files(tmp_path) == []


def test_a_closed_pipe_after_extraction_leaves_no_temp_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bitstrace.cli.analyze", "--no-progress", "--extract", str(out),
                             "--json", "-", str(CLEAN)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.read(10)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
    assert temp_files(out) == [] and len(os.listdir(out)) == 1


# --- 4. a disk that fills: the output that failed and the extraction problems, both named --------

@pytest.fixture
def tiny_filesystem(tmp_path: Path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a 64 KiB tmpfs (needs root): {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_disk_filled_by_extraction_names_the_report_and_the_extraction_problems(tiny_filesystem: Path) -> None:
    report = tiny_filesystem / "report.json"
    run = bits_analyze("--extract", tiny_filesystem / "files", "--json", report, CLEAN)
    err = run.stderr.decode()
    assert "Traceback" not in err, err
    assert run.returncode == 2, err
    assert f"cannot write {report}: No space left on device" in err
    extraction, = [line for line in err.splitlines() if "writing session {" in line]  # one per session, then counted
    assert "No space left on device" in extraction
    assert temp_files(tiny_filesystem / "files") == []
