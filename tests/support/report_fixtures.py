"""Report dicts of schema version 1 (analyzer/report/schema.md) for the renderer tests.

A small builder walks a session the way a capture would show it (Create, Fragments, Close...),
numbering frames and advancing the clock, and fills every schema field; the scenarios below are
the situations the reports must show. The summary is computed from the content, as the
producer computes it.
"""

from __future__ import annotations

import datetime as dt
import hashlib

from bitstrace.analyzer.bits.catalogue import CATALOGUE

PROTOCOL = "{7df0354d-249b-430f-820d-3d2a9bef4931}"
T0 = 1795605040.0  # 2026-11-25T11:10:40Z
KIB = 1024

def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def anomaly(code: str, severity: str, message: str, *, session: str | None, connection: int | None,
            frames: list[int], ts: float) -> dict:
    kind = CATALOGUE[code]
    return {"code": code, "severity": severity, "meaning": kind.meaning, "spec": kind.rule,
            "message": message, "session": session, "connection": connection,
            "frames": frames, "time": iso(ts), "ts": ts}


class SessionBuilder:
    """One BITS upload session as the capture shows it, packet by packet."""

    def __init__(self, session_id: str | None, *, start: float = T0, frame: int = 4, connection: int = 0,
                 client: str = "127.0.0.1:50412", server: str = "127.0.0.1:8080",
                 url: str = "/uploads/report.bin", content_name: str | None = "report.bin",
                 user_agent: str = "Microsoft BITS/7.8", reply_url: str | None = None) -> None:
        self.id, self.clock, self.frame, self.connection = session_id, start, frame, connection
        self.client, self.server, self.url = client, server, url
        self.content_name, self.user_agent, self.reply_url = content_name, user_agent, reply_url
        self.packets: list[dict] = []
        self.anomalies: list[dict] = []
        self.total: int | None = None
        self.acknowledged = 0
        self.bytes_sent = 0
        self.first_ts: float | None = None
        self.before_capture = False

    def _packet(self, kind: str, *, body: int = 0, rng: dict | None = None, status: int | None = 200,
                received: int | None = None, error: tuple[str, str] | None = None,
                reply_url: str | None = None, rtt: float = 0.004, gap: float = 0.01) -> dict:
        self.clock += gap
        if self.first_ts is None:
            self.first_ts = self.clock
        request_ts, first_frame = self.clock, self.frame
        self.frame += 1 + body // (64 * KIB)
        request = {"method": "BITS_POST", "target": self.url, "frame": first_frame,
                   "last_frame": self.frame - 1, "time": iso(request_ts), "ts": request_ts,
                   "range": rng, "content_length": body, "body_length": body,
                   "body_sha256": hashlib.sha256(f"{self.id}{first_frame}".encode()).hexdigest() if body else None}
        response = None
        if status is not None:
            self.clock += rtt
            response = {"status": status, "reason": {200: "OK", 416: "Requested Range Not Satisfiable",
                                                     500: "Internal Server Error"}[status],
                        "frame": self.frame, "time": iso(self.clock), "ts": self.clock,
                        "packet_type": "Ack", "session_id": self.id if kind != "Ping" else None,
                        "received": received, "error_code": error[0] if error else None,
                        "error_name": error[1] if error else None,
                        "error_context": "0x5" if error else None,
                        "reply_url": reply_url, "host_id": None}
            self.frame += 1
        packet = {"type": kind, "type_raw": kind, "connection": self.connection,
                  "request": request, "response": response, "anomalies": []}
        self.packets.append(packet)
        return packet

    def create(self) -> "SessionBuilder":
        self._packet("Create-Session")
        return self

    def fragment(self, first: int, last: int, total: int, *, status: int | None = 200,
                 received: int | None = None, rtt: float = 0.02, gap: float = 0.002,
                 reply_url: str | None = None, error: tuple[str, str] | None = None) -> dict:
        self.total = total
        body = last - first + 1
        self.bytes_sent += body
        if status in (200, 416) and received is None:
            received = last + 1 if status == 200 else self.acknowledged
        packet = self._packet("Fragment", body=body, rng={"first": first, "last": last, "total": total},
                              status=status, received=received, rtt=rtt, gap=gap,
                              reply_url=reply_url, error=error)
        if status == 200 and received is not None:
            self.acknowledged = max(self.acknowledged, received)
        return packet

    def upload(self, total: int, size: int, *, start: int = 0, stop: int | None = None) -> "SessionBuilder":
        """Fragments of `size` from `start` up to `stop` (default: the whole file)."""
        for first in range(start, total if stop is None else stop, size):
            self.fragment(first, min(first + size, total) - 1, total)
        return self

    def close(self) -> dict:
        return self._packet("Close-Session")

    def cancel(self) -> dict:
        return self._packet("Cancel-Session")

    def flag(self, packet: dict, code: str, severity: str, message: str) -> dict:
        """Raise `code` at `packet` (its request and response frames)."""
        frames = [packet["request"]["frame"]] + ([packet["response"]["frame"]] if packet["response"] else [])
        found = anomaly(code, severity, message, session=self.id, connection=packet["connection"],
                        frames=frames, ts=packet["request"]["ts"])
        packet["anomalies"].append(code)
        self.anomalies.append(found)
        return found

    def build(self, *, state: str, verdict: str) -> dict:
        first, last = self.first_ts or T0, self.clock
        duration = last - first
        return {
            "id": self.id, "client": self.client, "server": self.server, "host": self.server,
            "url": self.url, "content_name": self.content_name, "protocol": PROTOCOL,
            "user_agent": self.user_agent, "state": state, "verdict": verdict,
            "before_capture": self.before_capture, "reply_url": self.reply_url,
            "total": self.total, "acknowledged": self.acknowledged, "bytes_sent": self.bytes_sent,
            "fragments": sum(1 for p in self.packets if p["type"] == "Fragment"),
            "first_time": iso(first), "first_ts": first, "last_time": iso(last), "last_ts": last,
            "duration_s": duration,
            "throughput_bps": self.acknowledged / duration if duration > 0 else None,
            "connections": sorted({p["connection"] for p in self.packets}),
            "packets": self.packets, "anomalies": self.anomalies,
        }


