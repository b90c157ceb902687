"""The HTML report (`bits-analyze --html FILE`): one self-contained page rendered from the report
dict (schema.md): summary, sessions, anomalies, problems, downloads, and a timeline per session
in inline SVG.

Captures are hostile input, so every string that came from one is made printable and
HTML-escaped, and the page forbids itself any script and any network access (Content Security
Policy). Nothing needs JavaScript: the severity filter is CSS, tooltips are SVG <title>s.
"""

from __future__ import annotations

import bisect
import html
import io
from typing import IO, Iterable

from bitstrace.analyzer.report.presentation import (
    SEVERITIES, Clock, all_anomalies, anomaly_frames, anomaly_order, capture_legend, frame_name,
    human_duration, human_rate, human_size, percent, printable, several_captures, severity_counts, short_ids,
)

#: Fragments drawn one by one per timeline; past this, ordinary ones are aggregated in bands.
MAX_FRAGMENT_BARS = 150
AGGREGATE_BANDS = 60
#: Anomaly and event markers drawn per timeline; the session's anomaly list has them all.
MAX_MARKERS = 100
MAX_ACK_POINTS = 400

_VERDICT_MARK = {"delivered": "✓", "not-delivered": "✗", "unknown": "?"}
_SEVERITY_MARK = {"error": "■", "warning": "▲", "info": "●"}

# Okabe-Ito colours, safe for the common colour-vision deficiencies; every colour also comes
# with a shape or a word.
_CSS = """
:root{--ok:#009E73;--bad:#D55E00;--warn:#E69F00;--info:#0072B2;--frag:#56B4E9;--cancel:#CC79A7;
--ink:#1d232b;--muted:#5d6673;--line:#d9dee4;--bg:#f6f7f9;--card:#fff}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1280px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 10px}h3{font-size:15px;margin:0}
.sub,.note{color:var(--muted)}.note{font-size:12.5px;margin:6px 0}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;font-size:12.5px}
a{color:var(--info)}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:18px 0}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px;min-width:120px}
.card b{display:block;font-size:22px}.card span{color:var(--muted);font-size:12.5px}
.card.ok{border-top:4px solid var(--ok)}.card.bad{border-top:4px solid var(--bad)}
.card.unknown,.card.warning{border-top:4px solid var(--warn)}.card.error{border-top:4px solid var(--bad)}
.card.info{border-top:4px solid var(--info)}.card.zero{border-top-color:var(--line)}.card.zero b{color:var(--muted)}
.banner{background:#fbe0d0;border:1px solid var(--bad);border-radius:8px;padding:10px 14px;margin:12px 0}
table{border-collapse:collapse;width:100%;background:var(--card);border:1px solid var(--line)}
th,td{padding:5px 8px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600;font-size:12.5px;position:sticky;top:0}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.wrap{overflow-wrap:anywhere;min-width:11em}
a code,table.anomalies code{white-space:nowrap}.pct{font-size:11.5px;color:var(--muted);display:flex;gap:6px;align-items:center}
table.sessions{font-size:13px}table.sessions td,table.sessions th{padding:5px 6px}
table.sessions td:first-child,td.nowrap{white-space:nowrap}
tr:hover td{background:#f8fafc}
.badge{display:inline-block;padding:1px 7px;border-radius:10px;font-size:12px;font-weight:600;white-space:nowrap}
.v-delivered{background:#d4f0e6;color:#00553f}.v-not-delivered{background:#fbe0d0;color:#8a3300}
.v-unknown{background:#fdf0d0;color:#6b4700}
.s-error{background:#fbe0d0;color:#8a3300}.s-warning{background:#fdf0d0;color:#6b4700}
.s-info{background:#d6e8f5;color:#003f66}
.bar{flex:1;height:6px;background:#e6e9ed;border-radius:3px;min-width:60px}
.bar i{display:block;height:6px;border-radius:3px;background:var(--ok)}
.counts .badge{margin-right:2px}
.filter{margin:0 0 8px}.filter label{margin-right:14px;cursor:pointer}
#f-warning:checked~table .a-info,#f-error:checked~table .a-info,#f-error:checked~table .a-warning{display:none}
section.session{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:14px 16px;
margin:14px 0;content-visibility:auto;contain-intrinsic-size:auto 460px}
.session header{display:flex;gap:10px;align-items:center;flex-wrap:wrap}
dl.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:2px 18px;margin:10px 0}
dl.facts div{display:flex;gap:6px;min-width:0}dl.facts dt{color:var(--muted);white-space:nowrap}
dl.facts dd{margin:0;overflow-wrap:anywhere}
svg.timeline{width:100%;height:auto;display:block;margin-top:6px}
svg text{font:11px system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;fill:#5d6673}
.plot{fill:#fbfcfd;stroke:#d9dee4}.grid{stroke:#e8ebef}
.f-ok{fill:var(--frag);stroke:var(--info);stroke-width:.6}
.f-416{fill:#f6d28a;stroke:var(--warn);stroke-width:1}
.f-err{fill:#f2b38f;stroke:var(--bad);stroke-width:1.2}
.f-none{fill:none;stroke:var(--muted);stroke-width:1;stroke-dasharray:3 2}
.f-agg{fill:var(--frag);fill-opacity:.45;stroke:var(--info);stroke-width:.6;stroke-dasharray:2 2}
.ackline{fill:none;stroke:var(--ok);stroke-width:1.5}
.ack{fill:var(--ok);stroke:#fff;stroke-width:.8}.ack416{fill:var(--warn);stroke:#6b4700;stroke-width:.8}
.ev{stroke:#7c8591;stroke-width:1;stroke-dasharray:4 3}.ev-cancel{stroke:var(--cancel);stroke-width:2;stroke-dasharray:6 3}
.ev-close{stroke:#3d4551;stroke-width:1.5}.ev-fetch{stroke:var(--ok);stroke-width:2;stroke-dasharray:1 3}.ev-err{stroke:var(--bad);stroke-width:2}
.m-error{fill:var(--bad)}.m-warning{fill:var(--warn)}.m-info{fill:var(--info)}
.tot{stroke:#3d4551;stroke-dasharray:2 3}
.idle{fill:#eef1f4;stroke:#c3c9d1;stroke-dasharray:2 2}.axisbreak{fill:none;stroke:#3d4551;stroke-width:1.5}
svg.legend{display:block;margin:6px 0 10px;max-width:100%}
.legend-wrap{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:6px 12px}
ul.anoms{margin:8px 0 0;padding-left:18px}ul.anoms li{margin:2px 0}
footer{margin-top:40px;color:var(--muted);font-size:12.5px}
details summary{cursor:pointer}
@media print{body{background:#fff}main{max-width:none;padding:0}th{position:static}
.filterbox input,.filterbox label{display:none}
section.session{content-visibility:visible;break-inside:avoid}a{color:inherit;text-decoration:none}}
"""

