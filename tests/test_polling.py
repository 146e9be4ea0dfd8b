"""The poll planner, one import's poll track and the account's call budget."""

from __future__ import annotations

import heapq
import itertools
import math

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.logs import capture_events
from orchestrator.polling import CallBudget, PollPlanner, PollTrack

intervals = st.tuples(
    st.floats(min_value=0.0, max_value=60.0), st.floats(min_value=0.0, max_value=120.0)
).map(lambda pair: (min(pair), max(pair)))


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_import(
    planner: PollPlanner, clock: FakeClock, records: int, duration: float
) -> list[float]:
    """Poll one import to its end on a fake clock (answers take no time); the poll times."""
    track = planner.track(records=records, submitted=clock.now)
    start, times = clock.now, []
    while True:
        clock.now = max(clock.now, track.next_poll_at())
        track.sent(clock.now)
        times.append(clock.now - start)
        running = clock.now - start < duration
        track.answered(running=running)
        if not running:
            track.finished()
            return times


@given(
    bounds=intervals,
    history=st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=200_000),
            st.one_of(st.none(), st.floats(min_value=0.0, max_value=500.0)),
            st.floats(min_value=0.001, max_value=1_000.0),
            st.booleans(),
        ),
        max_size=20,
    ),
    records=st.integers(min_value=0, max_value=500_000),
    elapsed=st.floats(min_value=0.0, max_value=2_000.0),
    probes=st.integers(min_value=0, max_value=50),
)
def test_delay_is_always_within_the_bounds(
    bounds: tuple[float, float],
    history: list[tuple[int, float | None, float, bool]],
    records: int,
    elapsed: float,
    probes: int,
) -> None:
    """Whatever was learned, the next delay is never under poll_min nor over poll_max."""
    planner = PollPlanner(poll_min=bounds[0], poll_max=bounds[1])
    for done_records, running_at, finished_by, aimed in history:
        planner.observe(
            records=done_records, running_at=running_at, finished_by=finished_by, aimed=aimed
        )
    delay = planner.next_delay(records=records, elapsed=elapsed, probes=probes)
    assert bounds[0] <= delay <= bounds[1]
    model = planner.model
    assert model is None or (model[0] >= 0 and model[1] >= 0 and math.isfinite(sum(model)))


@given(
    poll_min=st.floats(min_value=0.1, max_value=10.0),
    spread=st.floats(min_value=1.0, max_value=10.0),
    durations=st.lists(st.floats(min_value=0.0, max_value=20.0), min_size=1, max_size=12),
    sizes=st.lists(st.integers(min_value=1, max_value=100_000), min_size=1, max_size=12),
    trip=st.floats(min_value=0.0, max_value=1.0),
)
@settings(deadline=None)
def test_a_track_keeps_its_polls_within_the_window(
    poll_min: float, spread: float, durations: list[float], sizes: list[int], trip: float
) -> None:
    """Seen from the server, one import's polls are at least poll_min and at most poll_max apart."""
    poll_max = poll_min * spread
    # A round trip longer than poll_max - poll_min leaves no room for any poll time.
    round_trip = trip * min(poll_max - poll_min, 0.5)
    clock = FakeClock()
    planner = PollPlanner(poll_min=poll_min, poll_max=poll_max, clock=clock)
    for number, in_poll_max in enumerate(durations):
        records, duration = sizes[number % len(sizes)], in_poll_max * poll_max
        track = planner.track(records=records, submitted=clock.now)
        # The accept counts from its answer (the server's moment is unknown), the polls from
        # their arrival at the server.
        arrivals = [clock.now + round_trip / 2]
        while True:
            clock.now = max(clock.now, track.next_poll_at())
            track.sent(clock.now)
            clock.now += round_trip / 2
            arrivals.append(clock.now)
            clock.now += round_trip / 2
            running = arrivals[-1] - arrivals[0] < duration
            track.answered(running=running)
            if not running:
                track.finished()
                break
        gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
        assert all(poll_min - 1e-9 <= gap <= poll_max + 1e-9 for gap in gaps)


