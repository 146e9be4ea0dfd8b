"""The account's import slots: at most ``max_concurrent`` bulk imports in flight at once.

A slot is held from the submit of an import until its status is terminal. Every run of one
account shares its gate: two concurrent imports into different collections together stay within
the API's limit. ``LocalSlotGate`` serves one process; a gate shared between processes (the
worker on PostgreSQL) keeps the same interface.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

import anyio

__all__ = ["LocalSlotGate", "SlotGate"]


class SlotGate(Protocol):
    """Hands out an account's import slots."""

    @property
    def capacity(self) -> int:
        """How many slots the account has."""
        ...

    @property
    def in_use(self) -> int:
        """How many slots are taken now."""
        ...

    def hold(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Wait for a free slot and hold it for the block: from the submit to the end."""
        ...


class LocalSlotGate:
    """The slots of one account, shared by the runs of this process (first come, first served).

    Args:
        capacity: slots of the account (the API allows 5 imports in flight).
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._semaphore = anyio.Semaphore(capacity)

    def __repr__(self) -> str:
        return f"LocalSlotGate(in_use={self.in_use}, capacity={self.capacity})"

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._capacity - self._semaphore.value

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        async with self._semaphore:
            yield
