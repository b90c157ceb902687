"""bits-analyze from the outside: hostile captures and bad arguments give a message and an exit
status, never a traceback; outputs are checked before the analysis runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tests.support import craft
from tests.support import REPO

ROOT = REPO
CLEAN = ROOT / "captures" / "clean-multi-fragment.pcap"
GUID = "{7df0354d-249b-430f-820d-3d2a9bef4931}"


def bits_analyze(*args: str | os.PathLike, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bitstrace.cli.analyze", *map(str, args)], input=stdin,
                          capture_output=True, cwd=ROOT, timeout=120)


def http_conversation(request: bytes, response: bytes, start_ns: int = 1_700_000_000 * 10**9) -> list:
    """A handshake, one request and one response between 10.0.0.1:50000 and 10.0.0.2:80."""
    def seg(src: str, dst: str, sport: int, dport: int, flags: str, seq: int, ack: int, data: bytes = b""):
        return Ether() / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack) / data

    c, s = ("10.0.0.1", "10.0.0.2")
    packets = [
        seg(c, s, 50000, 80, "S", 100, 0),
        seg(s, c, 80, 50000, "SA", 500, 101),
        seg(c, s, 50000, 80, "A", 101, 501),
        seg(c, s, 50000, 80, "PA", 101, 501, request),
        seg(s, c, 80, 50000, "PA", 501, 101 + len(request), response),
    ]
    return [(start_ns + i * 1000, p) for i, p in enumerate(packets)]


def write_pcap(path: Path, records: list) -> Path:
    path.write_bytes(craft.pcap_bytes(records))
    return path


def test_hostile_numbers_are_malformed_not_fatal(tmp_path: Path) -> None:
    huge = "9" * 5000
    request = (f"BITS_POST /up/x.bin HTTP/1.1\r\nBITS-Packet-Type: Fragment\r\n"
               f"BITS-Session-Id: {{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}}\r\n"
               f"Content-Range: bytes 0-{huge}/{huge}\r\nContent-Length: {huge}\r\n\r\n").encode()
    response = (f"HTTP/1.1 200 OK\r\nBITS-Packet-Type: Ack\r\nBITS-Received-Content-Range: {huge}\r\n"
                f"Content-Length: 0\r\n\r\n").encode()
    capture = write_pcap(tmp_path / "huge.pcap", http_conversation(request, response))
    run = bits_analyze("--json", "-", capture)
    assert b"Traceback" not in run.stderr, run.stderr.decode()
    report = json.loads(run.stdout)
    assert report["summary"]["http_exchanges"] == 1
    assert run.returncode == 0


def test_far_future_pcapng_timestamps_are_shown_not_fatal(tmp_path: Path) -> None:
    request = (f"BITS_POST /up/x.bin HTTP/1.1\r\nBITS-Packet-Type: Create-Session\r\n"
               f"BITS-Supported-Protocols: {GUID}\r\nContent-Length: 0\r\n\r\n").encode()
    response = b"HTTP/1.1 200 OK\r\nBITS-Packet-Type: Ack\r\nContent-Length: 0\r\n\r\n"
    blocks = [craft.shb(), craft.idb(1, tsoffset=2**62)]
    blocks += [craft.epb(0, i, packet) for i, (_, packet) in enumerate(http_conversation(request, response))]
    capture = tmp_path / "future.pcapng"
    capture.write_bytes(b"".join(blocks))
    for args in (["--json", "-"], ["--http"], []):
        run = bits_analyze(*args, capture)
        assert b"Traceback" not in run.stderr, (args, run.stderr.decode())
        assert run.returncode == 0, (args, run.stderr.decode())
    http = json.loads(bits_analyze("--http", capture).stdout.splitlines()[0])
    assert http["request"]["first_time"].startswith("@")  # beyond datetime: seconds since the epoch


def test_outputs_are_checked_before_the_analysis(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for args in (["--extract", blocker], ["--html", tmp_path / "missing" / "r.html"],
                 ["--json", tmp_path / "missing" / "r.json"]):
        run = bits_analyze(*args, CLEAN)
        assert run.returncode == 2, args
        assert run.stderr.decode().startswith("bits-analyze: cannot write"), run.stderr.decode()
        assert run.stdout == b""  # nothing analysed, nothing half-written


@pytest.mark.parametrize("option", ["--json", "--jsonl", "--html"])
def test_a_full_disk_while_writing_a_report_is_a_message_not_a_fail_on_status(option: str) -> None:
    """/dev/full takes the open and fails the writes: status 1 would read as --fail-on's verdict."""
    run = bits_analyze(option, "/dev/full", CLEAN)
    assert b"Traceback" not in run.stderr, run.stderr.decode()
    assert run.stderr.decode().startswith("bits-analyze: cannot write /dev/full: No space left on device")
    assert run.returncode == 2


