"""The terminal report: bits-analyze's default output, rendered from the report dict (schema.md).

Read by network and support engineers and by auditors, in a terminal or in a log file: a header
line per capture, the sessions table, the anomalies worst first, downloads and counts, problems.
Colour only when asked for; without it the output holds no escape codes at all.

Width: a terminal's own (rich measures it, and honours COLUMNS). Anywhere else (a pipe, a file,
a CI log) COLUMNS when it is set, else no limit at all: every table row is one line as long as
its content, nothing folds or wraps. A log is read with grep, less -S, an editor or a CI log
viewer, each of which shows long lines its own way; a row folded at some fixed width would
split one record over several lines, and grep would find half a row. Whoever wants a width
says so: `COLUMNS=100 bits-analyze x.pcap | less`.

Sessions that need a look, and those with a story worth telling (a cut connection, a resume, a
recreation after BG_E_SESSION_NOT_FOUND, a Host-Id redirect), get a few words under the table:
the verdict's reason and presentation.session_story's sentences, the same as the HTML page's.

A table holds at most TABLE_ROWS rows, so a capture of thousands of sessions still gives a page
a person reads (and renders in a moment): the sessions that need a look (not delivered, or with
a warning or an error) come first, then the healthy ones fill the rows left, and a line says
how many of each were left out. The JSON and HTML reports hold every row.
"""

from __future__ import annotations

import os
from typing import IO, Callable, Iterable, Sequence, TypedDict, TypeVar

from rich import box
from rich.cells import cell_len
from rich.console import Console, Group, JustifyMethod, OverflowMethod, RenderableType
from rich.padding import Padding
from rich.style import Style
from rich.table import Table
from rich.text import Text

from bitstrace.analyzer.report.presentation import (
    SEVERITIES, Clock, Packets, all_anomalies, anomaly_frames, anomaly_order, capture_legend, check_min_severity,
    compact_progress, clip, count, has_story, human_duration, human_rate, human_size, look_order, needs_a_look,
    printable, recreations, session_story, severity_counts, severity_rank, several_captures, short_ids, skew_sentence,
)
from bitstrace.analyzer.report.schema import (
    AnomalyRecord, DownloadRecord, ExtractedRecord, ProblemRecord, Report, SessionRecord,
)

LOG_WIDTH = 120  # the width from which the sessions table shows all but the start column
UNBOUNDED = 1 << 20  # "no limit": wider than any row the report writes
WIDE = 140  # room for the sessions' start times
NARROW = 100  # below this the anomalies are a list, not a table
URL_LIMIT = 200  # longer URLs are cut in the table; --json has them whole
TABLE_ROWS = 200  # rows of a table at most; a line says what was left out

_STYLES = {
    "heading": "bold",
    "dim": "dim",
    "ok": "green",
    "bad": "bold red",
    "unknown": "yellow",
    "error": "bold red",
    "warning": "yellow",
    "info": "cyan",
    "code": "bold",
}
_VERDICT_STYLE = {"delivered": "ok", "not-delivered": "bad", "unknown": "unknown"}


class _Palette:
    """Named styles; all of them empty without colour, so nothing but text is written."""

    def __init__(self, color: bool) -> None:
        self.color = color

    def __getitem__(self, name: str) -> Style:
        return Style.parse(_STYLES[name]) if self.color else Style.null()


def render_text(report: Report, console_or_file: Console | IO[str], *, min_severity: str = "info",
                color: bool, packets: Packets | None = None) -> None:
    """Write the report for people. `console_or_file` is a rich Console or a text file; anomalies
    below `min_severity` ("error" > "warning" > "info") are left out (and counted as such), and
    each table keeps to TABLE_ROWS rows (and says what it left out). The stories read the
    sessions' packets from `packets` when given (a report built without them), else from the
    records, and only for the sessions that have a story to tell."""
    threshold = check_min_severity(min_severity)
    console = _console(console_or_file, color)
    palette = _Palette(color)
    clock = Clock(report)
    sessions = report.get("sessions") or []
    ids = short_ids([s.get("id") for s in sessions] +
                    [a.get("session") for a in all_anomalies(report)])
    anomalies = all_anomalies(report)
    shown = [a for a in anomalies if severity_rank(a.get("severity")) <= threshold]

    parts: list[RenderableType] = [
        _captures(report, palette, clock),
        _summary(report, palette),
        _sessions(sessions, ids, palette, clock, console.width, _unread_tls(report)),
        *_what_happened(sessions, ids, palette, packets, several_captures(report)),
        _anomalies(shown, len(anomalies) - len(shown), min_severity, ids, palette, clock, console.width,
                   several_captures(report)),
    ]
    files = [(s, extracted) for s in sessions if (extracted := s.get("extracted"))]
    if files:
        parts.append(_extracted(files, ids, palette, console.width))
    if report.get("downloads"):
        parts.append(_downloads(report["downloads"], palette, clock, console.width))
    parts.append(_counts(report, palette))
    if report.get("problems"):
        parts.append(_problems(report["problems"], palette))
    for part in parts:
        console.print(part, highlight=False)
        console.print()