def capture(file: str, *, frames: int, first: float = T0, last: float = T0 + 5.0, complete: bool = True,
            connections: int = 1, exchanges: int = 10, fmt: str = "pcap") -> dict:
    return {"file": file, "format": fmt, "frames": frames, "bytes": frames * 700,
            "first_time": iso(first), "first_ts": first, "last_time": iso(last), "last_ts": last,
            "complete": complete, "connections": connections, "exchanges": exchanges,
            "decoder": {"frames": frames, "tcp": frames, "non_ip": 0, "non_tcp": 0, "malformed": 0},
            "tcp": {"connections": connections, "gaps": 0 if complete else 1, "conflicts": 0}}


def report(*, captures: list[dict], sessions: list[dict], anomalies: list[dict] = (),
           problems: list[dict] = (), downloads: list[dict] = (), other_http: int = 0) -> dict:
    every = [a for s in sessions for a in s["anomalies"]] + list(anomalies)
    bits_exchanges = sum(len(s["packets"]) for s in sessions)
    return {
        "schema": "bitstrace.report", "version": 1,
        "tool": {"name": "bits-analyze", "version": "0.1.0"},
        "captures": captures,
        "problems": list(problems),
        "summary": {
            "sessions": len(sessions),
            **{key: sum(1 for s in sessions if s["verdict"] == verdict)
               for key, verdict in (("delivered", "delivered"), ("not_delivered", "not-delivered"),
                                    ("unknown", "unknown"))},
            "anomalies": {sev: sum(1 for a in every if a["severity"] == sev)
                          for sev in ("error", "warning", "info")},
            "http_exchanges": bits_exchanges + other_http + len(downloads),
            "bits_exchanges": bits_exchanges, "other_http": other_http + len(downloads),
            "downloads": len(downloads),
        },
        "sessions": sessions,
        "anomalies": list(anomalies),
        "downloads": list(downloads),
    }


def download(url: str, *, ts: float, status: int = 206, size: int = 4096,
             client: str = "127.0.0.1:50414", method: str = "GET", frame: int = 240,
             session: str | None = None) -> dict:
    return {"client": client, "server": "127.0.0.1:8080", "method": method, "url": url,
            "host": "127.0.0.1:8080", "status": status, "bytes": size,
            "range": None if status == 200 else f"bytes=0-{size - 1}", "user_agent": "Microsoft BITS/7.8",
            "frame": frame, "capture": 0, "time": iso(ts), "ts": ts, "session": session}