def test_probing_gaps_grow_from_poll_min_to_poll_max() -> None:
    """Before any estimate, the gaps grow from poll_min to poll_max."""
    clock = FakeClock()
    times = run_import(PollPlanner(poll_min=5, poll_max=30, clock=clock), clock, 1000, 200.0)
    gaps = [later - earlier for earlier, later in zip([0.0, *times], times, strict=False)]
    assert gaps[:4] == [5, 7.5, 11.25, 16.875]
    assert 29 <= max(gaps) <= 30  # a little under poll_max, for the way to the server
    assert gaps == sorted(gaps)
    assert len(times) < 200 / 5 / 2  # polling every poll_min would take 40 calls


def test_steady_imports_are_found_done_at_the_first_poll() -> None:
    """With a steady 1000 records/s, the planner soon aims one poll just after the finish."""
    clock = FakeClock()
    planner = PollPlanner(poll_min=5, poll_max=30, clock=clock)
    polls = [run_import(planner, clock, 12_000, 12.0) for _ in range(40)]
    assert polls[0] == [5, 12.5]
    steady = polls[2:]
    assert sum(len(times) for times in steady) / len(steady) <= 1.25
    assert all(len(times) <= 2 for times in steady)
    assert all(times[-1] >= 12.0 for times in steady)
    first_poll_hits = [times[0] for times in steady[20:] if len(times) == 1]
    assert all(seen <= 12.0 * 1.1 for seen in first_poll_hits)


def test_long_imports_take_the_fewest_polls_poll_max_allows() -> None:
    """A 100 s import with poll_max 30 is soon seen done in four polls, the fewest possible."""
    clock = FakeClock()
    planner = PollPlanner(poll_min=5, poll_max=30, clock=clock)
    polls = [run_import(planner, clock, 50_000, 100.0) for _ in range(30)]
    assert sum(len(times) for times in polls[10:]) / 20 <= 4.3
    assert all(times[-1] - 100.0 <= 0.25 * 30 for times in polls[10:])


def test_latency_and_per_record_cost_are_told_apart() -> None:
    """Mixed sizes teach the fixed latency, so a small last batch is aimed right too."""
    clock = FakeClock()
    planner = PollPlanner(poll_min=1, poll_max=60, clock=clock)
    for records in [10_000, 40_000, 20_000, 30_000] * 6:
        run_import(planner, clock, records, 8.0 + records / 2_000)
    model = planner.model
    assert model is not None
    assert 5.0 <= model[0] <= 10.0  # the 8 s latency, not all per record
    times = run_import(planner, clock, 100, 8.05)
    assert len(times) <= 2
    assert times[-1] - 8.05 <= 1.5


@given(
    history=st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=200_000), st.floats(min_value=0.01, max_value=600.0)
        ),
        min_size=1,
        max_size=20,
    ),
    records=st.integers(min_value=1, max_value=500_000),
)
def test_a_restored_history_gives_the_model_it_was_taken_from(
    history: list[tuple[int, float]], records: int
) -> None:
    """A planner restored from another's history predicts as that one does, and keeps at most
    its window of the newest imports."""
    clock = FakeClock()
    learned = PollPlanner(poll_min=5, poll_max=30, clock=clock)
    for count, seconds in history:
        run_import(learned, clock, count, seconds)
    restored = PollPlanner(poll_min=5, poll_max=30, clock=clock)
    assert restored.restore(learned.history())
    assert restored.history() == learned.history()
    assert len(restored.history()) == min(len(history), restored.window)
    assert restored.expected_duration(records) == pytest.approx(learned.expected_duration(records))


