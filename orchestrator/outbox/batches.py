"""The outbox store seen as a ``BatchStore``: the worker's imports through the run's downstream.

``OutboxBatches`` adapts one ``OutboxStore`` queue (an account's collection) to what
``lifecycle.Downstream`` calls, so slot, submit, poll, resubmit, split and outcome are the same
code for ``run`` and the worker. A batch's id is the store's import ref. What the store keeps
durably: the phase, the import id, the body, its rows, PUT intents and resubmits; what only this
process counts (polls, PUT requests as the API saw them, counters) lives here, for the outcome
and the metrics.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import anyio
import orjson

from orchestrator.errors import JournalStateError
from orchestrator.journal.base import BatchPhase, DeadLetter, NewBatch, StoredBatch
from orchestrator.outbox.base import (
    RECORD_ORIGIN,
    ImportPart,
    ImportPhase,
    OutboxQueue,
    OutboxStore,
    Rejection,
    SlotsFull,
    StoredImport,
)
from orchestrator.refs import RecordRefs

__all__ = ["OutboxBatches", "stored_refs"]

#: Bytes of bodies a queue keeps in memory from their seal to their first PUT (one 50 MB body):
#: more wait for a slot, and are read back from the store when their turn comes.
_KEPT_BYTES = 60_000_000

_PHASES = {
    ImportPhase.SEALED: BatchPhase.SEALED,
    ImportPhase.SUBMITTING: BatchPhase.SUBMITTING,
    ImportPhase.SUBMITTED: BatchPhase.SUBMITTED,
}


class OutboxBatches:
    """The imports of one outbox queue, as the downstream's ``BatchStore``.

    Args:
        store: the outbox store.
        queue: the queue whose imports these are.
        on_finished: called after each import's rows are settled in the store.
    """

    keeps_bodies = False  # each load_body gives a body of its own, freed after the PUT

    def __init__(
        self,
        store: OutboxStore,
        queue: OutboxQueue,
        *,
        on_finished: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.queue = queue
        self._on_finished = on_finished
        self.counters: Counter[str] = Counter()
        self._batches: dict[int, StoredBatch] = {}
        self._rows: dict[int, tuple[int, ...]] = {}  # ref -> row ids in body order
        self._kept: dict[int, bytearray] = {}  # ref -> its body, until its first load_body

    def __repr__(self) -> str:
        return f"OutboxBatches({self.queue!r}, unfinished={len(self._batches)})"

    @property
    def unfinished(self) -> int:
        """Imports of this queue known to this process and not finished."""
        return len(self._batches)

    def register(self, held: StoredImport, *, body: bytearray | None = None) -> StoredBatch:
        """Take over an import the store holds (sealed now, or found by ``recover``).

        Args:
            held: the import.
            body: its body, just stored: the first ``load_body`` hands this very object over
                instead of reading the store (the sender frees it after the PUT). A queue keeps
                60 MB of bodies at most, so bodies waiting for a slot do not pile up in memory.
        """
        if held.queue != self.queue:
            raise JournalStateError(f"import {held.ref} belongs to {held.queue}, not {self.queue}")
        stored = StoredBatch(
            batch_id=held.ref,
            phase=_PHASES[held.phase],
            import_id=held.import_id,
            record_count=len(held.row_ids),
            body_bytes=held.body_bytes,
            depends_on=held.depends_on,
            attempts=held.attempts,
            resubmits=held.resubmits,
            in_doubt=held.in_doubt,
            polls=0,
            submitted_at=held.submitted_at,
            finished_at=None,
            status=None,
            submits=held.attempts,
        )
        self._batches[held.ref] = stored
        self._rows[held.ref] = held.row_ids
        if body is not None:
            kept = sum(map(len, self._kept.values()))
            if not self._kept or kept + len(body) <= _KEPT_BYTES:
                self._kept[held.ref] = body
        return stored

    def _get(self, batch_id: int) -> StoredBatch:
        stored = self._batches.get(batch_id)
        if stored is None:
            raise JournalStateError(f"import {batch_id} is not one of {self.queue}'s")
        return stored

    def _set(self, batch_id: int, **changes: object) -> StoredBatch:
        stored = self._batches[batch_id] = dataclasses.replace(self._get(batch_id), **changes)  # type: ignore[arg-type]
        return stored

    # ------------------------------------------------------------------ BatchStore

    async def add_counters(self, counters: Mapping[str, int]) -> None:
        """Count in memory (the metrics read them); nothing here needs to survive a crash."""
        self.counters.update(counters)

    async def load_body(self, batch_id: int) -> bytes | bytearray:
        """A fresh copy of the body, as a bytearray: the sender clears it after the PUT, so it
        does not outlive the upload until the garbage collector finds the HTTP client's
        reference cycles (bodies are up to 50 MB)."""
        self._get(batch_id)
        kept = self._kept.pop(batch_id, None)
        if kept is not None:
            return kept
        body = await self.store.load_body(batch_id)
        return body if isinstance(body, bytearray) else bytearray(body)

    async def mark_submitting(self, batch_id: int) -> StoredBatch:
        """Record the intent; on a shared store this takes the import's slot, and another worker
        may have taken the last one since the gate looked: wait for one to free, then again
        (counted as an account-full wait)."""
        stored = self._get(batch_id)
        while True:
            try:
                await self.store.mark_submitting(batch_id)
                break
            except SlotsFull as full:
                self.counters["account_full_waits"] += 1
                wait_for_slot = getattr(self.store, "wait_for_slot", None)
                if wait_for_slot is None:  # only a shared store counts slots
                    raise
                await wait_for_slot(full.account)
        return self._set(batch_id, phase=BatchPhase.SUBMITTING, submits=stored.submits + 1)

    async def mark_refused(self, batch_id: int, *, calls: int) -> StoredBatch:
        stored = self._get(batch_id)
        if stored.phase is BatchPhase.SUBMITTING:
            await self.store.mark_refused(batch_id)
        return self._set(
            batch_id, phase=BatchPhase.SEALED, import_id=None, attempts=stored.attempts + calls
        )

    async def mark_submitted(
        self, batch_id: int, import_id: str, submitted_at: float, *, calls: int = 1
    ) -> StoredBatch:
        stored = self._get(batch_id)
        await self.store.mark_submitted(batch_id, import_id)
        return self._set(
            batch_id,
            phase=BatchPhase.SUBMITTED,
            import_id=import_id,
            submitted_at=submitted_at,
            attempts=stored.attempts + calls,
        )

    async def mark_polled(self, batch_id: int, *, calls: int = 1) -> StoredBatch:
        return self._set(batch_id, polls=self._get(batch_id).polls + calls)

    async def mark_resubmit(self, batch_id: int) -> StoredBatch:
        stored = self._get(batch_id)
        await self.store.mark_resubmit(batch_id)
        return self._set(
            batch_id, phase=BatchPhase.SEALED, import_id=None, resubmits=stored.resubmits + 1
        )

    async def split_batch(self, batch_id: int, halves: Sequence[NewBatch]) -> list[int]:
        self._get(batch_id)
        parts = []
        for half in halves:
            refs = half.refs if isinstance(half.refs, RecordRefs) else RecordRefs.of(half.refs)
            ends = refs.ends
            if ends is None:
                raise JournalStateError("a split part has no record offsets")
            row_ids = tuple(_row_id(refs, index) for index in range(len(refs)))
            parts.append(ImportPart(row_ids, half.body, tuple(ends)))
        new = await self.store.split(batch_id, parts)
        del self._batches[batch_id]
        del self._rows[batch_id]
        self._kept.pop(batch_id, None)
        for held in new:
            self.register(held)
        return [held.ref for held in new]

    async def mark_finished(
        self,
        batch_id: int,
        *,
        status: str,
        imported: int,
        dead_letters: Sequence[DeadLetter],
        finished_at: float,
        counters: Mapping[str, int],
    ) -> StoredBatch:
        stored = self._get(batch_id)
        failures = await anyio.to_thread.run_sync(
            _failures_by_row, self._rows[batch_id], dead_letters
        )
        done = await self.store.finish(batch_id, failures=failures)
        self.counters.update(counters)
        self.counters["rows_dead_lettered"] += done.dead_lettered
        del self._batches[batch_id]
        del self._rows[batch_id]
        self._kept.pop(batch_id, None)
        if self._on_finished is not None:
            self._on_finished()
        return dataclasses.replace(
            stored,
            phase=BatchPhase.FINISHED,
            status=status,
            imported=imported,
            finished_at=finished_at,
        )


def _row_id(refs: RecordRefs, index: int) -> int:
    source = refs.source(index)
    if source is None or source.origin != RECORD_ORIGIN:
        raise JournalStateError("a record of an outbox import does not name its outbox row")
    return source.line


def _failures_by_row(
    rows: tuple[int, ...], dead_letters: Sequence[DeadLetter]
) -> dict[int, Rejection]:
    """The API's per-record failures (or a whole import given up) by outbox row id.

    Each dead letter names its row as its source (``insight_outbox:<id>``); one the API reported
    without a key we can find names none, and is counted against no row (its record stays
    imported as far as the store knows: the API did not say which one it was).
    """
    held = set(rows)
    failures: dict[int, Rejection] = {}
    for letter in dead_letters:
        if letter.source is None:
            continue
        origin, _, line = letter.source.rpartition(":")
        if origin != RECORD_ORIGIN or not line.isdigit() or int(line) not in held:
            continue
        failures[int(line)] = Rejection(letter.reason, letter.message, letter.details)
    return failures


def stored_refs(held: StoredImport) -> RecordRefs:
    """The record refs of an import the store holds (after a restart), from its identities."""
    keys: list[str] = []
    contacts: list[tuple[str, str] | None] = []
    for identity in held.identities:
        value = orjson.loads(identity) if identity else ""
        if isinstance(value, list):
            keys.append(str(value[2]))
            contacts.append((str(value[0]), str(value[1])))
        else:
            keys.append(str(value))
            contacts.append(None)
    return RecordRefs(
        keys,
        contacts,
        [RECORD_ORIGIN] * len(keys),
        list(held.row_ids),
        list(held.ends) if len(held.ends) == len(keys) else None,
    )
