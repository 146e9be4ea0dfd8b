"""The progress display: its numbers (rate window, percent, ETA) and its line."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.outcomes import RunStats
from orchestrator.progress import RateWindow, progress_fields, progress_line


@given(
    speed=st.floats(min_value=1.0, max_value=1e6),
    steps=st.integers(min_value=2, max_value=60),
    tick=st.floats(min_value=0.05, max_value=2.0),
)
def test_a_steady_reader_reads_at_its_speed(speed: float, steps: int, tick: float) -> None:
    """At a steady speed the window's rate is that speed, however long the run has been."""
    window = RateWindow(span=5.0)
    rate = 0.0
    for step in range(steps):
        now = step * tick
        rate, _ = window.add(now, round(speed * now), 0)
    # counts are whole records: off by at most one over the time the window spans
    spanned = min(tick * (steps - 1), 5.0)
    assert abs(rate - speed) <= 1.0 / spanned + 1e-6 + speed * 1e-9


def test_the_rate_falls_to_zero_soon_after_reading_stops() -> None:
    """Once reading stops the rate is 0 within the window, not a slowly falling average."""
    window = RateWindow(span=5.0)
    for second in range(11):
        window.add(float(second), second * 1000, second * 100_000)
    for second in range(11, 18):
        records_per_s, bytes_per_s = window.add(float(second), 10_000, 1_000_000)
    assert (records_per_s, bytes_per_s) == (0.0, 0.0)


def test_percent_and_eta_come_from_the_bytes_of_a_known_size() -> None:
    """Half of a 100 MB input read at 10 MB/s: 50%, 5 s left."""
    stats = RunStats(input_bytes=100_000_000, started=0.0)
    window = RateWindow()
    progress_fields(stats, window, 0.0)
    stats.bytes_read, stats.records_read = 50_000_000, 500_000
    fields = progress_fields(stats, window, 5.0)
    assert (fields["percent"], fields["eta_s"]) == (50.0, 5.0)
    assert (fields["records_per_s"], fields["bytes_per_s"]) == (100_000, 10_000_000)
    line = progress_line(fields)
    assert "50.0/100.0 MB 50%" in line
    assert "10.0 MB/s" in line
    assert "ETA 0:05" in line
    assert line.endswith("| 0:05")


def test_after_reading_the_line_says_how_long_it_took_and_no_rate() -> None:
    """When reading is done the line has no rate nor ETA, but the time reading took."""
    stats = RunStats(input_bytes=1000, started=0.0, bytes_read=1000, records_read=10)
    stats.reading_done = True
    fields = progress_fields(stats, RateWindow(), 70.0, read_ended=65.0)
    line = progress_line(fields)
    assert "100% in 1:05" in line
    assert "/s" not in line
    assert "ETA" not in line


def test_the_line_names_outcomes_plainly_and_counts_in_the_singular() -> None:
    """`1 record`, `invalid` for local rules and `refused by the API` for the API's refusals."""
    stats = RunStats(started=0.0, records_read=1, records_rejected=2, records_failed=3)
    line = progress_line(progress_fields(stats, RateWindow(), 1.0))
    assert "read 1 record " in line
    assert "invalid 2" in line
    assert "refused by the API 3" in line
    assert "failed" not in line


def test_a_resumed_run_counts_from_the_journal_and_shows_no_percent() -> None:
    """After a resume the counts include the earlier runs; bytes skipped are not guessed at."""
    stats = RunStats(input_bytes=1000, started=0.0)
    stats.resume({"records_read": 900, "records_imported": 850, "records_rejected": 1})
    stats.records_read += 10
    fields = progress_fields(stats, RateWindow(), 1.0)
    assert (fields["records_read"], fields["records_imported"]) == (910, 850)
    assert fields["percent"] is None
    assert progress_line(fields).startswith("resumed: read 910 records")
    stats.started = time.monotonic() - 10.0
    assert 0.9 < stats.rate() <= 1.0  # the 10 records this run read, not the 910
