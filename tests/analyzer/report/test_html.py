"""The HTML report, rendered from schema-v1 report dicts (tests/support/report_fixtures.py): a
well-formed, self-contained page that shows hostile capture strings as text; and, when Debian's
chromium is installed, the page as a real browser renders it."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.support import report_fixtures as fx
from bitstrace.analyzer.report.html import MAX_TIMELINES, render_html
from bitstrace.analyzer.report.timeline import MAX_FRAGMENT_BARS

VOID = {"meta", "br", "input", "link", "img", "hr", "col", "wbr", "source", "area", "base", "embed", "track"}
SVG_LEAVES = {"rect", "circle", "line", "path", "polyline", "polygon"}  # written self-closed


class PageParser(HTMLParser):
    """Checks nesting and collects tags, attributes and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    return parser


def svgs(page: str) -> list[ET.Element]:
    return [ET.fromstring(match) for match in re.findall(r"<svg\b.*?</svg>", page, re.S)]


def timelines(page: str) -> list[ET.Element]:
    return [svg for svg in svgs(page) if svg.get("class") == "timeline"]


def test_page_is_well_formed_and_its_svg_is_xml():
    page = render_html(fx.corpus_report())
    assert page.startswith("<!DOCTYPE html>")
    parsed = parse(page)
    assert [tag for tag, _ in parsed.tags].count("html") == 1
    drawn = svgs(page)  # raises if any SVG is not well-formed XML
    assert len(drawn) == 1 + 6  # the legend and one timeline per session


def test_self_contained_one_script_allowed_by_its_hash_no_external_reference():
    for report in (fx.corpus_report(), fx.hostile_report()):
        page = render_html(report)
        parsed = parse(page)
        tags = [tag for tag, _ in parsed.tags]
        assert not set(tags) & {"link", "img", "iframe", "object", "embed"}
        assert tags.count("script") == 1
        for tag, attrs in parsed.tags:
            assert "src" not in attrs
            if "href" in attrs:
                assert attrs["href"].startswith("#"), (tag, attrs)
            assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        style = page[page.index("<style>"):page.index("</style>")]
        assert "url(" not in style and "@import" not in style and "http" not in style
        csp = next(a["content"] for t, a in parsed.tags if t == "meta" and a.get("http-equiv"))
        script = page[page.index("<script>") + len("<script>"):page.index("</script>")]
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
        assert directives["default-src"] == "'none'" and directives["script-src"] == f"'sha256-{digest}'"
        assert "fetch" not in script and "XMLHttpRequest" not in script and "http" not in script


def test_hostile_strings_render_as_text():
    report = fx.hostile_report()
    page = render_html(report)
    parsed = parse(page)
    text = "".join(parsed.text)
    titles = " ".join(el.text or "" for svg in svgs(page) for el in svg.iter("title"))
    for name, value in fx.HOSTILE.items():
        shown = value.replace("\x1b", "\\x1b").replace("\u202e", "\\u202e")
        assert value not in page or "<" not in value, name
        assert shown in text or shown in titles or any(shown in (v or "") for _, a in parsed.tags for v in a.values()), name
    assert "<script>alert(4)</script>" in text  # the session id, as text
    # Nothing from the capture became an element: only the renderer's own tags are there.
    assert {tag for tag, _ in parsed.tags} <= {
        "html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "h3", "p", "div", "b", "span",
        "a", "table", "thead", "tbody", "tr", "th", "td", "code", "br", "input", "label", "section", "header",
        "dl", "dt", "dd", "ul", "li", "i", "svg", "g", "text", "title", "footer", "details", "summary",
        "nav", "select", "option", "button", "noscript", "script", *SVG_LEAVES}
    # The tag <b> is the renderer's (cards), never the client address's.
    assert "&lt;b&gt;127.0.0.1:1&lt;/b&gt;" in page


def test_one_timeline_per_session_with_its_marks():
    report = fx.corpus_report()
    page = render_html(report)
    drawn = timelines(page)
    assert len(drawn) == len(report["sessions"])
    by_label = {svg.get("aria-label"): svg for svg in drawn}
    resync = by_label[f"timeline of session {fx.ID_RESYNC}"]
    classes = [el.get("class") for el in resync.iter()]
    assert classes.count("f-ok") == 4 and classes.count("f-416") == 1
    assert "ack416" in classes and "ackline" in classes
    assert classes.count("m-error") == 1 and classes.count("m-info") == 1  # range-gap, out-of-sync
    cancelled = by_label[f"timeline of session {fx.ID_CANCELLED}"]
    classes = [el.get("class") for el in cancelled.iter()]
    assert "ev ev-cancel" in classes and "f-err" in classes
    truncated = by_label[f"timeline of session {fx.ID_TRUNCATED}"]
    assert [el.get("class") for el in truncated.iter()].count("f-none") == 1
    tooltip = " ".join(el.text for el in resync.iter("title"))
    assert "range-gap" in tooltip and "starts past the acknowledged offset 100000" in tooltip
    assert "416 at frame" in tooltip


def test_fragment_detail_is_capped_and_says_so():
    page = render_html(fx.with_fragments(2000))
    (svg,) = timelines(page)
    rects = [el for el in svg.iter("rect") if el.get("class", "").startswith("f-")]
    assert 0 < len(rects) <= MAX_FRAGMENT_BARS
    assert "2,000 fragments" in page and "aggregated into" in page
    small = render_html(fx.with_fragments(40))
    (svg,) = timelines(small)
    assert len([el for el in svg.iter("rect") if el.get("class") == "f-ok"]) == 40
    assert "aggregated into" not in small


