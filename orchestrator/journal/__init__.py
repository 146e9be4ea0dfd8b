"""The durable state of a run: what was read, sealed, submitted and finished, and what was not.

``open_journal(path)`` gives a ``SqliteJournal`` for a path and a ``MemoryJournal`` for ``None``;
the engine sees only the ``Journal`` protocol, so other backends can follow.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.journal.base import (
    BatchPhase,
    BatchStore,
    DeadLetter,
    InputProgress,
    Journal,
    NewBatch,
    RecordedRun,
    RunSpec,
    RunState,
    StoredBatch,
    account_id,
)
from orchestrator.journal.memory import MemoryJournal
from orchestrator.journal.sqlite import SqliteJournal

__all__ = [
    "BatchPhase",
    "BatchStore",
    "DeadLetter",
    "InputProgress",
    "Journal",
    "MemoryJournal",
    "NewBatch",
    "RecordedRun",
    "RunSpec",
    "RunState",
    "SqliteJournal",
    "StoredBatch",
    "account_id",
    "open_journal",
]


async def open_journal(path: str | Path | None) -> Journal:
    """Return the journal for ``path``: durable SQLite for a path, in memory for ``None``.

    Nothing is touched until ``Journal.open`` (or ``async with``): the SQLite file, its parent
    directories and its lock are created and taken then.

    Args:
        path: the journal file, or ``None`` for a journal in memory (no resume after a crash).
    """
    if path is None:
        return MemoryJournal()
    return SqliteJournal(path)
