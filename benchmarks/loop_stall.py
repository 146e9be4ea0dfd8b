"""Event-loop stalls while importing ~1 GB in-process: a 5 ms ticker must never be 50 ms late.

The import uses the library API (``Orchestrator.import_files``, SQLite journal, default 50 MB body
cap) against the simulator in ANOTHER process, so the simulator's CPU work does not stall our loop.
A ticker task sleeps 5 ms in a loop and records how late each wake-up is. Baseline, measured in
the same run: the same ticker on an idle loop. Figures: max and p99 lateness during the import;
ratios max / 50 ms goal and p99 / idle p99. ``--diagnose`` turns on asyncio debug mode and lists the
slowest callbacks (debug mode slows everything a little). ``--watchdog MS`` runs a thread that,
whenever the loop is MS late, takes the loop thread's stack (and the other threads' top frames):
where the loop was stuck, not only which callback was slow. ``--freeze`` freezes the start-up
heap first (``gc.freeze()``, as the CLI does): a full collection of the imports alone costs tens
of milliseconds on a slow core, and it stalls the loop that long wherever it runs.

    python -m benchmarks.loop_stall [--mb 1000] [--keep] [--diagnose] [--watchdog MS]
        [--parse-processes N] [--freeze]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

from benchmarks._common import (
    DATA_DIR,
    SIM_PASSWORD,
    SIM_USER,
    ensure_free_disk,
    goal,
    percentile,
    quiet_logs,
    simulator_process,
    write_big_orders,
)
from benchmarks._data import record_section
from orchestrator import (
    ClientSettings,
    Collection,
    InsightClient,
    Orchestrator,
    Settings,
    SqliteJournal,
)
from orchestrator.parsing import default_processes

TICK = 0.005
GOAL_S = 0.050


class _Watchdog:
    """A thread that takes the loop thread's stack whenever the loop is ``threshold`` late.

    The ticker calls ``beat`` before each sleep; the thread looks every millisecond and, once per
    late tick, keeps the stack of the loop thread (where it is stuck) and the innermost frame of
    every other thread (one of them holds the GIL). Sampling needs the GIL too, so the stack is
    taken when the thread gets it: while the loop is still stuck, or just after.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.samples: dict[int, tuple[list[str], list[str]]] = {}
        self._tick = 0
        self._since = time.perf_counter()
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)

    def beat(self, tick: int) -> None:
        self._tick, self._since = tick, time.perf_counter()

    def __enter__(self) -> _Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            tick, since = self._tick, self._since
            if tick in self.samples or time.perf_counter() - since - TICK < self.threshold:
                continue
            frames = sys._current_frames()
            loop = frames.pop(self._loop_thread, None)
            if loop is None:
                continue
            stack = [_frame(f) for f, _ in traceback.walk_stack(loop)][:6]
            others = sorted(
                f"{threading._active.get(ident, ident)!s:.40}: {_frame(frame)}"  # type: ignore[attr-defined]
                for ident, frame in frames.items()
                if ident != threading.get_ident()
            )
            self.samples[tick] = (stack, others)