_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def _e(value: object) -> str:
    """Printable and escaped, for text and attribute values alike."""
    return html.escape(printable(value), quote=True)


def render_html(report: dict) -> str:
    """The whole page as one string."""
    page = io.StringIO()
    write_html(report, page)
    return page.getvalue()


def write_html(report: dict, out: IO[str], sessions: Iterable[dict] | None = None) -> None:
    """Write the page to `out` part by part. The timelines draw `sessions` when given (the
    report's sessions with their packets, in the same order, made one at a time for a report
    whose own session records leave the packets out), else the report's own."""
    sessions_table = report.get("sessions") or []
    anomalies = all_anomalies(report)
    ids = short_ids([s.get("id") for s in sessions_table] + [a.get("session") for a in anomalies])
    anchors = {s.get("id"): f"s-{n}" for n, s in enumerate(sessions_table) if s.get("id") is not None}
    clock = Clock(report)
    files = ", ".join(printable(c.get("file")) for c in report.get("captures") or [])
    tool = report.get("tool") or {}
    several = several_captures(report)
    out.write("".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">",
        "<meta name=\"referrer\" content=\"no-referrer\">",
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">",
        f"<title>BITS upload report: {html.escape(files or 'no capture')}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        "<h1>BITS upload report</h1>",
        f"<p class=\"sub\">{_e(tool.get('name') or 'bits-analyze')} {_e(tool.get('version') or '')}"
        f" · report schema {_e(report.get('version'))} · {len(report.get('captures') or [])} capture(s)</p>",
    ]))
    for part in (_summary(report), _captures(report, clock), _sessions_table(sessions_table, ids, anchors, clock),
                 _anomalies(anomalies, ids, anchors, clock, several), _problems(report.get("problems") or []),
                 _downloads(report.get("downloads") or [], clock)):
        out.write("".join(part))
    if sessions_table:
        out.write("".join(_timelines_heading()))
        fetches = _reply_fetches(sessions_table, report.get("downloads") or [])
        for index, session in enumerate(sessions_table if sessions is None else sessions):
            out.write(_session_section(index, session, fetches.get(index, []), ids, clock, several))
    out.write("".join(_counters(report)))
    out.write("</main></body></html>\n")


# --- summary, captures ------------------------------------------------------------------------

