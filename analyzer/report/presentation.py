"""What the human-facing renderings (text, HTML and its timelines) share: severity order,
display-safe strings, counts, human sizes and durations, short session ids, the worst-first
anomaly order, which sessions need a look, and the story of a session told in words.

One unit system everywhere a person reads a size: binary multiples with their IEC names (KiB,
MiB, GiB: 1 KiB = 1,024 bytes), in the text, the HTML and the progress bar alike. Binary
because fragment sizes, server limits and the protocol's own figures are powers of two; the
names say it, so `5.84 MiB` is never read as millions of bytes. Counts carry thousands
separators (`2,000`); byte positions inside a range (`bytes 32768-65535`) stay as the
Content-Range header writes them, so they can be searched for in the capture.

Everything here reads the report of schema version 1 (schema.md, schema.py) and nothing else.
"""

from __future__ import annotations

import datetime as dt
import html
import math
import unicodedata
from typing import Callable, Iterable, NamedTuple

from bitstrace.analyzer.report.schema import AnomalyRecord, ClockSkewRecord, PacketRecord, Report, SessionRecord

#: A session's packet records by its index in the report (json.PacketSource): the renderers that
#: tell a session's story ask for the packets of the sessions that have one, and only those.
Packets = Callable[[int], list[PacketRecord]]

SEVERITIES = ("error", "warning", "info")
_RANK = {severity: rank for rank, severity in enumerate(SEVERITIES)}


def severity_rank(severity: str | None) -> int:
    """0 for error, 1 warning, 2 info. A severity this renderer does not know ranks as the
    worst, so a producer's new or misspelt severity is shown rather than filtered away."""
    return _RANK.get(severity or "", 0)


def check_min_severity(min_severity: str) -> int:
    if min_severity not in _RANK:
        raise ValueError(f"min_severity must be one of {', '.join(SEVERITIES)}, not {min_severity!r}")
    return _RANK[min_severity]


def printable(value: object) -> str:
    """A capture string made safe to show: control characters (ANSI escapes, NUL, C1 codes)
    and invisible format characters (bidi overrides that reorder what the reader sees) become
    visible escapes such as `\\x1b` or `\\u202e`. Captures are hostile input."""
    if value is None:
        return ""
    text = str(value)
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable() or char == " ":
            out.append(char)
        elif unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                       else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


def escaped(value: object) -> str:
    """`printable` and HTML-escaped, for text and attribute values alike."""
    return html.escape(printable(value), quote=True)


def or_dash(value: object) -> object:
    return "—" if value is None else value


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(size: int | float | None) -> str:
    """`512 B`, `1.50 KiB`, `12.5 MiB`, `128 KiB`: three significant digits, binary units."""
    if size is None:
        return "?"
    value = float(size)
    if abs(value) < 1024:
        return f"{int(value)} B"
    unit = 0
    # Rounded, 1023.9 KiB would read "1024 KiB": move up a unit before rounding decides.
    while abs(value) >= 1023.5 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    if abs(value) >= 99.95:
        return f"{value:.0f} {_UNITS[unit]}"
    if abs(value) >= 9.995:
        return f"{value:.1f} {_UNITS[unit]}"
    return f"{value:.2f} {_UNITS[unit]}"


def compact_size(size: int | float | None) -> str:
    """`512B`, `4.78KiB`, `128KiB`, `1.00MiB`: human_size without the space, for narrow columns."""
    if size is None:
        return "?"
    return human_size(size).replace(" ", "")


def count(number: int | None) -> str:
    """`2,000`: a count as people read it (`—` when unknown)."""
    return "—" if number is None else f"{number:,}"


def human_rate(bytes_per_second: float | None, *, compact: bool = False) -> str:
    if bytes_per_second is None:
        return "—"
    return f"{(compact_size if compact else human_size)(bytes_per_second)}/s"