# --- the scenarios ------------------------------------------------------------------------------

ID_CLEAN = "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}"
ID_CANCELLED = "{A0FF5911-77D2-4C3B-9A1E-0B6F3C1D2E44}"  # shares 8 hex digits with ID_CLEAN
ID_RESYNC = "{5C2E1B90-1D4F-4E0A-8C3B-6A7D9E2F1B03}"
ID_REPLY = "{C85B4E0A-5B3B-4F0E-9E2A-1C3D5E7F9A11}"
ID_BEFORE = "{0D9E8F7A-6B5C-4D3E-8F1A-2B3C4D5E6F70}"
ID_TRUNCATED = "{E1D2C3B4-A596-4877-8899-AABBCCDDEEFF}"


def clean_delivered() -> dict:
    """Create, eight 128 KiB fragments of a 1 MiB file, Close: delivered."""
    builder = SessionBuilder(ID_CLEAN).create()
    builder.upload(1024 * KIB, 128 * KIB)
    builder.close()
    return builder.build(state="closed", verdict="delivered")


def cancelled_then_fragment() -> dict:
    """Cancel half way, then another Fragment that the server no longer knows."""
    builder = SessionBuilder(ID_CANCELLED, start=T0 + 0.5, frame=60, connection=1,
                             client="127.0.0.1:50420", url="/uploads/cancel.bin", content_name="cancel.bin")
    builder.create()
    builder.upload(1024 * KIB, 64 * KIB, stop=256 * KIB)
    builder.cancel()
    late = builder.fragment(256 * KIB, 320 * KIB - 1, 1024 * KIB, status=500,
                            error=("0x8020001F", "BG_E_SESSION_NOT_FOUND"))
    builder.flag(late, "fragment-after-cancel", "error",
                 "fragment bytes 262144-327679/1048576 sent after the session was cancelled at frame "
                 f"{builder.packets[-2]['request']['frame']}")
    builder.flag(late, "error-response", "error",
                 "500 with 0x8020001F BG_E_SESSION_NOT_FOUND: the session id is unknown or expired")
    return builder.build(state="cancelled", verdict="not-delivered")


def resync_with_gap() -> dict:
    """A fragment past the acknowledged offset draws 416; the client resends from N."""
    builder = SessionBuilder(ID_RESYNC, start=T0 + 1.0, frame=120, connection=2,
                             client="[::1]:50430", server="[::1]:8080", url="/uploads/gap.bin",
                             content_name="gap.bin")
    builder.create()
    builder.fragment(0, 99_999, 400_000)
    skipped = builder.fragment(200_000, 299_999, 400_000, status=416)
    builder.flag(skipped, "range-gap", "error",
                 "fragment bytes 200000-299999/400000 starts past the acknowledged offset 100000")
    builder.flag(skipped, "out-of-sync", "info", "416: the server wants offset 100000")
    builder.fragment(100_000, 199_999, 400_000)
    builder.fragment(200_000, 299_999, 400_000)
    builder.fragment(300_000, 399_999, 400_000)
    builder.close()
    return builder.build(state="closed", verdict="delivered")


REPLY_URL = "BITS-Sessions\\Replies\\{C85B4E0A-5B3B-4F0E-9E2A-1C3D5E7F9A11}\\responsefile.bin"


def upload_reply() -> dict:
    """Upload-reply: the final Ack carries BITS-Reply-URL; the reply is fetched before Close."""
    builder = SessionBuilder(ID_REPLY, start=T0 + 2.0, frame=200, connection=3,
                             client="127.0.0.1:50440", url="/upload-reply/query.xml",
                             content_name="query.xml", reply_url=REPLY_URL)
    builder.create()
    builder.fragment(0, 4891, 4892, reply_url=REPLY_URL, rtt=0.3)
    builder.clock += 0.05  # the reply GET happens here (see reply_download)
    builder.close()
    return builder.build(state="closed", verdict="delivered")


def reply_download() -> dict:
    return download("/upload-reply/BITS-Sessions/Replies/%7BC85B4E0A-5B3B-4F0E-9E2A-1C3D5E7F9A11%7D/responsefile.bin",
                    ts=T0 + 2.33, client="127.0.0.1:50440", size=1337, status=200, frame=205, session=ID_REPLY)


