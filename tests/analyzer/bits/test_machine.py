"""The session state table: its shape, and the transitions that raise anomalies."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import pytest

from bitstrace.analyzer.bits.catalogue import CATALOGUE
from bitstrace.analyzer.bits.machine import ALL, TRANSITIONS, Answer, Sent, State, Transition, step
from tests.support import REPO

REPOSITORY = REPO
# The protocol page the catalogue, the state tables and the source comments refer to.
PROTOCOL_PAGE = REPOSITORY / "docs" / "protocol.md"

SESSION_STATES = (State.JOINED, State.RECEIVING, State.COMPLETE, State.CLOSED, State.CANCELLED, State.EXPIRED)
SESSION_EVENTS = (Sent.FRAGMENT, Sent.CLOSE, Sent.CANCEL, Sent.PING)


def test_table_is_total_over_every_event_a_session_can_see() -> None:
    for state in SESSION_STATES:
        for event in SESSION_EVENTS:
            for reply in ALL:
                assert (state, event, reply) in TRANSITIONS, (state, event, reply)
    for reply in ALL:
        assert (State.CREATING, Sent.CREATE, reply) in TRANSITIONS
        assert (State.COMPLETE, Sent.FINAL_RESEND, reply) in TRANSITIONS


def test_table_raises_only_catalogued_codes() -> None:
    raised = {t.anomaly for t in TRANSITIONS.values() if t.anomaly}
    assert raised <= set(CATALOGUE)
    assert raised == {"fragment-after-cancel", "fragment-after-close", "cancel-after-complete",
                      "packet-after-end", "close-incomplete", "fragment-after-complete"}


def test_ended_states_are_absorbing() -> None:
    for (state, _, _), transition in TRANSITIONS.items():
        if state in (State.CLOSED, State.CANCELLED):
            assert transition.next is state


@pytest.mark.parametrize("state,sent,reply,expected", [
    (State.CREATING, Sent.CREATE, Answer.ACKED, Transition(State.RECEIVING)),
    (State.CREATING, Sent.CREATE, Answer.REFUSED, Transition(State.REFUSED)),
    (State.CREATING, Sent.CREATE, Answer.CHALLENGED, Transition(State.CREATING)),
    (State.RECEIVING, Sent.FRAGMENT, Answer.ACKED, Transition(State.RECEIVING)),
    (State.RECEIVING, Sent.FRAGMENT, Answer.RESYNC, Transition(State.RECEIVING)),
    (State.RECEIVING, Sent.FRAGMENT, Answer.COMPLETED, Transition(State.COMPLETE)),
    (State.RECEIVING, Sent.FRAGMENT, Answer.NOT_FOUND, Transition(State.EXPIRED)),
    (State.RECEIVING, Sent.CLOSE, Answer.ACKED, Transition(State.CLOSED, "close-incomplete")),
    (State.RECEIVING, Sent.CANCEL, Answer.ACKED, Transition(State.CANCELLED)),
    (State.JOINED, Sent.CLOSE, Answer.ACKED, Transition(State.CLOSED)),
    (State.JOINED, Sent.FRAGMENT, Answer.COMPLETED, Transition(State.COMPLETE)),
    (State.COMPLETE, Sent.FINAL_RESEND, Answer.COMPLETED, Transition(State.COMPLETE)),
    (State.COMPLETE, Sent.FRAGMENT, Answer.ACKED, Transition(State.COMPLETE, "fragment-after-complete")),
    (State.COMPLETE, Sent.CLOSE, Answer.ACKED, Transition(State.CLOSED)),
    (State.COMPLETE, Sent.CLOSE, Answer.REFUSED, Transition(State.COMPLETE)),
    (State.COMPLETE, Sent.CANCEL, Answer.ACKED, Transition(State.CANCELLED, "cancel-after-complete")),
    (State.CLOSED, Sent.FRAGMENT, Answer.NOT_FOUND, Transition(State.CLOSED, "fragment-after-close")),
    (State.CLOSED, Sent.CLOSE, Answer.ACKED, Transition(State.CLOSED, "packet-after-end")),
    (State.CANCELLED, Sent.FRAGMENT, Answer.ACKED, Transition(State.CANCELLED, "fragment-after-cancel")),
    (State.CANCELLED, Sent.PING, Answer.ACKED, Transition(State.CANCELLED, "packet-after-end")),
    (State.EXPIRED, Sent.FRAGMENT, Answer.ACKED, Transition(State.RECEIVING)),
])
def test_transitions(state: State, sent: Sent, reply: Answer, expected: Transition) -> None:
    assert step(state, sent, reply) == expected


def test_missing_row_keeps_the_state() -> None:
    assert step(State.REFUSED, Sent.FRAGMENT, Answer.ACKED) == Transition(State.REFUSED)


# --- the protocol page (docs/protocol.md) ----------------------------------------------------

_HEADING = re.compile(r"^#{1,4} (?:(\d+(?:\.\d+)*)\.? )?", re.MULTILINE)
_NUMBERED_ITEM = re.compile(r"^(\d+)\. ", re.MULTILINE)


def page_sections(text: str) -> dict[str, str]:
    """Section number -> its text up to the next heading. The numbered list items of a section
    count as its subsections (`5.2.6` is item 6 of section 5.2)."""
    marks = list(_HEADING.finditer(text))
    sections: dict[str, str] = {}
    for mark, following in zip(marks, marks[1:] + [None]):
        if mark.group(1):
            sections[mark.group(1)] = text[mark.end():following.start() if following else len(text)]
    for number, body in list(sections.items()):
        for item in _NUMBERED_ITEM.finditer(body):
            sections.setdefault(f"{number}.{item.group(1)}", "")
    return sections


def catalogue_rows(text: str) -> dict[str, tuple[str, str, str]]:
    """code -> (severity, what, rule) from the table of section 9."""
    section = page_sections(text)["9"]
    rows = re.findall(r"^\| ([a-z-]+) \| (error|warning|info|by status) \| (.+) \| (.+?) \|$", section, re.MULTILINE)
    table = {code: (severity, what, rule) for code, severity, what, rule in rows}
    assert len(table) == len(rows), "a code appears twice in section 9"
    return table


# The sources a rule cites: sections (2.2.7.2), notes, RFCs, Win32 pages, client codes.
_CITATION = re.compile(r"MC-BUP|Win32|RFC \d+|note \d+|BG_E_\w+|\d+(?:\.\d+)+")


def test_page_keeps_the_section_numbering() -> None:
    sections = page_sections(PROTOCOL_PAGE.read_text(encoding="utf-8"))
    expected = {str(n) for n in range(1, 11)} | {"2.1", "2.2", "5.1", "5.2"}
    assert expected <= set(sections)
    assert {f"5.2.{n}" for n in range(1, 7)} <= set(sections)  # the client's six numbered rules


def test_catalogue_matches_protocol_page_section_9() -> None:
    """The catalogue in code and the page's table are two writings of one catalogue: the same
    codes, the same severities, and every source the code cites for a rule cited by the page."""
    rows = catalogue_rows(PROTOCOL_PAGE.read_text(encoding="utf-8"))
    assert set(rows) == set(CATALOGUE)
    for code, (severity, what, rule) in rows.items():
        kind = CATALOGUE[code]
        if severity != "by status":
            assert kind.severity.value == severity, code
        assert what.strip(), code
        page_cites = _CITATION.findall(rule)
        for cited in _CITATION.findall(kind.rule):
            if cited[0].isdigit():
                assert any(c == cited or c.startswith(cited + ".") for c in page_cites), (code, cited, rule)
            else:
                assert cited in page_cites, (code, cited, rule)


# --- section references in the tree -----------------------------------------------------------

_NUMBERS = r"\d+(?:\.\d+)*(?:\s*(?:-|–|,|and)\s*\d+(?:\.\d+)*)*"
# "protocol.md 5.1", "protocol.md (sections 1-4 and 7)", "protocol.md section 9", "protocol.md 1, 2.1, 7"
_AFTER = re.compile(r"protocol\.md\s*\(?\s*(?:sections?\s+)?(" + _NUMBERS + ")")
# "section 9 of the project's bits-protocol.md"
_BEFORE = re.compile(r"sections?\s+(" + _NUMBERS + r")\s+of\s+the\s+[\w'\s-]*?protocol\.md")
_TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".rst", ".sh", ".yml", ".yaml"}
_SKIPPED_DIRS = {"__pycache__", "build", "dist", "node_modules"}


def section_references(line: str) -> list[str]:
    """The section numbers a line cites next to a protocol.md reference; ranges of whole
    sections (`1-4`) expanded."""
    found: list[str] = []
    for match in (*_AFTER.finditer(line), *_BEFORE.finditer(line)):
        for part in re.split(r"\s*(?:,|and)\s*", match.group(1)):
            ends = [end.strip() for end in re.split(r"-|–", part) if end.strip()]
            if len(ends) == 2 and all(end.isdigit() for end in ends):
                found += [str(n) for n in range(int(ends[0]), int(ends[1]) + 1)]
            else:
                found += ends
    return found


@pytest.mark.parametrize("line,expected", [
    ("States follow docs/protocol.md 5.1 as the wire shows them", ["5.1"]),
    ("Reference: docs/protocol.md (sections 1-4 and 7).", ["1", "2", "3", "4", "7"]),
    ("# --- limits (bits-protocol.md 1, 2.1, 7) -----", ["1", "2.1", "7"]),
    ("the client's response timer (docs/protocol.md 5.2.6)", ["5.2.6"]),
    ("looks like a Windows client on the wire (docs/protocol.md 5.2, 8).", ["5.2", "8"]),
    ("each session its delivery verdict (docs/protocol.md section 9):", ["9"]),
    ("anomaly codes (section 9 of the project's bits-protocol.md), verbatim", ["9"]),
    ("Behaviour (docs/protocol.md 1-7; the state transitions", ["1", "2", "3", "4", "5", "6", "7"]),
    ("one test per rule of docs/protocol.md.", []),
])
def test_section_references_are_read_from_a_line(line: str, expected: list[str]) -> None:
    assert section_references(line) == expected


def _text_files(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in _SKIPPED_DIRS
                   and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder, name)
            if path.suffix in _TEXT_SUFFIXES and path != PROTOCOL_PAGE:
                yield path


def test_every_section_reference_in_the_tree_exists_in_the_page() -> None:
    sections = page_sections(PROTOCOL_PAGE.read_text(encoding="utf-8"))
    cited: list[tuple[str, str]] = []
    for path in _text_files(REPOSITORY):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if "protocol.md" in line:
                cited += [(f"{path.relative_to(REPOSITORY)}:{number}", section) for section in section_references(line)]
    assert cited, "no section reference to protocol.md found anywhere in the tree"
    missing = [(place, section) for place, section in cited if section not in sections]
    assert not missing, f"references to sections the page does not have: {missing}"