def _summary(report: dict) -> list[str]:
    summary = report.get("summary") or {}
    anomalies = summary.get("anomalies") or {}
    cards = [("sessions", summary.get("sessions", 0), "sessions"),
             ("ok", summary.get("delivered", 0), "✓ delivered"),
             ("bad", summary.get("not_delivered", 0), "✗ not delivered"),
             ("unknown", summary.get("unknown", 0), "? unknown"),
             *((severity, anomalies.get(severity, 0), f"{_SEVERITY_MARK[severity]} {severity}")
               for severity in SEVERITIES),
             ("exchanges", summary.get("http_exchanges", 0),
              f"HTTP exchanges ({summary.get('bits_exchanges', 0)} BITS, {summary.get('other_http', 0)} other)")]
    out = ["<div class=\"cards\">"]
    for kind, number, label in cards:
        zero = " zero" if number == 0 else ""
        out.append(f"<div class=\"card {kind}{zero}\"><b>{_e(number)}</b><span>{_e(label)}</span></div>")
    out.append("</div>")
    incomplete = [c for c in report.get("captures") or [] if not c.get("complete", True)]
    problems = report.get("problems") or []
    if incomplete or problems:
        what = (f"{len(incomplete)} capture(s) could not be read to the end; " if incomplete else "")
        out.append(f"<div class=\"banner\"><b>⚠ Input problems.</b> {what}{len(problems)} problem(s) "
                   "met while reading: what could be read was analysed. "
                   "<a href=\"#problems\">See the problems</a>.</div>")
    return out


def _captures(report: dict, clock: Clock) -> list[str]:
    out = ["<h2 id=\"captures\">Captures</h2><table><thead><tr><th>File</th><th>Format</th>"
           "<th class=\"num\">Frames</th><th class=\"num\">Bytes</th><th>First packet</th>"
           "<th>Last packet</th><th class=\"num\">Duration</th><th class=\"num\">TCP connections</th>"
           "<th class=\"num\">HTTP exchanges</th><th>Read</th></tr></thead><tbody>"]
    for capture in report.get("captures") or []:
        first, last = capture.get("first_ts"), capture.get("last_ts")
        complete = capture.get("complete", True)
        state = ("<span class=\"badge v-delivered\">✓ complete</span>" if complete
                 else "<span class=\"badge v-not-delivered\">✗ incomplete</span>")
        out.append(
            f"<tr><td class=\"wrap mono\">{_e(capture.get('file'))}</td><td>{_e(capture.get('format'))}</td>"
            f"<td class=\"num\">{capture.get('frames') or 0:,}</td>"
            f"<td class=\"num\">{_e(human_size(capture.get('bytes')))}</td>"
            f"<td>{_e(clock.datetime(first))}</td><td>{_e(clock.datetime(last))}</td>"
            f"<td class=\"num\">{_e(human_duration(last - first) if first is not None and last is not None else '—')}</td>"
            f"<td class=\"num\">{_e(capture.get('connections'))}</td><td class=\"num\">{_e(capture.get('exchanges'))}</td>"
            f"<td>{state}</td></tr>")
    out.append("</tbody></table>")
    legend = capture_legend(report)
    if legend:
        out.append(f"<p class=\"note\">{_e(legend)}</p>")
    return out


# --- sessions ---------------------------------------------------------------------------------

def _verdict(verdict: str | None) -> str:
    verdict = verdict if verdict in _VERDICT_MARK else "unknown"
    return f"<span class=\"badge v-{verdict}\">{_VERDICT_MARK[verdict]} {verdict}</span>"


def _severity_badges(anomalies: Iterable[dict]) -> str:
    counts = severity_counts(anomalies)
    return "".join(f"<span class=\"badge s-{sev}\" title=\"{counts[sev]} {sev}\">{_SEVERITY_MARK[sev]} {counts[sev]}</span>"
                   for sev in SEVERITIES if counts[sev]) or "<span class=\"note\">none</span>"


def _session_link(session_id: str | None, ids: dict[str, str], anchors: dict[str, str]) -> str:
    if session_id is None:
        return "<span class=\"note\">—</span>"
    label = f"<code title=\"{_e(session_id)}\">{_e(ids.get(session_id, session_id))}</code>"
    anchor = anchors.get(session_id)
    return f"<a href=\"#{anchor}\">{label}</a>" if anchor else label


def _sessions_table(sessions: list[dict], ids: dict[str, str], anchors: dict[str, str],
                    clock: Clock) -> list[str]:
    out = [f"<h2 id=\"sessions\">Sessions ({len(sessions)})</h2>"]
    if not sessions:
        return out + ["<p>No BITS upload sessions in the capture.</p>"]
    out.append("<table class=\"sessions\"><thead><tr><th>Session</th><th>Client</th><th>URL</th><th>State</th>"
               "<th>Verdict</th><th class=\"num\">Acknowledged / total</th><th class=\"num\">Fragments</th>"
               "<th>Start (UTC)</th><th class=\"num\">Duration</th><th class=\"num\">Throughput</th>"
               "<th>Anomalies</th></tr></thead><tbody>")
    for session in sessions:
        share = _share(session)
        name = _session_link(session.get("id"), ids, anchors)
        if session.get("before_capture"):
            name += "<br><span class=\"note\" title=\"already running when the capture began\">before capture</span>"
        content = session.get("content_name")
        url = _e(session.get("url")) + (f"<br><span class=\"note\">{_e(content)}</span>" if content else "")
        out.append(
            f"<tr><td>{name}</td><td class=\"mono nowrap\">{_e(session.get('client'))}</td>"
            f"<td class=\"wrap\">{url}</td><td>{_e(session.get('state'))}</td>"
            f"<td>{_verdict(session.get('verdict'))}</td>"
            f"<td class=\"num\">{_e(_sizes(session))}<div class=\"pct\"><div class=\"bar\">"
            f"<i style=\"width:{share:.1f}%\"></i></div>{_e(percent(session.get('acknowledged') or 0, session.get('total')))}"
            "</div></td>"
            f"<td class=\"num\">{_e(session.get('fragments'))}</td><td>{_e(clock.time(session.get('first_ts')))}</td>"
            f"<td class=\"num\">{_e(human_duration(session.get('duration_s')))}</td>"
            f"<td class=\"num\">{_e(human_rate(session.get('throughput_bps')))}</td>"
            f"<td class=\"counts\">{_severity_badges(session.get('anomalies') or [])}</td></tr>")
    out.append("</tbody></table>")
    return out