class _CallerDecidesConsole(Console):
    """rich ends the process (exit 1) when the reader closes the pipe; a renderer leaves that to
    its caller: `bits-analyze x.pcap | head` is normal use."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def _console(target: Console | IO[str], color: bool) -> Console:
    if isinstance(target, Console):
        return target
    tty = bool(getattr(target, "isatty", lambda: False)())
    return _CallerDecidesConsole(file=target, width=None if tty else _log_width(), force_terminal=color,
                   color_system=("auto" if tty else "standard") if color else None, no_color=not color,
                   highlight=False, markup=False, emoji=False, soft_wrap=False, legacy_windows=False)


def _log_width() -> int:
    """COLUMNS when it is set (to a number), else no limit (the module docstring says why)."""
    columns = os.environ.get("COLUMNS", "").strip()
    return int(columns) if columns.isdigit() and int(columns) > 0 else UNBOUNDED


def _text(value: object, style: Style | str = "") -> Text:
    """Capture strings go through Text, never through markup: `[bold]` in a URL stays text."""
    return Text(printable(value), style=style)


def _heading(title: str, palette: _Palette) -> Text:
    return Text(title, style=palette["heading"])


def _table(palette: _Palette, title: str) -> Table:
    # One space between columns (the box's divider, no cell padding): the sessions table has
    # eleven columns to fit in 120.
    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0,
                 header_style=palette["heading"], border_style=palette["dim"],
                 title=title, title_justify="left", title_style=palette["heading"])


def _add_rows(table: Table, rows: Sequence[Sequence[Text]], palette: _Palette, width: int) -> None:
    """Add the rows. rich lays a table out cell by cell, most of the report's time when a
    capture has thousands of sessions; without colour, and when every row fits on one line,
    the rows go in as one row of multi-line cells, which rich lays out line by line into the
    same lines in a fraction of the time. (With colour a cell's style would cover its padding
    one way and not the other: the same look, other bytes.)"""
    columns = list(zip(*rows))
    if not palette.color and columns and _one_line_rows(table, columns, width):
        table.add_row(*(Text("\n").join(column) for column in columns))
        return
    for row in rows:
        table.add_row(*row)


def _one_line_rows(table: Table, columns: list[tuple[Text, ...]], width: int) -> bool:
    """Whether no cell can wrap or be cut: every column as wide as its widest line allows, and
    the columns in the width. rich then gives each column that width (it narrows columns
    only when they do not fit)."""
    needed = len(table.columns) - 1  # a divider between columns (_table: no edges, no padding)
    for column, cells in zip(table.columns, columns):
        if any("\n" in cell.plain for cell in cells):
            return False
        widest = max(cell_len(str(column.header)), *(cell_len(cell.plain) for cell in cells))
        if column.max_width is not None and widest > column.max_width:
            return False
        needed += max(widest, column.min_width or 0)
    return needed <= width


_Row = TypeVar("_Row")


def _first_rows(items: Sequence[_Row], first: Callable[[_Row], bool]) -> tuple[list[_Row], int, int]:
    """At most TABLE_ROWS of `items`, in their order: those `first` picks before the others; and
    how many of each kind were left out (picked, others)."""
    if len(items) <= TABLE_ROWS:
        return list(items), 0, 0
    chosen = [first(item) for item in items]
    picked = [index for index, pick in enumerate(chosen) if pick]
    others = [index for index, pick in enumerate(chosen) if not pick]
    kept = picked[:TABLE_ROWS] + others[:max(TABLE_ROWS - len(picked), 0)]
    left_picked = max(len(picked) - TABLE_ROWS, 0)
    return [items[index] for index in sorted(kept)], left_picked, len(items) - len(kept) - left_picked


def _left_out(count: int, singular: str, plural: str, palette: _Palette, detail: str = "") -> Text:
    """`N more ... not shown`: the line under a table that reached TABLE_ROWS."""
    return Text(f"{count:,} more {singular if count == 1 else plural}{detail} not shown; --json for all.",
                style=palette["warning"])


# --- captures and summary ---------------------------------------------------------------------

def _captures(report: Report, palette: _Palette, clock: Clock) -> RenderableType:
    problems = report.get("problems") or []
    lines = []
    for capture in report.get("captures") or []:
        first, last = capture.get("first_ts"), capture.get("last_ts")
        span = f" ({human_duration(last - first)})" if first is not None and last is not None else ""
        line = Text.assemble(_text(capture.get("file") or "-", palette["heading"]), ": ")
        own = [p for p in problems if p.get("file") == capture.get("file")]
        fatal = sum(1 for p in own if p.get("fatal"))
        complete = capture.get("complete", True)
        line.append("complete" if complete else "INCOMPLETE", palette["ok"] if complete else palette["bad"])
        if own:
            line.append(f" ({_plural(len(own), 'problem')}" + (f", {fatal} fatal)" if fatal else ")"),
                        palette["warning"] if complete else palette["bad"])
        if not capture.get("format"):
            line.append(", not read as a capture")  # the problem says why
        else:
            line.append(f", {capture['format']}, {_plural(capture.get('frames') or 0, 'frame')}, "
                        f"{human_size(capture.get('bytes'))}")
            if first is not None:
                line.append(f", {clock.datetime(first)[:-4]} → {clock.time(last)} UTC{span}")
        lines.append(line)
        skew = capture.get("clock_skew")
        if skew:
            lines.append(Text(f"  clock skew: {skew_sentence(skew)}", style=palette["warning"]))
    legend = capture_legend(report)
    if legend:
        lines.append(Text(legend, style=palette["dim"]))
    return Group(*lines) if lines else Text("no capture read")


def _summary(report: Report, palette: _Palette) -> Text:
    summary = report["summary"]
    counts = summary.get("anomalies") or {}
    line = Text(f"{_plural(summary.get('sessions', 0), 'BITS upload session')}: ", style=palette["heading"])
    for number, label, style in ((summary.get("delivered", 0), "delivered", "ok"),
                                 (summary.get("not_delivered", 0), "not delivered", "bad"),
                                 (summary.get("unknown", 0), "unknown", "unknown")):
        line.append(f"{number:,} {label}", palette[style] if number else Style.null())
        line.append(", " if label != "unknown" else "   anomalies: ")
    by_severity = {"error": counts.get("error", 0), "warning": counts.get("warning", 0), "info": counts.get("info", 0)}
    for severity in SEVERITIES:
        number = by_severity[severity]
        line.append(_plural(number, severity) if severity != "info" else f"{number:,} info",
                    palette[severity] if number else Style.null())
        line.append(", " if severity != "info" else "")
    return line


# --- sessions ----------------------------------------------------------------------------------

class _ColumnOptions(TypedDict, total=False):
    """What `Table.add_column` takes, of what the sessions table sets."""

    no_wrap: bool
    overflow: OverflowMethod
    justify: JustifyMethod
    min_width: int
    max_width: int
    ratio: int


#: The sessions table's columns: header, the console width from which it is shown (narrow
#: terminals keep the essentials), column options.
_SESSION_COLUMNS: tuple[tuple[str, int, _ColumnOptions], ...] = (
    ("Session", 0, {"no_wrap": True}),
    ("Client", 100, {"overflow": "fold", "min_width": 15, "max_width": 23}),
    ("URL", 0, {"overflow": "fold", "ratio": 1, "min_width": 20}),
    ("State", 110, {"overflow": "fold", "min_width": 8, "max_width": 10}),
    ("Verdict", 0, {"no_wrap": True}),
    ("Acked/total", 0, {"no_wrap": True, "justify": "right"}),
    ("Frags", LOG_WIDTH, {"no_wrap": True, "justify": "right"}),
    ("Start", WIDE, {"no_wrap": True}),
    ("Time", LOG_WIDTH, {"no_wrap": True, "justify": "right"}),
    ("Rate", LOG_WIDTH, {"no_wrap": True, "justify": "right"}),
    ("E/W/I", 0, {"no_wrap": True, "justify": "right"}),
)


def _session_cells(session: SessionRecord, ids: dict[str, str], palette: _Palette, clock: Clock) -> dict[str, Text]:
    verdict = session.get("verdict") or "unknown"
    name = _text(_short_id(session.get("id"), ids))
    if session.get("before_capture"):
        name.append("*", palette["dim"])
    return {
        "Session": name,
        "Client": _text(session.get("client")),
        "URL": _text(clip(printable(session.get("url")), URL_LIMIT)),
        "State": _text(session.get("state")),
        "Verdict": _text(verdict, palette[_VERDICT_STYLE.get(verdict, "unknown")]),
        "Acked/total": Text(compact_progress(session)),
        "Frags": Text(count(session.get("fragments", 0))),
        "Start": Text(clock.time(session.get("first_ts"))),
        "Time": Text(human_duration(session.get("duration_s"), compact=True)),
        "Rate": Text(human_rate(session.get("throughput_bps"), compact=True)),
        "E/W/I": _severity_cell(session.get("anomalies") or [], palette),
    }


def _short_id(session_id: str | None, ids: dict[str, str]) -> str:
    return "(no id)" if session_id is None else ids.get(session_id, "(no id)")


def _unread_tls(report: Report) -> int:
    """TLS connections of the report's captures that could not be decrypted."""
    return sum(1 for capture in report["captures"] for item in capture.get("tls") or [] if not item.get("decrypted"))


