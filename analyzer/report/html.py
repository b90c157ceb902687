"""The HTML report (`bits-analyze --html FILE`): one self-contained page rendered from the report
(schema.md): summary, sessions, anomalies, problems, downloads, and a section per session with
its timeline (timeline.py, inline SVG).

Captures are hostile input, so every string that came from one is made printable and
HTML-escaped, and the page forbids itself any script and any network access (Content Security
Policy). Nothing needs JavaScript: the severity filter is CSS, tooltips are SVG <title>s.
"""

from __future__ import annotations

import html
import io
from typing import IO, Iterable

from bitstrace.analyzer.report.presentation import (
    SEVERITIES, Clock, all_anomalies, anomaly_frames, anomaly_order, capture_legend, escaped, human_duration,
    human_rate, human_size, or_dash, percent, printable, several_captures, severity_counts, short_ids,
)
from bitstrace.analyzer.report.schema import (
    AnomalyRecord, DownloadRecord, ProblemRecord, Report, SessionRecord,
)
from bitstrace.analyzer.report.timeline import LEGEND_SVG, timeline_svg

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


def render_html(report: Report) -> str:
    """The whole page as one string."""
    page = io.StringIO()
    write_html(report, page)
    return page.getvalue()


def write_html(report: Report, out: IO[str], sessions_with_packets: Iterable[SessionRecord] | None = None) -> None:
    """Write the page to `out` part by part. The timelines draw `sessions_with_packets` when
    given (the report's sessions with their packets, in the same order, made one at a time for a
    report whose own session records leave the packets out), else the report's own."""
    sessions_table = report.get("sessions") or []
    anomalies = all_anomalies(report)
    ids = short_ids([s.get("id") for s in sessions_table] + [a.get("session") for a in anomalies])
    anchors = {sid: f"s-{n}" for n, s in enumerate(sessions_table) if (sid := s.get("id")) is not None}
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
        f"<p class=\"sub\">{escaped(tool.get('name') or 'bits-analyze')} {escaped(tool.get('version') or '')}"
        f" · report schema {escaped(report.get('version'))} · {len(report.get('captures') or [])} capture(s)</p>",
    ]))
    for part in (_summary(report), _captures(report, clock), _sessions_table(sessions_table, ids, anchors, clock),
                 _anomalies(anomalies, ids, anchors, clock, several), _problems(report.get("problems") or []),
                 _downloads(report.get("downloads") or [], clock)):
        out.write("".join(part))
    if sessions_table:
        out.write("".join(_timelines_heading()))
        fetches = _reply_fetches(sessions_table, report.get("downloads") or [])
        for index, session in enumerate(sessions_table if sessions_with_packets is None else sessions_with_packets):
            out.write(_session_section(index, session, fetches.get(index, []), ids, clock, several))
    out.write("".join(_counters(report)))
    out.write("</main></body></html>\n")


# --- summary, captures ------------------------------------------------------------------------

def _summary(report: Report) -> list[str]:
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
        out.append(f"<div class=\"card {kind}{zero}\"><b>{escaped(number)}</b><span>{escaped(label)}</span></div>")
    out.append("</div>")
    incomplete = [c for c in report.get("captures") or [] if not c.get("complete", True)]
    problems = report.get("problems") or []
    if incomplete or problems:
        what = (f"{len(incomplete)} capture(s) could not be read to the end; " if incomplete else "")
        out.append(f"<div class=\"banner\"><b>⚠ Input problems.</b> {what}{len(problems)} problem(s) "
                   "met while reading: what could be read was analysed. "
                   "<a href=\"#problems\">See the problems</a>.</div>")
    return out


def _captures(report: Report, clock: Clock) -> list[str]:
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
            f"<tr><td class=\"wrap mono\">{escaped(capture.get('file'))}</td><td>{escaped(capture.get('format'))}</td>"
            f"<td class=\"num\">{capture.get('frames') or 0:,}</td>"
            f"<td class=\"num\">{escaped(human_size(capture.get('bytes')))}</td>"
            f"<td>{escaped(clock.datetime(first))}</td><td>{escaped(clock.datetime(last))}</td>"
            f"<td class=\"num\">{escaped(human_duration(last - first) if first is not None and last is not None else '—')}</td>"
            f"<td class=\"num\">{escaped(capture.get('connections'))}</td><td class=\"num\">{escaped(capture.get('exchanges'))}</td>"
            f"<td>{state}</td></tr>")
    out.append("</tbody></table>")
    legend = capture_legend(report)
    if legend:
        out.append(f"<p class=\"note\">{escaped(legend)}</p>")
    return out


# --- sessions ---------------------------------------------------------------------------------

def _verdict(verdict: str | None) -> str:
    verdict = verdict if verdict in _VERDICT_MARK else "unknown"
    return f"<span class=\"badge v-{verdict}\">{_VERDICT_MARK[verdict]} {verdict}</span>"


