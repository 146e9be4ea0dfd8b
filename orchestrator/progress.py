"""The CLI's live progress line on stderr (rich), fed by the engine's RunStats counters."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.text import Text

from orchestrator.outcomes import RunStats

__all__ = ["ProgressDisplay"]


class ProgressDisplay:
    """A one-line live view of a run; does nothing when disabled (no terminal, --progress off).

    Args:
        stats: the counters the engine updates.
        enabled: show the display at all.
    """

    def __init__(self, stats: RunStats, *, enabled: bool) -> None:
        self._stats = stats
        self._live: Live | None = None
        if enabled:
            # rich refreshes from its own thread, reading plain ints: the event loop never waits.
            self._live = Live(
                get_renderable=self._render,
                console=Console(stderr=True),
                refresh_per_second=4,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=True,
            )

    def _render(self) -> Text:
        s = self._stats
        return Text(
            f"read {s.records_read:,} ({s.rate():,.0f}/s)  rejected {s.records_rejected:,}  "
            f"batches {s.batches_sealed}  in flight {s.imports_in_flight}  "
            f"finished {s.imports_finished}  imported {s.records_imported:,}  "
            f"failed {s.records_failed:,}"
        )

    async def __aenter__(self) -> ProgressDisplay:
        if self._live is not None:
            self._live.start()
        return self

    async def stop(self) -> None:
        """Stop refreshing, leaving the last line on screen."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
