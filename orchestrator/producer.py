"""The upstream half of a run: inputs in, sealed batches out, on one channel.

The producer packs each input's records into request bodies (``batching.BatchAssembler``),
journals each sealed batch with the input progress it completes, and sends it downstream as a
``lifecycle.BatchTask``. It holds at most ``capacity`` unfinished batches, so memory stays flat
whatever the input size.

A batch is sealed when it is full, or when its oldest record has waited ``linger`` seconds and
one of the account's slots is free (Kafka's ``linger.ms``): a busy account gets full bodies, a
quiet source gets its records sent within seconds.

Last write wins: a record whose identity is still in an unfinished batch goes to a *held* batch
that depends on the batches holding its keys, so the newer version is never applied before the
older one, while the main stream keeps every slot busy. Both open batches are sealed together,
in one journal transaction with the progress mark: every line before the mark is in a sealed
batch or dead-lettered, so a crash loses nothing and re-sends nothing that was sealed.

A batch sealed while one of the account's slots is free (the first wave) is journaled with its
intent to submit in the same transaction, and handed downstream with its body in memory: its
PUT starts once that transaction commits, without reading the body back (see
``lifecycle`` for why the PUT never starts before the commit).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from orchestrator import failpoints
from orchestrator.batching import Batch, BatchAssembler
from orchestrator.chunks import RecordRun
from orchestrator.errors import JournalMismatchError, RecordError
from orchestrator.inputs import Chunk, RecordInput
from orchestrator.journal import DeadLetter, InputProgress, Journal, NewBatch, StoredBatch
from orchestrator.lifecycle import BatchTask, InFlight, OutcomeSink, UploadBudget
from orchestrator.logs import get_logger
from orchestrator.outcomes import ImportOutcome, RunStats
from orchestrator.records import Collection, EncodedRecord, IdentityHashes, RejectedRecord
from orchestrator.settings import Settings
from orchestrator.slots import SlotGate

__all__ = ["Producer"]

log = get_logger("orchestrator.producer")

# How often a lingering batch looks again for a free slot while every slot is busy.
_SLOT_RECHECK = 0.25


@dataclass(frozen=True, slots=True)
class _Sealed:
    """A sealed batch with the hashes of its records' identities (both made in a thread)."""

    batch: Batch
    hashes: IdentityHashes


def _progress_after(index: int, chunk: Chunk) -> InputProgress:
    """Progress through the last line of ``chunk``."""
    return InputProgress(
        index=index,
        lines=chunk.last_line,
        digest=chunk.digest_through(chunk.last_line - chunk.first_line + 1),
    )


def _progress_before(index: int, chunk: Chunk, line: int) -> InputProgress:
    """Progress through the line before ``line`` of ``chunk``."""
    return InputProgress(
        index=index, lines=line - 1, digest=chunk.digest_through(line - chunk.first_line)
    )


