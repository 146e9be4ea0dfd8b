"""When to poll an import next, and whether the account's call budget lets a status call go now.

The API asks for status checks every 5–30 s and counts them against the account's rate limit
(35 calls a minute on the Basic tier, shared with the account's other integrations), while a slot
is only freed when a poll sees the import end. Three parts keep polls few and well aimed:

- :class:`PollPlanner` learns how long imports take, as a fixed latency plus a cost per record,
  from the imports already finished, and aims the poll just after the expected finish. Before it
  has an estimate (and for an import past its expected finish) it probes with growing gaps, from
  ``poll_min`` up to ``poll_max``, instead of polling every ``poll_min``. Imports probed at the
  same time shift their probes apart, so that together they bracket the duration finely: the
  first one found done teaches the planner, and the others, still waiting, aim at once.
- :class:`PollTrack` is one import's polls: it says when the next one is due, always at least
  ``poll_min`` after the previous answer and at most ``poll_max`` after the previous send.
- :class:`CallBudget` is the account's status calls per minute, shared by all its imports: a poll
  waits for its turn, so many imports in flight never call faster than the budget allows.

The cost is per record, not per byte: the API upserts record by record (looking up a contact for
each in contact scope), and records of one collection are of similar size, so records explain a
duration as well as bytes do while staying meaningful across collections of different shapes.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import anyio

from orchestrator.logs import get_logger

__all__ = ["CallBudget", "PollPlanner", "PollTrack"]

log = get_logger("orchestrator.polling")

Clock = Callable[[], float]

#: Each probing gap is this many times the previous one (from poll_min, capped at poll_max).
PROBE_GROWTH = 1.5
#: A new observation counts at most this many times the current prediction, or 1/this of it:
#: one outlier moves the estimate, never blows it up.
OUTLIER_FACTOR = 2.0
#: Before any estimate, an import seen running bounds from below the duration of imports of up
#: to this many times its records.
SIMILAR_SIZE = 1.1
#: A lower bound brackets a finish when it is at least this fraction of it.
BRACKET = 0.85
#: Successive probing imports shift their probes by this fraction of a growth step (the golden
#: ratio's, so any number of them spread evenly).
_PHASE_STEP = 0.6180339887


@dataclass(frozen=True, slots=True)
class _Observation:
    records: int
    seconds: float  # the duration learned
    running_at: float  # the latest time it was seen running (0.0: never), a lower bound


@dataclass(slots=True, kw_only=True)
class PollPlanner:
    """Learns import durations (latency + seconds per record) and says when to poll next.

    Args:
        poll_min: never poll sooner than this many seconds after the submit or the last poll.
        poll_max: never wait longer than this between polls.
        margin: the starting fraction to aim past the expected finish.
        min_margin: the margin never goes below this fraction.
        max_margin: the margin never goes above this fraction.
        window: how many recent finished imports the duration model is fitted to.
        recency: weight of an observation relative to the next newer one (0 < recency <= 1).
        clock: the time source of :meth:`track` (the event loop's by default).
    """

    poll_min: float
    poll_max: float
    margin: float = 0.05
    min_margin: float = 0.03
    max_margin: float = 0.5
    window: int = 8
    recency: float = 0.7
    clock: Clock = field(default=anyio.current_time, repr=False)
    _seen: deque[_Observation] = field(init=False, repr=False)
    _latency: float | None = field(default=None, init=False)
    _per_record: float = field(default=0.0, init=False)
    _hits_in_row: int = field(default=0, init=False)
    _tracks: weakref.WeakSet[PollTrack] = field(init=False, repr=False)
    _probing: int = field(default=0, init=False)
    observed: int = field(default=0, init=False)
    _widened_after: int = field(default=0, init=False)
    _narrowed_after: int = field(default=0, init=False)
    _learned: anyio.Event | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._seen = deque(maxlen=self.window)
        self._tracks = weakref.WeakSet()

    @property
    def model(self) -> tuple[float, float] | None:
        """``(latency seconds, seconds per record)``, or ``None`` before any import finished."""
        if self._latency is None:
            return None
        return (self._latency, self._per_record)

    def expected_duration(self, records: int) -> float | None:
        """Expected seconds from submit to finish for an import of ``records`` records."""
        if self._latency is None:
            return None
        return self._latency + self._per_record * max(records, 1)

    def aim(self, records: int) -> float | None:
        """Seconds after submit at which the poll that should find the import done is aimed."""
        expected = self.expected_duration(records)
        return None if expected is None else expected * (1.0 + self.margin)

    def next_delay(
        self, *, records: int, elapsed: float, probes: int = 0, phase: float = 1.0
    ) -> float:
        """Seconds to wait from now (the submit or the last answer) before polling again.

        Args:
            records: records in the import.
            elapsed: seconds since the import was submitted.
            probes: polls that found it running with no aim ahead (no estimate yet, or after
                the first poll past the aim): each probe waits longer than the previous one,
                from poll_min up to poll_max.
            phase: the probing gaps' factor (1 to ``PROBE_GROWTH``), set apart per import.
        """
        target = self.aim(records)
        if target is not None and target > elapsed and self.poll_max > 0:
            remaining = target - elapsed
            # Spread what is left evenly over as few polls as poll_max allows: the last lands
            # on the aim, the ones before it see the import running as late as they can.
            count = remaining / self.poll_max
            polls = max(1, math.ceil(count - 1e-9)) if math.isfinite(count) else 1
            return self._clamp(remaining / polls)
        return self._clamp(self.poll_min * phase * PROBE_GROWTH ** min(max(probes, 0), 100))

    def observe(
        self,
        *,
        records: int,
        running_at: float | None,
        finished_by: float,
        aimed: bool,
        missed: bool | None = None,
        aimed_after: int | None = None,
    ) -> None:
        """Learn from an import that a poll found finished.

        Args:
            records: records in the import.
            running_at: seconds after submit of the last poll that still saw it running
                (``None`` when the first poll already found it finished).
            finished_by: seconds after submit of the poll that found it finished.
            aimed: whether its polls were aimed at an estimate (else it was probed for).
            missed: whether a poll at its aim saw it running (``None``: judge by the aim now;
                several imports aimed at once each know best what their own aim was).
            aimed_after: how many imports the planner had learned from when this one was
                aimed (``observed``): a miss widens the margin (a hit narrows it) only if no
                miss (hit) did since, so imports aimed together count as one experience.
        """
        records = max(records, 1)
        lower = running_at if running_at is not None and running_at < finished_by else 0.0
        aim = self.aim(records)
        if not aimed or aim is None:
            # Probed for: it ended between the last two probes, which grow apart, so the later
            # end can be late by most of a gap (with probes at 0.5, 1.25, 2.4 s a 1.5 s import
            # is "2.4 s", and every import after it would be aimed that late). Imports of its
            # size seen running later than its own last probe narrow the gap from below. Take
            # the middle: early by at most half a gap costs one more poll; the hits or misses
            # that follow correct the estimate.
            floor = self._seen_running(records)
            if lower < floor < finished_by:
                lower = floor
            seconds = (lower + finished_by) / 2 if lower else finished_by
        elif missed if missed is not None else lower >= aim * 0.999:
            # Missed: still running at the aim. It most likely ended soon after: lean on that
            # lower bound, and aim wider from now on.
            self._hits_in_row = 0
            if aimed_after is None or aimed_after >= self._widened_after:
                self.margin = min(self.max_margin, self.margin * 1.5 + 0.01)
                self._widened_after = self.observed + 1
            seconds = min(finished_by, lower * (1.0 + self.margin))
        else:
            # Found done at (or before) the aim: it may have ended well before. Probe lower,
            # faster after each hit in a row, never below what it was seen running at.
            if aimed_after is None or aimed_after >= self._narrowed_after:
                self._hits_in_row += 1
                self.margin = max(self.min_margin, self.margin * 0.85)
                self._narrowed_after = self.observed + 1
            step = self.margin + min(0.002 * 2 ** (self._hits_in_row - 1), 0.1)
            # A poll that went after the aim (held by poll_min or the budget) says no more than
            # one at the aim would have.
            found_by = max(lower, min(finished_by, aim))
            seconds = max(lower, found_by * (1.0 - step))
            # An import of its size seen running close below this finish brackets it: take the
            # middle, as a bisection does (a floor far below says too little to go by).
            floor = max(lower, self._seen_running(records, similar=True))
            if found_by * BRACKET < floor < seconds:
                seconds = (floor + found_by) / 2
        expected = self.expected_duration(records)
        if expected is not None and expected > 0:
            seconds = min(max(seconds, expected / OUTLIER_FACTOR), expected * OUTLIER_FACTOR)
        self._seen.append(_Observation(records, seconds, lower))
        self.observed += 1
        self._fit()
        if self._learned is not None:
            self._learned.set()  # imports waiting for their next poll aim again
            self._learned = None

    def history(self) -> list[tuple[int, float]]:
        """What the model is fitted to: ``(records, seconds)`` of recent finished imports,
        oldest first (at most ``window``). Kept between runs, it lets :meth:`restore` aim the
        next run's first imports instead of probing for them."""
        return [(seen.records, seen.seconds) for seen in self._seen]

    def restore(self, history: Iterable[tuple[int, float]]) -> bool:
        """Start from what an earlier planner of the account learned (its :meth:`history`).

        Only a planner that has learned nothing yet takes it: its own imports say more. Entries
        that are not a positive record count and duration are skipped.

        Returns:
            whether the planner now has a model.
        """
        if self._latency is not None:
            return False
        for records, seconds in history:
            if records > 0 and 0.0 < seconds < math.inf:
                self._seen.append(_Observation(int(records), float(seconds), 0.0))
        if self._seen:
            self._fit()
        return self._latency is not None

    def track(self, *, records: int, submitted: float) -> PollTrack:
        """The polls of one import submitted at ``submitted`` (a time of :attr:`clock`)."""
        phase = 1.0
        if self._latency is None:
            phase = PROBE_GROWTH ** ((self._probing * _PHASE_STEP) % 1.0)
            self._probing += 1
        track = PollTrack(planner=self, records=records, submitted=submitted, phase=phase)
        self._tracks.add(track)
        return track

    def learned(self) -> anyio.Event:
        """An event set the next time the planner learns from a finished import."""
        if self._learned is None:
            self._learned = anyio.Event()
        return self._learned

    def _seen_running(self, records: int, *, similar: bool = False) -> float:
        """The longest a recent or running import was seen running, as a lower bound on the
        duration of one of ``records`` records: from imports of a similar size or smaller only
        (``similar``, or before there is a model), else scaled by the model."""
        expected = None if similar else self.expected_duration(records)
        seen: list[tuple[int, float]] = [(o.records, o.running_at) for o in self._seen]
        seen.extend((t.records, t.running_at) for t in self._tracks if t.running_at)
        floor = 0.0
        for their_records, running_at in seen:
            if running_at <= 0.0:
                continue
            if expected is None:
                if their_records > records * SIMILAR_SIZE:
                    continue
                scaled = running_at
            else:
                theirs = self.expected_duration(their_records)
                scaled = running_at * expected / theirs if theirs else running_at
            floor = max(floor, scaled)
        return floor

    def _fit(self) -> None:
        # Weighted least squares of seconds on records, newest weighing most.
        total = sum_n = sum_s = 0.0
        weights: list[float] = []
        for age in range(len(self._seen)):
            weights.append(self.recency ** (len(self._seen) - 1 - age))
        for weight, seen in zip(weights, self._seen, strict=True):
            total += weight
            sum_n += weight * seen.records
            sum_s += weight * seen.seconds
        mean_n, mean_s = sum_n / total, sum_s / total
        var_n = cov = 0.0
        for weight, seen in zip(weights, self._seen, strict=True):
            var_n += weight * (seen.records - mean_n) ** 2
            cov += weight * (seen.records - mean_n) * (seen.seconds - mean_s)
        var_n /= total
        cov /= total
        if var_n > (0.1 * mean_n) ** 2:
            slope = cov / var_n
            latency = mean_s - slope * mean_n
            if slope < 0:  # bigger imports were quicker: noise, no per-record cost to see
                slope, latency = 0.0, mean_s
            elif latency < 0:
                slope, latency = mean_s / mean_n, 0.0
        else:
            # One size only: latency and per-record cost cannot be told apart. Split it half
            # and half: for another size that errs early on either side of the truth, and an
            # early poll costs one call where a late one costs time (a slot held idle).
            slope, latency = mean_s / mean_n / 2, mean_s / 2
        self._latency, self._per_record = latency, slope

    def _clamp(self, delay: float) -> float:
        return min(max(delay, self.poll_min), self.poll_max)


@dataclass(slots=True, kw_only=True, weakref_slot=True, eq=False)
class PollTrack:
    """The polls of one import: when the next is due, and what each answer said.

    ``poll_min`` is counted from the previous answer (the later end) and ``poll_max`` from the
    previous send (the earlier end), less a little for the way to the server: seen from the
    server, polls stay inside [poll_min, poll_max] whatever the round trip.

    Args:
        planner: the account's planner, which learns from this import once it ends.
        records: records in the import.
        submitted: when the API accepted it (a time of the planner's clock).
        phase: the factor of its probing gaps (see ``PollPlanner.next_delay``).
    """

    planner: PollPlanner
    records: int
    submitted: float
    phase: float = 1.0
    aimed_after: int = field(init=False)
    last_sent: float = field(init=False)
    last_answer: float = field(init=False)
    running_at: float | None = field(default=None, init=False)
    probes: int = field(default=0, init=False)
    aimed: bool = field(default=False, init=False)
    replanned: bool = field(default=False, init=False)
    missed: bool = field(default=False, init=False)
    stretched: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.last_sent = self.last_answer = self.submitted
        self.aimed = self.planner.aim(self.records) is not None
        self.aimed_after = self.planner.observed

    def next_poll_at(self) -> float:
        """When the next status call is due (a time of the planner's clock)."""
        planner = self.planner
        aim = planner.aim(self.records)
        if not self.aimed and not self.replanned and aim is not None:
            # Probing, and an import that ended meanwhile taught the planner: aim from now on.
            # When the aim is already past, the next poll goes poll_min after the last answer:
            # not aimed at a finish, so what it finds teaches as a probe does.
            self.replanned, self.probes, self.phase = True, 0, 1.0
            self.aimed = aim > self.last_answer - self.submitted
            self.aimed_after = planner.observed
        delay = planner.next_delay(
            records=self.records,
            elapsed=self.last_answer - self.submitted,
            probes=self.probes,
            phase=self.phase,
        )
        safety = min(0.02 * planner.poll_max, 0.25)
        latest = self.last_sent + planner.poll_max - safety
        return max(min(self.last_answer + delay, latest), self.last_answer + planner.poll_min)

    def latest_poll_at(self) -> float:
        """The latest time the next call may go without stretching past poll_max."""
        return self.last_sent + self.planner.poll_max

    async def wait(self, budget: CallBudget | None = None) -> float:
        """Sleep until the next poll is due and, with a budget, until it is this poll's turn.

        Returns the time the call may go. A turn past poll_max (the budget forces it) is
        logged once per import as ``poll.budget_stretched``.

        Args:
            budget: the account's status-call budget, or ``None`` for no limit.
        """
        clock = self.planner.clock
        while (delay := self.next_poll_at() - clock()) > 0:
            learned = self.planner.learned()
            with anyio.move_on_after(delay) as slept:
                await learned.wait()  # another import ended: the due time may be sooner now
            if slept.cancelled_caught:
                break
        now = clock()
        if budget is not None:
            now, held = await budget.take()
            if held and now > self.latest_poll_at() and not self.stretched:
                self.stretched = True
                log.warning(
                    "poll.budget_stretched",
                    gap_s=round(now - self.last_sent, 3),
                    poll_max=self.planner.poll_max,
                    calls_per_minute=budget.calls_per_minute,
                    hint="many imports in flight share the account's status-call budget",
                )
        self.sent(now)
        return now

    def sent(self, at: float) -> None:
        """Record that a status call went at ``at`` (done by :meth:`wait`)."""
        self.last_sent = at

    def answered(self, *, running: bool | None) -> None:
        """Record the answer of the call sent last.

        Args:
            running: ``True`` the import is still running, ``False`` it ended (successfully or
                not: see :meth:`finished`), ``None`` no status (an error; it is polled again).
        """
        self.last_answer = self.planner.clock()
        if running:
            self.running_at = self.last_sent - self.submitted
            aim = self.planner.aim(self.records)
            if aim is None or self.missed:
                self.probes += 1
            elif self.running_at >= aim * 0.999:
                self.missed = True  # the next poll comes poll_min later: it most likely ended

    def finished(self) -> None:
        """The import succeeded at the last poll: teach the planner how long it took."""
        self.planner.observe(
            records=self.records,
            running_at=self.running_at,
            finished_by=self.last_sent - self.submitted,
            aimed=self.aimed,
            missed=self.missed,
            aimed_after=self.aimed_after,
        )


@dataclass(slots=True, kw_only=True)
class CallBudget:
    """At most ``calls_per_minute`` status calls in any 60 s, for all imports of one account.

    Calls take their turns one after the other, in the order they ask: a call goes at once while
    the last 60 s hold fewer calls than the budget, else when the oldest of them is 60 s old.
    Each call is counted at the moment it goes, so over any span ``[t, t + 60)`` at most
    ``floor(calls_per_minute)`` calls go, however the event loop's timers fire.

    Args:
        calls_per_minute: the budget (at least 1; a fraction is rounded down).
        window: seconds the budget counts over.
        clock: the time source (the event loop's by default).
    """

    calls_per_minute: float
    window: float = 60.0
    clock: Clock = field(default=anyio.current_time, repr=False)
    _calls: deque[float] = field(init=False, repr=False)
    _lock: anyio.Lock | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.calls_per_minute) and self.calls_per_minute >= 1):
            raise ValueError(f"calls_per_minute must be >= 1, got {self.calls_per_minute!r}")
        self._calls = deque(maxlen=int(self.calls_per_minute))

    def next_turn(self, now: float) -> float:
        """The earliest time at or after ``now`` that a call would fit in the budget."""
        calls = self._calls
        if len(calls) == calls.maxlen:
            return max(now, calls[0] + self.window)
        return now

    def record(self, at: float) -> None:
        """Count a call that went at ``at`` (not before the calls already counted)."""
        self._calls.append(at)

    async def take(self) -> tuple[float, bool]:
        """Wait for this call's turn and count it: ``(time it may go, whether it was held)``."""
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            asked = now = self.clock()
            turn = self.next_turn(asked)
            while now < turn:  # a timer may fire a hair early: the budget is a hard limit
                await anyio.sleep(turn - now)
                now = self.clock()
            self.record(now)
            return now, turn > asked