class _Collections:
    """The collector's passes while it is installed: how many of each generation, and how long
    the full ones took (each stalls the loop that long, in whichever thread it runs)."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.full: list[float] = []
        self._started = 0.0

    def __enter__(self) -> _Collections:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        generation = info["generation"]
        self.counts[generation] += 1
        if generation == 2:
            self.full.append(time.perf_counter() - self._started)

    def summary(self) -> str:
        young, middle, full = self.counts
        longest = f", the longest {max(self.full) * 1000:.0f} ms" if self.full else ""
        return (
            f"the collector ran {young:,} young, {middle:,} middle and {full:,} full passes"
            f" during the import{longest}"
        )


def _frame(frame: object) -> str:
    code = frame.f_code  # type: ignore[attr-defined]
    return f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}"  # type: ignore[attr-defined]


async def _ticker(
    lateness: list[float], stop: asyncio.Event, watchdog: _Watchdog | None = None
) -> None:
    while not stop.is_set():
        if watchdog is not None:
            watchdog.beat(len(lateness))
        before = time.perf_counter()
        await asyncio.sleep(TICK)
        lateness.append(time.perf_counter() - before - TICK)


async def _idle(seconds: float) -> list[float]:
    lateness: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(_ticker(lateness, stop))
    await asyncio.sleep(seconds)
    stop.set()
    await task
    return lateness


async def _during_import(
    path: Path, base_url: str, journal_dir: Path, processes: int, watchdog: _Watchdog | None
) -> tuple[list[float], float]:
    client = InsightClient(
        ClientSettings(username=SIM_USER, password=SIM_PASSWORD, base_url=base_url)
    )
    settings = Settings(poll_min=0.05, poll_max=0.5, parse_processes=processes)
    lateness: list[float] = []
    stop = asyncio.Event()
    async with (
        SqliteJournal(journal_dir / "journal.sqlite") as journal,
        Orchestrator(client, settings=settings) as orch,
    ):
        task = asyncio.create_task(_ticker(lateness, stop, watchdog))
        start = time.monotonic()
        try:
            result = await orch.import_files(
                Collection("Orders", "contact", "orders"), [str(path)], journal=journal
            )
        finally:
            stop.set()
            await task
        wall = time.monotonic() - start
    if not result.ok:
        raise SystemExit(f"the import did not succeed: {result.counters}")
    return lateness, wall


class _SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "took" in message:
            self.messages.append(message)


def _seconds(message: str) -> float:
    try:
        return float(message.rsplit("took ", 1)[1].split(" ")[0])
    except (IndexError, ValueError):
        return 0.0


def main() -> None:
    """Run the loop-stall benchmark and record its section of RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=1000.0, help="input size in MB")
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--records-per-second", type=float, default=2_000_000.0)
    parser.add_argument("--diagnose", action="store_true", help="asyncio debug: slow callbacks")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    parser.add_argument(
        "--watchdog",
        type=float,
        default=0.0,
        metavar="MS",
        help="take the loop thread's stack whenever the loop is MS late (0: off)",
    )
    parser.add_argument(
        "--freeze",
        action="store_true",
        help="freeze the start-up heap first (gc.freeze(), as the CLI and many servers do)",
    )
    parser.add_argument(
        "--parse-processes",
        type=int,
        default=None,
        help="parse worker processes (default: the library's, one per CPU; 0 parses in a thread)",
    )
    args = parser.parse_args()
    if args.parse_processes is None:
        args.parse_processes = default_processes()
    quiet_logs()
    ensure_free_disk(DATA_DIR, int(args.mb * 1e6 + 1e9))
    path = DATA_DIR / f"loop-stall-{args.mb:g}mb.jsonl"
    slow = _SlowCallbacks()
    try:
        lines = write_big_orders(path, mb=args.mb)
        idle = asyncio.run(_idle(args.idle_seconds))
        # What one full collection of this process's heap costs (the imports, mostly): a
        # collection that runs on the loop, or in a thread holding the GIL, stalls it that long.
        started = time.thread_time()
        gc.collect()
        full_collection = time.thread_time() - started
        if args.freeze:
            gc.freeze()
        with (
            simulator_process(records_per_second=args.records_per_second) as base_url,
            tempfile.TemporaryDirectory(prefix="loop-stall-", dir=DATA_DIR) as tmp,
        ):
            if args.diagnose:
                logging.getLogger("asyncio").addHandler(slow)
                logging.getLogger("asyncio").setLevel(logging.WARNING)
            with contextlib.ExitStack() as stack:
                collections = stack.enter_context(_Collections())
                watchdog = None
                if args.watchdog:
                    watchdog = stack.enter_context(_Watchdog(args.watchdog / 1000))
                busy, wall = asyncio.run(
                    _during_import(path, base_url, Path(tmp), args.parse_processes, watchdog),
                    debug=args.diagnose,
                )
    finally:
        gc.unfreeze()
        if not args.keep:
            path.unlink(missing_ok=True)

    idle_p99 = percentile(idle, 0.99)
    busy_max = max(busy)
    busy_p99 = percentile(busy, 0.99)
    over = sum(1 for late in busy if late >= GOAL_S)
    rows = [
        ("ticks", f"{len(idle):,}", f"{len(busy):,}"),
        (
            "median lateness",
            f"{statistics.median(idle) * 1000:.2f} ms",
            f"{statistics.median(busy) * 1000:.2f} ms",
        ),
        ("p99 lateness", f"{idle_p99 * 1000:.2f} ms", f"{busy_p99 * 1000:.2f} ms"),
        ("max lateness", f"{max(idle) * 1000:.2f} ms", f"{busy_max * 1000:.2f} ms"),
        ("ticks >= 50 ms late", f"{sum(1 for v in idle if v >= GOAL_S)}", f"{over}"),
    ]
    table = "| figure | idle loop (baseline) | during the import |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows
    )
    parsing = (
        f"parsing in {args.parse_processes} worker processes"
        + (", the library's default" if args.parse_processes == default_processes() else "")
        if args.parse_processes
        else "parsing in a worker thread (`parse_processes=0`)"
    )
    max_ratio = busy_max / GOAL_S
    p99_ratio = busy_p99 / idle_p99 if idle_p99 > 0 else float("inf")
    body = (
        f"In-process import of {path.stat().st_size / 1e9 if path.exists() else args.mb / 1000:.2f}"
        f" GB ({lines:,} records) with the library API (default 50 MB bodies, SQLite journal, polls"
        f" 0.05-0.5 s, {parsing}) against the simulator in another process, in {wall:.0f} s; a"
        " ticker sleeps "
        f"{TICK * 1000:g} ms in a loop and records its lateness. One full collection of the"
        f" process's heap before the import (its imports) took {full_collection * 1000:.0f} ms"
        " of CPU"
        + (
            "; that heap was then frozen (`gc.freeze()`, as the CLI does), so later collections"
            " skip it"
            if args.freeze
            else ""
        )
        + ".\n\n"
        + table
        + "\n\n"
        + f"- **max stall / 50 ms goal: {max_ratio:.2f}x** (goal < 1: {goal(max_ratio < 1)})\n"
        + f"- p99 during import / p99 idle: **{p99_ratio:.1f}x**\n"
        + f"- {collections.summary()}\n"
    )
    if args.diagnose and slow.messages:
        worst = sorted(slow.messages, key=_seconds, reverse=True)[:8]
        body += (
            "\nSlowest callbacks (asyncio debug mode):\n\n"
            + "\n".join(f"- `{m[:300]}`" for m in worst)
            + "\n"
        )
        print("\n".join(m[:400] for m in worst))
    if watchdog is not None:
        _print_stalls(busy, watchdog)
    title = "Event-loop stalls during a 1 GB in-process import"
    if args.parse_processes:
        title += f", {args.parse_processes} parse processes"
    else:
        title += ", parsing in a thread"
    if args.freeze:
        title += ", start-up heap frozen"
    record_section(title, body)
    print(table)
    print(f"max stall / 50 ms goal: {max_ratio:.2f}x (goal < 1); max {busy_max * 1000:.1f} ms")
    print(collections.summary())
    print(
        f"p99 during import / idle p99: {p99_ratio:.1f}x "
        f"({busy_p99 * 1000:.2f} ms vs {idle_p99 * 1000:.2f} ms)"
    )


def _print_stalls(lateness: list[float], watchdog: _Watchdog) -> None:
    """Each late tick with where the loop was, then the places counted by the loop's frame."""
    places: Counter[str] = Counter()
    for tick, (stack, others) in sorted(watchdog.samples.items()):
        late = lateness[tick] if tick < len(lateness) else float("nan")
        places[stack[0] if stack else "?"] += 1
        print(f"tick {tick}: {late * 1000:.1f} ms late; loop in:")
        for line in stack:
            print(f"    {line}")
        for line in others:
            print(f"  other {line}")
    print("late ticks by the loop's innermost frame:")
    for place, count in places.most_common():
        print(f"  {count:4d}  {place}")


if __name__ == "__main__":
    main()