def _sizes(session: dict) -> str:
    return f"{human_size(session.get('acknowledged') or 0)} / {human_size(session.get('total'))}"


def _share(session: dict) -> float:
    total, acknowledged = session.get("total"), session.get("acknowledged") or 0
    return min(100.0, 100.0 * acknowledged / total) if total else 0.0


# --- anomalies, problems, downloads -----------------------------------------------------------

def _anomaly_title(anomaly: dict) -> str:
    spec = f" ({anomaly['spec']})" if (anomaly.get("spec") or "-") != "-" else ""
    return _e(f"{anomaly.get('meaning') or ''}{spec}")


def _anomalies(anomalies: list[dict], ids: dict[str, str], anchors: dict[str, str], clock: Clock,
               several: bool) -> list[str]:
    out = [f"<h2 id=\"anomalies\">Anomalies ({len(anomalies)})</h2>"]
    if not anomalies:
        return out + ["<p>No anomalies.</p>"]
    out.append("<div class=\"filterbox\"><p class=\"note\">Worst first: errors, warnings, then information; "
               "by time within each. Hover a code for the rule it comes from.</p>"
               "<input type=\"radio\" name=\"sev\" id=\"f-info\" checked><label for=\"f-info\"> all</label> "
               "<input type=\"radio\" name=\"sev\" id=\"f-warning\"><label for=\"f-warning\"> warnings and errors</label> "
               "<input type=\"radio\" name=\"sev\" id=\"f-error\"><label for=\"f-error\"> errors only</label>"
               "<table class=\"anomalies\"><thead><tr><th>Severity</th><th>Code</th><th>Session</th>"
               "<th>Frames</th><th>Time (UTC)</th><th>Message</th></tr></thead><tbody>")
    for anomaly in sorted(anomalies, key=anomaly_order):
        severity = anomaly.get("severity")
        css = severity if severity in SEVERITIES else "error"
        where = _session_link(anomaly.get("session"), ids, anchors)
        if anomaly.get("session") is None and anomaly.get("connection") is not None:
            where = f"<span class=\"note\">stream {_e(anomaly['connection'])}</span>"
        out.append(
            f"<tr class=\"a-{css}\"><td><span class=\"badge s-{css}\">{_SEVERITY_MARK[css]} {_e(severity)}</span></td>"
            f"<td><code title=\"{_anomaly_title(anomaly)}\">{_e(anomaly.get('code'))}</code></td>"
            f"<td>{where}</td><td class=\"mono\">{_e(anomaly_frames(anomaly, several))}</td>"
            f"<td>{_e(clock.time(anomaly.get('ts')))}</td><td class=\"wrap\">{_e(anomaly.get('message'))}</td></tr>")
    out.append("</tbody></table></div>")
    return out


def _problems(problems: list[dict]) -> list[str]:
    out = [f"<h2 id=\"problems\">Problems reading the input ({len(problems)})</h2>"]
    if not problems:
        return out + ["<p>None: every capture was read to the end without trouble.</p>"]
    out.append("<table><thead><tr><th>Kind</th><th>File</th><th class=\"num\">Frame</th><th class=\"num\">Offset</th>"
               "<th class=\"num\">Stream</th><th>Message</th></tr></thead><tbody>")
    for problem in problems:
        fatal = " <span class=\"badge s-error\">fatal</span>" if problem.get("fatal") else ""
        out.append(_row(("", f"<code>{_e(problem.get('kind'))}</code>{fatal}"),
                        ("mono wrap", _e(problem.get("file"))),
                        *(("num", _e(_or_dash(problem.get(key)))) for key in ("frame", "offset", "connection")),
                        ("wrap", _e(problem.get("message")))))
    out.append("</tbody></table>")
    return out


