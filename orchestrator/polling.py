"""When to poll an import next: aimed at its expected finish, always within [poll_min, poll_max].

The API asks for status checks every 5–30 s and counts them against the rate limit, while a slot is
only freed when a poll sees the import end. So the planner learns how long imports take (seconds per
record, from the imports already finished) and aims the first poll just after the expected finish:
steady workloads then cost about one status call per import and free the slot right after the work.

How far past the expected finish to aim (the margin) adapts too: a poll that finds the import still
running widens it, a poll that finds it done narrows it, so steady processing times are met within
a few percent while jittery ones are not polled too early again and again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PollPlanner"]


@dataclass(slots=True, kw_only=True)
class PollPlanner:
    """Learns import durations and says how long to wait before the next status poll.

    Args:
        poll_min: never poll sooner than this many seconds after the submit or the last poll.
        poll_max: never wait longer than this between polls.
        margin: the starting fraction to aim past the expected finish.
        min_margin: the margin never goes below this fraction.
        max_margin: the margin never goes above this fraction.
        smoothing: weight of the newest observation in the moving estimate (0 < smoothing <= 1).
    """

    poll_min: float
    poll_max: float
    margin: float = 0.1
    min_margin: float = 0.03
    max_margin: float = 0.5
    smoothing: float = 0.3
    _seconds_per_record: float | None = field(default=None, init=False)

    @property
    def seconds_per_record(self) -> float | None:
        """The current estimate, or ``None`` before any import was seen to finish."""
        return self._seconds_per_record

    def expected_duration(self, records: int) -> float | None:
        """Expected seconds from submit to finish for an import of ``records`` records."""
        if self._seconds_per_record is None:
            return None
        return self._seconds_per_record * max(records, 1)

    def next_delay(self, *, records: int, elapsed: float) -> float:
        """Seconds to wait from now (the submit or the last poll) before polling again.

        Args:
            records: records in the import.
            elapsed: seconds since the import was submitted.
        """
        expected = self.expected_duration(records)
        if expected is not None:
            target = expected * (1.0 + self.margin) - elapsed
            if target > 0:
                return self._clamp(target)
        # No estimate yet, or the import is overdue: check back as soon as allowed.
        return self.poll_min

    def observe(self, *, records: int, running_at: float | None, finished_by: float) -> None:
        """Learn from an import that a poll found finished.

        Args:
            records: records in the import.
            running_at: seconds after submit of the last poll that still saw it running
                (``None`` when the first poll already found it finished).
            finished_by: seconds after submit of the poll that found it finished.
        """
        records = max(records, 1)
        upper = finished_by / records
        current = self._seconds_per_record
        if running_at is None:
            # Censored: it took at most `upper`. Never raise the estimate on this, but probe a
            # little lower so a faster API is noticed (a too-early poll costs one extra call).
            self.margin = max(self.min_margin, self.margin * 0.85)
            if current is None or upper < current:
                self._seconds_per_record = upper
            else:
                self._seconds_per_record = current * 0.995
            return
        if current is not None:  # aimed with an estimate and missed: aim wider next time
            self.margin = min(self.max_margin, self.margin * 1.5 + 0.01)
        # Bracketed: it ran past `running_at`. The finishing poll may have come long after the
        # finish (polls are poll_min apart), so lean on the lower bound plus the margin.
        observed = min(finished_by, running_at * (1.0 + self.margin)) / records
        smoothed = observed if current is None else current + self.smoothing * (observed - current)
        self._seconds_per_record = max(smoothed, running_at / records)

    def _clamp(self, delay: float) -> float:
        return min(max(delay, self.poll_min), self.poll_max)