def skew_sentence(skew: ClockSkewRecord) -> str:
    """The capture's `clock_skew` note as one sentence (for a note that is not null)."""
    if skew["offset_s"] < 0:
        evidence = (f"{skew['answers_before_requests']} answers are stamped before their requests began, "
                    f"by up to {human_duration(skew['behind_s'])}")
        direction = "behind"
    else:
        evidence = (f"{skew['answers_after_next_request']} answers are stamped after the client's next "
                    f"request on their connection, by up to {human_duration(skew['ahead_s'])}")
        direction = "ahead of"
    return (f"{evidence}: the server→client timestamps run {direction} the client→server ones by at "
            f"least {human_duration(abs(skew['offset_s']))} (session timings are corrected by it)")


def human_duration(seconds: float | None, *, compact: bool = False) -> str:
    """`850 ms`, `12.4 s`, `3 m 05 s`, `2 h 03 m`, `3 d 04 h` (`850ms`, `3m05s` compact)."""
    if seconds is None:
        return "—"
    space = "" if compact else " "
    if seconds < 1:
        return f"{seconds * 1000:.0f}{space}ms"
    if seconds < 60:
        return f"{seconds:.1f}{space}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}{space}m{space}{whole % 60:02d}{space}s"
    if whole < 86400:
        return f"{whole // 3600}{space}h{space}{whole % 3600 // 60:02d}{space}m"
    return f"{whole // 86400}{space}d{space}{whole % 86400 // 3600:02d}{space}h"


def percent(part: int | None, whole: int | None) -> str:
    """Share of `whole`, never rounded up to a finished-looking 100% (or down to 0%)."""
    if part is None or not whole:
        return ""
    share = 100 * part / whole
    if part < whole and share >= 99.5:
        return f"{math.floor(share * 10) / 10:.1f}%"
    if 0 < part and share < 0.5:
        return "<1%"
    return f"{share:.0f}%"


def compact_progress(session: SessionRecord) -> str:
    """`512KiB/1.00MiB 50%`: the acknowledged share of the file, for a narrow column."""
    acknowledged, total = session.get("acknowledged") or 0, session.get("total")
    share = percent(acknowledged, total)
    shown = f"{compact_size(acknowledged)}/{compact_size(total)}"
    return f"{shown} {share}" if share else shown


def short_ids(ids: Iterable[str | None]) -> dict[str, str]:
    """Session ids shortened for tables, each still unambiguous within the report.

    A GUID `{A0FF5911-4144-…}` shows as `A0FF5911`: the shortest prefix of at least 8
    characters (braces dropped) that no other id shares, with `…` when something was cut.
    Ids are opaque strings (Win32 allows any ≤ 100 chars), so nothing else is assumed."""
    keys = {i: printable(i).strip("{}") for i in ids if i is not None}
    distinct = sorted(set(keys.values()), key=str.lower)
    shortest: dict[str, str] = {}
    for index, key in enumerate(distinct):
        neighbours = distinct[max(index - 1, 0): index] + distinct[index + 1: index + 2]
        length = max(8, *(1 + _common_prefix(key.lower(), other.lower()) for other in neighbours)) \
            if neighbours else 8
        # Cutting one character to add "…" gains nothing.
        shortest[key] = key if length >= len(key) - 1 else key[:length] + "…"
    return {i: shortest[key] for i, key in keys.items()}


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def all_anomalies(report: Report) -> list[AnomalyRecord]:
    """Every anomaly of the report (the sessions' and the session-less ones), worst first:
    error, warning, info; then by time (untimed last); then by first frame."""
    found = [a for s in report.get("sessions") or () for a in s.get("anomalies") or ()]
    found += list(report.get("anomalies") or ())
    return sorted(found, key=anomaly_order)


def anomaly_order(anomaly: AnomalyRecord) -> tuple[int, bool, float, int, int]:
    ts = anomaly.get("ts")
    frames = anomaly.get("frames") or []
    captures = anomaly.get("captures") or []
    return (severity_rank(anomaly.get("severity")), ts is None, ts or 0.0,
            captures[0] if captures else 0, frames[0] if frames else 0)


def severity_counts(anomalies: Iterable[AnomalyRecord]) -> dict[str, int]:
    """Anomalies by severity; an unknown severity counts as an error (as `severity_rank`)."""
    counts = dict.fromkeys(SEVERITIES, 0)
    for anomaly in anomalies:
        severity = anomaly.get("severity") or "error"
        counts[severity if severity in counts else "error"] += 1
    return counts