def _sessions(sessions: list[SessionRecord], ids: dict[str, str], palette: _Palette, clock: Clock,
              width: int, unread_tls: int = 0) -> RenderableType:
    unseen = (f"{_plural(unread_tls, 'TLS connection')} could not be decrypted: sessions in "
              f"{'it are' if unread_tls == 1 else 'them are'} not shown (see Problems)") if unread_tls else ""
    if not sessions:
        return Text("No BITS upload sessions in the capture." + (f" {unseen}." if unseen else ""))
    table = _table(palette, title=f"Sessions ({len(sessions):,})")
    columns = [(header, options) for header, from_width, options in _SESSION_COLUMNS if width >= from_width]
    for header, options in columns:
        table.add_column(header, **options)
    listed, flagged_left, healthy_left = _first_rows(sessions, needs_a_look)
    rows = []
    for session in listed:
        cells = _session_cells(session, ids, palette, clock)
        rows.append([cells[header] for header, _ in columns])
    _add_rows(table, rows, palette, width)
    parts: list[RenderableType] = [table]
    if flagged_left:
        parts.append(_left_out(flagged_left, "session that needs a look", "sessions that need a look", palette,
                               " (not delivered, or a warning or an error)"))
    if healthy_left:
        parts.append(_left_out(healthy_left, "healthy session", "healthy sessions", palette,
                               " (delivered, no warning or error)"))
    legend = "E/W/I: anomalies by severity (error/warning/info)"
    if any(s.get("before_capture") for s in listed):
        legend += "; * already running when the capture began"
    if len(columns) < len(_SESSION_COLUMNS) - 1:
        legend += f"; a wider terminal ({LOG_WIDTH}+ columns) shows more columns"
    if unseen:
        legend += f"; {unseen}"
    return Group(*parts, Text(legend, style=palette["dim"]))