def test_a_full_disk_on_standard_output_is_a_message() -> None:
    with open("/dev/full", "w") as full:
        run = subprocess.run([sys.executable, "-m", "bitstrace.cli.analyze", "--json", "-", str(CLEAN)],
                             stdout=full, stderr=subprocess.PIPE, cwd=ROOT, timeout=120)
    assert b"Traceback" not in run.stderr and b"Exception ignored" not in run.stderr, run.stderr.decode()
    assert run.stderr.decode().startswith("bits-analyze: cannot write standard output: No space left")
    assert run.returncode == 2


@pytest.mark.parametrize("args", [["--json", "-", "--jsonl", "-"], ["--stall-after", "nan"],
                                  ["--stall-after", "-5"]])
def test_bad_arguments_are_usage_errors(args: list[str]) -> None:
    run = bits_analyze(*args, CLEAN)
    assert run.returncode == 2 and b"Traceback" not in run.stderr
    assert b"error:" in run.stderr


def test_unknown_session_is_said() -> None:
    run = bits_analyze("--session", "{00000000-0000-0000-0000-000000000000}", CLEAN)
    assert run.returncode == 2
    assert b"no session {00000000-0000-0000-0000-000000000000}" in run.stderr


def test_closed_pipe_is_normal_use() -> None:
    for args in ([], ["--http"], ["--json", "-"]):
        proc = subprocess.Popen([sys.executable, "-m", "bitstrace.cli.analyze", *args, str(CLEAN)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.read(10)
        proc.stdout.close()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (args, err.decode())
        assert b"Traceback" not in err and b"Exception ignored" not in err


def test_min_severity_cuts_lists_but_not_the_summary() -> None:
    capture = ROOT / "captures" / "gap.pcap"
    full = json.loads(bits_analyze("--json", "-", capture).stdout)
    errors_only = json.loads(bits_analyze("--json", "-", "--min-severity", "error", capture).stdout)
    severities = [a["severity"] for s in full["sessions"] for a in s["anomalies"]]
    assert "info" in severities and "error" in severities  # the capture has both
    kept = [a["severity"] for s in errors_only["sessions"] for a in s["anomalies"]]
    assert kept == [s for s in severities if s == "error"]
    assert errors_only["summary"] == full["summary"]
    assert errors_only["filter"]["min_severity"] == "error"


def test_stdin_and_incomplete_input_exit_status(tmp_path: Path) -> None:
    data = CLEAN.read_bytes()
    whole = bits_analyze("--json", "-", "-", stdin=data)
    assert whole.returncode == 0
    assert json.loads(whole.stdout)["summary"]["delivered"] == 1
    cut = bits_analyze("--json", "-", "-", stdin=data[: len(data) // 2 + 7])
    assert cut.returncode == 3
    report = json.loads(cut.stdout)
    assert report["captures"][0]["complete"] is False
    assert any(p["fatal"] and p["frame"] for p in report["problems"])
    assert b"<stdin>" in cut.stderr


def test_failed_extraction_says_incomplete(tmp_path: Path) -> None:
    """A full disk while extracting: the report still comes, the exit status says incomplete."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tiny tmpfs here: {made.stderr.decode().strip()}")
    try:
        run = bits_analyze("--extract", mount, "--json", "-", CLEAN)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
    assert run.returncode == 3, run.stderr.decode()
    report = json.loads(run.stdout)
    assert any(p["kind"].startswith("extract-") for p in report["problems"])
    assert report["summary"]["sessions"] == 1


def test_unreadable_inputs_are_named_and_the_rest_analysed(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a capture\n")
    run = subprocess.run([sys.executable, "-m", "bitstrace.cli.analyze", "--color", "never", ".", "notes.txt", str(CLEAN)],
                         capture_output=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = run.stdout.decode()
    assert run.returncode == 3
    assert ".: INCOMPLETE (1 problem, 1 fatal), not read as a capture" in out
    assert "notes.txt: INCOMPLETE (1 problem, 1 fatal), not read as a capture" in out
    assert "1 BITS upload session: 1 delivered" in out
    assert "cannot open: Is a directory" in run.stderr.decode()
    assert "not a pcap or pcapng file" in run.stderr.decode()


# --- tcpdump's and tshark's habits ---------------------------------------------------------------

TWO = ROOT / "captures" / "two-sessions-interleaved.pcap"


def report_of(*args: str | os.PathLike) -> dict:
    run = bits_analyze("--json", "-", *args)
    assert run.returncode in (0, 3), run.stderr.decode()
    return json.loads(run.stdout)


def test_r_reads_captures_as_tcpdump_takes_them() -> None:
    assert report_of("-r", CLEAN)["sessions"] == report_of(CLEAN)["sessions"]
    both = report_of("-r", CLEAN, TWO)
    assert [c["file"] for c in both["captures"]] == [str(CLEAN), str(TWO)]
    assert bits_analyze().returncode == 2 and b"no capture given" in bits_analyze().stderr


def test_bpf_filter_keeps_what_libpcap_keeps() -> None:
    everything = report_of(TWO)
    assert report_of("-f", "tcp", TWO)["sessions"] == everything["sessions"]
    assert report_of("-f", "not tcp", TWO)["summary"]["sessions"] == 0
    # One client's port: only that client's session is left, whole.
    first = everything["sessions"][0]
    port = first["client"].rsplit(":", 1)[1]
    kept = report_of("-f", f"tcp port {port}", TWO)
    assert [s["id"] for s in kept["sessions"]] == [first["id"]]
    assert kept["sessions"][0]["verdict"] == first["verdict"]
    # The frames kept are the frames tcpdump keeps with the same expression.
    listed = subprocess.run(["tcpdump", "-nn", "-r", str(TWO), f"tcp port {port}"], capture_output=True, text=True)
    if listed.returncode == 0:
        assert kept["captures"][0]["decoder"]["frames"] == len(listed.stdout.splitlines())


def test_a_filter_that_does_not_compile_is_a_usage_error() -> None:
    run = bits_analyze("-f", "tcp prot 80", CLEAN)
    assert run.returncode == 2 and b"Traceback" not in run.stderr
    assert b"filter 'tcp prot 80'" in run.stderr and b"syntax error" in run.stderr


def test_count_and_time_bounds_cut_the_frames_read() -> None:
    assert report_of("-c", "10", CLEAN)["captures"][0]["frames"] == 10
    whole = report_of(CLEAN)
    start, end = whole["captures"][0]["first_ts"], whole["captures"][0]["last_ts"]
    middle = (start + end) / 2
    later = report_of("--from", f"{middle:.6f}", CLEAN)
    assert later["captures"][0]["first_ts"] >= middle
    earlier = report_of("--to", f"{middle:.6f}", CLEAN)
    assert earlier["captures"][0]["last_ts"] <= middle
    iso = whole["captures"][0]["first_time"]
    assert report_of("--from", iso, CLEAN)["sessions"] == whole["sessions"]
    bad = bits_analyze("--from", "yesterday", CLEAN)
    assert bad.returncode == 2 and b"neither seconds since the epoch nor an ISO 8601 time" in bad.stderr


def test_session_ids_as_people_type_them() -> None:
    full = report_of(CLEAN)["sessions"][0]["id"]
    for typed in (full, full.lower(), full.strip("{}"), full[1:9].lower(), full[:5]):
        assert [s["id"] for s in report_of("--session", typed, CLEAN)["sessions"]] == [full], typed
    unknown = bits_analyze("--session", "ffff", CLEAN)
    assert unknown.returncode == 2 and f"they hold {full}".encode() in unknown.stderr


def test_an_ambiguous_session_prefix_lists_the_candidates() -> None:
    from bitstrace.cli.common import SessionChoiceError, choose_session

    ids = [s["id"] for s in report_of(TWO)["sessions"]]
    assert choose_session(ids[1][1:12], ids) == ids[1]
    twins = [ids[0], "{" + ids[0][1:5] + "0000-0000-0000-0000-000000000000}"]
    with pytest.raises(SessionChoiceError, match="matches 2 sessions") as raised:
        choose_session(ids[0][1:5], twins)
    assert all(i in str(raised.value) for i in twins)
    assert choose_session(ids[0], twins) == ids[0]  # a whole id is never ambiguous


def test_an_input_named_twice_is_read_once() -> None:
    run = bits_analyze("--json", "-", CLEAN, ROOT / "captures" / ".." / "captures" / CLEAN.name)
    assert run.returncode == 0
    assert len(json.loads(run.stdout)["captures"]) == 1
    assert b"is named twice" in run.stderr


@pytest.mark.parametrize("option", [["--json", "out.json"], ["--html", "out.html"], ["--extract", "out"],
                                    ["--session", "ab"]])
def test_http_with_a_report_option_is_a_usage_error(option: list[str], tmp_path: Path) -> None:
    run = bits_analyze("--http", *[str(tmp_path / o) if o.startswith("out") else o for o in option], CLEAN)
    assert run.returncode == 2 and b"--http prints the HTTP exchanges" in run.stderr
    assert not list(tmp_path.iterdir())


def test_unreadable_only_input_prints_no_empty_report(tmp_path: Path) -> None:
    run = bits_analyze("--color", "never", tmp_path / "missing.pcap")
    assert run.returncode == 3 and run.stdout == b""
    assert b"cannot open" in run.stderr


def test_quiet_leaves_only_the_file_outputs(tmp_path: Path) -> None:
    run = bits_analyze("-q", "--json", tmp_path / "r.json", CLEAN)
    assert run.returncode == 0 and run.stdout == b""
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["sessions"] == 1


def test_ctrl_c_is_said() -> None:
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "bitstrace.cli.analyze", "-"], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(CLEAN.read_bytes()[:4096])  # a capture still arriving
    proc.stdin.flush()
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"interrupted" in err and b"Traceback" not in err


def test_max_memory_bounds_reassembly_with_located_problems(tmp_path: Path) -> None:
    """A capture whose frames arrive shuffled holds out-of-order data while holes wait: under a
    64 KiB --max-memory the oldest holes give way, each a located problem, and nothing crashes;
    with the default budget the same capture loses nothing."""
    from tests.support.disorder import read_packets, shuffle, write_pcap

    shuffled = tmp_path / "shuffled.pcap"
    write_pcap(shuffled, shuffle(read_packets(CLEAN), 96, per_direction=True))
    roomy = json.loads(bits_analyze("--json", "-", shuffled).stdout)
    assert roomy["captures"][0]["tcp"]["gap_bytes"] == 0
    tight = bits_analyze("--json", "-", "--max-memory", "64K", shuffled)
    assert tight.returncode in (0, 3) and b"Traceback" not in tight.stderr
    problems = [p for p in json.loads(tight.stdout)["problems"] if p["kind"] == "reassembly-budget"]
    located = [p for p in problems if "only counted" not in p["message"]]  # the ProblemLog's tally line
    assert located and all(p["file"] == str(shuffled) and p["frame"] and p["connection"] is not None
                           for p in located)
    assert "past the budget of 65536" in problems[0]["message"]
    bad = bits_analyze("--max-memory", "lots", CLEAN)
    assert bad.returncode == 2 and b"size (e.g. 512M)" in bad.stderr
