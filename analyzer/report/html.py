"""The HTML report (`bits-analyze --html FILE`): one self-contained page rendered from the report
(schema.md): summary, sessions, anomalies, problems, downloads, and a section per session with
its timeline (timeline.py, inline SVG).

It is read first for what went wrong, so it opens with the sessions that need a look (not
delivered, unknown, or with a warning or an error), worst first, each with its verdict and the
reason for it, its story in words (presentation.session_story: the same sentences as the text
report) and its timeline; then every session in one compact table; then the anomalies. A page
of 2,000 sessions stays a few megabytes that a browser shows at once: at most MAX_TIMELINES
timelines are drawn, and every timeline of a small report.

Captures are hostile input, so every string that came from one is made printable and
HTML-escaped, and the page forbids itself any network access and any script but its own
(Content Security Policy: the one inline script is allowed by its hash). The script only sorts
and filters the sessions table; without it everything is still there (the severity filter is
CSS, tooltips are SVG <title>s).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from typing import IO, Iterable

from bitstrace.analyzer.report.presentation import (
    SEVERITIES, Clock, all_anomalies, anomaly_frames, anomaly_order, capture_legend, count, escaped, has_story,
    human_duration, human_rate, human_size, look_order, needs_a_look, or_dash, percent, printable, recreations,
    session_story, several_captures, severity_counts, severity_rank, short_ids,
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
a code,table.anomalies code{white-space:nowrap}.pct{font-size:11.5px;color:var(--muted)}
table.sessions{font-size:13px}table.sessions td,table.sessions th{padding:5px 5px}
table.sessions td:first-child,td.nowrap{white-space:nowrap}
tr:hover td{background:#f8fafc}
.badge{display:inline-block;padding:1px 7px;border-radius:10px;font-size:12px;font-weight:600;white-space:nowrap}
.v-delivered{background:#d4f0e6;color:#00553f}.v-not-delivered{background:#fbe0d0;color:#8a3300}
.v-unknown{background:#fdf0d0;color:#6b4700}
.s-error{background:#fbe0d0;color:#8a3300}.s-warning{background:#fdf0d0;color:#6b4700}
.s-info{background:#d6e8f5;color:#003f66}
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
ul.story{margin:6px 0;padding-left:18px;font-size:13.5px}ul.story li{margin:2px 0}
.why{color:var(--ink);font-size:12.5px}.story{color:#3d4551;font-size:12px}p.url{margin:4px 0 0;color:var(--muted)}
.session header .why{font-size:13.5px}
nav.jump{margin:4px 0 0;font-size:13px}
.allgood{background:#d4f0e6;border:1px solid var(--ok);border-radius:8px;padding:10px 14px;font-weight:600}
.tools{margin:0 0 8px;display:flex;gap:12px;align-items:center;flex-wrap:wrap}
.tools input{font:inherit;padding:3px 6px;min-width:22em}.tools select{font:inherit}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
table.paged th{cursor:pointer;user-select:none}table.sessions td.v{min-width:13em}
dl.codes{margin:8px 0;font-size:12.5px}dl.codes div{display:flex;gap:8px}dl.codes dt{min-width:14em}dl.codes dd{margin:0;color:var(--muted)}
footer{margin-top:40px;color:var(--muted);font-size:12.5px}
details summary{cursor:pointer}
@media print{body{background:#fff}main{max-width:none;padding:0}th{position:static}
.filterbox input,.filterbox label,.tools{display:none}
section.session{content-visibility:visible;break-inside:avoid}a{color:inherit;text-decoration:none}}
"""

