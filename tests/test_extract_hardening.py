"""Extraction under hostile or unlucky conditions: no file with a hole is ever certified complete,
file names Windows cannot hold are never written, temp files never outlive their run."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from bitstrace.analyzer.bits.extract import PARTIAL_SUFFIX, entity_name
from bits_fixtures import SID, Wire, payload

NAME = "A0FF5911-4144-45B3-BF27-27AFC8EC8A67_report.bin"


def files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def holes(entity) -> list[tuple[int, int]]:
    return [(hole.first, hole.last) for hole in entity.holes]


# --- 1. complete means: acknowledged without a hole over the final TOTAL ----------------------

def test_a_changed_total_never_certifies_the_hole_between_fragments(tmp_path: Path) -> None:
    """0-29/50 acknowledged, then 40-59/70: 30 + 20 acknowledged bytes equal the first TOTAL, but
    bytes 30-39 were never sent."""
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 29, 50)
    w.fragment(SID, 40, 59, 70)
    entity = w.finish().sessions[0].entity
    assert not entity.complete and entity.sha256 is None
    assert files(tmp_path) == [NAME + PARTIAL_SUFFIX]
    assert entity.total == 70
    assert holes(entity) == [(30, 39), (60, 69)]
    changed, = [p for p in w.extractor.problems if p.kind == "extract-total-changed"]
    assert "50" in changed.message and "70" in changed.message and SID in changed.message
    assert changed.frame is not None  # located: the fragment that changed it


def test_a_changed_total_is_judged_on_the_final_total_and_said(tmp_path: Path) -> None:
    """Every byte of the final TOTAL acknowledged: complete, cut to that TOTAL, and the change named."""
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 69, 70)
    w.fragment(SID, 0, 49, 50)
    entity = w.finish().sessions[0].entity
    assert entity.complete and entity.total == 50 and holes(entity) == []
    data = (tmp_path / NAME).read_bytes()
    assert data == payload(70)[:50] and entity.sha256 == hashlib.sha256(data).hexdigest()
    changed, = [p for p in w.extractor.problems if p.kind == "extract-total-changed"]
    assert "TOTAL 70" in changed.message and "TOTAL 50" in changed.message


def test_the_final_total_is_that_of_the_last_acknowledged_fragment(tmp_path: Path) -> None:
    """A conformant server refuses a fragment whose TOTAL changed (400): the session's TOTAL stays."""
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 29, 50)
    w.fragment(SID, 30, 69, 70, status=400)
    w.fragment(SID, 30, 49, 50)
    entity = w.finish().sessions[0].entity
    assert entity.complete and entity.total == 50 and (tmp_path / NAME).read_bytes() == payload(50)


def test_unacknowledged_fragment_with_a_new_total_leaves_the_entity_partial(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 49, 50, status=None)
    w.fragment(SID, 0, 29, 30, status=None)
    entity = w.finish().sessions[0].entity
    assert not entity.complete and entity.total == 30 and holes(entity) == [(0, 29)]


def test_bytes_past_the_final_total_do_not_fill_a_hole_below_it(tmp_path: Path) -> None:
    """Acknowledged bytes 0-19 and 40-99 (of TOTAL 100) count 80 bytes; the final TOTAL is 80."""
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 19, 100)
    w.fragment(SID, 40, 99, 100)
    w.fragment(SID, 0, 9, 80)
    entity = w.finish().sessions[0].entity
    assert not entity.complete and entity.total == 80 and holes(entity) == [(20, 39)]
    assert entity.acknowledged_bytes == 60  # 0-19 and 40-79: what lies past the TOTAL is not counted


def test_an_empty_body_acknowledged_as_the_rest_is_not_coverage(tmp_path: Path) -> None:
    """A Fragment 10-19/20 with no body, which the server acknowledges up to 20."""
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 9, 20)
    w.fragment(SID, 10, 19, 20, body=b"")
    entity = w.finish().sessions[0].entity
    assert not entity.complete and holes(entity) == [(10, 19)]


def test_overlapping_and_conflicting_resends_keep_complete_honest(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.create()
    w.fragment(SID, 0, 59, 100)
    w.fragment(SID, 30, 79, 100, seed=4, status=500, received=None)  # refused: 60-79 stay provisional
    w.fragment(SID, 90, 99, 100)
    entity = w.finish().sessions[0].entity
    assert not entity.complete and holes(entity) == [(60, 89)]


def test_a_complete_entity_has_no_holes(tmp_path: Path) -> None:
    w = Wire(tmp_path)
    w.upload(total=12_000)
    entity = w.finish().sessions[0].entity
    assert entity.complete and holes(entity) == [] and entity.total == 12_000


# --- 3. Windows reserved names, on the final file name -------------------------------------

_RESERVED = ({"con", "prn", "aux", "nul", "conin$", "conout$"}
             | {f"{port}{n}" for port in ("com", "lpt") for n in (*"0123456789", "¹", "²", "³")})


def windows_reserved(name: str) -> bool:
    """Win32 "Naming Files": a reserved device name, alone or followed by an extension, matched
    without case; Windows drops trailing dots and spaces (of the name and of the part before the dot)."""
    stem = name.rstrip(" .").split(".", 1)[0].rstrip(" ")
    return stem.lower() in _RESERVED


@pytest.mark.parametrize("session_id", [
    "{CON}", "{nul}", "{COM1}", "LPT1", "CON.txt", "{CON.}", "{CON }", "{ CON }", "{con.tar.gz}",
    "{AUX. .}", "{COM¹}", "{lpt³}", "{CONIN$}", "{PRN}...", "NUL .txt", "{COM0}",
])
@pytest.mark.parametrize("partial", [False, True])
def test_a_reserved_session_id_never_becomes_a_reserved_file_name(tmp_path: Path, session_id: str,
                                                                  partial: bool) -> None:
    w = Wire(tmp_path)
    w.create(session_id)
    w.fragment(session_id, 0, 99, 100 if not partial else 200, content_name=None)
    w.close(session_id)
    w.finish()
    written, = files(tmp_path)
    assert not windows_reserved(written), written
    assert written.endswith(PARTIAL_SUFFIX) == partial
    assert not written.endswith((" ", ".")) and not written.startswith(" ")
    assert (tmp_path / written).read_bytes()[:100] == payload(100 if not partial else 200)[:100]


@pytest.mark.parametrize("session_id,content_name", [
    ("{CON}", None), ("{CON}", "\x00"), ("{CON}", ".."), ("{nul}", " . "), ("{x}", "CON"), ("{}", "NUL.txt"),
    ("{COM1.}", None), ("{..}", "lpt1"),
])
def test_entity_name_is_never_reserved(session_id: str, content_name: str | None) -> None:
    name = entity_name(session_id, content_name)
    assert name and not windows_reserved(name) and not windows_reserved(name + PARTIAL_SUFFIX)
    assert "/" not in name and not name.endswith((" ", "."))
