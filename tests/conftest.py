"""Fixtures every room's tests may use. The test tree mirrors the package (tests/analyzer/bits/
tests bitstrace.analyzer.bits, and so on); what several rooms share lives in tests/support/."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import CAPTURES, REPO


@pytest.fixture(scope="session")
def repo() -> Path:
    """The repository's root."""
    return REPO


@pytest.fixture(scope="session")
def corpus() -> Path:
    """captures/: the real recordings and their expected.json."""
    return CAPTURES