#: The page's one script: the long tables (sessions, anomalies) sort by any column, filter by
#: text (and the sessions by kind) and show PAGE_ROWS rows until asked for all; a browser lays out
#: a few hundred rows at once, not thousands. Inline, so the page stays one self-contained file
#: that works offline; allowed by its hash in the Content-Security-Policy, so nothing else can run
#: (no other inline script, no source from anywhere). Without script the page is whole: a
#: <noscript> style shows every row, and the controls stay hidden.
SCRIPT = """(function(){
var PAGE=200;
function num(n){return n.toLocaleString('en-US');}
[].forEach.call(document.querySelectorAll('table.paged'),function(t){
var b=t.tBodies[0],heads=[].slice.call(t.tHead.rows[0].cells),tools=document.querySelector('[data-for="'+t.id+'"]');
var q=tools.querySelector('input'),k=tools.querySelector('select'),shown=tools.querySelector('.shown'),
matching=tools.querySelector('.matching'),more=tools.querySelector('button'),limit=PAGE;
function words(r){if(r.words===undefined)r.words=r.textContent.toLowerCase();return r.words;}
function apply(){var w=q.value.trim().toLowerCase(),c=k?k.value:'all',m=0,s=0;
[].forEach.call(b.rows,function(r){var ok=(!w||words(r).indexOf(w)>=0)&&(c==='all'||r.getAttribute('data-kind')===c);
if(ok)m++;var show=ok&&(limit===0||m<=limit);r.hidden=!show;if(show)s++;});
shown.textContent=num(s);matching.textContent=num(m);more.hidden=limit===0||m<=limit;}
q.addEventListener('input',apply);if(k)k.addEventListener('change',apply);
more.addEventListener('click',function(){limit=0;apply();});
heads.forEach(function(th,col){th.tabIndex=0;th.title='sort by this column';
function sort(){var up=th.getAttribute('aria-sort')!=='ascending',isnum=th.classList.contains('num');
heads.forEach(function(o){o.removeAttribute('aria-sort');});th.setAttribute('aria-sort',up?'ascending':'descending');
var keyed=[].map.call(b.rows,function(r,i){var c=r.cells[col],v=c.hasAttribute('data-v')?c.getAttribute('data-v'):c.textContent;
return [isnum?parseFloat(v):v.toLowerCase(),i,r];});
keyed.sort(function(x,y){var a=x[0],z=y[0];
if(isnum&&(isNaN(a)||isNaN(z)))return isNaN(a)===isNaN(z)?x[1]-y[1]:isNaN(a)?1:-1;
var d=a<z?-1:a>z?1:0;return d?(up?d:-d):x[1]-y[1];});
var f=document.createDocumentFragment();keyed.forEach(function(e){f.appendChild(e[2]);});b.appendChild(f);apply();}
th.addEventListener('click',sort);
th.addEventListener('keydown',function(e){if(e.key==='Enter'||e.key===' '){e.preventDefault();sort();}});});
tools.hidden=false;});
})();"""
SCRIPT_HASH = "sha256-" + base64.b64encode(hashlib.sha256(SCRIPT.encode("utf-8")).digest()).decode("ascii")
_CSP = (f"default-src 'none'; style-src 'unsafe-inline'; script-src '{SCRIPT_HASH}'; base-uri 'none'; "
        "form-action 'none'")

#: Full timelines at most per page: those of the sessions that need a look, worst first. A
#: report of at most ALL_TIMELINES_UP_TO sessions draws every session's timeline.
MAX_TIMELINES = 100
ALL_TIMELINES_UP_TO = 20
#: Rows of a long table shown before "show all" (the script's PAGE).
PAGE_ROWS = 200


def render_html(report: Report) -> str:
    """The whole page as one string."""
    page = io.StringIO()
    write_html(report, page)
    return page.getvalue()


class _Plan:
    """Which sessions get a section with their timeline, and each session's story."""

    def __init__(self, sessions: list[SessionRecord]) -> None:
        #: The sessions that need a look, worst first; the first MAX_TIMELINES of them are drawn.
        self.flagged = sorted((n for n, s in enumerate(sessions) if needs_a_look(s)),
                              key=lambda n: look_order(sessions[n]))
        self.look = self.flagged[:MAX_TIMELINES]
        flagged = set(self.flagged)
        healthy = [n for n in range(len(sessions)) if n not in flagged]
        #: The healthy sessions drawn too (in a small report), in capture order.
        self.others = healthy if len(sessions) <= ALL_TIMELINES_UP_TO else []
        self.drawn = set(self.look) | set(self.others)
        self.table_order = self.flagged + healthy