class Producer:
    """Turns inputs into sealed, journaled batches sent to ``batches``.

    Args:
        collection: where the records go.
        settings: the cap on a body and the linger.
        journal: the run's journal.
        slots: the account's slot gate (a lingering batch is sealed only while a slot is free).
        in_flight: the run's register of records in unfinished batches (the producer adds each
            batch it seals; the downstream drops it when it ends).
        capacity: places for unfinished batches, taken here and freed downstream.
        batches: the channel to the downstream.
        stats: live counters.
        on_outcome: where local rejects go as they are recorded, if anywhere.
    """

    def __init__(
        self,
        *,
        collection: Collection,
        settings: Settings,
        journal: Journal,
        slots: SlotGate,
        uploads: UploadBudget,
        in_flight: InFlight,
        capacity: anyio.Semaphore,
        batches: MemoryObjectSendStream[BatchTask],
        stats: RunStats,
        on_outcome: OutcomeSink | None,
    ) -> None:
        self._collection = collection
        self._settings = settings
        self._journal = journal
        self._slots = slots
        self._uploads = uploads
        self._in_flight = in_flight
        self._capacity = capacity
        self._batches = batches
        self._stats = stats
        self._on_outcome = on_outcome
        self._main = BatchAssembler(
            collection, max_body_bytes=settings.max_body_bytes, on_superseded=self._superseded
        )
        self._held = BatchAssembler(
            collection, max_body_bytes=settings.max_body_bytes, on_superseded=self._superseded
        )
        self._held_depends_on: set[int] = set()
        self._from_memory: BatchTask | None = None  # the last batch handed with its body
        self._oldest: float | None = None  # when the oldest record of the open batches came
        # what the next journal transaction records along with its batches
        self._dead_letters: list[DeadLetter] = []
        self._counters: dict[str, int] = {}
        self._finished_inputs: list[InputProgress] = []  # read to the end, records still open

    async def produce(
        self, inputs: Sequence[RecordInput], progress: Sequence[InputProgress]
    ) -> None:
        """Read every input from where the journal left it, then seal what is left.

        Raises:
            JournalMismatchError: an input's first lines differ from what the journal recorded.
        """
        for index, source in enumerate(inputs):
            done = progress[index] if index < len(progress) else None
            if done is not None and done.lines:
                # Read through what was handled before and compare fingerprints: an input edited
                # since would otherwise mix old and new records silently.
                digest = await source.skip(done.lines)
                if digest and done.digest and digest != done.digest:
                    raise JournalMismatchError(
                        f"{source.origin} changed since the journal recorded its first "
                        f"{done.lines} lines; run again with fresh=True to import it anew, or "
                        "restore the original input to resume"
                    )
            if done is not None and done.done:
                continue
            await self._consume(index, source)
        await self._seal_open(progress=None)
        await self._flush()

    # ------------------------------------------------------------------ reading

    async def _consume(self, index: int, source: RecordInput) -> None:
        last: Chunk | None = None
        async with source.open(self._collection) as chunks:
            while True:
                chunk: Chunk | None = None
                with anyio.move_on_after(self._linger_wait()):
                    try:
                        chunk = await chunks.receive()
                    except anyio.EndOfStream:
                        break
                if chunk is None:  # the oldest record waited its linger: send what is open
                    if self._slots.in_use < self._slots.capacity:
                        await self._seal_open(
                            progress=_progress_after(index, last) if last is not None else None
                        )
                        await self._flush()
                    continue
                last = chunk
                failpoints.hit("read")
                await self._add_chunk(index, chunk)
                self._stats.records_read += chunk.read
                self._stats.bytes_read += chunk.size
        end = _progress_after(index, last) if last is not None else InputProgress(index, 0, "")
        self._finished_inputs.append(
            InputProgress(index=end.index, lines=end.lines, digest=end.digest, done=True)
        )

    def _linger_wait(self) -> float:
        """Seconds to wait for more input before the open batches are sealed."""
        if self._oldest is None:
            return float("inf")
        left = self._oldest + self._settings.linger - anyio.current_time()
        if left > 0:
            return left
        return 0.0 if self._slots.in_use < self._slots.capacity else _SLOT_RECHECK

    async def _add_chunk(self, index: int, chunk: Chunk) -> None:
        if chunk.run is not None:
            await self._add_run(chunk, chunk.run, index)
            return
        for result in chunk.results:
            if isinstance(result, RejectedRecord):
                self._reject(result.error, result.raw)
            else:
                await self._add(result, index, chunk)

    async def _add(self, record: EncodedRecord, index: int, chunk: Chunk) -> None:
        identity = record.identity
        holder = self._in_flight.holder(hash(identity))
        target = self._held if holder is not None or identity in self._held else self._main
        if not target.fits(record):
            # One of the open batches is full: seal both, with the progress up to this record
            # (which starts the next batch), in one journal transaction.
            line = record.source.line if record.source is not None else chunk.first_line
            await self._seal_open(progress=_progress_before(index, chunk, line))
            # An older version of this record may have just been sealed: it is in flight now.
            holder = self._in_flight.holder(hash(identity))
            target = self._held if holder is not None else self._main
        try:
            target.add(record)  # never seals now: the record fits, or the batch is empty
        except RecordError as error:
            self._reject(error, record.data)
            return
        if holder is not None:
            self._held_depends_on.add(holder)
        self._count("records_read")
        self._touch()

    async def _add_run(self, chunk: Chunk, records: RecordRun, index: int) -> None:
        """Add a file chunk's records in bulk; a record whose key is still in flight (or held)
        sends the rest of the chunk down the per-record path. ``chunk.results`` holds the
        chunk's rejects, which are dead-lettered in line order with the seals between them."""
        rejects = chunk.results
        next_reject = 0

        def reject_before(line: int) -> None:
            nonlocal next_reject
            while next_reject < len(rejects):
                result = rejects[next_reject]
                assert isinstance(result, RejectedRecord)
                source = result.error.source
                if source is not None and source.line >= line:
                    return
                self._reject(result.error, result.raw)
                next_reject += 1

        in_flight = self._in_flight
        hashes = records.identity_hashes()
        position = 0
        total = len(records)
        while position < total:
            if (in_flight and in_flight.holds_any(hashes[position:])) or (
                self._held and self._held.holds_any(hashes[position:])
            ):
                for at in range(position, total):  # rare: updates of records still in flight
                    reject_before(records.lines[at])
                    await self._add(records.record(at), index, chunk)
                break
            try:
                stop = self._main.add_run(records, position)
            except RecordError as error:
                reject_before(records.lines[position])
                self._reject(error, records.record(position).data)
                position += 1
                continue
            self._count("records_read", stop - position)
            if stop > position:
                self._touch()
            else:  # the main batch is full: seal both, with the progress up to this record
                line = records.lines[stop]
                reject_before(line)
                await self._seal_open(progress=_progress_before(index, chunk, line))
            position = stop
        reject_before(chunk.last_line + 1)

    def _touch(self) -> None:
        if self._oldest is None:
            self._oldest = anyio.current_time()

    def _count(self, name: str, n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n

    def _superseded(self, record: EncodedRecord) -> None:
        self._count("records_superseded")

    def _reject(self, error: RecordError, raw: bytes) -> None:
        self._count("records_read")
        self._count("records_rejected")
        self._stats.records_rejected += 1
        self._dead_letters.append(
            DeadLetter(
                source=str(error.source) if error.source is not None else None,
                key=error.key,
                reason=error.rule,
                message=error.message,
                record=raw,
            )
        )

    # ------------------------------------------------------------------ sealing

    async def _seal_open(self, *, progress: InputProgress | None) -> None:
        """Seal both open batches (if not empty) and journal them with the progress mark.

        Sealing copies up to a whole body and makes one ref per record: done in a worker
        thread, so the event loop is not held for it (the producer alone touches the assemblers).
        """

        def seal(assembler: BatchAssembler) -> _Sealed | None:
            hashes = assembler.identity_hashes()
            batch = assembler.seal()
            return None if batch is None else _Sealed(batch, hashes)

        main, held = await anyio.to_thread.run_sync(lambda: (seal(self._main), seal(self._held)))
        self._oldest = None
        if main is None and held is None:
            if progress is not None:
                await self._flush(progress)
            return
        # Held records come before the main batch's last records in the input, so the two are
        # journaled together: a crash can never keep one and re-read the other.
        # (sealed, depends_on, sent at once): the held batch waits for its dependencies
        plans: list[tuple[_Sealed, tuple[int, ...], bool]] = []
        if held is not None:
            plans.append((held, tuple(sorted(self._held_depends_on)), False))
            self._held_depends_on = set()
        if main is not None:
            plans.append((main, (), self._send_from_memory(main.batch.body_bytes)))
        for _ in plans:
            await self._capacity.acquire()
        self._count("records_submitted", sum(s.batch.record_count for s, _, _ in plans))
        letters = self._dead_letters
        batch_ids = await self._journal.seal_batches(
            batches=[
                NewBatch(s.batch.body, s.batch.refs, deps, submitting=now) for s, deps, now in plans
            ],
            progress=self._progresses(progress),
            dead_letters=letters,
            counters=self._counters,
        )
        self._clear()
        failpoints.hit("sealed")
        if not self._journal.keeps_bodies:
            # The journal holds copies of the bodies now: the next ones are built in their memory
            # (but a body sent at once, which the downstream frees after its upload).
            if main is not None and not plans[-1][2]:
                self._main.recycle(main.batch.body)
            if held is not None:
                self._held.recycle(held.batch.body)
        await self._tell_rejects(letters)
        for batch_id, (sealed, depends_on, now) in zip(batch_ids, plans, strict=True):
            batch = sealed.batch
            self._stats.batches_sealed += 1
            log.info(
                "batch.sealed",
                batch_id=batch_id,
                records=batch.record_count,
                body_bytes=batch.body_bytes,
                fill=round(batch.body_bytes / self._settings.max_body_bytes, 4),
                depends_on=list(depends_on),
            )
            task = BatchTask(
                stored=StoredBatch.sealed(
                    batch_id,
                    record_count=batch.record_count,
                    body_bytes=batch.body_bytes,
                    depends_on=depends_on,
                    submitting=now,
                ),
                refs=batch.refs,
                identity_hashes=sealed.hashes,
                depends_on=depends_on,
                body=batch.body if now else None,
            )
            if now:
                self._from_memory = task
            # Registered before the next record is read, so that record sees it.
            self._in_flight.add(batch_id, sealed.hashes)
            await self._batches.send(task)

    def _send_from_memory(self, body_bytes: int) -> bool:
        """Whether a batch sealed now goes downstream with its body: it would find a slot free
        (none in use by every other, nor promised to a batch sent downstream that has not
        reached the gate yet) and room in the upload budget, and the last body handed so has
        started its upload. No body waits in memory so: five sealed at once would each hold
        50 MB until their turn to upload, and one sealed while another uploads would hold it
        until that upload ends, while the next is built in fresh memory (bodies not sent at
        once are read back from the journal when their upload starts)."""
        last = self._from_memory
        if last is not None and last.body is not None:
            return False
        if not self._uploads.admits(body_bytes):
            return False
        waiting = self._batches.statistics().current_buffer_used
        return self._slots.in_use + waiting < self._slots.capacity

    async def _flush(self, progress: InputProgress | None = None) -> None:
        """Journal the progress, rejects and counters gathered since the last seal, if any."""
        progresses = self._progresses(progress)
        if not (progresses or self._dead_letters or self._counters):
            return
        letters = self._dead_letters
        await self._journal.save_progress(
            progress=progresses, dead_letters=letters, counters=self._counters
        )
        self._clear()
        await self._tell_rejects(letters)

    def _progresses(self, progress: InputProgress | None) -> list[InputProgress]:
        return [*self._finished_inputs, *([progress] if progress is not None else [])]

    def _clear(self) -> None:
        self._finished_inputs = []
        self._dead_letters = []
        self._counters = {}

    async def _tell_rejects(self, letters: list[DeadLetter]) -> None:
        if letters and self._on_outcome is not None:
            await self._on_outcome(ImportOutcome.rejected(tuple(letters)))