def _downloads(downloads: list[dict], clock: Clock) -> list[str]:
    if not downloads:
        return []
    out = [f"<h2 id=\"downloads\">Downloads ({len(downloads)})</h2><table><thead><tr><th>Client</th><th>Server</th>"
           "<th>Method</th><th>URL</th><th class=\"num\">Status</th><th class=\"num\">Bytes</th><th>User-Agent</th>"
           "<th>Time (UTC)</th></tr></thead><tbody>"]
    for download in downloads:
        out.append(_row(("mono", _e(download.get("client"))), ("mono", _e(download.get("server"))),
                        ("", _e(download.get("method"))), ("wrap", _e(download.get("url"))),
                        ("num", _e(_or_dash(download.get("status")))), ("num", _e(human_size(download.get("bytes")))),
                        ("", _e(download.get("user_agent"))), ("", _e(clock.time(download.get("ts"))))))
    out.append("</tbody></table>")
    return out


def _counters(report: dict) -> list[str]:
    out = ["<footer><details><summary>Decoder and reassembly counters</summary>"]
    for capture in report.get("captures") or []:
        for layer in ("decoder", "tcp"):
            counters = capture.get(layer) or {}
            listed = ", ".join(f"{_e(key)} {_e(value)}" for key, value in counters.items())
            out.append(f"<p><span class=\"mono\">{_e(capture.get('file'))}</span> {layer}: {listed or 'none'}</p>")
    out.append("</details><p>Rendered by bitstrace from report schema version "
               f"{_e(report.get('version'))}; the same data as <code>bits-analyze --json</code>.</p></footer>")
    return out


def _row(*cells: tuple[str, str]) -> str:
    """A table row from (CSS class, HTML already escaped) pairs."""
    return "<tr>" + "".join(f"<td class=\"{css}\">{content}</td>" if css else f"<td>{content}</td>"
                            for css, content in cells) + "</tr>"


def _or_dash(value: object) -> object:
    return "—" if value is None else value


# --- timelines --------------------------------------------------------------------------------

_W, _H = 1000, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 74, 16, 34, 30
_PLOT_W, _PLOT_H = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM


def _timelines_heading() -> list[str]:
    return ["<h2 id=\"timelines\">Session timelines</h2>",
            "<div class=\"legend-wrap\"><p class=\"note\">Time runs left to right from the session's first "
            "packet; height is the byte offset in the file (0 at the bottom, the file size at the top). "
            "Each fragment is a box from its request to its response, covering its byte range. "
            "Hover any mark for details.</p>", _LEGEND, "</div>"]


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
    parts, x, y = [], 0, 16
    for shape, label in zip(items[::2], items[1::2]):
        width = 24 + 6.2 * len(label) + 18
        if x + width > 980:
            x, y = 0, y + 22
        parts.append(f"<g transform=\"translate({x:.0f},{y})\">{shape}<text x=\"22\" y=\"2\">{label}</text></g>")
        x += width
    return (f"<svg class=\"legend\" viewBox=\"0 0 1000 {y + 10}\" width=\"1000\" height=\"{y + 10}\" "
            f"role=\"img\" aria-label=\"legend\">{''.join(parts)}</svg>")


_LEGEND = _legend()


def _facts(session: dict, clock: Clock) -> str:
    rows = [
        ("Session id", session.get("id")), ("Client", session.get("client")), ("Server", session.get("server")),
        ("Host", session.get("host")), ("URL", session.get("url")), ("Content-Name", session.get("content_name")),
        ("User-Agent", session.get("user_agent")), ("Protocol", session.get("protocol")),
        ("State", session.get("state")), ("Reply URL", session.get("reply_url")),
        ("Acknowledged", _acknowledged(session)),
        ("Bytes sent", f"{session.get('bytes_sent') or 0:,} (resends included)"),
        ("Fragments", session.get("fragments")),
        ("First packet", clock.datetime(session.get("first_ts"))),
        ("Last packet", clock.datetime(session.get("last_ts"))),
        ("Duration", human_duration(session.get("duration_s"))),
        ("Throughput", human_rate(session.get("throughput_bps"))),
        ("TCP streams", ", ".join(str(c) for c in session.get("connections") or []) or "—"),
    ]
    if session.get("extracted"):
        extracted = session["extracted"]
        rows.append(("Extracted", f"{printable(extracted.get('path'))} "
                                  f"({'complete' if extracted.get('complete') else 'incomplete'}, "
                                  f"sha256 {printable(extracted.get('sha256'))})"))
    return "<dl class=\"facts\">" + "".join(
        f"<div><dt>{name}</dt><dd>{_e('—' if value is None else value)}</dd></div>" for name, value in rows) + "</dl>"


def _acknowledged(session: dict) -> str:
    acknowledged, total = session.get("acknowledged") or 0, session.get("total")
    of = "?" if total is None else f"{total:,}"
    return f"{acknowledged:,} of {of} bytes {percent(acknowledged, total)}"