def _what_happened(sessions: list[SessionRecord], ids: dict[str, str], palette: _Palette, packets: Packets | None,
                   several: bool) -> list[RenderableType]:
    """Under the sessions table: for each session that needs a look (worst first) and each with a
    story, its verdict's reason and its story; at most TABLE_ROWS sessions, the rest counted."""
    told = sorted((n for n, s in enumerate(sessions) if needs_a_look(s) or has_story(s)),
                  key=lambda n: (not needs_a_look(sessions[n]), look_order(sessions[n])))
    if not told:
        return []
    links = recreations(sessions, several)
    lines: list[RenderableType] = [_heading("What happened", palette)]
    for index in told[:TABLE_ROWS]:
        session = sessions[index]
        if packets is not None and not session.get("packets") and has_story(session):
            session = {**session, "packets": packets(index)}
        verdict = session.get("verdict") or "unknown"
        line = Text.assemble(_text(_short_id(session.get("id"), ids)), " ",
                             _text(verdict, palette[_VERDICT_STYLE.get(verdict, "unknown")]), ": ",
                             _text(session.get("verdict_reason") or "no reason given"), ".")
        lines.append(line)
        for sentence in session_story(session, index, links, sessions, ids, several):
            lines.append(Text.assemble("  ", _text(sentence)))  # Padding would pad to the width
    if len(told) > TABLE_ROWS:
        lines.append(_left_out(len(told) - TABLE_ROWS, "session", "sessions", palette, " that need a look or have a story"))
    return [Group(*lines)]


