"""Benchmark: status calls per import and finish-detection delay of the poll planner.

The planner is pure logic, so it is driven on a simulated clock with synthetic import durations
(every workload runs in milliseconds). Each workload imports one batch after another through one
planner, as an account does; measured in the same run, two baselines: polling every ``poll_max``
(the simplest client that keeps to the window) and the fewest calls the window allows (an oracle
that knows each duration: ``max(1, ceil(max(D, poll_min) / poll_max))`` calls, seeing the end
``max(0, poll_min - D)`` late). Goals: calls <= 1.3x the fewest; mean detection delay <= 25% of
``poll_max`` on steady workloads. A last table: the first wave of 5 imports before any estimate,
status calls in its first minute, probing against polling every ``poll_min``.

    python -m benchmarks.polling [--imports 200] [--poll-min 5] [--poll-max 30]
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks._common import goal
from benchmarks._data import record_section
from orchestrator.polling import PollPlanner

TITLE = "Polling: calls per import and detection delay (benchmarks.polling)"

Workload = Callable[[int, random.Random], tuple[int, float]]  # import number -> (records, s)


class SimClock:
    """A clock the benchmark moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Figures:
    calls: int = 0
    delay: float = 0.0
    delays: list[float] | None = None


def ours(planner: PollPlanner, clock: SimClock, records: int, duration: float) -> tuple[int, float]:
    """Poll one import to its end with the planner: (calls, seconds seen after the end)."""
    track = planner.track(records=records, submitted=clock.now)
    start, calls = clock.now, 0
    while True:
        clock.now = max(clock.now, track.next_poll_at())
        track.sent(clock.now)
        calls += 1
        running = clock.now - start < duration
        track.answered(running=running)
        if not running:
            track.finished()
            return calls, clock.now - start - duration


def every_poll_max(duration: float, poll_max: float) -> tuple[int, float]:
    calls = max(1, math.ceil(duration / poll_max - 1e-12))
    return calls, calls * poll_max - duration


def fewest(duration: float, poll_min: float, poll_max: float) -> tuple[int, float]:
    return max(1, math.ceil(max(duration, poll_min) / poll_max - 1e-12)), max(
        0.0, poll_min - duration
    )


def workloads() -> dict[str, tuple[Workload, bool]]:
    """name -> (import number -> (records, seconds), steady?)."""

    def mixed_size(n: int, rng: random.Random) -> tuple[int, float]:
        records = rng.randrange(1_000, 60_000)
        return records, records / 1_000

    def fixed_latency(n: int, rng: random.Random) -> tuple[int, float]:
        records = rng.choice([2_000, 10_000, 40_000])
        return records, 20.0 + records / 5_000

    def last_batch_small(n: int, rng: random.Random) -> tuple[int, float]:
        records = 2_000 if n % 10 == 9 else 40_000
        return records, 3.0 + records / 2_000

    return {
        "steady, 12 s": (lambda n, rng: (12_000, 12.0), True),
        "steady, 100 s": (lambda n, rng: (100_000, 100.0), True),
        "jittered, 12 s +-20%": (lambda n, rng: (12_000, 12.0 * rng.uniform(0.8, 1.2)), False),
        "fixed latency, 20 s + n/5000": (fixed_latency, False),
        "mixed sizes, 1k-60k at 1000/s": (mixed_size, False),
        "short, 1 s": (lambda n, rng: (500, 1.0), True),
        "every 10th batch small": (last_batch_small, False),
    }