def write_html(report: Report, out: IO[str], sessions_with_packets: Iterable[SessionRecord] | None = None) -> None:
    """Write the page to `out`. The stories and timelines read `sessions_with_packets` when given
    (the report's sessions with their packets, in the same order, made one at a time for a
    report whose own session records leave the packets out), else the report's own. The page
    shows the sessions that need a look first, each with its story and timeline (at most
    MAX_TIMELINES), then every session in one sortable, filterable table."""
    sessions = report.get("sessions") or []
    anomalies = all_anomalies(report)
    ids = short_ids([s.get("id") for s in sessions] + [a.get("session") for a in anomalies])
    clock = Clock(report)
    several = several_captures(report)
    plan = _Plan(sessions)
    anchors = {sid: f"s-{n}" for n, s in enumerate(sessions) if n in plan.drawn and (sid := s.get("id")) is not None}
    links = recreations(sessions, several)
    fetches = _reply_fetches(sessions, report.get("downloads") or [])
    # One pass over the sessions with their packets: each drawn section and each story is made
    # while that session's packets are at hand, then the page is written in its own order.
    sections: dict[int, str] = {}
    stories: dict[int, list[str]] = {}
    for index, session in enumerate(sessions if sessions_with_packets is None else sessions_with_packets):
        if has_story(sessions[index]) or index in plan.drawn:
            stories[index] = session_story(session, index, links, sessions, ids, several)
        if index in plan.drawn:
            sections[index] = _session_section(index, session, fetches.get(index, []), ids, clock, several,
                                               stories[index])
    files = ", ".join(printable(c.get("file")) for c in report.get("captures") or [])
    tool = report.get("tool") or {}
    out.write("".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">",
        "<meta name=\"referrer\" content=\"no-referrer\">",
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">",
        f"<title>BITS upload report: {html.escape(files or 'no capture')}</title>",
        f"<style>{_CSS}</style><noscript><style>table.paged tr[hidden]{{display:table-row}}</style></noscript>"
        "</head><body><main>",
        "<h1>BITS upload report</h1>",
        f"<p class=\"sub\">{escaped(tool.get('name') or 'bits-analyze')} {escaped(tool.get('version') or '')}"
        f" · report schema {escaped(report.get('version'))} · {_plural(len(report.get('captures') or []), 'capture')}</p>",
    ]))
    out.write("".join(_nav(report, plan, anomalies)))
    out.write("".join(_summary(report)))
    out.write("".join(_look(plan, sessions, sections)))
    for part in (_sessions_table(sessions, plan, ids, anchors, clock, stories),
                 _anomalies(anomalies, ids, anchors, clock, several), _problems(report.get("problems") or []),
                 _downloads(report.get("downloads") or [], clock), _captures(report, clock)):
        out.write("".join(part))
    if plan.others:
        out.write("<h2 id=\"timelines\">Timelines of the other sessions</h2>")
        if not plan.look:
            out.write("".join(_legend()))
        for index in plan.others:
            out.write(sections[index])
    out.write("".join(_counters(report)))
    out.write(f"<script>{SCRIPT}</script></main></body></html>\n" if sessions else "</main></body></html>\n")


def _plural(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number:,} {singular if number == 1 else plural or singular + 's'}"


def _nav(report: Report, plan: _Plan, anomalies: list[AnomalyRecord]) -> list[str]:
    places = []
    if plan.flagged:
        places.append(("look", f"{count(len(plan.flagged))} need a look"))
    if report.get("sessions"):
        places.append(("sessions", f"all {count(len(report.get('sessions') or []))} sessions"))
    places.append(("anomalies", f"{count(len(anomalies))} anomalies"))
    places.append(("problems", f"{count(len(report.get('problems') or []))} input problems"))
    if report.get("downloads"):
        places.append(("downloads", f"{count(len(report.get('downloads') or []))} downloads"))
    places.append(("captures", "captures"))
    if plan.others:
        places.append(("timelines", "other timelines"))
    return ["<nav class=\"jump\">" + " · ".join(f"<a href=\"#{anchor}\">{label}</a>" for anchor, label in places)
            + "</nav>"]