def _severity_cell(anomalies: Iterable[AnomalyRecord], palette: _Palette) -> Text:
    """`2/0/1`: the anomalies by severity, error/warning/info."""
    counts = severity_counts(anomalies)
    text = Text()
    for index, severity in enumerate(SEVERITIES):
        if index:
            text.append("/", palette["dim"])
        number = counts[severity]
        text.append(f"{number:,}", palette[severity] if number else palette["dim"])
    return text


# --- anomalies ---------------------------------------------------------------------------------

def _anomalies(shown: list[AnomalyRecord], hidden: int, min_severity: str, ids: dict[str, str],
               palette: _Palette, clock: Clock, width: int, several: bool) -> RenderableType:
    notes: list[RenderableType] = []
    if hidden:
        notes.append(Text(f"{_plural(hidden, 'anomaly', 'anomalies')} below {min_severity} not shown.",
                          style=palette["dim"]))
    if not shown:
        return Group(Text("No anomalies at this severity."), *notes) if notes else Text("No anomalies.")
    title = f"Anomalies ({len(shown):,}), worst first"
    ordered = sorted(shown, key=anomaly_order)
    listed, left = ordered[:TABLE_ROWS], ordered[TABLE_ROWS:]
    if left:
        counted = ", ".join(f"{number:,} {severity}" for severity, number in severity_counts(left).items() if number)
        notes.insert(0, _left_out(len(left), "anomaly", "anomalies", palette, f" ({counted})"))
    rows = [_anomaly_cells(anomaly, ids, palette, clock, several) for anomaly in listed]
    table: RenderableType
    if width < NARROW:
        # A table's message column would be a few characters wide: one heading line per
        # anomaly instead, its message indented below.
        lines: list[RenderableType] = [_heading(title, palette)]
        for severity, code, where, frames, time, message in rows:
            lines.append(Text.assemble(severity, " ", code, " ", where, f" frames {frames.plain} at {time.plain}"))
            lines.append(Padding(message, (0, 0, 0, 4)))
        table = Group(*lines)
    else:
        table = _table(palette, title=title)
        table.add_column("Severity", no_wrap=True)
        table.add_column("Code", no_wrap=True)
        table.add_column("Session", no_wrap=True)
        table.add_column("Frames", overflow="fold", max_width=16)
        table.add_column("Time", no_wrap=True)
        table.add_column("Message", overflow="fold", ratio=1)
        _add_rows(table, rows, palette, width)
    return Group(table, *notes) if notes else table


def _anomaly_cells(anomaly: AnomalyRecord, ids: dict[str, str], palette: _Palette, clock: Clock,
                   several: bool) -> tuple[Text, ...]:
    severity = anomaly.get("severity") or "?"
    session = anomaly.get("session")
    if session is not None:
        where = _text(ids.get(session, session))
    elif anomaly.get("connection") is not None:
        where = Text(f"stream {anomaly['connection']}", style=palette["dim"])
    else:
        where = Text("—", style=palette["dim"])
    return (Text(severity, style=palette[severity] if severity in SEVERITIES else palette["error"]),
            _text(anomaly.get("code"), palette["code"]), where, Text(anomaly_frames(anomaly, several)),
            Text(clock.time(anomaly.get("ts"))), _text(anomaly.get("message") or anomaly.get("meaning")))


# --- downloads, counts, problems ---------------------------------------------------------------

def _extracted(files: list[tuple[SessionRecord, ExtractedRecord]], ids: dict[str, str], palette: _Palette,
               width: int) -> RenderableType:
    """The extracted files (each with its session), the incomplete ones first."""
    table = _table(palette, title=f"Extracted files ({len(files):,})")
    table.add_column("Session", no_wrap=True)
    table.add_column("File", overflow="fold", ratio=1)
    table.add_column("Complete", no_wrap=True)
    table.add_column("SHA-256", overflow="fold", max_width=64)
    listed, partial_left, complete_left = _first_rows(files, lambda file: not file[1].get("complete"))
    rows = []
    for session, extracted in listed:
        complete = bool(extracted.get("complete"))
        rows.append((_text(_short_id(session.get("id"), ids)), _text(extracted.get("path")),
                     Text("yes" if complete else "NO", style=palette["ok"] if complete else palette["bad"]),
                     _text(extracted.get("sha256") or "—")))
    _add_rows(table, rows, palette, width)
    notes = [_left_out(count, f"{kind} extracted file", f"{kind} extracted files", palette)
             for count, kind in ((partial_left, "incomplete"), (complete_left, "complete")) if count]
    return Group(table, *notes) if notes else table