def _reply_fetches(sessions: list[dict], downloads: list[dict]) -> dict[int, list[dict]]:
    """The downloads that fetch a session's reply, by the session's index: the download names
    the session by id, and of the sessions with that id (servers that derive ids reuse them)
    the one begun last before it."""
    by_id: dict[str, list[int]] = {}
    for index, session in enumerate(sessions):
        by_id.setdefault(session.get("id"), []).append(index)
    fetches: dict[int, list[dict]] = {}
    for download in downloads:
        if download.get("session") is None:
            continue
        begun = [index for index in by_id.get(download["session"], ())
                 if (sessions[index].get("first_ts") or 0) <= (download.get("ts") or 0)]
        if begun:
            fetches.setdefault(begun[-1], []).append(download)
    return fetches


def _session_section(index: int, session: dict, fetches: list[dict], ids: dict[str, str], clock: Clock,
                     several: bool) -> str:
    sid = session.get("id")
    before = " <span class=\"note\">already running when the capture began</span>" if session.get("before_capture") else ""
    svg, notes = _timeline(session, fetches, clock, several)
    anomalies = sorted(session.get("anomalies") or [], key=anomaly_order)
    listed = "".join(
        f"<li><span class=\"badge s-{a.get('severity') if a.get('severity') in SEVERITIES else 'error'}\">"
        f"{_e(a.get('severity'))}</span> <code title=\"{_anomaly_title(a)}\">{_e(a.get('code'))}</code> "
        f"<span class=\"note\">frames {_e(anomaly_frames(a, several))}</span> {_e(a.get('message'))}</li>"
        for a in anomalies)
    return (f"<section class=\"session\" id=\"s-{index}\"><header><h3>Session <code title=\"{_e(sid)}\">"
            f"{_e(ids.get(sid, sid) if sid is not None else '(no id)')}</code></h3>{_verdict(session.get('verdict'))}"
            f"<span class=\"note\">{_e(session.get('url'))}</span>{before}</header>"
            f"{_facts(session, clock)}{svg}"
            + "".join(f"<p class=\"note\">{_e(n)}</p>" for n in notes)
            + (f"<ul class=\"anoms\">{listed}</ul>" if listed else "")
            + "</section>")


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


def _timeline(session: dict, fetches: list[dict], clock: Clock, several: bool) -> tuple[str, list[str]]:
    """The session's SVG (with the downloads in `fetches` that fetched its reply) and the notes
    that say what was simplified."""
    packets = session.get("packets") or []
    stamps = [t for p in packets for t in ((p.get("request") or {}).get("ts"), (p.get("response") or {}).get("ts"))
              if t is not None]
    stamps += [a.get("ts") for a in session.get("anomalies") or [] if a.get("ts") is not None]
    stamps += [t for t in (session.get("first_ts"), session.get("last_ts")) if t is not None]
    stamps += [d.get("ts") for d in fetches if d.get("ts") is not None]
    fragments = [p for p in packets if (p.get("request") or {}).get("range")]
    ranges_top = max(((p["request"]["range"].get("last") or 0) + 1 for p in fragments), default=0)
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
           f"aria-label=\"timeline of session {_e(label)}\">{''.join(body)}</svg>")
    return svg, notes


def _axes(scale: _Scale, total: int | None, has_fragments: bool) -> list[str]:
    out = []
    for step in range(5):
        offset = scale.top * step / 4
        y = scale.y(offset)
        out.append(f"<line class=\"grid\" x1=\"{_LEFT}\" y1=\"{y:.1f}\" x2=\"{_W - _RIGHT}\" y2=\"{y:.1f}\"/>")
        if has_fragments:
            out.append(f"<text x=\"{_LEFT - 6}\" y=\"{y + 4:.1f}\" text-anchor=\"end\">{_e(human_size(offset))}</text>")
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
                   f"<text x=\"{x:.1f}\" y=\"{_H - 10}\" text-anchor=\"{anchor}\">+{_e(human_duration(ts - scale.t0))}</text>")
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
                   f"l{BREAK_W / 4:.1f} 5\"/><title>{_e(title)}</title></g>")
    if scale.breaks:
        longest = max(end - start for start, end in scale.breaks)
        notes.append(f"The time axis skips {len(scale.breaks)} idle stretch{'es' if len(scale.breaks) > 1 else ''} "
                     f"(the longest {human_duration(longest)}), each drawn as a narrow shaded band with a zigzag on the axis.")
    return out


def _fragment_class(packet: dict) -> str:
    response = packet.get("response")
    if response is None:
        return "f-none"
    status = response.get("status") or 0
    return "f-ok" if status in (200, 201) else "f-416" if status == 416 else "f-err"


def _frame(record: dict, several: bool, key: str = "frame", capture_key: str = "capture") -> str:
    """A packet record's frame, naming its file in a report of several captures."""
    return frame_name(record.get(key), record.get(capture_key), several)


