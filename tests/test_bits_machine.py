"""The session state table: its shape, and the transitions that raise anomalies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bitstrace.analyzer.bits.catalogue import CATALOGUE
from bitstrace.analyzer.bits.machine import ALL, TRANSITIONS, Answer, Sent, State, Transition, step

# The team's protocol reference lives beside the repository (CI lays a copy of shared/ there too).
SPEC = Path(__file__).resolve().parent.parent.parent / "shared" / "bits-protocol.md"

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


README = Path(__file__).resolve().parent.parent / "README.md"
_ROW = re.compile(r"^\| ([a-z-]+) \| (error|warning|info|by status) \|.*\| ([^|]+) \|$", re.MULTILINE)


def _readme_rows() -> list[tuple[str, str, str]]:
    """The README's table of codes the reference's section 9 does not list yet."""
    section = README.read_text().split("does not list yet", 1)[1].split("\n\n", 2)[1]
    return _ROW.findall(section)


@pytest.mark.skipif(not SPEC.exists(), reason="shared spec not present")
def test_catalogue_matches_spec_section_9() -> None:
    section = SPEC.read_text().split("## 9.", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([a-z-]+) \| (error|warning|info|by status) \|", section, re.MULTILINE)
    own = [(code, severity) for code, severity, _ in _readme_rows()]
    assert rows and not {code for code, _ in rows} & {code for code, _ in own}  # listed once
    assert {code for code, _ in rows + own} == set(CATALOGUE)
    for code, severity in rows + own:
        if severity != "by status":
            assert CATALOGUE[code].severity.value == severity, code


def test_codes_beyond_the_reference_are_documented_as_catalogued() -> None:
    rows = _readme_rows()
    assert {code for code, _, _ in rows} == {"response-overrun", "ack-beyond-sent", "ack-session-id-absent"}
    for code, severity, rule in rows:
        assert (CATALOGUE[code].severity.value, CATALOGUE[code].rule) == (severity, rule.strip()), code