def _downloads(downloads: list[DownloadRecord], palette: _Palette, clock: Clock, width: int) -> RenderableType:
    table = _table(palette, title=f"Downloads ({len(downloads):,})")
    table.add_column("Client", overflow="fold", max_width=23)
    table.add_column("Method", no_wrap=True)
    table.add_column("URL", overflow="fold", ratio=1)
    table.add_column("Status", no_wrap=True, justify="right")
    table.add_column("Bytes", no_wrap=True, justify="right")
    table.add_column("User-Agent", overflow="fold", max_width=24)
    table.add_column("Time", no_wrap=True)
    listed = downloads[:TABLE_ROWS]
    rows = [(_text(download.get("client")), _text(download.get("method")),
             _text(clip(printable(download.get("url")), URL_LIMIT)),
             Text(str(download.get("status") or "—")), Text(human_size(download.get("bytes"))),
             _text(download.get("user_agent")), Text(clock.time(download.get("ts"))))
            for download in listed]
    _add_rows(table, rows, palette, width)
    if len(downloads) > len(listed):
        return Group(table, _left_out(len(downloads) - len(listed), "download", "downloads", palette))
    return table


def _counts(report: Report, palette: _Palette) -> RenderableType:
    summary = report["summary"]
    lines = [_heading("Counts", palette),
             Text(f"HTTP exchanges {summary.get('http_exchanges', 0):,}: "
                  f"{summary.get('bits_exchanges', 0):,} BITS, {summary.get('other_http', 0):,} other "
                  f"(downloads: {summary.get('downloads', 0):,})")]
    for capture in report.get("captures") or []:
        line = Text.assemble(_text(capture.get("file") or "-", palette["dim"]))
        line.append(f": {_plural(capture.get('connections') or 0, 'TCP connection')}, "
                    f"{_plural(capture.get('exchanges') or 0, 'HTTP exchange')}")
        for layer, every in (("decoder", capture.get("decoder") or {}), ("tcp", capture.get("tcp") or {})):
            counters = {k: v for k, v in every.items() if v}
            if counters:
                line.append(f"; {layer} " + ", ".join(f"{printable(k)} {v:,}" if isinstance(v, int)
                                                       else f"{printable(k)} {printable(v)}"
                                                       for k, v in counters.items()))
        lines.append(line)
        if capture.get("tls"):
            lines.append(_tls_counts(capture["tls"], palette))
    return Group(*lines)


def _tls_counts(connections: list[dict[str, object]], palette: _Palette) -> Text:
    """TLS connections by version and suite, and how many could not be read (their exchanges
    are missing from the report)."""
    kinds: dict[str, int] = {}
    for item in connections:
        kind = " ".join(printable(v) for v in (item.get("version"), item.get("cipher_suite")) if v) or "unknown"
        kinds[kind] = kinds.get(kind, 0) + 1
    unread = sum(1 for item in connections if not item.get("decrypted"))
    resumed = sum(1 for item in connections if item.get("resumed"))
    line = Text(f"  {_plural(len(connections), 'TLS connection')}: " +
                ", ".join(f"{count:,} {kind}" for kind, count in kinds.items()) +
                f"; {resumed:,} resumed; {len(connections) - unread:,} decrypted")
    if unread:
        line.append(f"; {unread:,} not decrypted: their HTTP exchanges are not in this report",
                    palette["warning"])
    return line


def _problems(problems: list[ProblemRecord], palette: _Palette) -> RenderableType:
    table = _table(palette, title=f"Problems reading the input ({len(problems):,})")
    table.add_column("Kind", no_wrap=True)
    table.add_column("Where", overflow="fold", max_width=40)
    table.add_column("Message", overflow="fold", ratio=1)
    for problem in problems:
        place = ", ".join(part for part in (
            printable(problem.get("file")) or None,
            f"frame {problem['frame']}" if problem.get("frame") is not None else None,  # a frame number: no separator
            f"stream {problem['connection']}" if problem.get("connection") is not None else None,
            f"offset {problem['offset']:,}" if problem.get("offset") is not None else None,
        ) if part)
        kind = _text(problem.get("kind"), palette["bad"] if problem.get("fatal") else palette["warning"])
        if problem.get("fatal"):
            kind.append(" (fatal)")
        table.add_row(kind, Text(place), _text(problem.get("message")))
    return table


def _plural(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number:,} {singular if number == 1 else plural or singular + 's'}"