def test_sections_and_many_sessions():
    page = render_html(fx.corpus_report())
    for anchor in ("sessions", "anomalies", "problems", "downloads", "timelines", "captures"):
        assert f'id="{anchor}"' in page
    assert "truncated-record" in page and "✗ incomplete" in page
    # 1,000 sessions, every fifth cancelled: the 200 that need a look lead, 100 of them drawn.
    page = render_html(fx.many_sessions(1000, fragments=4))
    assert len(timelines(page)) == MAX_TIMELINES
    assert "100 more sessions need a look; their timelines are left out" in page
    assert "Sessions (1,000)" in page and "need a look (200)" in page
    assert len(page) < 1_500_000


def test_sparse_values():
    page = render_html(fx.sparse_report())
    parse(page)
    assert len(timelines(page)) == 2 and "(no id)" in page and "no fragments in the capture" in page
    assert "out/A0FF5911_report.bin (incomplete" in page


def test_empty_report():
    page = render_html(fx.empty_report())
    parse(page)
    assert "No BITS upload sessions in the capture." in page and timelines(page) == []


# --- a real browser ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")


def chromium(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--window-size=1280,2000", *extra, page.as_uri()],
        capture_output=True, text=True, timeout=60)


def png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the inflated image data (filter bytes included) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks, width, height = 8, [], 0, 0
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    return width, height, zlib.decompress(b"".join(chunks))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_renders_the_page(tmp_path):
    report = fx.corpus_report()
    hostile = fx.hostile_report()
    report["sessions"] += hostile["sessions"]
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")

    shot = tmp_path / "report.png"
    run = chromium(page, tmp_path, f"--screenshot={shot}")
    assert shot.exists(), run.stderr[-2000:]
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1280, 2000)
    row = len(pixels) // height
    distinct_rows = {pixels[i * row + 1:(i + 1) * row] for i in range(height)}
    assert len(distinct_rows) > 200  # text, tables and drawings, not a blank page

    dom = chromium(page, tmp_path, "--dump-dom")
    parsed = parse(dom.stdout[dom.stdout.index("<html"):])
    sections = [a for t, a in parsed.tags if t == "section" and "session" in (a.get("class") or "")]
    assert len(sections) == len(report["sessions"])
    assert len([a for t, a in parsed.tags if t == "svg" and a.get("class") == "timeline"]) == len(report["sessions"])
    assert not [t for t, _ in parsed.tags if t in ("img", "iframe")]
    for run in (dom,):
        assert "Uncaught" not in run.stderr
        assert "Content Security Policy" not in run.stderr  # nothing tried to load or run
    assert html.escape("<script>alert(4)</script>", quote=False) in dom.stdout


def test_idle_stretches_are_cut_out_of_the_time_axis():
    """Retries 10 and 20 minutes apart: the tries fill the plot, each wait is a narrow break."""
    page = render_html(fx.idle_retries())
    (svg,) = timelines(page)
    breaks = [el for el in svg.iter("rect") if el.get("class") == "idle"]
    assert len(breaks) == 2
    spans = sorted((float(el.get("x")), float(el.get("x")) + float(el.get("width"))) for el in breaks)
    fragments = [el for el in svg.iter("rect") if el.get("class") == "f-ok"]
    assert len(fragments) == 16
    lefts = [float(el.get("x")) for el in fragments]
    assert lefts == sorted(lefts)
    for el in fragments:  # no fragment in a break
        left, right = float(el.get("x")), float(el.get("x")) + float(el.get("width"))
        assert all(right <= a + 0.1 or left >= b - 0.1 for a, b in spans)
    # The three tries: 4, 6 and 6 fragments, each try spread over a good part of the plot.
    tries = [[x for x in lefts if x < spans[0][0]], [x for x in lefts if spans[0][1] <= x < spans[1][0]],
             [x for x in lefts if x >= spans[1][1]]]
    assert [len(t) for t in tries] == [4, 6, 6]
    assert all(max(t) - min(t) > 150 for t in tries)
    titles = " ".join(el.text or "" for el in svg.iter("title"))
    assert "10 m 00 s without a packet" in titles and "20 m 00 s without a packet" in titles
    labels = [el.text for el in svg.iter("text") if (el.text or "").startswith("+")]
    assert labels[0] == "+0 ms" and labels[-1] == "+30 m 00 s"
    assert "The time axis skips 2 idle stretches (the longest 20 m 00 s)" in page


def test_short_sessions_keep_a_linear_time_axis():
    page = render_html(fx.corpus_report())
    assert all(el.get("class") != "idle" for svg in timelines(page) for el in svg.iter("rect"))
    assert "idle stretch" not in page


def test_reply_fetch_is_drawn_on_its_sessions_timeline():
    report = fx.corpus_report()
    page = render_html(report)
    by_label = {svg.get("aria-label"): svg for svg in timelines(page)}
    for session_id, svg in ((s["id"], by_label[f"timeline of session {s['id']}"]) for s in report["sessions"]):
        fetches = [g for g in svg.iter("g") if any(el.get("class") == "ev ev-fetch" for el in g)]
        if session_id != fx.ID_REPLY:
            assert fetches == []
            continue
        (fetch,) = fetches
        assert fetch.find("title").text.startswith("reply fetched: GET /upload-reply/BITS-Sessions/Replies/")
        assert "at frame 1:205; 200, 1.31 KiB" in fetch.find("title").text  # two captures: file 1
        assert fetch.find("text").text == "GET"
        # Between the final fragment's ack and the Close, as on the wire.
        x = float(fetch.find("line").get("x1"))
        close = next(g for g in svg.iter("g") if any(el.get("class") == "ev ev-close" for el in g))
        assert x < float(close.find("line").get("x1"))
    assert "127.0.0.1:50440" in page and "11:10:42.330" in page  # the downloads table has its time