def test_a_restored_planner_aims_its_first_imports() -> None:
    """Started from an earlier run's history, the first wave is aimed, not probed for: a 60 s
    import is seen done in the fewest polls poll_max allows, where probing takes five."""
    clock = FakeClock()
    earlier = PollPlanner(poll_min=5, poll_max=30, clock=clock)
    for _ in range(4):
        run_import(earlier, clock, 10_000, 60.0)
    cold = PollPlanner(poll_min=5, poll_max=30, clock=clock)
    warm = PollPlanner(poll_min=5, poll_max=30, clock=clock)
    assert warm.restore(earlier.history())
    cold_polls, warm_polls = (
        run_import(cold, clock, 10_000, 60.0),
        run_import(warm, clock, 10_000, 60.0),
    )
    assert len(cold_polls) == 5  # 5, 12.5, 23.75, 40.6, 65.9
    assert len(warm_polls) == 3  # 60 s in polls of at most 30 s, the last at the finish
    assert warm_polls[-1] - 60.0 < cold_polls[-1] - 60.0


def test_a_history_is_not_taken_over_what_the_planner_learned() -> None:
    """Once a planner learned from an import of its own, a restored history changes nothing;
    entries that are not a positive count and duration are skipped."""
    clock = FakeClock()
    planner = PollPlanner(poll_min=5, poll_max=30, clock=clock)
    assert not planner.restore([(0, 10.0), (100, 0.0), (100, -1.0), (100, math.inf)])
    assert planner.model is None
    run_import(planner, clock, 1_000, 12.0)
    model = planner.model
    assert not planner.restore([(1_000, 500.0)] * 8)
    assert planner.model == model


def test_one_outlier_moves_the_estimate_but_does_not_blow_it_up() -> None:
    """A single import ten times slower than the rest at most doubles its own observation."""
    planner = PollPlanner(poll_min=1, poll_max=600)
    for _ in range(6):
        planner.observe(records=1000, running_at=9.0, finished_by=10.0, aimed=False)
    before = planner.expected_duration(1000)
    assert before is not None
    planner.observe(records=1000, running_at=99.0, finished_by=100.0, aimed=True)
    after = planner.expected_duration(1000)
    assert after is not None
    assert before < after <= 1.6 * before


def test_a_slower_api_is_learned_from_a_missed_aim() -> None:
    """An import still running at the aim raises the estimate to at least that time."""
    planner = PollPlanner(poll_min=1, poll_max=30)
    planner.observe(records=100, running_at=None, finished_by=5.0, aimed=False)
    planner.observe(records=100, running_at=9.0, finished_by=10.0, aimed=True)
    expected = planner.expected_duration(100)
    assert expected is not None
    assert expected >= 7.0


def test_a_faster_api_is_probed_downwards() -> None:
    """Imports found finished at their aimed poll, again and again, lower the estimate."""
    planner = PollPlanner(poll_min=1, poll_max=30)
    planner.observe(records=100, running_at=None, finished_by=10.0, aimed=False)
    before = planner.expected_duration(100)
    for _ in range(4):
        aim = planner.aim(100)
        assert aim is not None
        planner.observe(records=100, running_at=None, finished_by=aim, aimed=True)
    after = planner.expected_duration(100)
    assert before is not None
    assert after is not None
    assert after < before


def test_jittery_durations_stop_being_missed() -> None:
    """Imports that overrun the aim make the planner aim later, so misses become rare."""
    clock = FakeClock()
    planner = PollPlanner(poll_min=1, poll_max=60, clock=clock)
    durations = [10.0, 12.5, 9.5, 12.0, 10.5, 12.4] * 6
    misses = [len(run_import(planner, clock, 1_000, d)) > 1 for d in durations]
    assert sum(misses[18:]) <= sum(misses[:18])
    assert sum(misses[18:]) <= 4


@given(
    rate=st.floats(min_value=1.0, max_value=40.0),
    asks=st.lists(st.floats(min_value=0.0, max_value=30.0), max_size=120),
)
def test_the_budget_is_never_exceeded_in_any_minute(rate: float, asks: list[float]) -> None:
    """Turns are never before the ask, and any 60 s span holds at most the budget's calls."""
    budget = CallBudget(calls_per_minute=rate)
    now, turns = 0.0, []
    for step in asks:
        now += step
        turn = budget.next_turn(now)
        assert turn >= now
        budget.record(turn)
        turns.append(turn)
        now = turn
    limit = math.floor(rate)
    for first, start in enumerate(turns):
        inside = [t for t in turns[first:] if t < start + 60.0]
        assert len(inside) <= limit