def several_captures(report: Report) -> bool:
    """Whether the report's frames need their file named (`2:431`)."""
    return len(report.get("captures") or ()) > 1


def capture_legend(report: Report) -> str | None:
    """`frames N:F are frame F of capture #N: #1 a.pcap, #2 b.pcap` when the report has several
    captures, else None."""
    if not several_captures(report):
        return None
    files = ", ".join(f"#{n} {printable(c.get('file')) or '-'}" for n, c in enumerate(report["captures"], 1))
    return f"frames N:F are frame F of capture #N: {files}"


def frame_name(frame: int | None, capture: int | None, several: bool) -> str:
    """`431`, or `2:431` (frame 431 of the second capture) in a report of several captures."""
    if frame is None:
        return "—"
    return f"{(capture or 0) + 1}:{frame}" if several else f"{frame}"


def frame_list(frames: Iterable[int] | None, limit: int = 6, captures: Iterable[int] | None = None) -> str:
    """`21-23, 40, 52` with runs collapsed; `… (+N)` past `limit` runs. With `captures` (the
    capture index of each frame, given in reports of several captures) `1:21-23, 2:4`."""
    frames = list(frames or ())
    places = sorted(set(zip(captures, frames) if captures is not None else ((None, f) for f in frames)),
                    key=lambda place: (place[0] or 0, place[1]))
    runs: list[tuple[int | None, int, int]] = []
    for capture, number in places:
        if runs and capture == runs[-1][0] and number == runs[-1][2] + 1:
            runs[-1] = (capture, runs[-1][1], number)
        else:
            runs.append((capture, number, number))
    parts = [("" if c is None else f"{c + 1}:") + (f"{a}" if a == b else f"{a}-{b}") for c, a, b in runs[:limit]]
    if len(runs) > limit:
        parts.append(f"… (+{len(runs) - limit})")
    return ", ".join(parts)


def anomaly_frames(anomaly: AnomalyRecord, several: bool) -> str:
    """An anomaly's frames for display (`frame_list`), naming their files when `several`."""
    frames = anomaly.get("frames") or []
    captures = (anomaly.get("captures") or [0] * len(frames)) if several else None
    return frame_list(frames, captures=captures)


class Clock:
    """Formats the report's timestamps: time of day (UTC) when everything happened on one day
    (the date is in the capture header), the full date and time otherwise."""

    def __init__(self, report: Report) -> None:
        stamps = [ts for c in report.get("captures") or () for ts in (c.get("first_ts"), c.get("last_ts"))]
        stamps += [ts for s in report.get("sessions") or () for ts in (s.get("first_ts"), s.get("last_ts"))]
        days = {self._utc(ts).date() for ts in stamps if ts is not None}
        self.one_day = len(days) <= 1

    @staticmethod
    def _utc(ts: float) -> dt.datetime:
        try:
            return dt.datetime.fromtimestamp(ts, dt.timezone.utc)
        except (OverflowError, OSError, ValueError):  # a capture's clock can be anything
            return dt.datetime.max.replace(tzinfo=dt.timezone.utc) if ts > 0 else dt.datetime.min.replace(tzinfo=dt.timezone.utc)

    def time(self, ts: float | None) -> str:
        if ts is None:
            return "—"
        moment = self._utc(ts)
        clock = moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"
        return clock if self.one_day else f"{moment:%Y-%m-%d} {clock}"

    def datetime(self, ts: float | None) -> str:
        if ts is None:
            return "—"
        moment = self._utc(ts)
        return f"{moment:%Y-%m-%d %H:%M:%S}.{moment.microsecond // 1000:03d} UTC"


# --- which sessions need a look, and their story --------------------------------------------

def needs_a_look(session: SessionRecord) -> bool:
    """Not delivered, or with an anomaly worse than info: what a reader must see first."""
    return (session.get("verdict") != "delivered"
            or any(severity_rank(a.get("severity")) < severity_rank("info") for a in session.get("anomalies") or ()))


_VERDICT_RANK = {"not-delivered": 0, "unknown": 1, "delivered": 2}