def _legend() -> list[str]:
    return ["<div class=\"legend-wrap\"><p class=\"note\">Timelines: time runs left to right from the session's "
            "first packet; height is the byte offset in the file (0 at the bottom, the file size at the top). "
            "Each fragment is a box from its request to its response, covering its byte range. "
            "Hover any mark for details.</p>", LEGEND_SVG, "</div>"]


def _look(plan: _Plan, sessions: list[SessionRecord], sections: dict[int, str]) -> list[str]:
    if not sessions:
        return []
    if not plan.flagged:
        return [f"<p class=\"allgood\" id=\"look\">✓ {_all_delivered(len(sessions))} delivered, "
                "with no warning or error.</p>"]
    out = [f"<h2 id=\"look\">Sessions that need a look ({count(len(plan.flagged))}), worst first</h2>",
           "<p class=\"note\">Not delivered, unknown, or with a warning or an error: not delivered first, then "
           "unknown, then by the worst anomaly and by time.</p>", *_legend()]
    out += [sections[index] for index in plan.look]
    if len(plan.flagged) > len(plan.look):
        out.append(f"<p class=\"banner\">{count(len(plan.flagged) - len(plan.look))} more sessions need a look; "
                   f"their timelines are left out to keep the page light (the first {count(len(plan.look))} are "
                   "drawn). They lead the <a href=\"#sessions\">sessions table</a>; "
                   "<code>bits-analyze --session ID --html FILE</code> draws any one of them.</p>")
    return out


def _all_delivered(number: int) -> str:
    return "The session was" if number == 1 else f"All {count(number)} sessions were"


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
              f"HTTP exchanges ({count(summary.get('bits_exchanges', 0))} BITS, "
              f"{count(summary.get('other_http', 0))} other)")]
    out = ["<div class=\"cards\">"]
    for kind, number, label in cards:
        zero = " zero" if number == 0 else ""
        out.append(f"<div class=\"card {kind}{zero}\"><b>{escaped(_number(number))}</b><span>{escaped(label)}</span></div>")
    out.append("</div>")
    incomplete = [c for c in report.get("captures") or [] if not c.get("complete", True)]
    problems = report.get("problems") or []
    if incomplete or problems:
        what = (f"{_plural(len(incomplete), 'capture')} could not be read to the end; " if incomplete else "")
        out.append(f"<div class=\"banner\"><b>⚠ Input problems.</b> {what}{_plural(len(problems), 'problem')} "
                   "met while reading: what could be read was analysed. "
                   "<a href=\"#problems\">See the problems</a>.</div>")
    return out


def _number(value: object) -> object:
    """A count with thousands separators; anything else (a report may hold anything) as it is."""
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value


