"""A journal in memory: the SQLite journal's semantics without durability, for embedded use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Self

from orchestrator.errors import JournalMismatchError, JournalStateError
from orchestrator.journal.base import (
    SUBMITS_IN_DOUBT,
    BatchPhase,
    DeadLetter,
    InputProgress,
    NewBatch,
    RecordedRun,
    RunSpec,
    RunState,
    SealOne,
    StoredBatch,
    check_phase,
    mismatch_message,
    progress_list,
    redirected,
)
from orchestrator.refs import RecordRefs

if TYPE_CHECKING:
    pass

__all__ = ["MemoryJournal"]

_UNFINISHED = (BatchPhase.SEALED, BatchPhase.SUBMITTING, BatchPhase.SUBMITTED)


@dataclass(slots=True)
class _Run:
    spec: RunSpec
    inputs: list[InputProgress]
    batches: dict[int, StoredBatch]
    payloads: dict[int, tuple[bytes | bytearray, RecordRefs]]
    dead_letters: list[DeadLetter]
    counters: dict[str, int]
    next_batch_id: int = 1
    complete: bool = False


class MemoryJournal(SealOne):
    """A journal kept in memory: same behaviour as ``SqliteJournal``, gone when the process ends.

    Closing it keeps the state, so ``open`` on the same object resumes the run (and finds submits
    in doubt, like a durable journal after a crash). Usable as an async context manager.
    """

    keeps_bodies = True  # a body is stored as given: no copy in memory

    def __init__(self) -> None:
        self._run: _Run | None = None
        self._open = False

    def __repr__(self) -> str:
        return "MemoryJournal()"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(
        self, spec: RunSpec, *, fresh: bool = False, start_after: Sequence[InputProgress] = ()
    ) -> RunState:
        """Open the run ``spec``; see ``Journal.open``."""
        starts = progress_list(spec, start_after) if fresh else ()
        created = fresh or self._run is None
        if not created and self._run is not None and self._run.spec != spec:
            raise JournalMismatchError(mismatch_message(self._run.spec, spec))
        if created:
            self._run = _Run(
                spec=spec,
                inputs=[InputProgress(i, 0, "") for i in range(len(spec.inputs))],
                batches={},
                payloads={},
                dead_letters=[],
                counters={},
            )
            for start in starts:
                self._run.inputs[start.index] = replace(start, done=False)
        run = self._require(opening=True)
        for batch_id, batch in run.batches.items():
            if batch.phase is BatchPhase.SUBMITTING:
                run.batches[batch_id] = replace(
                    batch, phase=BatchPhase.SEALED, in_doubt=batch.in_doubt + 1
                )
                _add(run.counters, {SUBMITS_IN_DOUBT: 1})
        self._open = True
        return RunState(
            fresh=created,
            inputs=tuple(run.inputs),
            unfinished=tuple(
                b for _, b in sorted(run.batches.items()) if b.phase is not BatchPhase.FINISHED
            ),
            complete=run.complete,
            counters=dict(run.counters),
        )

    async def recorded(self) -> RecordedRun | None:
        """Return the run held, or ``None``; see ``Journal.recorded``."""
        run = self._run
        if run is None:
            return None
        return RecordedRun(spec=run.spec, complete=run.complete, inputs=tuple(run.inputs))

    async def seal_batches(
        self,
        *,
        batches: Sequence[NewBatch],
        progress: InputProgress | Sequence[InputProgress] | None,
        dead_letters: Sequence[DeadLetter],
        counters: Mapping[str, int],
    ) -> list[int]:
        """Store sealed batches at once; see ``Journal.seal_batches``."""
        run = self._require()
        progresses = progress_list(run.spec, progress)
        ids = []
        for batch in batches:
            batch_id = run.next_batch_id
            run.next_batch_id += 1
            run.batches[batch_id] = StoredBatch.sealed(
                batch_id,
                record_count=len(batch.refs),
                body_bytes=len(batch.body),
                depends_on=batch.depends_on,
                submitting=batch.submitting,
            )
            refs = batch.refs
            run.payloads[batch_id] = (
                batch.body,
                refs if isinstance(refs, RecordRefs) else RecordRefs.of(refs),
            )
            ids.append(batch_id)
        self._apply(run, progresses, dead_letters, counters)
        return ids

    async def save_progress(
        self,
        *,
        progress: InputProgress | Sequence[InputProgress] | None,
        dead_letters: Sequence[DeadLetter],
        counters: Mapping[str, int],
    ) -> None:
        """Record progress, dead letters and counter deltas; see ``Journal.save_progress``."""
        run = self._require()
        self._apply(run, progress_list(run.spec, progress), dead_letters, counters)

    async def add_counters(self, counters: Mapping[str, int]) -> None:
        """Add deltas to the run's counters (see ``Journal.add_counters``)."""
        _add(self._require().counters, counters)

    async def mark_submitting(self, batch_id: int) -> StoredBatch:
        """Write the intent to PUT a batch; see ``Journal.mark_submitting``."""
        _, batch = self._batch(
            batch_id, (BatchPhase.SEALED, BatchPhase.SUBMITTING), "mark it submitting"
        )
        return self._store(replace(batch, phase=BatchPhase.SUBMITTING, submits=batch.submits + 1))

    async def mark_refused(self, batch_id: int, *, calls: int) -> StoredBatch:
        """Record a refused submit; see ``Journal.mark_refused``."""
        _, batch = self._batch(batch_id, (BatchPhase.SUBMITTING,), "mark it refused")
        return self._store(replace(batch, phase=BatchPhase.SEALED, attempts=batch.attempts + calls))

    async def mark_submitted(
        self, batch_id: int, import_id: str, submitted_at: float, *, calls: int = 1
    ) -> StoredBatch:
        """Record a batch's import id; see ``Journal.mark_submitted``."""
        _, batch = self._batch(batch_id, (BatchPhase.SUBMITTING,), "mark it submitted")
        return self._store(
            replace(
                batch,
                phase=BatchPhase.SUBMITTED,
                import_id=import_id,
                submitted_at=submitted_at,
                attempts=batch.attempts + calls,
            )
        )

    async def mark_polled(self, batch_id: int, *, calls: int = 1) -> StoredBatch:
        """Count a batch's status requests; see ``Journal.mark_polled``."""
        _, batch = self._batch(batch_id, tuple(BatchPhase), "record its polls")
        return self._store(replace(batch, polls=batch.polls + calls))

    async def mark_resubmit(self, batch_id: int) -> StoredBatch:
        """Put a failed batch back to SEALED; see ``Journal.mark_resubmit``."""
        _, batch = self._batch(batch_id, _UNFINISHED, "resubmit it")
        return self._store(
            replace(batch, phase=BatchPhase.SEALED, import_id=None, resubmits=batch.resubmits + 1)
        )

    async def split_batch(self, batch_id: int, halves: Sequence[NewBatch]) -> list[int]:
        """Replace a batch by smaller ones; see ``Journal.split_batch``."""
        run, batch = self._batch(batch_id, _UNFINISHED, "split it")
        ids = await self.seal_batches(batches=halves, progress=None, dead_letters=(), counters={})
        self._store(replace(batch, phase=BatchPhase.FINISHED, status="split"))
        run.payloads.pop(batch_id, None)
        for other in list(run.batches.values()):
            if other.phase is not BatchPhase.FINISHED and batch_id in other.depends_on:
                self._store(replace(other, depends_on=redirected(other.depends_on, batch_id, ids)))
        return ids

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
        """Finish a batch; see ``Journal.mark_finished``."""
        run, batch = self._batch(batch_id, _UNFINISHED, "finish it")
        stored = self._store(
            replace(
                batch,
                phase=BatchPhase.FINISHED,
                status=status,
                imported=imported,
                finished_at=finished_at,
            )
        )
        run.payloads.pop(batch_id, None)
        self._apply(run, (), dead_letters, counters)
        return stored

    async def load_body(self, batch_id: int) -> bytes | bytearray:
        """Return the stored body of an unfinished batch (see ``Journal.load_body``)."""
        run, _ = self._batch(batch_id, _UNFINISHED, "load its body")
        return run.payloads[batch_id][0]

    async def load_refs(self, batch_id: int) -> RecordRefs:
        """Return the record refs of an unfinished batch; see ``Journal.load_refs``."""
        run, _ = self._batch(batch_id, _UNFINISHED, "load its refs")
        return run.payloads[batch_id][1]

    async def mark_complete(self) -> None:
        """Mark the run complete."""
        self._require().complete = True

    async def dead_letters(self) -> list[DeadLetter]:
        """Return every dead letter of the run, in insertion order."""
        return list(self._require().dead_letters)

    async def batches(self) -> list[StoredBatch]:
        """Return every batch of the run, in ``batch_id`` order."""
        return [b for _, b in sorted(self._require().batches.items())]

    async def counters(self) -> dict[str, int]:
        """Return the run's counters."""
        return dict(self._require().counters)

    async def close(self) -> None:
        """Close the journal; its state stays for a later ``open`` of the same object."""
        self._open = False

    def _require(self, *, opening: bool = False) -> _Run:
        if self._run is None or not (self._open or opening):
            raise JournalStateError("the journal is not open: call open() first")
        return self._run

    def _batch(
        self, batch_id: int, allowed: tuple[BatchPhase, ...], action: str
    ) -> tuple[_Run, StoredBatch]:
        run = self._require()
        batch = run.batches.get(batch_id)
        check_phase(batch_id, batch.phase if batch else None, allowed, action)
        assert batch is not None  # check_phase raised otherwise
        return run, batch

    def _store(self, batch: StoredBatch) -> StoredBatch:
        self._require().batches[batch.batch_id] = batch
        return batch

    @staticmethod
    def _apply(
        run: _Run,
        progresses: tuple[InputProgress, ...],
        dead_letters: Sequence[DeadLetter],
        counters: Mapping[str, int],
    ) -> None:
        for progress in progresses:
            run.inputs[progress.index] = progress
        run.dead_letters.extend(dead_letters)
        _add(run.counters, counters)


def _add(counters: dict[str, int], deltas: Mapping[str, int]) -> None:
    for name, delta in deltas.items():
        counters[name] = counters.get(name, 0) + delta
