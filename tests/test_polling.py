"""The poll planner: delays always within [poll_min, poll_max], aimed at the learned finish."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.polling import PollPlanner

intervals = st.tuples(
    st.floats(min_value=0.0, max_value=60.0), st.floats(min_value=0.0, max_value=120.0)
).map(lambda pair: (min(pair), max(pair)))


@given(
    bounds=intervals,
    history=st.lists(
        st.tuples(
            st.integers(min_value=1, max_value=200_000),
            st.one_of(st.none(), st.floats(min_value=0.0, max_value=500.0)),
            st.floats(min_value=0.001, max_value=1_000.0),
        ),
        max_size=20,
    ),
    records=st.integers(min_value=0, max_value=500_000),
    elapsed=st.floats(min_value=0.0, max_value=2_000.0),
)
def test_delay_is_always_within_the_bounds(
    bounds: tuple[float, float],
    history: list[tuple[int, float | None, float]],
    records: int,
    elapsed: float,
) -> None:
    """Whatever was learned, the next delay is never under poll_min nor over poll_max."""
    planner = PollPlanner(poll_min=bounds[0], poll_max=bounds[1])
    for done_records, running_at, finished_by in history:
        if running_at is not None and running_at >= finished_by:
            running_at = None
        planner.observe(records=done_records, running_at=running_at, finished_by=finished_by)
    delay = planner.next_delay(records=records, elapsed=elapsed)
    assert bounds[0] <= delay <= bounds[1]


def test_first_poll_without_history_is_at_poll_min() -> None:
    """Before any import finished, poll as soon as allowed."""
    planner = PollPlanner(poll_min=5, poll_max=30)
    assert planner.next_delay(records=1000, elapsed=0) == 5


def test_steady_imports_are_found_done_at_the_first_poll() -> None:
    """With a steady 1000 records/s, the planner soon aims one poll just after the finish."""
    planner = PollPlanner(poll_min=5, poll_max=30)
    true_duration = 12.0  # 12,000 records at 1000/s
    polls_per_import = []
    for _ in range(40):
        elapsed, polls, running_at = 0.0, 0, None
        aimed = planner.version if planner.expected_duration(12_000) is not None else None
        while True:
            elapsed += planner.next_delay(records=12_000, elapsed=elapsed)
            polls += 1
            if elapsed >= true_duration:
                break
            running_at = elapsed
        planner.observe(
            records=12_000, running_at=running_at, finished_by=elapsed, aimed_with=aimed
        )
        polls_per_import.append((polls, elapsed))
    assert polls_per_import[0][0] == 3  # 5, 10, 15 s without history
    steady = polls_per_import[2:]
    # Probing for a faster API costs an extra poll now and then, never more.
    assert sum(polls for polls, _ in steady) / len(steady) <= 1.25
    assert all(polls <= 2 for polls, _ in steady)
    # Never seen before the end; once the estimate has come down from the first import's late
    # poll, the finish is seen within a few percent of the real end.
    assert all(seen >= true_duration for _, seen in steady)
    first_poll_hits = [seen for polls, seen in steady[25:] if polls == 1]
    assert all(seen <= true_duration * 1.08 for seen in first_poll_hits)


def test_a_slower_api_is_learned_from_a_bracketed_finish() -> None:
    """An import seen running past the estimate raises the estimate to at least that time."""
    planner = PollPlanner(poll_min=1, poll_max=30)
    planner.observe(records=100, running_at=None, finished_by=5.0)
    planner.observe(records=100, running_at=9.0, finished_by=10.0, aimed_with=planner.version)
    expected = planner.expected_duration(100)
    assert expected is not None
    assert expected >= 9.0


def test_a_faster_api_is_probed_downwards() -> None:
    """Imports found finished at their aimed poll, again and again, lower the estimate."""
    planner = PollPlanner(poll_min=1, poll_max=30)
    planner.observe(records=100, running_at=None, finished_by=10.0)
    before = planner.seconds_per_record
    for _ in range(4):
        planner.observe(records=100, running_at=None, finished_by=10.5, aimed_with=planner.version)
    after = planner.seconds_per_record
    assert before is not None
    assert after is not None
    assert after < before


def test_jittery_durations_stop_being_missed() -> None:
    """Imports that overrun the aim make the planner aim later, so misses become rare."""
    planner = PollPlanner(poll_min=1, poll_max=60)
    durations = [10.0, 12.5, 9.5, 12.0, 10.5, 12.4] * 6
    misses = []
    for true_duration in durations:
        elapsed, running_at = 0.0, None
        aimed = planner.version if planner.expected_duration(1_000) is not None else None
        while True:
            elapsed += planner.next_delay(records=1_000, elapsed=elapsed)
            if elapsed >= true_duration:
                break
            running_at = elapsed
        planner.observe(records=1_000, running_at=running_at, finished_by=elapsed, aimed_with=aimed)
        misses.append(running_at is not None)
    assert sum(misses[18:]) < sum(misses[:18])
    assert sum(misses[18:]) <= 1