def test_the_budget_lets_calls_go_at_once_while_there_is_room() -> None:
    """Under the budget, a call's turn is now; the next past it waits for the oldest to age out."""
    budget = CallBudget(calls_per_minute=3)
    turns = []
    for ask in (0.0, 1.0, 2.0, 3.0, 61.5, 61.6):
        turns.append(budget.next_turn(max([ask, *turns[-1:]])))
        budget.record(turns[-1])
    assert turns == [0.0, 1.0, 2.0, 60.0, 61.5, 62.0]


@pytest.mark.parametrize("rate", [0.5, math.inf, math.nan])
def test_a_budget_below_one_call_is_refused(rate: float) -> None:
    """A budget must allow at least one call a minute."""
    with pytest.raises(ValueError, match="calls_per_minute"):
        CallBudget(calls_per_minute=rate)


@settings(max_examples=60, deadline=None)
@given(
    imports=st.integers(min_value=1, max_value=12),
    rate=st.floats(min_value=2.0, max_value=60.0),
    durations=st.lists(st.floats(min_value=0.5, max_value=200.0), min_size=1, max_size=30),
)
def test_imports_sharing_a_budget_keep_to_it_and_to_the_poll_window(
    imports: int, rate: float, durations: list[float]
) -> None:
    """Imports sharing a budget keep to it; a gap passes poll_max only when the budget forces it."""
    clock = FakeClock()
    planner = PollPlanner(poll_min=5, poll_max=30, clock=clock)
    budget = CallBudget(calls_per_minute=rate)
    # A discrete-event run: (due time, order, import number) in a heap.
    events: list[tuple[float, int, int]] = []
    tracks: dict[int, tuple[PollTrack, float]] = {}
    calls: list[float] = []
    for number in range(imports):
        duration = durations[number % len(durations)]
        tracks[number] = (planner.track(records=1000, submitted=0.0), duration)
        heapq.heappush(events, (tracks[number][0].next_poll_at(), 0, number))
    while events:
        due, _, number = heapq.heappop(events)
        track, duration = tracks[number]
        clock.now = max(clock.now, due)
        turn = budget.next_turn(clock.now)
        budget.record(turn)
        gap = turn - track.last_sent
        # Past poll_max only when the budget held the call back.
        assert gap <= 30 + 1e-9 or turn > due
        assert gap >= 5 - 1e-9
        clock.now = turn
        track.sent(turn)
        calls.append(turn)
        running = turn - track.submitted < duration
        track.answered(running=running)
        if running:
            heapq.heappush(events, (track.next_poll_at(), len(calls), number))
        else:
            track.finished()
    for first, start in enumerate(calls):
        assert len([t for t in calls[first:] if t < start + 60.0]) <= math.floor(rate)


@pytest.mark.anyio
async def test_concurrent_calls_take_their_turns_within_the_budget() -> None:
    """Calls asking at once on the event loop go no faster than the budget, in asking order."""
    budget = CallBudget(calls_per_minute=2, window=0.1)
    went: list[tuple[int, float]] = []

    async def call(number: int) -> None:
        at, _ = await budget.take()
        went.append((number, at))

    async with anyio.create_task_group() as tg:
        for number in range(5):
            tg.start_soon(call, number)
    assert [number for number, _ in went] == [0, 1, 2, 3, 4]
    times = [at for _, at in went]
    assert all(later - earlier >= 0.1 for earlier, later in zip(times, times[2:], strict=False))


