"""What a person sees while a run goes: a live line on a terminal, a ``run.progress`` log otherwise.

Both read the engine's :class:`~orchestrator.outcomes.RunStats` and say the same things: records
and bytes read, the percent of the input where its size is known, the current rate (over the
last few seconds, not since the start), the time left, imports in flight and done, what was
imported, what broke a local rule ("invalid") and what the API refused, and the time elapsed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from orchestrator.logs import get_logger
from orchestrator.outcomes import RunStats

if TYPE_CHECKING:
    from rich.live import Live
    from rich.text import Text

__all__ = ["ProgressDisplay", "RateWindow", "progress_fields", "progress_line"]

log = get_logger("orchestrator.progress")

#: Seconds of history the current rate is measured over.
RATE_WINDOW_S = 5.0


@dataclass(slots=True)
class RateWindow:
    """Records and bytes per second over the last ``span`` seconds of samples.

    Args:
        span: seconds of history kept.
    """

    span: float = RATE_WINDOW_S
    _samples: deque[tuple[float, int, int]] = field(default_factory=deque, repr=False)

    def add(self, now: float, records: int, size: int) -> tuple[float, float]:
        """Take a sample; return ``(records/s, bytes/s)`` since the oldest sample kept.

        Args:
            now: ``time.monotonic()`` of the sample.
            records: records read so far.
            size: bytes read so far.
        """
        samples = self._samples
        samples.append((now, records, size))
        while len(samples) > 2 and now - samples[1][0] >= self.span:
            samples.popleft()
        then, records_then, size_then = samples[0]
        elapsed = now - then
        if elapsed <= 0:
            return 0.0, 0.0
        return (records - records_then) / elapsed, (size - size_then) / elapsed


def progress_fields(
    stats: RunStats, window: RateWindow, now: float, read_ended: float | None = None
) -> dict[str, Any]:
    """The numbers of one progress report, as a ``run.progress`` event's keys.

    Args:
        stats: the run's live counters.
        window: the rate window of this display (sampled here).
        now: ``time.monotonic()``.
        read_ended: when reading was first seen done, if it was.
    """
    records_per_s, bytes_per_s = window.add(now, stats.records_read, stats.bytes_read)
    total = stats.input_bytes if not stats.resumed else None
    percent = None
    eta_s = None
    if total:
        percent = min(100.0, 100.0 * stats.bytes_read / total)
        if not stats.reading_done and bytes_per_s > 0:
            eta_s = max(0.0, (total - stats.bytes_read) / bytes_per_s)
    reading = not stats.reading_done
    return {
        "records_read": stats.records_read,
        "bytes_read": stats.bytes_read,
        "input_bytes": total,
        "percent": None if percent is None else round(percent, 1),
        "records_per_s": round(records_per_s) if reading else None,
        "bytes_per_s": round(bytes_per_s) if reading else None,
        "eta_s": None if eta_s is None else round(eta_s, 1),
        "reading_done": stats.reading_done,
        "read_s": None if read_ended is None else round(read_ended - stats.started, 1),
        "imports_in_flight": stats.imports_in_flight,
        "imports_finished": stats.imports_finished,
        "records_imported": stats.records_imported,
        "records_invalid": stats.records_rejected,
        "records_refused_by_api": stats.records_failed,
        "resumed": stats.resumed,
        "elapsed_s": round(now - stats.started, 1),
    }


def _mb(size: float) -> str:
    return f"{size / 1e6:,.1f}"


def _clock(seconds: float) -> str:
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def progress_line(fields: dict[str, Any]) -> str:
    """One line for a terminal, from :func:`progress_fields`.

    Args:
        fields: one progress report.
    """
    read = f"read {_plural(fields['records_read'], 'record')}"
    if fields["resumed"]:
        read = "resumed: " + read
    size = fields["bytes_read"]
    if fields["input_bytes"]:
        read += f"  {_mb(size)}/{_mb(fields['input_bytes'])} MB {fields['percent']:.0f}%"
    elif size:
        read += f"  {_mb(size)} MB"
    if fields["reading_done"]:
        if fields["read_s"] is not None:
            read += f" in {_clock(fields['read_s'])}"
    else:
        if fields["bytes_per_s"]:
            read += f"  {_mb(fields['bytes_per_s'])} MB/s"
        read += f"  {fields['records_per_s']:,} records/s"
        if fields["eta_s"] is not None:
            read += f"  ETA {_clock(fields['eta_s'])}"
    imports = (
        f"imports: {fields['imports_in_flight']} in flight, {fields['imports_finished']:,} done"
    )
    outcome = f"imported {fields['records_imported']:,}"
    if fields["records_invalid"]:
        outcome += f"  invalid {fields['records_invalid']:,}"
    if fields["records_refused_by_api"]:
        outcome += f"  refused by the API {fields['records_refused_by_api']:,}"
    return f"{read} | {imports} | {outcome} | {_clock(fields['elapsed_s'])}"


class ProgressDisplay:
    """The live line on a terminal, or a ``run.progress`` log line every ``log_every`` seconds.

    Args:
        stats: the counters the engine updates.
        live: show the live line (stderr is a terminal, or ``--progress on``).
        log_every: seconds between two ``run.progress`` events when not live; ``None`` or 0:
            none (one is still logged at the end).
    """

    def __init__(self, stats: RunStats, *, live: bool, log_every: float | None = None) -> None:
        self._stats = stats
        self._window = RateWindow()
        self._read_ended: float | None = None
        self._live: Live | None = None
        self._log_every = log_every or None
        self._task_group: TaskGroup | None = None
        self._logging = anyio.CancelScope()
        self._stopped = False
        if live:
            # rich is loaded only for a live display (most runs are not on a terminal)
            from rich.console import Console
            from rich.live import Live

            # rich refreshes from its own thread, reading plain ints: the event loop never waits.
            self._live = Live(
                get_renderable=self._render,
                console=Console(stderr=True),
                refresh_per_second=4,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=True,
            )

    def _fields(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._stats.reading_done and self._read_ended is None:
            self._read_ended = now
        return progress_fields(self._stats, self._window, now, self._read_ended)

    def _render(self) -> Text:
        from rich.text import Text

        return Text(progress_line(self._fields()))

    async def _log_periodically(self, every: float) -> None:
        # Only this task's own scope is cancelled to stop it: cancelling the task group's scope
        # would cancel the caller's code inside the ``async with`` as well.
        with self._logging:
            while True:
                await anyio.sleep(every)
                log.info("run.progress", **self._fields())

    async def __aenter__(self) -> ProgressDisplay:
        if self._live is not None:
            self._live.start()
        else:
            self._fields()  # the first sample of the rate window
            if self._log_every is not None:
                self._task_group = anyio.create_task_group()
                await self._task_group.__aenter__()
                self._task_group.start_soon(self._log_periodically, self._log_every)
        return self

    async def stop(self) -> None:
        """Stop refreshing, leaving the last line on screen (or logging a last report)."""
        if self._stopped:
            return
        self._stopped = True
        if self._live is not None:
            self._live.stop()
            self._live = None
            return
        self._logging.cancel()
        log.info("run.progress", **self._fields())

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        if self._task_group is not None:
            group, self._task_group = self._task_group, None
            await group.__aexit__(exc_type, exc, tb)
