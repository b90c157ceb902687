"""Scale-out: directories as capture points, partitioned runs, local processes and a real Dask
cluster give the report one process gives, byte for byte."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitstrace.analyzer.analysis import analyze
from bitstrace.analyzer.engines import run_local
from bitstrace.analyzer.partition import (Options, ShippedSession, analyze_units, merge, partition_of, partition_options,
                                          plan, read_unit, run_in_process, units_of)
from bitstrace.analyzer.report import render_text
from bitstrace.analyzer.report.json import build_report, filter_report, packet_source, write_json
from bitstrace.analyzer.sources import expand
from tests.support import REPO

ROOT = REPO
CAPTURES = ROOT / "captures"
CORPUS = sorted(str(p) for p in CAPTURES.iterdir() if p.suffix in (".pcap", ".pcapng"))
VENV_BIN = Path(sys.executable).parent
ANALYZE = [sys.executable, "-m", "bitstrace.cli.analyze"]


def report_text(analysis) -> str:
    report = filter_report(build_report(analysis, with_packets=False), "info")
    out = io.StringIO()
    write_json(report, out, packet_source(analysis, report))
    return out.getvalue()


def split_pcap(source: Path, cuts: list[int], names: list[Path], compress: tuple[int, ...] = ()) -> None:
    """Rotate a pcap by raw record copying: part i holds records cuts[i-1]..cuts[i] (as tcpdump -C cuts)."""
    data = source.read_bytes()
    header, records, pos = data[:24], [], 24
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    while pos < len(data):
        incl = struct.unpack_from(endian + "I", data, pos + 8)[0]
        records.append(data[pos:pos + 16 + incl])
        pos += 16 + incl
    bounds = [0, *cuts, len(records)]
    for i, name in enumerate(names):
        body = header + b"".join(records[bounds[i]:bounds[i + 1]])
        name.write_bytes(gzip.compress(body) if i in compress else body)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Path:
    """Capture points made from the corpus: rotated files whose names sort against their time
    order, a connection and a fragment crossing each file boundary, a gzip part, a sub-directory,
    a session moved to another server by Host-Id, and a file that is no capture."""
    top = tmp_path_factory.mktemp("fleet")
    edge1 = top / "edge1"
    edge1.mkdir()
    # frame 30 and 70 fall inside fragment bodies of the resumed upload's connections
    split_pcap(CAPTURES / "connection-cut-resume.pcap", [30, 70],
               [edge1 / "z-first.pcap", edge1 / "a-second.pcap.gz", edge1 / "m-third.pcap"], compress=(1,))
    (edge1 / "README.txt").write_text("not a capture\n")
    nested = edge1 / "nested"
    nested.mkdir()
    split_pcap(CAPTURES / "two-sessions-interleaved.pcap", [41], [nested / "cap1.pcap", nested / "cap0.pcap"])
    edge2 = top / "edge2"
    edge2.mkdir()
    shutil.copy(CAPTURES / "host-id-redirect.pcapng", edge2)
    split_pcap(CAPTURES / "conflicting-resend.pcap", [25], [edge2 / "resend-b.pcap", edge2 / "resend-a.pcap"])
    return top


def test_directory_is_capture_points_with_files_in_time_order(fleet: Path) -> None:
    inputs = expand([str(fleet)])
    by_point = {Path(p.name).relative_to(fleet).as_posix(): [Path(f).name for f in p.files] for p in inputs.points}
    assert by_point["edge1"] == ["z-first.pcap", "a-second.pcap.gz", "m-third.pcap"]
    assert by_point["edge1/nested"] == ["cap1.pcap", "cap0.pcap"]
    assert set(by_point["edge2"]) == {"host-id-redirect.pcapng", "resend-b.pcap", "resend-a.pcap"}
    assert by_point["edge2"].index("resend-b.pcap") < by_point["edge2"].index("resend-a.pcap")
    assert [(n.kind, Path(n.file).name) for n in inputs.notes] == [("not-a-capture", "README.txt")]


def test_rotated_directory_reads_as_the_whole_capture(fleet: Path) -> None:
    """The rotated parts of a capture point, read as a run, find what the unsplit capture holds."""
    whole = analyze([CAPTURES / "connection-cut-resume.pcap"])
    point = expand([str(fleet / "edge1")]).points[0]
    rotated = analyze_units([point], 1, partition_options(point.files, None, None), run_in_process)
    assert [(s.id, s.verdict, s.acknowledged, len(s.packets)) for s in rotated.bits.sessions] == \
        [(s.id, s.verdict, s.acknowledged, len(s.packets)) for s in whole.bits.sessions]
    assert len(whole.bits.sessions[0].connections) > 1  # the resume is on another connection
    assert rotated.bits.sessions[0].capture_points == [point.name]


@pytest.mark.parametrize("capture", CORPUS, ids=lambda c: Path(c).name)
def test_every_corpus_capture_same_report_for_1_2_4_partitions(capture: str) -> None:
    expected = report_text(analyze([capture]))
    inputs = expand([capture])
    for partitions in (1, 2, 4):
        got = analyze_units(inputs.points, partitions, partition_options(inputs.files, None, None), run_in_process)
        assert report_text(got) == expected, partitions


@pytest.mark.parametrize("partitions", [2, 3, 5, 8, 13])
def test_any_partition_count_gives_the_sessions_of_one(partitions: int) -> None:
    """The whole corpus as one run: every partition count gives one process's report, and the
    connections really are spread over the units."""
    expected = report_text(analyze(CORPUS))
    inputs = expand(CORPUS)
    options = partition_options(inputs.files, None, None)
    got = analyze_units(inputs.points, partitions, options, run_in_process)
    assert report_text(got) == expected
    spread = [len(read_unit(unit).summary.opened) for unit in units_of(inputs.points, partitions, options)]
    assert sum(1 for n in spread if n) > 1


def text_report(analysis) -> str:
    out = io.StringIO()
    render_text(build_report(analysis, with_packets=False), out, min_severity="info", color=False)
    return out.getvalue()


@pytest.mark.parametrize("capture", ["connection-cut-resume.pcap", "host-id-redirect.pcapng"])
def test_session_on_connections_of_two_units_is_stitched_in_the_client(capture: str) -> None:
    """The resumed (or redirected) session's connections fall in two units: its key is shipped,
    its packets walked in the client, and the report is one process's, with packets or without."""
    path = str(CAPTURES / capture)
    whole = analyze([path])
    inputs = expand([path])
    options = partition_options(inputs.files, None, None)
    summaries = [read_unit(unit).summary for unit in units_of(inputs.points, 2, options)]
    assert [len(s.keys) for s in summaries] == [1, 1]
    assert plan(summaries)[0].shipped == {whole.bits.sessions[0].key}
    assert report_text(analyze_units(inputs.points, 2, options, run_in_process)) == report_text(whole)
    light = partition_options(inputs.files, None, None, with_packets=False)
    assert text_report(analyze_units(inputs.points, 2, light, run_in_process)) == text_report(whole)