def before_capture() -> dict:
    """The capture began mid-upload: the first packet seen is a Fragment."""
    builder = SessionBuilder(ID_BEFORE, start=T0 + 0.001, frame=1, connection=4,
                             client="10.0.0.7:49822", server="10.0.0.1:80", url="/bits/backup.vhd",
                             content_name="backup.vhd")
    first = builder.fragment(3 * 1024 * KIB, 4 * 1024 * KIB - 1, 5 * 1024 * KIB)
    builder.before_capture = True
    builder.flag(first, "session-before-capture", "info",
                 "first packet of the session is a Fragment at offset 3145728, 1 ms into the capture")
    builder.fragment(4 * 1024 * KIB, 5 * 1024 * KIB - 1, 5 * 1024 * KIB)
    builder.close()
    return builder.build(state="closed", verdict="delivered")


TRUNCATED_FILE = "captures/truncated.pcap"


def truncated_session() -> dict:
    """The capture stops mid-fragment: no ack, part of the body missing, never finished."""
    builder = SessionBuilder(ID_TRUNCATED, start=T0 + 3.0, frame=300, connection=0,
                             client="127.0.0.1:50450", url="/uploads/cut.bin", content_name="cut.bin")
    builder.create()
    builder.fragment(0, 65_535, 262_144)
    cut = builder.fragment(65_536, 131_071, 262_144, status=None)
    cut["request"]["body_length"] = 20_000
    cut["request"]["body_sha256"] = None
    builder.flag(cut, "capture-gap", "warning",
                 "45536 bytes of the fragment body missing from the capture; the message is partial")
    builder.flag(cut, "no-response", "warning", "Fragment at frame %d has no ack in the capture"
                 % cut["request"]["frame"])
    last = builder.packets[-1]
    builder.anomalies.append(anomaly("never-finished", "warning",
                                     "capture ends with 65536 of 262144 bytes acknowledged; session neither closed nor cancelled",
                                     session=ID_TRUNCATED, connection=0, frames=[last["request"]["frame"]],
                                     ts=last["request"]["ts"]))
    return builder.build(state="receive-fragments", verdict="unknown")


def truncated_problems() -> list[dict]:
    return [{"kind": "truncated-record", "message": "record header says 1514 bytes, 402 left in the file",
             "file": TRUNCATED_FILE, "frame": 311, "offset": 204_880, "connection": None, "fatal": True},
            {"kind": "capture-gap", "message": "45536 bytes missing in the client's direction",
             "file": TRUNCATED_FILE, "frame": 310, "offset": 86_000, "connection": 0, "fatal": False}]


def orphan_anomaly() -> dict:
    return anomaly("orphan-response", "warning", "200 response at frame 9 answers no request in the capture",
                   session=None, connection=5, frames=[9], ts=T0 + 0.2)


def corpus_report() -> dict:
    """Every scenario in one report over two captures, one of them truncated."""
    sessions = [before_capture(), clean_delivered(), cancelled_then_fragment(), resync_with_gap(),
                upload_reply(), truncated_session()]
    return report(
        captures=[capture("captures/clean-multi-fragment.pcap", frames=290, last=T0 + 2.6, connections=5,
                          exchanges=40),
                  capture(TRUNCATED_FILE, frames=311, first=T0 + 3.0, last=T0 + 3.1, complete=False,
                          fmt="pcapng")],
        sessions=sessions, anomalies=[orphan_anomaly()], problems=truncated_problems(),
        downloads=[reply_download(), download("/files/update.cab", ts=T0 + 2.5, client="127.0.0.1:50460")],
        other_http=1)


