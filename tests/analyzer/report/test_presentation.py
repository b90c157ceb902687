"""What the text and HTML reports share: short ids, sizes, shares, safe strings, order."""

from __future__ import annotations

from tests.support import report_fixtures as fx
from bitstrace.analyzer.report.presentation import (
    all_anomalies, compact_progress, frame_list, human_duration, human_size, percent, printable, short_ids,
)


def test_short_ids_are_unambiguous_prefixes():
    late = "{A0FF5911-4144-45B3-BF27-27AFC8EC8A67}"
    later = "{A0FF5911-4144-45B3-BF27-27AFC8EC8A68}"
    other = "{B0FF5911-4144-45B3-BF27-27AFC8EC8A67}"
    short = short_ids([late, later, other, "opaque-id", None])
    assert short[other] == "B0FF5911…"
    assert short[late] == late[1:-1] and short[later] == later[1:-1]  # differ only in the last digit
    assert short["opaque-id"] == "opaque-id"
    assert len(set(short.values())) == 4


def test_shares_never_round_to_done_or_nothing():
    assert percent(9_999, 10_000) == "99.9%"
    assert percent(10_000, 10_000) == "100%"
    assert percent(1, 10_000) == "<1%"
    assert percent(0, 10_000) == "0%"
    assert percent(5, None) == ""
    assert compact_progress({"acknowledged": 512 * 1024, "total": 1024 * 1024}) == "512KiB/1.00MiB 50%"


def test_sizes_durations_frames():
    assert [human_size(n) for n in (0, 1023, 1024, 4892, 131072, 5 << 30)] == \
        ["0 B", "1023 B", "1.00 KiB", "4.78 KiB", "128 KiB", "5.00 GiB"]
    # Rounding never shows four digits or a unit's upper bound.
    assert [human_size(n) for n in (10 * 1024 * 1024 - 1, 100 * 1024 - 1, 1024 * 1024 - 100)] == \
        ["10.0 MiB", "100 KiB", "1.00 MiB"]
    assert [human_duration(s) for s in (0.0504, 12.44, 185, 7380, 3 * 86400 + 4 * 3600)] == \
        ["50 ms", "12.4 s", "3 m 05 s", "2 h 03 m", "3 d 04 h"]
    assert frame_list([5, 1, 2, 3, 9, 10]) == "1-3, 5, 9-10"
    assert frame_list(range(0, 40, 2), limit=3) == "0, 2, 4, … (+17)"


def test_printable_shows_controls_and_bidi_overrides():
    assert printable("a\x1b[2Jb\x00\u202ec\x9b") == "a\\x1b[2Jb\\x00\\u202ec\\x9b"
    assert printable("Grüße / 東京") == "Grüße / 東京"
    assert printable(None) == ""


def test_all_anomalies_worst_first_then_time():
    ordered = all_anomalies(fx.corpus_report())
    ranks = ["error", "warning", "info"]
    assert [ranks.index(a["severity"]) for a in ordered] == sorted(ranks.index(a["severity"]) for a in ordered)
    for first, second in zip(ordered, ordered[1:]):
        if first["severity"] == second["severity"]:
            assert first["ts"] <= second["ts"]
    assert any(a["session"] is None for a in ordered)  # the session-less ones are included