def _severity_badges(anomalies: Iterable[AnomalyRecord]) -> str:
    counts = severity_counts(anomalies)
    return "".join(f"<span class=\"badge s-{sev}\" title=\"{counts[sev]} {sev}\">{_SEVERITY_MARK[sev]} {counts[sev]}</span>"
                   for sev in SEVERITIES if counts[sev]) or "<span class=\"note\">none</span>"


def _session_link(session_id: str | None, ids: dict[str, str], anchors: dict[str, str]) -> str:
    if session_id is None:
        return "<span class=\"note\">—</span>"
    label = f"<code title=\"{escaped(session_id)}\">{escaped(ids.get(session_id, session_id))}</code>"
    anchor = anchors.get(session_id)
    return f"<a href=\"#{anchor}\">{label}</a>" if anchor else label


def _sessions_table(sessions: list[SessionRecord], ids: dict[str, str], anchors: dict[str, str],
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
        url = escaped(session.get("url")) + (f"<br><span class=\"note\">{escaped(content)}</span>" if content else "")
        out.append(
            f"<tr><td>{name}</td><td class=\"mono nowrap\">{escaped(session.get('client'))}</td>"
            f"<td class=\"wrap\">{url}</td><td>{escaped(session.get('state'))}</td>"
            f"<td>{_verdict(session.get('verdict'))}</td>"
            f"<td class=\"num\">{escaped(_sizes(session))}<div class=\"pct\"><div class=\"bar\">"
            f"<i style=\"width:{share:.1f}%\"></i></div>{escaped(percent(session.get('acknowledged') or 0, session.get('total')))}"
            "</div></td>"
            f"<td class=\"num\">{escaped(session.get('fragments'))}</td><td>{escaped(clock.time(session.get('first_ts')))}</td>"
            f"<td class=\"num\">{escaped(human_duration(session.get('duration_s')))}</td>"
            f"<td class=\"num\">{escaped(human_rate(session.get('throughput_bps')))}</td>"
            f"<td class=\"counts\">{_severity_badges(session.get('anomalies') or [])}</td></tr>")
    out.append("</tbody></table>")
    return out


def _sizes(session: SessionRecord) -> str:
    return f"{human_size(session.get('acknowledged') or 0)} / {human_size(session.get('total'))}"


def _share(session: SessionRecord) -> float:
    total, acknowledged = session.get("total"), session.get("acknowledged") or 0
    return min(100.0, 100.0 * acknowledged / total) if total else 0.0


# --- anomalies, problems, downloads -----------------------------------------------------------

def _anomaly_title(anomaly: AnomalyRecord) -> str:
    spec = f" ({anomaly['spec']})" if (anomaly.get("spec") or "-") != "-" else ""
    return escaped(f"{anomaly.get('meaning') or ''}{spec}")


def _anomalies(anomalies: list[AnomalyRecord], ids: dict[str, str], anchors: dict[str, str], clock: Clock,
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
            where = f"<span class=\"note\">stream {escaped(anomaly['connection'])}</span>"
        out.append(
            f"<tr class=\"a-{css}\"><td><span class=\"badge s-{css}\">{_SEVERITY_MARK[css]} {escaped(severity)}</span></td>"
            f"<td><code title=\"{_anomaly_title(anomaly)}\">{escaped(anomaly.get('code'))}</code></td>"
            f"<td>{where}</td><td class=\"mono\">{escaped(anomaly_frames(anomaly, several))}</td>"
            f"<td>{escaped(clock.time(anomaly.get('ts')))}</td><td class=\"wrap\">{escaped(anomaly.get('message'))}</td></tr>")
    out.append("</tbody></table></div>")
    return out


def _problems(problems: list[ProblemRecord]) -> list[str]:
    out = [f"<h2 id=\"problems\">Problems reading the input ({len(problems)})</h2>"]
    if not problems:
        return out + ["<p>None: every capture was read to the end without trouble.</p>"]
    out.append("<table><thead><tr><th>Kind</th><th>File</th><th class=\"num\">Frame</th><th class=\"num\">Offset</th>"
               "<th class=\"num\">Stream</th><th>Message</th></tr></thead><tbody>")
    for problem in problems:
        fatal = " <span class=\"badge s-error\">fatal</span>" if problem.get("fatal") else ""
        out.append(_row(("", f"<code>{escaped(problem.get('kind'))}</code>{fatal}"),
                        ("mono wrap", escaped(problem.get("file"))),
                        *(("num", escaped(or_dash(problem.get(key)))) for key in ("frame", "offset", "connection")),
                        ("wrap", escaped(problem.get("message")))))
    out.append("</tbody></table>")
    return out


def _downloads(downloads: list[DownloadRecord], clock: Clock) -> list[str]:
    if not downloads:
        return []
    out = [f"<h2 id=\"downloads\">Downloads ({len(downloads)})</h2><table><thead><tr><th>Client</th><th>Server</th>"
           "<th>Method</th><th>URL</th><th class=\"num\">Status</th><th class=\"num\">Bytes</th><th>User-Agent</th>"
           "<th>Time (UTC)</th></tr></thead><tbody>"]
    for download in downloads:
        out.append(_row(("mono", escaped(download.get("client"))), ("mono", escaped(download.get("server"))),
                        ("", escaped(download.get("method"))), ("wrap", escaped(download.get("url"))),
                        ("num", escaped(or_dash(download.get("status")))), ("num", escaped(human_size(download.get("bytes")))),
                        ("", escaped(download.get("user_agent"))), ("", escaped(clock.time(download.get("ts"))))))
    out.append("</tbody></table>")
    return out


def _counters(report: Report) -> list[str]:
    out = ["<footer><details><summary>Decoder and reassembly counters</summary>"]
    for capture in report.get("captures") or []:
        for layer, counters in (("decoder", capture.get("decoder") or {}), ("tcp", capture.get("tcp") or {})):
            listed = ", ".join(f"{escaped(key)} {escaped(value)}" for key, value in counters.items())
            out.append(f"<p><span class=\"mono\">{escaped(capture.get('file'))}</span> {layer}: {listed or 'none'}</p>")
    out.append("</details><p>Rendered by bitstrace from report schema version "
               f"{escaped(report.get('version'))}; the same data as <code>bits-analyze --json</code>.</p></footer>")
    return out


def _row(*cells: tuple[str, str]) -> str:
    """A table row from (CSS class, HTML already escaped) pairs."""
    return "<tr>" + "".join(f"<td class=\"{css}\">{content}</td>" if css else f"<td>{content}</td>"
                            for css, content in cells) + "</tr>"


# --- session sections -------------------------------------------------------------------------

def _timelines_heading() -> list[str]:
    return ["<h2 id=\"timelines\">Session timelines</h2>",
            "<div class=\"legend-wrap\"><p class=\"note\">Time runs left to right from the session's first "
            "packet; height is the byte offset in the file (0 at the bottom, the file size at the top). "
            "Each fragment is a box from its request to its response, covering its byte range. "
            "Hover any mark for details.</p>", LEGEND_SVG, "</div>"]


def _facts(session: SessionRecord, clock: Clock) -> str:
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
    extracted = session.get("extracted")
    if extracted:
        rows.append(("Extracted", f"{printable(extracted.get('path'))} "
                                  f"({'complete' if extracted.get('complete') else 'incomplete'}, "
                                  f"sha256 {printable(extracted.get('sha256'))})"))
    return "<dl class=\"facts\">" + "".join(
        f"<div><dt>{name}</dt><dd>{escaped('—' if value is None else value)}</dd></div>" for name, value in rows) + "</dl>"


def _acknowledged(session: SessionRecord) -> str:
    acknowledged, total = session.get("acknowledged") or 0, session.get("total")
    of = "?" if total is None else f"{total:,}"
    return f"{acknowledged:,} of {of} bytes {percent(acknowledged, total)}"


def _reply_fetches(sessions: list[SessionRecord], downloads: list[DownloadRecord]) -> dict[int, list[DownloadRecord]]:
    """The downloads that fetch a session's reply, by the session's index: the download names
    the session by id, and of the sessions with that id (servers that derive ids reuse them)
    the one begun last before it."""
    by_id: dict[str | None, list[int]] = {}
    for index, session in enumerate(sessions):
        by_id.setdefault(session.get("id"), []).append(index)
    fetches: dict[int, list[DownloadRecord]] = {}
    for download in downloads:
        if download.get("session") is None:
            continue
        begun = [index for index in by_id.get(download["session"], ())
                 if (sessions[index].get("first_ts") or 0) <= (download.get("ts") or 0)]
        if begun:
            fetches.setdefault(begun[-1], []).append(download)
    return fetches


def _session_section(index: int, session: SessionRecord, fetches: list[DownloadRecord], ids: dict[str, str], clock: Clock,
                     several: bool) -> str:
    sid = session.get("id")
    before = " <span class=\"note\">already running when the capture began</span>" if session.get("before_capture") else ""
    svg, notes = timeline_svg(session, fetches, clock, several)
    anomalies = sorted(session.get("anomalies") or [], key=anomaly_order)
    listed = "".join(
        f"<li><span class=\"badge s-{a.get('severity') if a.get('severity') in SEVERITIES else 'error'}\">"
        f"{escaped(a.get('severity'))}</span> <code title=\"{_anomaly_title(a)}\">{escaped(a.get('code'))}</code> "
        f"<span class=\"note\">frames {escaped(anomaly_frames(a, several))}</span> {escaped(a.get('message'))}</li>"
        for a in anomalies)
    return (f"<section class=\"session\" id=\"s-{index}\"><header><h3>Session <code title=\"{escaped(sid)}\">"
            f"{escaped(ids.get(sid, sid) if sid is not None else '(no id)')}</code></h3>{_verdict(session.get('verdict'))}"
            f"<span class=\"note\">{escaped(session.get('url'))}</span>{before}</header>"
            f"{_facts(session, clock)}{svg}"
            + "".join(f"<p class=\"note\">{escaped(n)}</p>" for n in notes)
            + (f"<ul class=\"anoms\">{listed}</ul>" if listed else "")
            + "</section>")