def many_sessions(count: int = 50, fragments: int = 6) -> dict:
    """`count` uploads of various outcomes, for layout and size."""
    sessions = []
    for n in range(count):
        builder = SessionBuilder(f"{{{n:08X}-0000-4000-8000-{n:012X}}}", start=T0 + n * 0.7, frame=1 + n * 40,
                                 connection=n, client=f"192.0.2.{n % 250 + 1}:{50000 + n}",
                                 url=f"/uploads/host{n:03d}/daily-{n}.log", content_name=f"daily-{n}.log")
        builder.create()
        size = 64 * KIB * (1 + n % 4)
        if n % 5 == 4:  # cancelled half way
            builder.upload(size * fragments, size, stop=size * fragments // 2)
            builder.cancel()
            sessions.append(builder.build(state="cancelled", verdict="not-delivered"))
            continue
        builder.upload(size * fragments, size)
        builder.close()
        if n % 7 == 3:
            builder.flag(builder.packets[2], "range-resend", "info",
                         f"fragment bytes {size}-{2 * size - 1} resent after a lost ack")
        sessions.append(builder.build(state="closed", verdict="delivered"))
    return report(captures=[capture("bench/many.pcapng", frames=count * 40, last=T0 + count * 0.7 + 1,
                                    connections=count, exchanges=count * (fragments + 2), fmt="pcapng")],
                  sessions=sessions)


HOSTILE = {
    "url": "/up/<script>alert('url')</script>?a=1&b=\"2\"",
    "content_name": "\"><img src=x onerror=alert(1)>[bold red]markup[/]\x1b[2J",
    "user_agent": "Evil/1.0 <svg onload=alert(2)> \u202etxt.exe",
    "message": "</svg><script>alert(3)</script> & [link=http://evil.example]x[/link]",
    "client": "<b>127.0.0.1:1</b>",
}


def hostile_report() -> dict:
    """Strings a malicious client controls, in every place the capture feeds."""
    builder = SessionBuilder("{<script>alert(4)</script>}", url=HOSTILE["url"],
                             content_name=HOSTILE["content_name"], user_agent=HOSTILE["user_agent"],
                             client=HOSTILE["client"])
    builder.create()
    packet = builder.fragment(0, 9_999, 10_000)
    builder.flag(packet, "client-fingerprint", "info", HOSTILE["message"])
    builder.close()
    problem = {"kind": "malformed-ip", "message": "<iframe src=//evil.example>", "file": "<x>.pcap",
               "frame": 3, "offset": 40, "connection": None, "fatal": False}
    return report(captures=[capture("<x>.pcap", frames=12)], sessions=[builder.build(state="closed", verdict="delivered")],
                  problems=[problem], downloads=[download("/dl?<script>", ts=T0 + 1)])


def with_fragments(count: int) -> dict:
    """One session of `count` small fragments, for the timeline's detail cap."""
    builder = SessionBuilder(ID_CLEAN).create()
    builder.upload(count * 8 * KIB, 8 * KIB)
    builder.close()
    return report(captures=[capture("captures/long.pcap", frames=count * 3)],
                  sessions=[builder.build(state="closed", verdict="delivered")])


def sparse_report() -> dict:
    """What little a capture can give: a Create with no answer (no id, no size, no times on
    the response), and an extracted file with holes."""
    builder = SessionBuilder(None, url="/u")
    builder._packet("Create-Session", status=None)
    lonely = builder.build(state="create-session", verdict="unknown")
    lonely.update(duration_s=0.0, throughput_bps=None, total=None, content_name=None, user_agent=None)
    partial = clean_delivered()
    partial["extracted"] = {"path": "out/A0FF5911_report.bin", "complete": False, "sha256": None,
                            "coverage": [{"first": 0, "last": 131071, "frames": [5, 7]}]}
    return report(captures=[capture("captures/sparse.pcap", frames=4)], sessions=[lonely, partial])


def empty_report() -> dict:
    return report(captures=[capture("captures/no-bits.pcap", frames=3, exchanges=0)], sessions=[])



ID_RETRIES = "{9A8B7C6D-5E4F-4A3B-8C2D-1E0F9A8B7C6D}"


def idle_retries() -> dict:
    """An upload that stops twice and is taken up again by BITS's retry 10 and 20 minutes later;
    between the tries nothing is on the wire."""
    builder = SessionBuilder(ID_RETRIES, url="/uploads/retried.bin", content_name="retried.bin")
    builder.create()
    builder.upload(1024 * KIB, 64 * KIB, stop=256 * KIB)
    builder.clock += 600.0
    builder.upload(1024 * KIB, 64 * KIB, start=256 * KIB, stop=640 * KIB)
    builder.clock += 1200.0
    builder.upload(1024 * KIB, 64 * KIB, start=640 * KIB)
    builder.close()
    return report(captures=[capture("captures/retries.pcap", frames=400, last=T0 + 1805.0)],
                  sessions=[builder.build(state="closed", verdict="delivered")])
