"""A short run of the analyzer's fuzz target (fuzz/fuzz_analyzer.py; the README says how to run it
for an hour): mutated corpus captures, no exception, no hang, nothing certified unseen."""

from __future__ import annotations

import hashlib
import os
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import REPO

ROOT = REPO
sys.path.insert(0, str(ROOT / "fuzz"))

import fuzz_analyzer as target  # noqa: E402

from bitstrace.analyzer.bits import extract  # noqa: E402

FILES = target.corpus()
MUTATION = st.builds(target.Mutation, st.sampled_from(target.KINDS), st.integers(0, 2**31 - 1),
                     st.integers(0, 255), st.sampled_from([1, 2, 4, 16, 64, 300, 1500, 9000]))


def test_every_corpus_capture_keeps_the_promises() -> None:
    certified = sum(target.check_one(data) for data in FILES.values())
    assert certified >= 10  # the oracle has complete entities to check, not only partial ones


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(sorted(FILES)), mutations=st.lists(MUTATION, min_size=1, max_size=8))
def test_mutated_corpus_captures_keep_the_promises(base: str, mutations: list) -> None:
    target.check_one(target.mutate(FILES[base], mutations, FILES), per_input_s=30)


def test_the_oracle_catches_a_hole_certified_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    """An extractor that forgot its holes (the defect of changed TOTALs) is caught."""
    monkeypatch.setattr(extract._Spool, "holes", lambda self, total: [])
    with pytest.raises(target.Failure, match="no acknowledged fragment body carried|differ|bytes"):
        target.check_one(FILES["cancel-mid-upload.pcap"])


def test_the_oracle_catches_bytes_that_were_never_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    """An extractor whose published file differs from what was acknowledged (its sha256 matching the
    file) is caught byte by byte."""
    def tampered(spool: extract._Spool, size: int) -> str:
        os.pwrite(spool.descriptor(), b"\x00" * 16, 0)
        return hashlib.sha256(os.pread(spool.descriptor(), size, 0)).hexdigest()

    monkeypatch.setattr(extract.Extractor, "_sha256", staticmethod(tampered))
    with pytest.raises(target.Failure, match="differ from every acknowledged copy"):
        target.check_one(FILES["single-fragment.pcap"])


def test_a_hang_is_caught_within_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    from bitstrace.analyzer.bits.sessions import SessionTracker

    monkeypatch.setattr(SessionTracker, "finish", lambda self, *a, **k: time.sleep(30))
    started = time.monotonic()
    with pytest.raises(target.Hang):
        target.check_one(FILES["single-fragment.pcap"], per_input_s=0.5)
    assert time.monotonic() - started < 10
