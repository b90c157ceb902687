"""Recorded TLS traffic on 127.0.0.1, captured with tcpdump on lo.

TLS 1.3 KeyUpdate: `openssl s_server` and `s_client` on 127.0.0.1 (the ssl module
has no key update call; s_client's and s_server's interactive `K` command sends a KeyUpdate
that asks the peer to update too), captured with tcpdump on lo. Needs root, tcpdump and the
openssl binary; `record_key_update` says what is missing instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

REQUESTS = [
    b"BITS_POST /uploads/a.txt HTTP/1.1\r\nBITS-Packet-Type: Ping\r\nHost: uploads.example.test\r\n"
    b"Content-Length: 0\r\n\r\n",
    b"BITS_POST /uploads/a.txt HTTP/1.1\r\nBITS-Packet-Type: Ping\r\nHost: uploads.example.test\r\n"
    b"Content-Length: 5\r\n\r\nafter",
]
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nBITS-Packet-Type: Ack\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBITS-Packet-Type: Ack\r\nContent-Length: 0\r\n\r\n",
]
STEP = 0.4  # seconds between interactive inputs, so each is read on its own


def missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root for tcpdump"
    for tool in ("tcpdump", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _wait_line(stream, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        seen += line
        match = re.search(pattern, line)
        if match:
            return match
    raise RuntimeError(f"no {pattern!r} in:\n{seen}")


def record_key_update(directory: Path, cert: Path, key: Path) -> tuple[Path, Path]:
    """One TLS 1.3 connection: request, KeyUpdate both ways, request, and their answers.
    Returns (capture, key log)."""
    pcap, keylog = directory / "keyupdate.pcap", directory / "keyupdate.keys"
    keylog.unlink(missing_ok=True)
    server = subprocess.Popen(["openssl", "s_server", "-accept", "127.0.0.1:0", "-cert", str(cert), "-key", str(key),
                               "-tls1_3", "-naccept", "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, bufsize=1)
    recorder = client = None
    try:
        port = int(_wait_line(server.stdout, r"ACCEPT 127\.0\.0\.1:(\d+)").group(1))
        recorder = subprocess.Popen(["tcpdump", "-i", "lo", "-n", "-U", "-B", "65536", "--immediate-mode", "-w", str(pcap), f"tcp port {port}"],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True)
        _wait_line(recorder.stderr, "listening on")
        client = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
                                   "-servername", "uploads.example.test", "-keylogfile", str(keylog)],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2 * STEP)
        assert client.stdin is not None and server.stdin is not None
        steps = [(client.stdin, REQUESTS[0]), (server.stdin, RESPONSES[0].decode()),
                 (client.stdin, b"K\n"), (server.stdin, "K\n"),
                 (client.stdin, REQUESTS[1]), (server.stdin, RESPONSES[1].decode())]
        for stream, data in steps:
            stream.write(data)
            stream.flush()
            time.sleep(STEP)
        client.stdin.close()
        client.wait(timeout=10)
        time.sleep(STEP)
    finally:
        for process in (client, server):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=5)
        if recorder is not None:
            _stop(recorder)
    return pcap, keylog


def record_bits_upload(directory: Path, cert: Path, key: Path, turns: list[tuple[int, bytes]],
                       keylog: Path, tls12_cipher: str | None = None,
                       name: str = "recorded-upload.pcap") -> Path:
    """A BITS upload over real TLS sockets on 127.0.0.1 (Python's ssl module: OpenSSL), captured
    with tcpdump: the client sends each of the capture's request turns, a TLS-terminating server
    thread answers each with the recorded answer once the whole turn has arrived."""
    import socket
    import ssl
    import threading

    pcap = directory / name
    keylog.unlink(missing_ok=True)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_context.check_hostname = False
    client_context.verify_mode = ssl.CERT_NONE
    client_context.keylog_filename = str(keylog)
    if tls12_cipher:  # TLS 1.2 with this suite (OpenSSL name)
        client_context.maximum_version = ssl.TLSVersion.TLSv1_2
        client_context.set_ciphers(tls12_cipher)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    failure: list[BaseException] = []

    def read_exactly(sock: ssl.SSLSocket, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            piece = sock.recv(size - len(data))
            if not piece:
                raise EOFError("peer closed early")
            data += piece
        return bytes(data)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_context.wrap_socket(conn, server_side=True) as tls:
                for side, data in turns:
                    if side == 0:
                        assert read_exactly(tls, len(data)) == data
                    else:
                        tls.sendall(data)
                tls.recv(1)  # the client's close
        except BaseException as error:  # reported by the test thread
            failure.append(error)

    recorder = subprocess.Popen(["tcpdump", "-i", "lo", "-n", "-U", "-B", "65536", "--immediate-mode", "-w", str(pcap), f"tcp port {port}"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    thread = threading.Thread(target=serve)
    try:
        _wait_line(recorder.stderr, "listening on")
        thread.start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_context.wrap_socket(raw, server_hostname="uploads.example.test") as tls:
                for side, data in turns:
                    if side == 0:
                        tls.sendall(data)
                    else:
                        assert read_exactly(tls, len(data)) == data
        thread.join(timeout=10)
        time.sleep(STEP)
    finally:
        listener.close()
        _stop(recorder)
    if failure:
        raise failure[0]
    return pcap


def _stop(recorder: subprocess.Popen) -> None:
    """SIGINT after a pause (tcpdump writes what the kernel still holds); packets it says it
    lost make the recording useless."""
    time.sleep(1.0)
    recorder.send_signal(signal.SIGINT)
    _, tail = recorder.communicate(timeout=10)
    if "0 packets dropped by kernel" not in tail:
        raise RuntimeError(f"tcpdump lost packets or failed: {tail}")
