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
    margin: float = 0.05
    min_margin: float = 0.03
    max_margin: float = 0.5
    smoothing: float = 0.3
    _seconds_per_record: float | None = field(default=None, init=False)
    _version: int = field(default=0, init=False)
    _hits_in_row: int = field(default=0, init=False)
    _floor: float = field(default=0.0, init=False)  # seconds per record some import ran past

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

    @property
    def version(self) -> int:
        """Grows whenever the estimate changes; an import keeps the version it was aimed with."""
        return self._version

    def observe(
        self,
        *,
        records: int,
        running_at: float | None,
        finished_by: float,
        aimed_with: int | None = None,
    ) -> None:
        """Learn from an import that a poll found finished.

        Args:
            records: records in the import.
            running_at: seconds after submit of the last poll that still saw it running
                (``None`` when the first poll already found it finished).
            finished_by: seconds after submit of the poll that found it finished.
            aimed_with: the :attr:`version` of the estimate its polls were aimed with, or
                ``None`` when they were not aimed (no estimate yet: polled every poll_min).
        """
        records = max(records, 1)
        upper = finished_by / records
        current = self._seconds_per_record
        if running_at is None:
            if current is None or upper < current:
                self._update(upper)
            elif aimed_with == self._version:
                # Found done at the aim: it may have ended well before. Probe lower, faster
                # after each hit in a row, so a faster API (or an estimate that came from a late
                # poll) is caught up with; a miss ends the streak. One step per estimate: the
                # other imports aimed with the same estimate tell nothing new.
                self._hits_in_row += 1
                self.margin = max(self.min_margin, self.margin * 0.85)
                if self._hits_in_row >= 3:
                    # Steps grow while the hits go on, but stay under half the margin: with an
                    # exact estimate a step past the margin would be a sure miss.
                    step = min(0.005 * 2 ** (self._hits_in_row - 3), self.margin / 2)
                    # Never below what an import was seen to last (that floor fades slowly).
                    self._floor *= 0.998
                    self._update(max(current * (1.0 - step), self._floor))
            return
        if aimed_with is None:
            # Polled every poll_min with no estimate: it ended within the last poll_min. Take
            # the later end: aiming a little late costs a fraction of a poll, too early a whole
            # poll_min, and the hits that follow pull the estimate down.
            self._floor = max(self._floor, running_at / records)
            self._update(upper if current is None else min(current, upper))
            return
        # Aimed and missed: aim wider next time. The finishing poll came poll_min after the
        # miss, so lean on the lower bound plus the margin.
        self._hits_in_row = 0
        self.margin = min(self.max_margin, self.margin * 1.5 + 0.01)
        observed = min(finished_by, running_at * (1.0 + self.margin)) / records
        smoothed = observed if current is None else current + self.smoothing * (observed - current)
        self._floor = max(self._floor, running_at / records)
        self._update(max(smoothed, running_at / records))

    def _update(self, seconds_per_record: float) -> None:
        self._seconds_per_record = seconds_per_record
        self._version += 1

    def _clamp(self, delay: float) -> float:
        return min(max(delay, self.poll_min), self.poll_max)
