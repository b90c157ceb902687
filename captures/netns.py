"""Recording real kernel TCP with Ethernet-sized segments: a private network namespace whose
loopback has MTU 1500 and no segmentation offload, used by captures/make_captures.py (the
corpus) and bench/make_captures.py (the benchmark captures)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

READY_TIMEOUT = 10.0  # seconds for a recorder to say it is listening


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, stdin=subprocess.DEVNULL)


def wait_for(process: subprocess.Popen, marker: str, timeout: float = READY_TIMEOUT) -> str:
    """Read the process's stderr until a line holds `marker`; what it printed so far."""
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        seen += line
        if marker in line:
            return seen
        if not line and process.poll() is not None:
            break
    raise RuntimeError(f"{process.args[0]} did not start:\n{seen}")


def run_in_namespace(script: str, argv: list[str], prefix: str) -> int:
    """Re-run `script --inside ARGV...` inside a fresh namespace named PREFIX<pid>; remove it,
    and anything left running in it, afterwards, whatever happened."""
    namespace = f"{prefix}{os.getpid()}"
    ip("netns", "add", namespace)
    inner = None
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        ip("-n", namespace, "link", "set", "lo", "up")
        ip("-n", namespace, "link", "set", "lo", "mtu", "1500")
        # without this the kernel hands loopback 64 KiB super-segments to the capture
        ip("-n", namespace, "link", "set", "lo", "gso_max_size", "1500", "gso_max_segs", "1")
        inner = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, script,
                                  "--inside", *argv], start_new_session=True)
        return inner.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if inner is not None and inner.poll() is None:
            os.killpg(inner.pid, signal.SIGTERM)
            try:
                inner.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(inner.pid, signal.SIGKILL)
                inner.wait()
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout
        for pid in pids.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", namespace], stdin=subprocess.DEVNULL)