def relabelled_copy(source: Path, target: Path, client_port: int, new_port: int, old: bytes, new: bytes,
                    shift_s: int) -> None:
    """A copy of an Ethernet/IPv4 pcap by raw record copying, as another client made it: the
    client port and a session id replaced (same length), every timestamp `shift_s` later."""
    data = bytearray(source.read_bytes())
    pos = 24
    while pos < len(data):
        struct.pack_into("<I", data, pos, struct.unpack_from("<I", data, pos)[0] + shift_s)
        incl = struct.unpack_from("<I", data, pos + 8)[0]
        frame = pos + 16
        tcp = frame + 14 + (data[frame + 14] & 0x0F) * 4
        for field_at in (tcp, tcp + 2):
            if struct.unpack_from(">H", data, field_at)[0] == client_port:
                struct.pack_into(">H", data, field_at, new_port)
        data[frame:frame + incl] = bytes(data[frame:frame + incl]).replace(old, new)
        pos = frame + incl
    target.write_bytes(bytes(data))


def test_cross_session_check_between_sessions_walked_in_two_units(tmp_path: Path) -> None:
    """A second client's Create for the same URL while the first session is open, on a
    connection of another unit: each unit walks its own session, the client sees both and
    flags duplicate-create, as one process does; the text report's sessions carry no packets."""
    first = CAPTURES / "never-finished.pcap"  # its session is never closed: still open for any later Create
    client_port, server_port = 33790, 44295
    loopback = bytes([127, 0, 0, 1])
    new_port = next(port for port in range(40000, 40100)
                    if partition_of(loopback, port, loopback, server_port, 2)
                    != partition_of(loopback, client_port, loopback, server_port, 2))
    second = tmp_path / "second-client.pcap"
    relabelled_copy(first, second, client_port, new_port, b"7D984FD1", b"7D984FD2", shift_s=1)
    files = [str(first), str(second)]
    whole = analyze(files)
    assert [a.code for a in whole.bits.sessions[1].anomalies if a.code == "duplicate-create"] == ["duplicate-create"]
    inputs = expand(files)
    light = partition_options(inputs.files, None, None, with_packets=False)
    summaries = [read_unit(unit).summary for unit in units_of(inputs.points, 2, light)]
    assert [len(s.keys) for s in summaries] == [1, 1] and not plan(summaries)[0].shipped
    got = analyze_units(inputs.points, 2, light, run_in_process)
    assert all(isinstance(s, ShippedSession) for s in got.bits.sessions)
    assert text_report(got) == text_report(whole)
    full = analyze_units(inputs.points, 2, partition_options(inputs.files, None, None), run_in_process)
    assert report_text(full) == report_text(whole)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*ANALYZE, "--no-progress", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_jobs_1_2_4_same_json_on_the_fleet(fleet: Path, tmp_path: Path) -> None:
    runs = {}
    for jobs in (1, 2, 4):
        done = cli("-q", "--json", str(tmp_path / f"{jobs}.json"), "--jobs", str(jobs), str(fleet))
        assert done.returncode == 0, done.stderr
        runs[jobs] = (tmp_path / f"{jobs}.json").read_text()
    assert runs[1] == runs[2] == runs[4]
    report = json.loads(runs[1])
    assert {Path(c["capture_point"]).name for c in report["captures"]} == {"edge1", "nested", "edge2"}
    assert all(s["capture_points"] for s in report["sessions"])
    assert any(a["code"] == "host-redirect" for s in report["sessions"] for a in s["anomalies"])


