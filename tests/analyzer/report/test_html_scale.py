"""The HTML report of 2,000 sessions from real traffic (single-fragment.pcap's session replicated
with new ids and ports by captures/replicate_session.py) read together with corpus captures whose
sessions need a look: a page of a few megabytes, problem sessions first with their story and
timeline, and a table that sorts and filters in a real browser (Debian's headless Chromium,
driven over the DevTools protocol; skipped when it is not installed). Correctness only: the
time a browser takes is measured by bench/html_scale.py."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.support.headless_chromium import CHROMIUM, Browser
from tests.analyzer.report.test_text_scale import replicate_session

from bitstrace.analyzer.report.html import MAX_TIMELINES, PAGE_ROWS
from tests.support import REPO

ROOT = REPO
BITS_ANALYZE = Path(sys.executable).parent / "bits-analyze"
COPIES = 2_000
PROBLEMS = ["fragment-after-cancel.pcap", "session-not-found.pcap", "close-incomplete.pcap", "never-finished.pcap",
            "connection-cut-resume.pcap", "host-id-redirect.pcapng"]
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("html-scale")
    many = folder / "2000-sessions.pcap"
    replicate_session().write_replicated(many, COPIES)
    out = folder / "report.html"
    run = subprocess.run([BITS_ANALYZE, "--no-progress", "--html", out, many,
                          *(ROOT / "captures" / name for name in PROBLEMS)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return out


class Sections(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.rows: list[dict[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "section":
            self.sections.append(attributes.get("id") or "")
        elif tag == "tr" and "data-kind" in attributes:
            self.rows.append(attributes)


def test_page_is_small_problems_lead_and_counts_are_grouped(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert len(text.encode()) < 5_000_000
    parsed = Sections()
    parsed.feed(text)
    sessions = COPIES + 7  # session-not-found.pcap holds two
    assert f"Sessions ({sessions:,})" in text and f"all {sessions:,} sessions" in text
    # Five need a look (cancelled, expired, closed incomplete, unknown, a lost answer): drawn,
    # before the table; the healthy thousands are rows only.
    assert "Sessions that need a look (5), worst first" in text
    assert len(parsed.sections) == 5 <= MAX_TIMELINES
    assert text.index("id=\"look\"") < text.index("id=\"sessions\"") < text.index("id=\"anomalies\"")
    kinds = [row["data-kind"] for row in parsed.rows]
    assert kinds[:5] == ["look"] * 5 and set(kinds[5:]) == {"ok"} and len(kinds) == sessions
    assert [("hidden" in row) for row in parsed.rows] == [False] * PAGE_ROWS + [True] * (sessions - PAGE_ROWS)
    # The stories, in words, and the verdicts' reasons in plain text.
    # The run numbers connections over all its captures: the cut one is not connection 0 here.
    assert re.search(r"Connection (\d+) closed mid-fragment \(bytes 32768-65535: 10,000 of 32,768 body bytes sent, "
                     r"no ack\); resumed on connection (\d+) from byte 32768\.", text)
    assert "the client created session" in text and "BITS-Host-Id bitsnode1" in text
    assert "<span class=\"why\">cancelled before the final fragment was acknowledged</span>" in text


@needs_chromium
def test_chromium_shows_problems_first_sorts_and_filters(page: Path) -> None:
    sessions = COPIES + 7
    with Browser(width=1280, height=900) as browser:
        browser.open(page)
        shown = "[].filter.call(document.querySelectorAll('#all-sessions tbody tr'), r => r.offsetParent !== null)"
        # The first screen: the summary, then the problem sessions, their reasons and stories visible.
        first = browser.evaluate("document.querySelector('section.session').getBoundingClientRect().top")
        assert 0 < first < 900
        assert browser.evaluate("document.querySelector('section.session .why').innerText") == \
            "cancelled before the final fragment was acknowledged"
        # The cut connection's story, in its section, in words a reader sees (not a tooltip).
        story = ("[].find.call(document.querySelectorAll('section.session ul.story'), "
                 "u => u.textContent.includes('closed mid-fragment'))")
        browser.evaluate(f"{story}.scrollIntoView()")
        browser.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
        assert re.match(r"Connection \d+ closed mid-fragment", browser.evaluate(f"{story}.innerText"))
        assert browser.evaluate(f"{story}.getBoundingClientRect().height") > 10
        assert browser.evaluate("document.querySelector('[data-for=all-sessions]').hidden") is False
        assert browser.evaluate(f"{shown}.length") == PAGE_ROWS
        assert browser.evaluate(f"{shown}.slice(0, 5).every(r => r.dataset.kind === 'look')")

        # Sort by Frags (a number column): ascending, then descending on a second click.
        column = browser.evaluate("[].findIndex.call(document.querySelectorAll('#all-sessions th'), "
                                  "th => th.textContent === 'Frags')")
        values = f"{shown}.map(r => parseFloat(r.cells[{column}].textContent.replace(/,/g, '')))"
        browser.evaluate(f"document.querySelectorAll('#all-sessions th')[{column}].click()")
        ascending = browser.evaluate(values)
        assert ascending == sorted(ascending) and ascending[0] == 1 and len(ascending) == PAGE_ROWS
        assert browser.evaluate(f"document.querySelectorAll('#all-sessions th')[{column}].getAttribute('aria-sort')") \
            == "ascending"
        browser.evaluate(f"document.querySelectorAll('#all-sessions th')[{column}].click()")
        descending = browser.evaluate(values)
        assert descending == sorted(descending, reverse=True) and descending[0] == 7  # connection-cut-resume's 7
        # Sort by URL (text).
        url = browser.evaluate("[].findIndex.call(document.querySelectorAll('#all-sessions th'), th => th.textContent === 'URL')")
        browser.evaluate(f"document.querySelectorAll('#all-sessions th')[{url}].click()")
        urls = browser.evaluate(f"{shown}.map(r => r.cells[{url}].textContent.toLowerCase())")
        assert urls == sorted(urls)

        # The filter hides the rows that do not match; the count follows.
        browser.evaluate("const q = document.querySelector('[data-for=all-sessions] input'); q.value = '000007CF';"
                         "q.dispatchEvent(new Event('input'))")
        assert browser.evaluate(f"{shown}.map(r => r.cells[0].textContent)") == ["000007CF…"]
        assert browser.evaluate("document.querySelector('[data-for=all-sessions] .matching').textContent") == "1"
        browser.evaluate("const q2 = document.querySelector('[data-for=all-sessions] input'); q2.value = '';"
                         "q2.dispatchEvent(new Event('input'));"
                         "const k = document.querySelector('[data-for=all-sessions] select'); k.value = 'look';"
                         "k.dispatchEvent(new Event('change'))")
        assert browser.evaluate(f"{shown}.length") == 5
        assert browser.evaluate(f"{shown}.every(r => r.dataset.kind === 'look')")
        # All healthy ones, then every one of them past the first page.
        browser.evaluate("const k2 = document.querySelector('[data-for=all-sessions] select'); k2.value = 'ok';"
                         "k2.dispatchEvent(new Event('change'))")
        assert browser.evaluate(f"{shown}.length") == PAGE_ROWS
        assert browser.evaluate("document.querySelector('[data-for=all-sessions] .matching').textContent") == \
            f"{sessions - 5:,}"
        browser.evaluate("document.querySelector('[data-for=all-sessions] button').click()")
        assert browser.evaluate(f"{shown}.length") == sessions - 5
        assert browser.console_messages() == []  # no error, nothing refused by the CSP