def _fragment_title(packet: dict, several: bool) -> str:
    request, response = packet["request"], packet.get("response")
    rng = request["range"]
    size = (rng.get("last") or 0) - (rng.get("first") or 0) + 1
    text = (f"Fragment bytes {rng.get('first')}-{rng.get('last')}/{rng.get('total')} ({human_size(size)}), "
            f"frames {_frame(request, several)}-{_frame(request, several, 'last_frame', 'last_capture')}")
    if request.get("body_length") is not None and request.get("body_length") != size:
        text += f", {request['body_length']:,} body bytes captured"
    if response is None:
        text += "; no response in the capture"
    else:
        text += f"; {response.get('status')} {printable(response.get('reason'))} at frame {_frame(response, several)}"
        if response.get("received") is not None:
            text += f", server has {response['received']:,} bytes"
        if response.get("error_code"):
            text += f", {printable(response.get('error_code'))} {printable(response.get('error_name') or '')}"
    if packet.get("anomalies"):
        text += "; anomalies: " + ", ".join(printable(a) for a in packet["anomalies"])
    return text


def _fragment_marks(fragments: list[dict], scale: _Scale, notes: list[str], several: bool) -> list[str]:
    individual, ordinary = fragments, []
    if len(fragments) > MAX_FRAGMENT_BARS:
        special = [p for p in fragments if p.get("anomalies") or _fragment_class(p) != "f-ok"]
        individual = special[:MAX_FRAGMENT_BARS]
        chosen = {id(p) for p in individual}
        ordinary = [p for p in fragments if id(p) not in chosen]
    out = []
    for packet in individual:
        request, response = packet["request"], packet.get("response")
        rng = request["range"]
        x0 = scale.x(request.get("ts"))
        x1 = scale.x(response.get("ts")) if response and response.get("ts") is not None else x0 + 4
        y0, y1 = scale.y((rng.get("last") or 0) + 1), scale.y(rng.get("first") or 0)
        out.append(f"<rect class=\"{_fragment_class(packet)}\" x=\"{x0:.1f}\" y=\"{y0:.1f}\" "
                   f"width=\"{max(x1 - x0, 1.5):.1f}\" height=\"{max(y1 - y0, 1.5):.1f}\">"
                   f"<title>{_e(_fragment_title(packet, several))}</title></rect>")
    if ordinary:
        bands = _bands(ordinary, scale, several)
        out += bands
        notes.append(f"{len(fragments):,} fragments: {len(individual):,} drawn one by one (those with an "
                     f"anomaly or a non-200 answer), the other {len(ordinary):,} aggregated into "
                     f"{len(bands):,} bands over time.")
    return out


def _bands(fragments: list[dict], scale: _Scale, several: bool) -> list[str]:
    groups: dict[int, list[dict]] = {}
    for packet in fragments:
        slot = int((scale.x(packet["request"].get("ts")) - _LEFT) / _PLOT_W * (AGGREGATE_BANDS - 1))
        groups.setdefault(slot, []).append(packet)
    out = []
    for group in groups.values():
        first = min(p["request"]["range"].get("first") or 0 for p in group)
        last = max(p["request"]["range"].get("last") or 0 for p in group)
        start = min(p["request"].get("ts") or scale.t0 for p in group)
        end = max((p.get("response") or {}).get("ts") or p["request"].get("ts") or scale.t0 for p in group)
        x0, x1 = scale.x(start), scale.x(end)
        y0, y1 = scale.y(last + 1), scale.y(first)
        title = (f"{len(group)} fragments acknowledged with 200, bytes {first:,}-{last:,}, "
                 f"frames {_frame(group[0]['request'], several)}-"
                 f"{_frame(group[-1]['request'], several, 'last_frame', 'last_capture')}")
        out.append(f"<rect class=\"f-agg\" x=\"{x0:.1f}\" y=\"{y0:.1f}\" width=\"{max(x1 - x0, 1.5):.1f}\" "
                   f"height=\"{max(y1 - y0, 1.5):.1f}\"><title>{_e(title)}</title></rect>")
    return out


def _resync_title(response: dict, received: int, several: bool) -> str:
    return f"416 at frame {_frame(response, several)}: the server wants offset {received:,}"