def first_wave(
    poll_min: float, poll_max: float, duration: float = 120.0, *, restored: bool = False
) -> tuple[int, int, float]:
    """5 imports submitted at once: status calls in their first minute, calls until each is seen
    done, and how late it is seen. Before any estimate, or (``restored``) with the planner
    started from an earlier run's history of four such imports, as ``insight-import run`` is."""
    clock = SimClock()
    planner = PollPlanner(poll_min=poll_min, poll_max=poll_max, clock=clock)
    if restored:
        earlier = PollPlanner(poll_min=poll_min, poll_max=poll_max, clock=clock)
        for _ in range(4):
            ours(earlier, clock, 10_000, duration)
        planner.restore(earlier.history())
        clock.now = 0.0
    probe = planner.track(records=10_000, submitted=0.0)
    times: list[float] = []
    while not times or times[-1] < duration:
        clock.now = probe.next_poll_at()
        probe.sent(clock.now)
        probe.answered(running=clock.now < duration)
        times.append(clock.now)
    first_minute = 5 * sum(1 for t in times if t < 60.0)
    return first_minute, 5 * len(times), times[-1] - duration


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imports", type=int, default=200, help="imports per workload")
    parser.add_argument("--poll-min", type=float, default=5.0)
    parser.add_argument("--poll-max", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    pmin, pmax = args.poll_min, args.poll_max

    rows = []
    ratios: dict[str, float] = {}
    all_met = True
    for name, (workload, steady) in workloads().items():
        rng = random.Random(args.seed)
        clock = SimClock()
        planner = PollPlanner(poll_min=pmin, poll_max=pmax, clock=clock)
        mine, base, best = Figures(delays=[]), Figures(), Figures()
        for number in range(args.imports):
            records, duration = workload(number, rng)
            calls, delay = ours(planner, clock, records, duration)
            mine.calls += calls
            mine.delay += delay
            assert mine.delays is not None
            mine.delays.append(delay)
            for figures, (c, d) in (
                (base, every_poll_max(duration, pmax)),
                (best, fewest(duration, pmin, pmax)),
            ):
                figures.calls += c
                figures.delay += d
            clock.now += 1.0  # the next submit
        n = args.imports
        ratio = mine.calls / best.calls
        mean_delay = mine.delay / n
        delays = sorted(mine.delays or [0.0])
        p95 = delays[max(0, math.ceil(0.95 * n) - 1)]
        ratios[name] = ratio
        met = ratio <= 1.3 and (not steady or mean_delay <= 0.25 * pmax)
        all_met &= met
        rows.append(
            f"| {name} | {mine.calls / n:.2f} | {base.calls / n:.2f} | {best.calls / n:.2f} "
            f"| **{ratio:.2f}x** | {mean_delay:.2f} | {p95:.2f} | {base.delay / n:.2f} "
            f"| {best.delay / n:.2f} | {'steady: ' if steady else ''}{goal(met)} |"
        )
    cold_minute, cold_calls, cold_delay = first_wave(pmin, pmax)
    warm_minute, warm_calls, warm_delay = first_wave(pmin, pmax, restored=True)
    every_min_calls = 5 * math.ceil(60.0 / pmin - 1)
    body = (
        f"Simulated clock, polls {pmin:g}-{pmax:g} s, {args.imports} imports per workload one "
        "after another through one planner (learning included: the first imports are probed "
        "for), answers taking no time. Calls and delays per import; delay = seconds the end was "
        "seen after it happened. Goals: calls <= 1.3x the fewest; on steady workloads mean "
        f"delay <= 25% of poll_max ({0.25 * pmax:g} s).\n\n"
        "| workload | calls (ours) | calls (every poll_max) | calls (fewest) | ours / fewest "
        "| delay s (ours, mean) | delay s (ours, p95) | delay s (every poll_max) "
        "| delay s (fewest) | goal |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows) + "\n\n"
        "First wave, 5 imports of 120 s submitted at once before any estimate: "
        f"**{cold_minute} status calls in its first minute** probing with growing gaps, against "
        f"{every_min_calls} polling every poll_min (the Basic tier allows 35 a minute for the "
        "whole account; the account's status-call budget, 30 a minute by default, caps either); "
        f"{cold_calls} calls until all are seen done, each {cold_delay:.1f} s after its end. "
        "The same wave in a later run, its planner started from the history the run before "
        f"kept (`polls-*.json`): **{warm_minute} calls in the first minute, {warm_calls} in "
        f"all**, each seen {warm_delay:.1f} s after its end."
        + ("" if all_met else "\n\nSome goals are **NOT met**.")
    )
    record_section(TITLE, body)
    print(body)
    return ratios


if __name__ == "__main__":
    main()