def look_order(session: SessionRecord) -> tuple[int, int, bool, float]:
    """Worst first: not delivered, unknown, delivered; within each the worst anomaly (error,
    warning, info, none), then by start time (untimed last)."""
    worst = min((severity_rank(a.get("severity")) for a in session.get("anomalies") or ()), default=len(SEVERITIES))
    ts = session.get("first_ts")
    return (_VERDICT_RANK.get(session.get("verdict") or "", 0), worst, ts is None, ts or 0.0)


#: Record-level signs that a session has a story worth telling (checked without its packets).
_STORY_CODES = frozenset({"session-recreated", "host-redirect", "no-response", "session-before-capture"})


def has_story(session: SessionRecord) -> bool:
    """Whether `session_story` may find something to tell: several connections, a recreation,
    a redirect, a lost answer, a start before the capture, or the server forgetting it. Decided
    from the record alone, so the packets are built only for the sessions that need them."""
    return (len(session.get("connections") or ()) > 1 or bool(session.get("before_capture"))
            or session.get("state") == "expired"
            or any(a.get("code") in _STORY_CODES for a in session.get("anomalies") or ()))


class Recreation(NamedTuple):
    """A session the server forgot (BG_E_SESSION_NOT_FOUND) and the one created for it."""

    gone: int  # index of the forgotten session in the report
    successor: int  # index of the session created after it
    frame: str  # the successor's Create-Session, as frame_name writes it


def recreations(sessions: list[SessionRecord], several: bool) -> list[Recreation]:
    """The pairs the `session-recreated` anomalies name. The anomaly sits on the new session and
    names the forgotten one in its message; that one is looked for among the earlier sessions
    for the same URL from the same client address (the analyzer's own grouping)."""
    found = []
    for index, session in enumerate(sessions):
        for anomaly in session.get("anomalies") or ():
            if anomaly.get("code") != "session-recreated":
                continue
            message = anomaly.get("message") or ""
            earlier = [n for n, other in enumerate(sessions)
                       if n != index and other.get("url") == session.get("url")
                       and _address(other.get("client")) == _address(session.get("client"))
                       and (other.get("first_ts") or 0.0) <= (session.get("first_ts") or 0.0)]
            named = [n for n in earlier if (sessions[n].get("id") or "\0") in message]
            gone = named[-1] if named else next((n for n in reversed(earlier) if sessions[n].get("state") == "expired"), None)
            if gone is not None:
                frames = anomaly.get("frames") or []
                captures = anomaly.get("captures") or []
                found.append(Recreation(gone, index, frame_name(frames[0] if frames else None,
                                                                captures[0] if captures else None, several)))
    return found


def _address(endpoint: str | None) -> str:
    """The address of `ip:port` or `[ip6]:port` (a client's port changes with its connection)."""
    text = endpoint or ""
    return text.rsplit(":", 1)[0] if text.count(":") == 1 or text.startswith("[") else text


def _span(packet: PacketRecord) -> str:
    rng = packet["request"].get("range")
    return f"bytes {rng.get('first')}-{rng.get('last')}" if rng else printable(packet.get("type") or "packet")


def _sent(packet: PacketRecord) -> str:
    """`10,000 of 32,768 body bytes sent` for a cut request, "" for a whole one."""
    request = packet["request"]
    rng = request.get("range")
    expected = request.get("content_length")
    if expected is None and rng:
        expected = (rng.get("last") or 0) - (rng.get("first") or 0) + 1
    sent = request.get("body_length")
    if expected is None or sent is None or sent >= expected:
        return ""
    return f"{sent:,} of {expected:,} body bytes sent"