def _ack_line(fragments: list[dict], scale: _Scale, several: bool) -> list[str]:
    """The server's acknowledged offset over time (a step line), and the 416 resync marks."""
    points: list[tuple[float, float]] = []
    marks: list[str] = []
    for packet in fragments:
        response = packet.get("response") or {}
        received, ts = response.get("received"), response.get("ts")
        if received is None or ts is None:
            continue
        x, y = scale.x(ts), scale.y(received)
        if response.get("status") == 416:
            marks.append(f"<path class=\"ack416\" d=\"M{x:.1f} {y - 6:.1f}l6 10h-12z\"><title>"
                         f"{_e(_resync_title(response, received, several))}"
                         "</title></path>")
        elif response.get("status") in (200, 201):
            points.append((x, y))
    out = []
    if points:
        step = max(1, len(points) // MAX_ACK_POINTS)
        kept = points[::step] if points[-1] in points[::step] else points[::step] + [points[-1]]
        # The line starts where the client started: the first fragment's offset (0 for a new
        # upload, further for a session that began before the capture or resumed).
        first = fragments[0]["request"]
        start = f"M{scale.x(first.get('ts')):.1f} {scale.y(first['range'].get('first') or 0):.1f}"
        path = start + "".join(f"H{x:.1f}V{y:.1f}" for x, y in kept)
        out.append(f"<path class=\"ackline\" d=\"{path}\"><title>acknowledged offset</title></path>")
        if len(points) <= MAX_FRAGMENT_BARS:
            out += [f"<circle class=\"ack\" cx=\"{x:.1f}\" cy=\"{y:.1f}\" r=\"2.6\"/>" for x, y in points]
    return out + marks


_EVENT_LABELS = {"Create-Session": "create", "Close-Session": "close", "Cancel-Session": "cancel", "Ping": "ping"}


def _events(packets: list[dict], scale: _Scale, notes: list[str], several: bool) -> list[str]:
    """Create, Ping, Close and Cancel as vertical lines; error answers to them in red."""
    events = [p for p in packets if not (p.get("request") or {}).get("range")]
    out = []
    for packet in events[:MAX_MARKERS]:
        request, response = packet.get("request") or {}, packet.get("response")
        kind = packet.get("type") or printable(packet.get("type_raw")) or "unknown packet"
        label = _EVENT_LABELS.get(packet.get("type"), "?")  # a range-less Fragment, an unknown type
        status = (response or {}).get("status")
        failed = response is not None and status not in (200, 201)
        css = "ev ev-err" if failed else {"close": "ev ev-close", "cancel": "ev ev-cancel"}.get(label, "ev")
        x = scale.x(request.get("ts"))
        answer = (f"{status} {printable(response.get('reason'))} at frame {_frame(response, several)}"
                  + (f", {printable(response.get('error_code'))} {printable(response.get('error_name') or '')}"
                     if response.get("error_code") else "")) if response else "no response in the capture"
        title = f"{printable(kind)} at frame {_frame(request, several)}; {answer}"
        out.append(f"<g><line class=\"{css}\" x1=\"{x:.1f}\" y1=\"{_TOP - 8}\" x2=\"{x:.1f}\" y2=\"{_TOP + _PLOT_H}\"/>"
                   f"{_label(x, label)}<title>{_e(title)}</title></g>")
    if len(events) > MAX_MARKERS:
        notes.append(f"{len(events):,} non-fragment packets; the first {MAX_MARKERS} are drawn.")
    return out


def _fetches(fetches: list[dict], scale: _Scale, several: bool) -> list[str]:
    """The reply's download requests (upload-reply), as event lines labelled with their method."""
    out = []
    for fetch in fetches[:MAX_MARKERS]:
        x = scale.x(fetch.get("ts"))
        title = (f"reply fetched: {printable(fetch.get('method'))} {printable(fetch.get('url'))} at frame "
                 f"{_frame(fetch, several)}; {_or_dash(fetch.get('status'))}, {human_size(fetch.get('bytes'))}")
        out.append(f"<g><line class=\"ev ev-fetch\" x1=\"{x:.1f}\" y1=\"{_TOP - 8}\" x2=\"{x:.1f}\" "
                   f"y2=\"{_TOP + _PLOT_H}\"/>{_label(x, printable(fetch.get('method')) or '?')}"
                   f"<title>{_e(title)}</title></g>")
    return out


def _label(x: float, label: str) -> str:
    """An event's label beside its line, on the inner side near the right edge."""
    if x > _W - _RIGHT - 50:
        return f"<text x=\"{x - 3:.1f}\" y=\"{_TOP - 10}\" text-anchor=\"end\">{_e(label)}</text>"
    return f"<text x=\"{x + 3:.1f}\" y=\"{_TOP - 10}\">{_e(label)}</text>"


def _anomaly_marks(anomalies: list[dict], scale: _Scale, clock: Clock, notes: list[str],
                   several: bool) -> list[str]:
    """Each anomaly as a shape on the strip above the plot: square error, triangle warning,
    circle info; its tooltip explains it."""
    ordered = sorted(anomalies, key=anomaly_order)
    out = []
    y = _TOP - 22
    taken: list[float] = []
    for anomaly in ordered[:MAX_MARKERS]:
        severity = anomaly.get("severity") if anomaly.get("severity") in SEVERITIES else "error"
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
        out.append(f"{shape} class=\"m-{severity}\"><title>{_e(title)}</title>"
                   f"{'</rect>' if severity == 'error' else '</path>' if severity == 'warning' else '</circle>'}")
    if len(ordered) > MAX_MARKERS:
        notes.append(f"{len(ordered):,} anomalies; the {MAX_MARKERS} worst are marked on the timeline, "
                     "all are listed below.")
    return out