@pytest.mark.anyio
async def test_a_stretch_by_the_budget_is_logged_once_per_import() -> None:
    """A budget too small for the poll window stretches gaps and logs it once for the import."""
    planner = PollPlanner(poll_min=0.01, poll_max=0.02)
    budget = CallBudget(calls_per_minute=1, window=0.1)
    track = planner.track(records=10, submitted=anyio.current_time())
    with capture_events() as logs:
        sent = []
        for _ in range(3):
            sent.append(await track.wait(budget))
            track.answered(running=True)
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
    assert all(gap >= 0.1 for gap in gaps)
    stretched = [entry for entry in logs if entry["event"] == "poll.budget_stretched"]
    assert len(stretched) == 1
    assert stretched[0]["calls_per_minute"] == 1


def run_wave(
    planner: PollPlanner, clock: FakeClock, duration: float, count: int = 5
) -> list[list[float]]:
    """Imports submitted together, polled to their ends on a fake clock (the others re-plan
    when one ends, as ``PollTrack.wait`` does); each import's poll times after its submit."""
    tracks = [planner.track(records=1000, submitted=clock.now + 0.1 * n) for n in range(count)]
    times: list[list[float]] = [[] for _ in tracks]
    events = [(track.next_poll_at(), n) for n, track in enumerate(tracks)]
    while events:
        events.sort()
        due, n = events.pop(0)
        track = tracks[n]
        clock.now = max(clock.now, due)
        track.sent(clock.now)
        times[n].append(round(clock.now - track.submitted, 6))
        running = clock.now - track.submitted < duration
        track.answered(running=running)
        if running:
            events.append((track.next_poll_at(), n))
        else:
            track.finished()
            events = [(max(tracks[m].next_poll_at(), clock.now), m) for _, m in events]
    return times


def test_imports_probed_together_spread_their_probes_then_aim_once_one_ends() -> None:
    """Imports probed together probe at different times; once one ends the others aim at once."""
    clock = FakeClock()
    planner = PollPlanner(poll_min=0.5, poll_max=3.0, clock=clock)
    times = run_wave(planner, clock, duration=1.48)
    assert len({polls[0] for polls in times}) == len(times)  # set apart, not all at poll_min
    # Probing in step (every import at 0.5, 1.25, 2.375 s) sees them all end at 2.375 s; set
    # apart, the first end found teaches the rest, which poll poll_min after their last answer.
    assert max(polls[-1] for polls in times) < 2.0
    latency, _ = planner.model or (0.0, 0.0)
    assert planner.expected_duration(1000) == pytest.approx(1.48, rel=0.15)
    assert latency > 0


def test_imports_aimed_together_and_missing_together_widen_the_margin_once() -> None:
    """Five imports aimed at one estimate that all miss widen the margin once, not five times."""
    clock = FakeClock()
    planner = PollPlanner(poll_min=0.5, poll_max=3.0, clock=clock)
    for _ in range(4):
        run_import(planner, clock, 1000, 1.0)  # learns ~1 s
    margin = planner.margin
    run_wave(planner, clock, duration=1.2)  # slower now: every aim misses
    assert margin < planner.margin <= margin * 1.5 + 0.01 + 1e-9


@pytest.mark.anyio
async def test_a_waiting_poll_is_brought_forward_when_another_import_ends() -> None:
    """A track waiting for its next probe polls sooner when another import teaches the planner."""
    planner = PollPlanner(poll_min=0.05, poll_max=2.0)
    start = anyio.current_time()
    waiting = planner.track(records=10, submitted=start)
    waiting.sent(start + 0.05)
    waiting.answered(running=True)  # probed once: its next probe is ~0.08-0.11 s later...
    for _ in range(6):
        waiting.answered(running=True)  # ...grown to over 0.5 s by later probes
    assert waiting.next_poll_at() - anyio.current_time() > 0.5
    ended = planner.track(records=10, submitted=start)

    async def end_the_other() -> None:
        await anyio.sleep(0.05)
        ended.sent(anyio.current_time())
        ended.answered(running=False)
        ended.finished()  # taught ~0.05 s: the waiting import is past its aim

    async with anyio.create_task_group() as tg:
        tg.start_soon(end_the_other)
        went = await waiting.wait()
    assert went - start < 0.4