def _connection_change(before: PacketRecord, after: PacketRecord, host_id: str | None, several: bool) -> str:
    """One sentence: why the session left connection `before` for connection `after`."""
    old, new = before.get("connection"), after.get("connection")
    response, request = before.get("response"), before["request"]
    if "host-redirect" in (after.get("anomalies") or ()) and host_id:
        opening = (f"The server's ack named BITS-Host-Id {printable(host_id)}: the upload moved to that host "
                   f"on connection {new}")
    else:
        if response is None:
            cut = _sent(before)
            if cut:
                opening = f"Connection {old} closed mid-fragment ({_span(before)}: {cut}, no ack)"
            else:
                opening = f"Connection {old} ended before the answer to {_span(before)} (frame {frame_name(request.get('frame'), request.get('capture'), several)})"
        else:
            after_range, before_range = after["request"].get("range"), request.get("range")
            frame = frame_name(response.get("frame"), response.get("capture"), several)
            if (after_range and before_range and response.get("status") in (200, 201)
                    and (after_range.get("first") or 0) <= (before_range.get("first") or 0)):
                # The same bytes again on the new connection: the client never took the ack in.
                opening = (f"Connection {old} ended after the server acknowledged {_span(before)} (frame {frame}), "
                           "an ack the client evidently did not read")
            else:
                opening = f"Connection {old} ended after the answer to {_span(before)} (frame {frame})"
        opening += f"; resumed on connection {new}"
    after_range = after["request"].get("range")
    if after_range:
        opening += f" from byte {after_range.get('first')}"
        answer = after.get("response")
        if answer is not None and answer.get("status") == 416 and answer.get("received") is not None:
            opening += (f": the server answered 416 (it had {answer['received']:,} bytes already) "
                        "and the client went on from there")
    else:
        opening += f" with {printable(after.get('type') or 'a packet')}"
    return opening + "."


def session_story(session: SessionRecord, index: int, links: list[Recreation], sessions: list[SessionRecord],
                  ids: dict[str, str], several: bool) -> list[str]:
    """What happened to the session, in sentences, where it is more than "created, uploaded,
    closed": a start before the capture, each move to another TCP connection (a cut one, an
    answer lost, a Host-Id redirect) and where the upload took up again, the server forgetting
    the session and the session created in its place. Derived from the session's packets (which
    connection each went on, cut bodies, missing answers, 416 offsets) and from the anomalies
    session-recreated and host-redirect; `links` is `recreations(sessions, several)`."""
    packets = session.get("packets") or []
    story: list[str] = []
    if session.get("before_capture"):
        first = next((p["request"]["range"] for p in packets if p["request"].get("range")), None)
        story.append("Already under way when the capture began" +
                     (f": the first fragment seen starts at byte {first.get('first')}." if first else "."))
    for link in links:
        if link.successor == index:
            gone = sessions[link.gone]
            start = next((p["request"]["range"] for p in packets if p["request"].get("range")), None)
            story.append(f"Created (frame {link.frame}) after the server no longer knew session "
                         f"{_short(gone.get('id'), ids)} (BG_E_SESSION_NOT_FOUND): a new session for the same URL"
                         + (f", starting over from byte {start.get('first')}." if start else "."))
    host_id: str | None = None
    for before, after in zip(packets, packets[1:]):
        answer = before.get("response")
        if answer is not None and answer.get("host_id"):
            host_id = answer.get("host_id")
        if before.get("connection") != after.get("connection"):
            story.append(_connection_change(before, after, host_id, several))
    if packets and packets[-1].get("response") is None and packets[-1]["request"].get("range"):
        last = packets[-1]
        cut = _sent(last)
        story.append(f"The capture holds no answer to the last fragment ({_span(last)}"
                     + (f", {cut}" if cut else "") + f") on connection {last.get('connection')}.")
    forgotten = next((response for p in packets if (response := p.get("response")) is not None
                      and response.get("error_name") == "BG_E_SESSION_NOT_FOUND"), None)
    if forgotten is not None and session.get("state") == "expired":
        frame = frame_name(forgotten.get("frame"), forgotten.get("capture"), several)
        acknowledged, total = session.get("acknowledged") or 0, session.get("total")
        sentence = (f"The server no longer knew the session (BG_E_SESSION_NOT_FOUND at frame {frame}) with "
                    f"{acknowledged:,} of {count(total)} bytes acknowledged")
        successors = [link for link in links if link.gone == index]
        if successors:
            successor = sessions[successors[0].successor]
            sentence += (f"; the client created session {_short(successor.get('id'), ids)} (frame "
                         f"{successors[0].frame}) for the same URL")
        else:
            sentence += "; no new session for it follows in the capture"
        story.append(sentence + ".")
    return story


def _short(session_id: str | None, ids: dict[str, str]) -> str:
    return "(no id)" if session_id is None else ids.get(session_id, printable(session_id))
