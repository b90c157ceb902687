"""The session timeline of the HTML report: one inline SVG per session, drawn from its record
(schema.md): time left to right, byte offset bottom to top; each fragment a box from request to
response over its byte range, the acknowledged offset as a step line, Create/Close/Cancel/Ping
and reply fetches as event lines, anomalies as shapes above the plot. Idle stretches are cut out
of the time axis; past a few hundred marks the detail is aggregated, and a note says so.

Every string from the capture is made printable and escaped (`escaped`); tooltips are SVG
<title>s, so nothing needs script.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

from bitstrace.analyzer.report.presentation import (
    SEVERITIES, Clock, anomaly_frames, anomaly_order, escaped, frame_name, human_duration, human_size, or_dash,
    printable,
)
from bitstrace.analyzer.report.schema import (
    AnomalyRecord, DownloadRecord, PacketRecord, RangeRecord, RequestRecord, ResponseRecord, SessionRecord,
)

#: Fragments drawn one by one per timeline; past this, ordinary ones are aggregated in bands.
MAX_FRAGMENT_BARS = 150
AGGREGATE_BANDS = 60
#: Anomaly and event markers drawn per timeline; the session's anomaly list has them all.
MAX_MARKERS = 100
MAX_ACK_POINTS = 400

_W, _H = 1000, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 74, 16, 34, 30
_PLOT_W, _PLOT_H = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM


def _legend() -> str:
    items = [
        "<rect class=\"f-ok\" x=\"0\" y=\"-9\" width=\"16\" height=\"12\"/>", "fragment, 200",
        "<rect class=\"f-416\" x=\"0\" y=\"-9\" width=\"16\" height=\"12\"/>", "fragment, 416 resync",
        "<rect class=\"f-err\" x=\"0\" y=\"-9\" width=\"16\" height=\"12\"/>", "fragment, error",
        "<rect class=\"f-none\" x=\"0\" y=\"-9\" width=\"16\" height=\"12\"/>", "no response",
        "<rect class=\"f-agg\" x=\"0\" y=\"-9\" width=\"16\" height=\"12\"/>", "fragments aggregated",
        "<path class=\"ackline\" d=\"M0 2H6V-6H16\"/><circle class=\"ack\" cx=\"6\" cy=\"2\" r=\"3\"/>",
        "acknowledged offset",
        "<path class=\"ack416\" d=\"M8 -8L14 2H2Z\"/>", "416: offset the server wants",
        "<line class=\"ev ev-close\" x1=\"8\" y1=\"-10\" x2=\"8\" y2=\"4\"/>", "close",
        "<line class=\"ev ev-cancel\" x1=\"8\" y1=\"-10\" x2=\"8\" y2=\"4\"/>", "cancel",
        "<line class=\"ev ev-err\" x1=\"8\" y1=\"-10\" x2=\"8\" y2=\"4\"/>", "error response",
        "<line class=\"ev ev-fetch\" x1=\"8\" y1=\"-10\" x2=\"8\" y2=\"4\"/>", "reply fetched (GET/HEAD)",
        "<rect class=\"m-error\" x=\"3\" y=\"-7\" width=\"9\" height=\"9\"/>", "error",
        "<path class=\"m-warning\" d=\"M8 -8L13 2H3Z\"/>", "warning",
        "<circle class=\"m-info\" cx=\"8\" cy=\"-3\" r=\"4.5\"/>", "info",
        "<rect class=\"idle\" x=\"3\" y=\"-9\" width=\"10\" height=\"12\"/><path class=\"axisbreak\" "
        "d=\"M3 3l2.5 5l5 -10l2.5 5\"/>", "idle time cut out",
    ]
    parts: list[str] = []
    x: float = 0
    y = 16
    for shape, label in zip(items[::2], items[1::2]):
        width = 24 + 6.2 * len(label) + 18
        if x + width > 980:
            x, y = 0, y + 22
        parts.append(f"<g transform=\"translate({x:.0f},{y})\">{shape}<text x=\"22\" y=\"2\">{label}</text></g>")
        x += width
    return (f"<svg class=\"legend\" viewBox=\"0 0 1000 {y + 10}\" width=\"1000\" height=\"{y + 10}\" "
            f"role=\"img\" aria-label=\"legend\">{''.join(parts)}</svg>")


#: What the marks mean, drawn once for the page.
LEGEND_SVG = _legend()


#: A stretch without any mark at least this long, and this share of the session, is cut out of
#: the time axis down to a break of BREAK_W pixels: retries minutes apart would otherwise leave
#: what happened a few pixels wide. The longest MAX_BREAKS are cut.
IDLE_MIN_S = 5.0
IDLE_SHARE = 0.05
BREAK_W = 14
MAX_BREAKS = 12


def _idle_stretches(times: list[float], span: float) -> list[tuple[float, float]]:
    """The stretches between consecutive marks (`times`, sorted) to cut out of the time axis."""
    idle = [(a, b) for a, b in zip(times, times[1:]) if b - a >= max(IDLE_MIN_S, IDLE_SHARE * span)]
    cut = sorted(sorted(idle, key=lambda gap: gap[0] - gap[1])[:MAX_BREAKS])  # the longest, in time order
    return cut if sum(b - a for a, b in cut) < span else []  # all idle: nothing to make room for


class _Scale:
    """Session time → x, byte offset → y, inside the plot area. The time axis is linear but
    for the idle stretches it cuts out (`breaks`, (first, last) times)."""

    def __init__(self, stamps: list[float], top_offset: int) -> None:
        times = sorted(set(stamps)) or [0.0, 1.0]
        self.t0, self.span = times[0], max(times[-1] - times[0], 1e-6)
        self.top = max(top_offset, 1)
        self.breaks = _idle_stretches(times, self.span)
        # The axis in pieces (first time, duration, first x, width, is a break): the active ones
        # share the plot's width in proportion to their duration, the breaks get BREAK_W each.
        per_second = (_PLOT_W - BREAK_W * len(self.breaks)) / (self.span - sum(b - a for a, b in self.breaks))
        self.pieces: list[tuple[float, float, float, float, bool]] = []
        start, x = self.t0, float(_LEFT)
        for a, b in self.breaks:
            self.pieces.append((start, a - start, x, (a - start) * per_second, False))
            x += (a - start) * per_second
            self.pieces.append((a, b - a, x, BREAK_W, True))
            start, x = b, x + BREAK_W
        self.pieces.append((start, self.span - (start - self.t0), x, _LEFT + _PLOT_W - x, False))
        self._starts = [piece[0] for piece in self.pieces]

    def x(self, ts: float | None) -> float:
        ts = ts if ts is not None else self.t0
        start, duration, x, width, _ = self.pieces[max(bisect.bisect_right(self._starts, ts) - 1, 0)]
        return x + width * ((ts - start) / duration) if duration > 0 else x

    def time(self, x: float) -> float | None:
        """The time at `x`; None inside a break."""
        for start, duration, left, width, cut in self.pieces:
            if left <= x <= left + width:
                if cut:
                    return None
                return start + duration * ((x - left) / width) if width > 0 else start
        return None

    def y(self, offset: float) -> float:
        return _TOP + _PLOT_H * (1 - min(max(offset, 0), self.top) / self.top)


def timeline_svg(session: SessionRecord, fetches: list[DownloadRecord], clock: Clock,
                 several: bool) -> tuple[str, list[str]]:
    """The session's SVG (with the downloads in `fetches` that fetched its reply) and the notes
    that say what was simplified."""
    packets = session.get("packets") or []
    stamps = [t for p in packets for t in (p["request"].get("ts"), _response_ts(p)) if t is not None]
    stamps += [t for a in session.get("anomalies") or [] if (t := a.get("ts")) is not None]
    stamps += [t for t in (session.get("first_ts"), session.get("last_ts")) if t is not None]
    stamps += [t for d in fetches if (t := d.get("ts")) is not None]
    fragments = [_Fragment(p, p["request"], rng) for p in packets if (rng := p["request"].get("range"))]
    ranges_top = max(((f.range.get("last") or 0) + 1 for f in fragments), default=0)
    total = session.get("total")
    scale = _Scale(stamps, max(total or 0, ranges_top))
    notes: list[str] = []
    body: list[str] = [f"<rect class=\"plot\" x=\"{_LEFT}\" y=\"{_TOP}\" width=\"{_PLOT_W}\" height=\"{_PLOT_H}\"/>"]
    body += _axes(scale, total, bool(fragments))
    body += _breaks(scale, notes)
    body += _fragment_marks(fragments, scale, notes, several)
    body += _ack_line(fragments, scale, several)
    body += _events(packets, scale, notes, several)
    body += _fetches(fetches, scale, several)
    body += _anomaly_marks(session.get("anomalies") or [], scale, clock, notes, several)
    label = printable(session.get("id")) or "session"
    svg = (f"<svg class=\"timeline\" viewBox=\"0 0 {_W} {_H}\" width=\"{_W}\" height=\"{_H}\" role=\"img\" "
           f"aria-label=\"timeline of session {escaped(label)}\">{''.join(body)}</svg>")
    return svg, notes


def _axes(scale: _Scale, total: int | None, has_fragments: bool) -> list[str]:
    out = []
    for step in range(5):
        offset = scale.top * step / 4
        y = scale.y(offset)
        out.append(f"<line class=\"grid\" x1=\"{_LEFT}\" y1=\"{y:.1f}\" x2=\"{_W - _RIGHT}\" y2=\"{y:.1f}\"/>")
        if has_fragments:
            out.append(f"<text x=\"{_LEFT - 6}\" y=\"{y + 4:.1f}\" text-anchor=\"end\">{escaped(human_size(offset))}</text>")
    if not has_fragments:
        out.append(f"<text x=\"{_LEFT + 8}\" y=\"{_TOP + _PLOT_H / 2:.0f}\">no fragments in the capture</text>")
    elif total is None:
        out.append(f"<text x=\"{_LEFT + 8}\" y=\"{_TOP + 12}\">file size never given</text>")
    for step in range(6):
        x = _LEFT + _PLOT_W * step / 5
        ts = scale.time(x)
        if ts is None:  # in a break, which says its own length
            continue
        anchor = "start" if step == 0 else "end" if step == 5 else "middle"
        out.append(f"<line class=\"grid\" x1=\"{x:.1f}\" y1=\"{_TOP}\" x2=\"{x:.1f}\" y2=\"{_TOP + _PLOT_H}\"/>"
                   f"<text x=\"{x:.1f}\" y=\"{_H - 10}\" text-anchor=\"{anchor}\">+{escaped(human_duration(ts - scale.t0))}</text>")
    return out


def _breaks(scale: _Scale, notes: list[str]) -> list[str]:
    """Each idle stretch cut out of the time axis: a pale band across the plot and a zigzag on
    the axis, its length in the tooltip."""
    out = []
    for start, end in scale.breaks:
        x = scale.x(start)
        title = f"{human_duration(end - start)} without a packet: cut out of the time axis"
        out.append(f"<g><rect class=\"idle\" x=\"{x:.1f}\" y=\"{_TOP}\" width=\"{BREAK_W}\" height=\"{_PLOT_H}\"/>"
                   f"<path class=\"axisbreak\" d=\"M{x:.1f} {_TOP + _PLOT_H}l{BREAK_W / 4:.1f} 5l{BREAK_W / 2:.1f} -10"
                   f"l{BREAK_W / 4:.1f} 5\"/><title>{escaped(title)}</title></g>")
    if scale.breaks:
        longest = max(end - start for start, end in scale.breaks)
        notes.append(f"The time axis skips {len(scale.breaks)} idle stretch{'es' if len(scale.breaks) > 1 else ''} "
                     f"(the longest {human_duration(longest)}), each drawn as a narrow shaded band with a zigzag on the axis.")
    return out


class _Fragment(NamedTuple):
    """A packet with a range (a Fragment, as its request says), with its request and range."""

    packet: PacketRecord
    request: RequestRecord
    range: RangeRecord


def _response_ts(packet: PacketRecord) -> float | None:
    response = packet.get("response")
    return None if response is None else response.get("ts")


def _request_frame(request: RequestRecord, several: bool) -> str:
    return frame_name(request.get("frame"), request.get("capture"), several)


def _request_last_frame(request: RequestRecord, several: bool) -> str:
    return frame_name(request.get("last_frame"), request.get("last_capture"), several)


def _response_frame(response: ResponseRecord, several: bool) -> str:
    return frame_name(response.get("frame"), response.get("capture"), several)


def _fragment_class(packet: PacketRecord) -> str:
    response = packet.get("response")
    if response is None:
        return "f-none"
    status = response.get("status") or 0
    return "f-ok" if status in (200, 201) else "f-416" if status == 416 else "f-err"


def _fragment_title(fragment: _Fragment, several: bool) -> str:
    packet, request, rng = fragment
    response = packet.get("response")
    size = (rng.get("last") or 0) - (rng.get("first") or 0) + 1
    text = (f"Fragment bytes {rng.get('first')}-{rng.get('last')}/{rng.get('total')} ({human_size(size)}), "
            f"frames {_request_frame(request, several)}-{_request_last_frame(request, several)}")
    if request.get("body_length") is not None and request.get("body_length") != size:
        text += f", {request['body_length']:,} body bytes captured"
    if response is None:
        text += "; no response in the capture"
    else:
        text += (f"; {response.get('status')} {printable(response.get('reason'))} "
                 f"at frame {_response_frame(response, several)}")
        if response.get("received") is not None:
            text += f", server has {response['received']:,} bytes"
        if response.get("error_code"):
            text += f", {printable(response.get('error_code'))} {printable(response.get('error_name') or '')}"
    if packet.get("anomalies"):
        text += "; anomalies: " + ", ".join(printable(a) for a in packet["anomalies"])
    return text


def _fragment_marks(fragments: list[_Fragment], scale: _Scale, notes: list[str], several: bool) -> list[str]:
    individual, ordinary = fragments, []
    if len(fragments) > MAX_FRAGMENT_BARS:
        special = [f for f in fragments if f.packet.get("anomalies") or _fragment_class(f.packet) != "f-ok"]
        individual = special[:MAX_FRAGMENT_BARS]
        chosen = {id(f.packet) for f in individual}
        ordinary = [f for f in fragments if id(f.packet) not in chosen]
    out = []
    for fragment in individual:
        packet, request, rng = fragment
        response = packet.get("response")
        x0 = scale.x(request.get("ts"))
        x1 = scale.x(response.get("ts")) if response and response.get("ts") is not None else x0 + 4
        y0, y1 = scale.y((rng.get("last") or 0) + 1), scale.y(rng.get("first") or 0)
        out.append(f"<rect class=\"{_fragment_class(packet)}\" x=\"{x0:.1f}\" y=\"{y0:.1f}\" "
                   f"width=\"{max(x1 - x0, 1.5):.1f}\" height=\"{max(y1 - y0, 1.5):.1f}\">"
                   f"<title>{escaped(_fragment_title(fragment, several))}</title></rect>")
    if ordinary:
        bands = _bands(ordinary, scale, several)
        out += bands
        notes.append(f"{len(fragments):,} fragments: {len(individual):,} drawn one by one (those with an "
                     f"anomaly or a non-200 answer), the other {len(ordinary):,} aggregated into "
                     f"{len(bands):,} bands over time.")
    return out


def _bands(fragments: list[_Fragment], scale: _Scale, several: bool) -> list[str]:
    groups: dict[int, list[_Fragment]] = {}
    for fragment in fragments:
        slot = int((scale.x(fragment.request.get("ts")) - _LEFT) / _PLOT_W * (AGGREGATE_BANDS - 1))
        groups.setdefault(slot, []).append(fragment)
    out = []
    for group in groups.values():
        first = min(f.range.get("first") or 0 for f in group)
        last = max(f.range.get("last") or 0 for f in group)
        start = min(f.request.get("ts") or scale.t0 for f in group)
        end = max(_response_ts(f.packet) or f.request.get("ts") or scale.t0 for f in group)
        x0, x1 = scale.x(start), scale.x(end)
        y0, y1 = scale.y(last + 1), scale.y(first)
        title = (f"{len(group)} fragments acknowledged with 200, bytes {first:,}-{last:,}, "
                 f"frames {_request_frame(group[0].request, several)}-"
                 f"{_request_last_frame(group[-1].request, several)}")
        out.append(f"<rect class=\"f-agg\" x=\"{x0:.1f}\" y=\"{y0:.1f}\" width=\"{max(x1 - x0, 1.5):.1f}\" "
                   f"height=\"{max(y1 - y0, 1.5):.1f}\"><title>{escaped(title)}</title></rect>")
    return out


def _resync_title(response: ResponseRecord, received: int, several: bool) -> str:
    return f"416 at frame {_response_frame(response, several)}: the server wants offset {received:,}"


def _ack_line(fragments: list[_Fragment], scale: _Scale, several: bool) -> list[str]:
    """The server's acknowledged offset over time (a step line), and the 416 resync marks."""
    points: list[tuple[float, float]] = []
    marks: list[str] = []
    for fragment in fragments:
        response = fragment.packet.get("response")
        if response is None:
            continue
        received, ts = response.get("received"), response.get("ts")
        if received is None or ts is None:
            continue
        x, y = scale.x(ts), scale.y(received)
        if response.get("status") == 416:
            marks.append(f"<path class=\"ack416\" d=\"M{x:.1f} {y - 6:.1f}l6 10h-12z\"><title>"
                         f"{escaped(_resync_title(response, received, several))}"
                         "</title></path>")
        elif response.get("status") in (200, 201):
            points.append((x, y))
    out = []
    if points:
        step = max(1, len(points) // MAX_ACK_POINTS)
        kept = points[::step] if points[-1] in points[::step] else points[::step] + [points[-1]]
        # The line starts where the client started: the first fragment's offset (0 for a new
        # upload, further for a session that began before the capture or resumed).
        first = fragments[0]
        start = f"M{scale.x(first.request.get('ts')):.1f} {scale.y(first.range.get('first') or 0):.1f}"
        path = start + "".join(f"H{x:.1f}V{y:.1f}" for x, y in kept)
        out.append(f"<path class=\"ackline\" d=\"{path}\"><title>acknowledged offset</title></path>")
        if len(points) <= MAX_FRAGMENT_BARS:
            out += [f"<circle class=\"ack\" cx=\"{x:.1f}\" cy=\"{y:.1f}\" r=\"2.6\"/>" for x, y in points]
    return out + marks


_EVENT_LABELS = {"Create-Session": "create", "Close-Session": "close", "Cancel-Session": "cancel", "Ping": "ping"}


def _events(packets: list[PacketRecord], scale: _Scale, notes: list[str], several: bool) -> list[str]:
    """Create, Ping, Close and Cancel as vertical lines; error answers to them in red."""
    events = [p for p in packets if not p["request"].get("range")]
    out = []
    for packet in events[:MAX_MARKERS]:
        request, response = packet["request"], packet.get("response")
        kind = packet.get("type") or printable(packet.get("type_raw")) or "unknown packet"
        label = _EVENT_LABELS.get(packet.get("type") or "", "?")  # a range-less Fragment, an unknown type
        failed = response is not None and response.get("status") not in (200, 201)
        css = "ev ev-err" if failed else {"close": "ev ev-close", "cancel": "ev ev-cancel"}.get(label, "ev")
        answer = "no response in the capture"
        if response is not None:
            answer = (f"{response.get('status')} {printable(response.get('reason'))} at frame "
                      f"{_response_frame(response, several)}"
                      + (f", {printable(response.get('error_code'))} {printable(response.get('error_name') or '')}"
                         if response.get("error_code") else ""))
        x = scale.x(request.get("ts"))
        title = f"{printable(kind)} at frame {_request_frame(request, several)}; {answer}"
        out.append(f"<g><line class=\"{css}\" x1=\"{x:.1f}\" y1=\"{_TOP - 8}\" x2=\"{x:.1f}\" y2=\"{_TOP + _PLOT_H}\"/>"
                   f"{_label(x, label)}<title>{escaped(title)}</title></g>")
    if len(events) > MAX_MARKERS:
        notes.append(f"{len(events):,} non-fragment packets; the first {MAX_MARKERS} are drawn.")
    return out


def _fetches(fetches: list[DownloadRecord], scale: _Scale, several: bool) -> list[str]:
    """The reply's download requests (upload-reply), as event lines labelled with their method."""
    out = []
    for fetch in fetches[:MAX_MARKERS]:
        x = scale.x(fetch.get("ts"))
        title = (f"reply fetched: {printable(fetch.get('method'))} {printable(fetch.get('url'))} at frame "
                 f"{frame_name(fetch.get('frame'), fetch.get('capture'), several)}; {or_dash(fetch.get('status'))}, "
                 f"{human_size(fetch.get('bytes'))}")
        out.append(f"<g><line class=\"ev ev-fetch\" x1=\"{x:.1f}\" y1=\"{_TOP - 8}\" x2=\"{x:.1f}\" "
                   f"y2=\"{_TOP + _PLOT_H}\"/>{_label(x, printable(fetch.get('method')) or '?')}"
                   f"<title>{escaped(title)}</title></g>")
    return out


def _label(x: float, label: str) -> str:
    """An event's label beside its line, on the inner side near the right edge."""
    if x > _W - _RIGHT - 50:
        return f"<text x=\"{x - 3:.1f}\" y=\"{_TOP - 10}\" text-anchor=\"end\">{escaped(label)}</text>"
    return f"<text x=\"{x + 3:.1f}\" y=\"{_TOP - 10}\">{escaped(label)}</text>"


def _anomaly_marks(anomalies: list[AnomalyRecord], scale: _Scale, clock: Clock, notes: list[str],
                   several: bool) -> list[str]:
    """Each anomaly as a shape on the strip above the plot: square error, triangle warning,
    circle info; its tooltip explains it."""
    ordered = sorted(anomalies, key=anomaly_order)
    out = []
    y = _TOP - 22
    taken: list[float] = []
    for anomaly in ordered[:MAX_MARKERS]:
        severity = anomaly.get("severity")
        severity = severity if severity in SEVERITIES else "error"
        x = scale.x(anomaly.get("ts"))
        while any(abs(x - other) < 10 for other in taken):  # side by side, not on top of each other
            x += 11
        taken.append(x)
        shape = {"error": f"<rect x=\"{x - 4.5:.1f}\" y=\"{y - 4.5}\" width=\"9\" height=\"9\"",
                 "warning": f"<path d=\"M{x:.1f} {y - 5.5}l5.5 10h-11z\"",
                 "info": f"<circle cx=\"{x:.1f}\" cy=\"{y}\" r=\"4.5\""}[severity]
        title = (f"{printable(anomaly.get('severity'))} {printable(anomaly.get('code'))} at "
                 f"{clock.time(anomaly.get('ts'))}, frames {anomaly_frames(anomaly, several)}: "
                 f"{printable(anomaly.get('message'))} — {printable(anomaly.get('meaning'))}")
        out.append(f"{shape} class=\"m-{severity}\"><title>{escaped(title)}</title>"
                   f"{'</rect>' if severity == 'error' else '</path>' if severity == 'warning' else '</circle>'}")
    if len(ordered) > MAX_MARKERS:
        notes.append(f"{len(ordered):,} anomalies; the {MAX_MARKERS} worst are marked on the timeline, "
                     "all are listed below.")
    return out