def _captures(report: Report, clock: Clock) -> list[str]:
    out = ["<h2 id=\"captures\">Captures</h2><table><thead><tr><th>File</th><th>Format</th>"
           "<th class=\"num\">Frames</th><th class=\"num\">Size</th><th>First packet</th>"
           "<th>Last packet</th><th class=\"num\">Duration</th><th class=\"num\">TCP connections</th>"
           "<th class=\"num\">HTTP exchanges</th><th>Read</th></tr></thead><tbody>"]
    for capture in report.get("captures") or []:
        first, last = capture.get("first_ts"), capture.get("last_ts")
        complete = capture.get("complete", True)
        state = ("<span class=\"badge v-delivered\">✓ complete</span>" if complete
                 else "<span class=\"badge v-not-delivered\">✗ incomplete</span>")
        out.append(
            f"<tr><td class=\"wrap mono\">{escaped(capture.get('file'))}</td><td>{escaped(capture.get('format'))}</td>"
            f"<td class=\"num\">{escaped(_number(capture.get('frames') or 0))}</td>"
            f"<td class=\"num\">{escaped(human_size(capture.get('bytes')))}</td>"
            f"<td>{escaped(clock.datetime(first))}</td><td>{escaped(clock.datetime(last))}</td>"
            f"<td class=\"num\">{escaped(human_duration(last - first) if first is not None and last is not None else '—')}</td>"
            f"<td class=\"num\">{escaped(_number(capture.get('connections')))}</td>"
            f"<td class=\"num\">{escaped(_number(capture.get('exchanges')))}</td>"
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
    return "".join(f"<span class=\"badge s-{sev}\" title=\"{counts[sev]:,} {sev}\">{_SEVERITY_MARK[sev]} {counts[sev]:,}</span>"
                   for sev in SEVERITIES if counts[sev]) or "<span class=\"note\">none</span>"


def _session_link(session_id: str | None, ids: dict[str, str], anchors: dict[str, str]) -> str:
    if session_id is None:
        return "<span class=\"note\">—</span>"
    label = f"<code title=\"{escaped(session_id)}\">{escaped(ids.get(session_id, session_id))}</code>"
    anchor = anchors.get(session_id)
    return f"<a href=\"#{anchor}\">{label}</a>" if anchor else label


def _sessions_table(sessions: list[SessionRecord], plan: _Plan, ids: dict[str, str], anchors: dict[str, str],
                    clock: Clock, stories: dict[int, list[str]]) -> list[str]:
    """Every session, one compact row each: those that need a look first (worst first), then the
    others in capture order; the page's script sorts by any column and filters the rows."""
    out = [f"<h2 id=\"sessions\">Sessions ({count(len(sessions))})</h2>"]
    if not sessions:
        return out + ["<p>No BITS upload sessions in the capture.</p>"]
    flagged = set(plan.flagged)
    kinds = ("<select aria-label=\"which sessions\"><option value=\"all\">all sessions</option>"
             f"<option value=\"look\">need a look ({count(len(flagged))})</option>"
             f"<option value=\"ok\">healthy ({count(len(sessions) - len(flagged))})</option></select> ")
    out.append(_tools("all-sessions", len(sessions), "id, client, URL, verdict, reason…", kinds) +
               "<table class=\"sessions paged\" id=\"all-sessions\"><thead><tr><th>Session</th><th>Client</th><th>URL</th>"
               "<th>Verdict and why</th><th class=\"num\">Acknowledged</th>"
               "<th class=\"num\">Frags</th><th class=\"num\">Start (UTC)</th><th class=\"num\">Duration</th>"
               "<th class=\"num\">Throughput</th><th class=\"num\">Anomalies</th></tr></thead><tbody>")
    for position, index in enumerate(plan.table_order):
        session = sessions[index]
        name = _session_link(session.get("id"), ids, anchors)
        if session.get("before_capture"):
            name += "<br><span class=\"note\">before capture</span>"
        content = session.get("content_name")
        url = escaped(session.get("url")) + (f"<br><span class=\"note\">{escaped(content)}</span>" if content else "")
        # A drawn session tells its story in its section, which the id links to.
        story = "" if index in plan.drawn else " ".join(stories.get(index) or ())
        why = (escaped(session.get("verdict_reason")) + f" <span class=\"note\">(state {escaped(session.get('state'))})</span>"
               + (f"<br><span class=\"story\">{escaped(story)}</span>" if story else ""))
        verdict = session.get("verdict")
        counts = severity_counts(session.get("anomalies") or [])
        weight = counts["error"] * 1_000_000 + counts["warning"] * 1_000 + counts["info"]
        out.append(
            f"<tr data-kind=\"{'look' if index in flagged else 'ok'}\"{_hidden(position)}><td>{name}</td>"
            f"<td class=\"mono nowrap\">{escaped(session.get('client'))}</td>"
            f"<td class=\"wrap\">{url}</td>"
            f"<td class=\"v\" data-v=\"{_VERDICT_ORDER.get(verdict or '', 0)} {escaped(verdict)}\">{_verdict(verdict)} "
            f"<span class=\"why\">{why}</span></td>"
            f"<td class=\"num\" data-v=\"{session.get('acknowledged') or 0}\">"
            f"{escaped(human_size(session.get('acknowledged') or 0))}<br><span class=\"pct\">of "
            f"{escaped(human_size(session.get('total')))} {escaped(percent(session.get('acknowledged') or 0, session.get('total')))}"
            "</span></td>"
            f"<td class=\"num\" data-v=\"{_sortable(session.get('fragments'))}\">{escaped(_number(session.get('fragments')))}</td>"
            f"<td class=\"num\" data-v=\"{_sortable(session.get('first_ts'))}\">{escaped(clock.time(session.get('first_ts')))}</td>"
            f"<td class=\"num\" data-v=\"{_sortable(session.get('duration_s'))}\">{escaped(human_duration(session.get('duration_s')))}</td>"
            f"<td class=\"num\" data-v=\"{_sortable(session.get('throughput_bps'))}\">{escaped(human_rate(session.get('throughput_bps')))}</td>"
            f"<td class=\"num counts\" data-v=\"{weight}\">{_severity_badges(session.get('anomalies') or [])}</td></tr>")
    out.append("</tbody></table>")
    return out


_VERDICT_ORDER = {"not-delivered": 0, "unknown": 1, "delivered": 2}


def _sortable(value: object) -> str:
    """A number for the script's sort key (anything else is empty, and sorts last)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    return str(value) if isinstance(value, int) else f"{value:.6f}".rstrip("0").rstrip(".")


def _tools(table: str, rows: int, what: str, kinds: str = "") -> str:
    """The controls of a paged table (shown by the script): a text filter, `kinds` (a <select>),
    how many rows show, and the button that shows them all."""
    shown = min(rows, PAGE_ROWS)
    return (f"<div class=\"tools\" data-for=\"{table}\" hidden><label>Filter <input type=\"search\" "
            f"placeholder=\"{what}\" autocomplete=\"off\"></label> {kinds}"
            f"<span class=\"note\"><span class=\"shown\">{count(shown)}</span> shown of "
            f"<span class=\"matching\">{count(rows)}</span> · click a column heading to sort</span> "
            f"<button type=\"button\"{'' if rows > PAGE_ROWS else ' hidden'}>show all</button></div>")


def _hidden(position: int) -> str:
    """The attribute that keeps a row past PAGE_ROWS out of the first layout."""
    return " hidden" if position >= PAGE_ROWS else ""


def _anomaly_title(anomaly: AnomalyRecord) -> str:
    spec = f" ({anomaly['spec']})" if (anomaly.get("spec") or "-") != "-" else ""
    return escaped(f"{anomaly.get('meaning') or ''}{spec}")


#: Rows of the anomalies table at most (worst first); --json has them all.
MAX_ANOMALY_ROWS = 5_000


def _anomalies(anomalies: list[AnomalyRecord], ids: dict[str, str], anchors: dict[str, str], clock: Clock,
               several: bool) -> list[str]:
    out = [f"<h2 id=\"anomalies\">Anomalies ({count(len(anomalies))})</h2>"]
    if not anomalies:
        return out + ["<p>No anomalies.</p>"]
    ordered = sorted(anomalies, key=anomaly_order)
    listed = ordered[:MAX_ANOMALY_ROWS]
    out.append("<div class=\"filterbox\"><p class=\"note\">Worst first: errors, warnings, then information; "
               "by time within each. What each code means is listed under the table.</p>"
               "<input type=\"radio\" name=\"sev\" id=\"f-info\" checked><label for=\"f-info\"> all</label> "
               "<input type=\"radio\" name=\"sev\" id=\"f-warning\"><label for=\"f-warning\"> warnings and errors</label> "
               "<input type=\"radio\" name=\"sev\" id=\"f-error\"><label for=\"f-error\"> errors only</label>"
               + _tools("all-anomalies", len(listed), "code, session, message…") +
               "<table class=\"anomalies paged\" id=\"all-anomalies\"><thead><tr><th>Severity</th><th>Code</th>"
               "<th>Session</th><th>Frames</th><th class=\"num\">Time (UTC)</th><th>Message</th></tr></thead><tbody>")
    for position, anomaly in enumerate(listed):
        severity = anomaly.get("severity")
        css = severity if severity in SEVERITIES else "error"
        where = _session_link(anomaly.get("session"), ids, anchors)
        if anomaly.get("session") is None and anomaly.get("connection") is not None:
            where = f"<span class=\"note\">stream {escaped(anomaly['connection'])}</span>"
        out.append(
            f"<tr class=\"a-{css}\"{_hidden(position)}><td data-v=\"{severity_rank(severity)}\"><span class=\"badge s-{css}\">"
            f"{_SEVERITY_MARK[css]} {escaped(severity)}</span></td>"
            f"<td><code>{escaped(anomaly.get('code'))}</code></td>"
            f"<td>{where}</td><td class=\"mono\">{escaped(anomaly_frames(anomaly, several))}</td>"
            f"<td class=\"num\" data-v=\"{_sortable(anomaly.get('ts'))}\">{escaped(clock.time(anomaly.get('ts')))}</td>"
            f"<td class=\"wrap\">{escaped(anomaly.get('message'))}</td></tr>")
    out.append("</tbody></table></div>")
    if len(ordered) > len(listed):
        left = severity_counts(ordered[len(listed):])
        detail = ", ".join(f"{number:,} {severity}" for severity, number in left.items() if number)
        out.append(f"<p class=\"banner\">{count(len(ordered) - len(listed))} more anomalies ({escaped(detail)}) "
                   "are not listed here; <code>bits-analyze --json</code> has every one.</p>")
    rules: dict[str, AnomalyRecord] = {}
    for anomaly in ordered:
        rules.setdefault(printable(anomaly.get("code")), anomaly)
    out.append("<dl class=\"codes\">" + "".join(
        f"<div><dt><code>{escaped(code)}</code></dt><dd>{_anomaly_title(anomaly)}</dd></div>"
        for code, anomaly in sorted(rules.items())) + "</dl>")
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

def _facts(session: SessionRecord, clock: Clock) -> str:
    rows = [
        ("Session id", session.get("id")), ("Client", session.get("client")), ("Server", session.get("server")),
        ("Host", session.get("host")), ("URL", session.get("url")), ("Content-Name", session.get("content_name")),
        ("User-Agent", session.get("user_agent")), ("Protocol", session.get("protocol")),
        ("State", session.get("state")), ("Reply URL", session.get("reply_url")),
        ("Acknowledged", _acknowledged(session)),
        ("Bytes sent", f"{session.get('bytes_sent') or 0:,} (resends included)"),
        ("Fragments", _number(session.get("fragments"))),
        ("First packet", clock.datetime(session.get("first_ts"))),
        ("Last packet", clock.datetime(session.get("last_ts"))),
        ("Duration", human_duration(session.get("duration_s"))),
        ("Throughput", human_rate(session.get("throughput_bps"))),
        ("TCP connections", ", ".join(str(c) for c in session.get("connections") or []) or "—"),
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
                     several: bool, story: list[str]) -> str:
    sid = session.get("id")
    before = " <span class=\"note\">already running when the capture began</span>" if session.get("before_capture") else ""
    svg, notes = timeline_svg(session, fetches, clock, several)
    anomalies = sorted(session.get("anomalies") or [], key=anomaly_order)
    listed = "".join(
        f"<li><span class=\"badge s-{a.get('severity') if a.get('severity') in SEVERITIES else 'error'}\">"
        f"{escaped(a.get('severity'))}</span> <code title=\"{_anomaly_title(a)}\">{escaped(a.get('code'))}</code> "
        f"<span class=\"note\">frames {escaped(anomaly_frames(a, several))}</span> {escaped(a.get('message'))}</li>"
        for a in anomalies)
    told = "".join(f"<li>{escaped(sentence)}</li>" for sentence in story)
    return (f"<section class=\"session\" id=\"s-{index}\"><header><h3>Session <code title=\"{escaped(sid)}\">"
            f"{escaped(ids.get(sid, sid) if sid is not None else '(no id)')}</code></h3>{_verdict(session.get('verdict'))}"
            f"<span class=\"why\">{escaped(session.get('verdict_reason'))}</span>{before}</header>"
            f"<p class=\"url\">{escaped(session.get('url'))}</p>"
            + (f"<ul class=\"story\">{told}</ul>" if told else "")
            + f"{_facts(session, clock)}{svg}"
            + "".join(f"<p class=\"note\">{escaped(n)}</p>" for n in notes)
            + (f"<ul class=\"anoms\">{listed}</ul>" if listed else "")
            + "</section>")