def test_jobs_on_files_same_json_as_one_process(tmp_path: Path) -> None:
    files = CORPUS[:8]
    one = cli("-q", "--json", "-", *files)
    two = cli("-q", "--json", "-", "--jobs", "2", *files)
    assert one.returncode == two.returncode
    assert one.stdout == two.stdout and one.stdout


def test_extract_in_parallel_writes_the_same_files(fleet: Path, tmp_path: Path) -> None:
    found = {}
    for jobs in (1, 2):
        out = tmp_path / f"x{jobs}"
        done = cli("-q", "--json", str(tmp_path / f"{jobs}.json"), "--extract", str(out), "--jobs", str(jobs), str(fleet),
                   cwd=tmp_path)
        assert done.returncode in (0, 3), done.stderr
        found[jobs] = ({p.name: p.read_bytes() for p in out.iterdir()},
                       (tmp_path / f"{jobs}.json").read_text().replace(f"x{jobs}", "x"))
    assert found[1] == found[2]
    assert any(not name.endswith(".partial") for name in found[1][0])


def test_failing_unit_is_retried_then_reported_and_the_rest_stands(tmp_path: Path) -> None:
    """A unit whose extraction directory cannot be made fails in its worker process, twice."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    inputs = expand([CORPUS[0], CORPUS[1]])
    good = analyze_units(inputs.points, 2, partition_options(inputs.files, None, None), run_in_process)
    units = units_of(inputs.points, 2, Options(several_captures=True, extract_dir=str(blocker / "sub")))
    results, failures = run_local(units, 2, plan)
    assert not results and len(failures) == 1
    analysis = merge(units, results, inputs.points, failures)
    failed = [p for p in analysis.problems if p.kind == "unit-failed"]
    assert failed and "partition 1 of 1" in failed[0].message and "failed twice" in failed[0].message
    assert not analysis.complete
    assert good.complete


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, depth below `pid`) of every live descendant, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier, depth = [], [pid], 0
    while frontier:
        depth += 1
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += [(child, depth) for child in frontier]
    return found


def test_local_worker_killed_mid_run_its_units_read_again_same_report(tmp_path: Path) -> None:
    """SIGKILL one --jobs worker (a child of the forkserver) as soon as it is seen: the unit it
    was given (and any it held) is read again by a new worker, and the report is one process's."""
    big = tmp_path / "big"
    big.mkdir()
    for i in range(24):
        point = big / f"p{i:02d}"
        point.mkdir()
        for capture in CORPUS[:6]:
            shutil.copy(capture, point)
    expected = cli("-q", "--json", str(tmp_path / "one.json"), str(big))
    assert expected.returncode == 0, expected.stderr
    run = subprocess.Popen([*ANALYZE, "--no-progress", "-q", "--json", str(tmp_path / "two.json"), "--jobs", "2",
                            str(big)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    killed = None
    while killed is None and time.monotonic() < deadline and run.poll() is None:
        for pid in [pid for pid, depth in descendants(run.pid) if depth == 2]:  # the forkserver's children
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # gone meanwhile
                continue
            killed = pid
            break
        else:
            time.sleep(0.01)
    assert killed is not None, "no worker seen alive"
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert (tmp_path / "two.json").read_text() == (tmp_path / "one.json").read_text()


# -- a real Dask cluster on 127.0.0.1 --------------------------------------------------------

distributed = pytest.importorskip("distributed")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def cluster(tmp_path: Path):
    dask = str(VENV_BIN / "dask")
    scheduler_file = tmp_path / "scheduler.json"
    processes = [_start([dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                         "--scheduler-file", str(scheduler_file)], tmp_path / "scheduler.log")]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scheduler_file.exists(), (tmp_path / "scheduler.log").read_text()
        address = json.loads(scheduler_file.read_text())["address"]
        for i in range(2):
            processes.append(_start([dask, "worker", address, "--nthreads", "1", "--nworkers", "1",
                                     "--host", "127.0.0.1", "--no-dashboard", "--name", f"w{i}"],
                                    tmp_path / f"worker{i}.log"))
        with distributed.Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        yield address, processes
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)


def test_dask_cluster_gives_the_same_report(cluster, fleet: Path, tmp_path: Path) -> None:
    address, _ = cluster
    local = cli("-q", "--json", str(tmp_path / "local.json"), str(fleet))
    remote = cli("-q", "--json", str(tmp_path / "dask.json"), "--dask", address, str(fleet))
    assert local.returncode == remote.returncode == 0, remote.stderr
    assert (tmp_path / "local.json").read_text() == (tmp_path / "dask.json").read_text()


def test_dask_worker_that_cannot_open_a_file_is_named(cluster, tmp_path: Path) -> None:
    address, _ = cluster
    capture = tmp_path / "gone.pcap"
    shutil.copy(CAPTURES / "gap.pcap", capture)
    os.chmod(capture, 0)
    if os.access(capture, os.R_OK):  # root reads anything: take the file away instead
        capture.unlink()
        capture.mkdir()
        (capture / "x.pcap").write_bytes(b"")
        capture = capture / "x.pcap"
        os.chmod(capture.parent, 0o000)
    try:
        done = cli("-q", "--dask", address, str(CAPTURES / "gap.pcap"), str(capture))
    finally:
        os.chmod(capture.parent, 0o755)
    assert done.returncode in (2, 3)


def test_dask_worker_killed_mid_run_task_rescheduled_same_report(cluster, fleet: Path, tmp_path: Path) -> None:
    """Kill one worker while the run is going: its unit runs again on the other, the report stands."""
    address, processes = cluster
    big = tmp_path / "big"
    big.mkdir()
    for i in range(24):  # enough units that the run outlasts the kill
        point = big / f"p{i:02d}"
        point.mkdir()
        for capture in CORPUS[:6]:
            shutil.copy(capture, point)
    expected = cli("-q", "--json", str(tmp_path / "one.json"), str(big))
    assert expected.returncode == 0, expected.stderr
    run = subprocess.Popen([*ANALYZE, "--no-progress", "-q", "--json", str(tmp_path / "dask.json"), "--dask", address,
                            str(big)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with distributed.Client(address, timeout=30) as client:
        deadline = time.monotonic() + 60
        victim = None
        while victim is None and time.monotonic() < deadline and run.poll() is None:
            busy = {w: tasks for w, tasks in client.processing().items() if any("bits-unit" in str(t) for t in tasks)}
            if busy:
                victim = sorted(busy)[0]
            else:
                time.sleep(0.05)
        assert victim is not None, "no unit seen running"
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert (tmp_path / "dask.json").read_text() == (tmp_path / "one.json").read_text()
