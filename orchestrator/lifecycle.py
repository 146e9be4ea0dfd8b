"""The downstream half of a run: each sealed batch from slot to outcome.

``Downstream.run`` takes sealed batches from one channel, in order, and gives each a task:

1. wait for the batches it depends on (an earlier batch holding one of its keys: last write wins);
2. take one of the account's slots (``slots.SlotGate``);
3. submit: the intent, the PUT and the import id are each journaled; "too many active imports"
   and rate limits are waited out;
4. poll until a terminal status, within ``[poll_min, poll_max]``;
5. map the API's per-record failures back to the records' sources, journal the outcome, free the
   slot and tell the caller.

A ``Failed`` import is sent again a bounded number of times; a body the API finds too large is
split in two (one journal transaction) and the halves take the same path. The journal's row is
the batch's state: every step stores it and keeps what the journal gives back.

Bodies in memory. A batch the producer sealed while a slot was free comes with its body (and
its intent already in the seal's transaction): it is sent without reading it back. The batch
next in line for a slot loads its body while it waits, so the PUT starts as the slot frees.
Each upload takes its size from the account's upload budget until its body is written out,
not until the answer: the API answers once it has checked the body, and the next upload need
not wait for that. A body written and waiting for its answer is still in memory (a lost answer
sends it again): those are bounded apart, to as many bytes again (``UploadBudget``).

What a crash may do. A PUT is sent only after the transaction that holds its body and its
intent has committed: the API can never have accepted a body the journal does not hold. A crash
before that commit leaves the batch's lines unread in the journal (its progress mark is in the
same transaction): the re-run reads and sends them again, and nothing of theirs was sent. A
crash after it leaves the intent without an import id: the submit is in doubt, and the re-run
sends the same body again from the journal (upserts by key make a repeat harmless). Sending
the first bytes before the commit would gain at most the commit's time (0.1-0.2 s for a 50 MB
body), and a crash in between could leave an accepted import the re-run knows nothing of,
whose older values could land after the re-run's newer ones.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from orchestrator import failpoints
from orchestrator.batching import Batch, record_spans, split_batch
from orchestrator.client import InsightClient
from orchestrator.errors import (
    AccountFullError,
    ApiError,
    BadRequestError,
    BodyTooLargeError,
    NotFoundError,
    RateLimitedError,
    TransientError,
)
from orchestrator.journal import BatchPhase, BatchStore, DeadLetter, NewBatch, StoredBatch
from orchestrator.logs import get_logger
from orchestrator.outcomes import ImportOutcome, RunStats
from orchestrator.polling import CallBudget, PollPlanner
from orchestrator.records import Collection, IdentityHashes, hash_identities
from orchestrator.refs import RecordRefs
from orchestrator.settings import Settings
from orchestrator.slots import SlotGate
from orchestrator.wire import ImportState, ImportStatus, SubmitReceipt

__all__ = [
    "BatchTask",
    "ByteBudget",
    "Downstream",
    "InFlight",
    "OutcomeSink",
    "UploadBudget",
    "identity_hashes",
]

log = get_logger("orchestrator.lifecycle")

#: Where outcomes go as batches end (and as local rejects are recorded).
OutcomeSink = Callable[[ImportOutcome], Awaitable[None]]


#: Bodies of up to this fraction of the upload budget are loaded ahead of their slot.
_LOAD_AHEAD_SHARE = 4


@dataclass(slots=True, eq=False)
class BatchTask:
    """One unfinished batch: its journaled state and what only this process knows of it.

    Args:
        stored: the batch as the journal last gave it back (phase, import id, counts).
        refs: the batch's records, in body order.
        identity_hashes: the hashes of the records' identities (for last write wins).
        depends_on: unfinished batches to wait for before submitting.
        holds_capacity: whether the batch holds one of the producer's places (the halves of a
            split batch borrow their parent's).
    """

    stored: StoredBatch
    refs: RecordRefs
    identity_hashes: IdentityHashes
    depends_on: tuple[int, ...]
    holds_capacity: bool = True
    accepted: float | None = None  # loop clock when the 202 arrived (this process only)
    # the body, while it is in memory to be sent: handed over by the producer, or loaded while
    # the batch waited for its slot
    body: bytes | bytearray | None = None

    @property
    def batch_id(self) -> int:
        return self.stored.batch_id


class InFlight:
    """Which unfinished batches hold which records (identities as hashes), for last write wins.

    The producer adds a batch when it seals it (before the next record is read, so that record
    sees it); the downstream drops it when the batch ends. One set per batch, made off the event
    loop: adding or dropping a batch is one step on the loop, where a dict of every record in
    flight (hundreds of thousands) took tens of milliseconds to update, or to resize. A hash
    collision only holds a record back needlessly.
    """

    __slots__ = ("_batches",)

    def __init__(self) -> None:
        self._batches: dict[int, IdentityHashes] = {}

    def __bool__(self) -> bool:
        return bool(self._batches)

    def add(self, batch_id: int, identity_hashes: IdentityHashes) -> None:
        self._batches[batch_id] = identity_hashes

    def discard(self, batch_id: int) -> None:
        self._batches.pop(batch_id, None)

    def holder(self, identity_hash: int) -> int | None:
        """The newest unfinished batch holding this identity, if any."""
        found = None
        for batch_id, held in self._batches.items():
            if identity_hash in held and (found is None or batch_id > found):
                found = batch_id
        return found

    def holds_any(self, identity_hashes: Iterable[int]) -> bool:
        """Whether any unfinished batch holds one of these identities."""
        probe = set(identity_hashes)
        return any(not held.keys().isdisjoint(probe) for held in self._batches.values())


def identity_hashes(refs: RecordRefs) -> IdentityHashes:
    """The hashes of the records' identities (run it in a worker thread: one per record)."""
    return hash_identities(refs.identities())


class ByteBudget:
    """Lets holders in while the bytes they hold stay within a budget; one always gets in.

    Args:
        budget: the bytes holders may hold together.
        parent: a wider budget each hold also takes (the worker's process-wide one), after
            this one.
    """

    def __init__(self, budget: int, *, parent: ByteBudget | None = None) -> None:
        self._budget = budget
        self._parent = parent
        self._used = 0
        self._changed: anyio.Event | None = None

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[Callable[[], None]]:
        """Hold ``size`` bytes until the block ends, or until the function it gives is called."""
        await self._take(size)
        parent: ByteBudget | None = None
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                if parent is not None:
                    parent._give_back(size)
                self._give_back(size)

        try:
            if self._parent is not None:
                await self._parent._take(size)
                parent = self._parent
            yield release
        finally:
            release()

    def admits(self, size: int) -> bool:
        """Whether a hold of ``size`` bytes would get in now, without waiting."""
        if self._used and self._used + size > self._budget:
            return False
        return self._parent is None or self._parent.admits(size)

    async def _take(self, size: int) -> None:
        while self._used and self._used + size > self._budget:
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()
        self._used += size

    def _give_back(self, size: int) -> None:
        self._used -= size
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()


class UploadBudget:
    """The request bodies an account holds in memory to send: at most ``budget`` bytes being
    written at once, and at most as many again written and waiting for their answer.

    A body is kept until its answer comes (a lost answer sends it again), but it gives its
    writing share back when its last byte is written, so the next upload overlaps the API's
    check of the last body. Without the second bound, every slot's body could wait in memory
    for its answer at once.

    Args:
        budget: the bytes being written at once (``Settings.max_upload_bytes``).
        parent: a wider budget each body also takes until its answer (the worker's
            process-wide one).
    """

    def __init__(self, budget: int, *, parent: ByteBudget | None = None) -> None:
        self._writing = ByteBudget(budget)
        self._held = ByteBudget(2 * budget, parent=parent)

    def admits(self, size: int) -> bool:
        """Whether a body of ``size`` bytes could start its upload now, without waiting."""
        return self._held.admits(size) and self._writing.admits(size)

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[Callable[[], None]]:
        """Hold a body of ``size`` bytes until the block ends; the function it gives returns the
        writing share (call it once the body is written)."""
        async with self._held.hold(size), self._writing.hold(size) as written:
            yield written


# ------------------------------------------------------------------------------ verdicts


@dataclass(frozen=True, slots=True)
class _Accepted:
    """The API took the import: the batch is SUBMITTED."""


@dataclass(frozen=True, slots=True)
class _Refused:
    """The API refused the whole body for good (or as too large: ``too_large``)."""

    status: str
    message: str
    too_large: bool = False


@dataclass(frozen=True, slots=True)
class _Ended:
    """The batch reached its end with this outcome."""

    outcome: ImportOutcome


@dataclass(frozen=True, slots=True)
class _SplitInto:
    """The batch was replaced by these halves; it ends when they do."""

    halves: tuple[BatchTask, ...]


@dataclass(slots=True)
class Downstream:
    """Takes a run's sealed batches through slot, submit, poll and outcome.

    Args:
        client: the account's API client.
        journal: where the batches' state lives: the run's journal, or the worker's outbox.
        settings: slot, polling and resubmit settings.
        collection: the collection the bodies are for (to split one).
        slots: the account's slot gate.
        uploads: the account's budget of bodies being sent, or waiting for their answer.
        planner: the account's poll planner.
        status_budget: the account's status calls a minute, if limited.
        in_flight: the run's register of records in unfinished batches.
        capacity: the producer's places for unfinished batches; freed as each batch ends.
        stats: live counters.
        on_outcome: where each batch's outcome goes, if anywhere.
    """

    client: InsightClient
    journal: BatchStore
    settings: Settings
    collection: Collection
    slots: SlotGate
    uploads: UploadBudget
    planner: PollPlanner
    status_budget: CallBudget | None
    in_flight: InFlight
    capacity: anyio.Semaphore
    stats: RunStats
    on_outcome: OutcomeSink | None
    _ended: dict[int, anyio.Event] = field(default_factory=dict)
    _task_group: TaskGroup | None = None
    # held by the one batch waiting for a slot with its body loaded
    _next_up: anyio.Lock = field(default_factory=anyio.Lock)
    _loaded_ahead: BatchTask | None = None  # the last batch whose body was loaded ahead

    async def run(self, batches: MemoryObjectReceiveStream[BatchTask]) -> None:
        """Give every batch from ``batches`` its task; return when the channel is closed and
        every batch has ended."""
        async with anyio.create_task_group() as tg, batches:
            self._task_group = tg
            async for task in batches:
                self._launch(task)

    def _launch(self, task: BatchTask) -> None:
        assert self._task_group is not None
        self._ended_event(task.batch_id)
        self._task_group.start_soon(self._run_batch, task, name=f"batch-{task.batch_id}")

    def _ended_event(self, batch_id: int) -> anyio.Event:
        # Made on first mention: a batch may depend on one that arrives later in the channel
        # (a resumed batch whose dependency was split into newer batches).
        event = self._ended.get(batch_id)
        if event is None:
            event = self._ended[batch_id] = anyio.Event()
        return event

    async def _run_batch(self, task: BatchTask) -> None:
        try:
            for dependency in task.depends_on:
                await self._ended_event(dependency).wait()
            async with contextlib.AsyncExitStack() as slot:
                async with self._next_up:
                    if self.slots.in_use >= self.slots.capacity:
                        log.debug("slot.waiting", batch_id=task.batch_id)
                        await self._load_ahead(task)
                    await slot.enter_async_context(self.slots.hold())
                self.stats.imports_in_flight += 1
                try:
                    verdict = await self._import(task)
                finally:
                    self.stats.imports_in_flight -= 1
            if isinstance(verdict, _SplitInto):
                for half in verdict.halves:
                    await self._ended_event(half.batch_id).wait()
                return
            outcome = verdict.outcome
            self.stats.imports_finished += 1
            self.stats.records_imported += outcome.imported
            self.stats.records_failed += len(outcome.failures)
            if self.on_outcome is not None:
                await self.on_outcome(outcome)
        finally:
            self._drop_body(task)
            self.in_flight.discard(task.batch_id)
            self._ended_event(task.batch_id).set()
            if task.holds_capacity:
                self.capacity.release()

    async def _load_ahead(self, task: BatchTask) -> None:
        """Load the body of the batch next in line while it waits, so its PUT goes as the slot
        frees. No more than one body waits so: the caller holds ``_next_up``, and a body loaded
        ahead before must have started its upload (else, once its slot came, it would wait for
        the upload budget and the next batch in line would load one more). Only small bodies
        are loaded so: a large one is read back from its file in a fraction of its upload, and
        holding one more of 50 MB would lift the run's peak memory by as much."""
        stored = task.stored
        last = self._loaded_ahead
        if (
            (last is None or last.body is None)
            and task.body is None
            and stored.phase is not BatchPhase.SUBMITTED
            and stored.body_bytes <= self.settings.max_body_bytes
            and stored.body_bytes <= self.settings.max_upload_bytes // _LOAD_AHEAD_SHARE
        ):
            task.body = await self.journal.load_body(task.batch_id)
            self._loaded_ahead = task
            failpoints.hit("loaded")

    def _drop_body(self, task: BatchTask) -> None:
        body, task.body = task.body, None
        if body is not None and not self.journal.keeps_bodies:
            _release(body)

    async def _import(self, task: BatchTask) -> _Ended | _SplitInto:
        """Submit, then poll until the batch ends; a Failed import is sent again (bounded)."""
        while True:
            if task.stored.phase is not BatchPhase.SUBMITTED:
                if task.stored.body_bytes > self.settings.max_body_bytes:
                    # sealed under a larger cap (a run resumed with a lower max_body_bytes):
                    # never sent as it is
                    if task.stored.record_count > 1:
                        return await self._split(task)
                    return _Ended(
                        await self._give_up(
                            task,
                            status="record-too-large",
                            message=(
                                f"the record takes {task.stored.body_bytes} bytes of body, more "
                                f"than max_body_bytes={self.settings.max_body_bytes}"
                            ),
                        )
                    )
                verdict = await self._submit(task)
                if isinstance(verdict, _Refused):
                    if verdict.too_large and task.stored.record_count > 1:
                        return await self._split(task)
                    return _Ended(
                        await self._give_up(task, status=verdict.status, message=verdict.message)
                    )
            status = await self._poll_until_done(task)
            if status is not None and status.state is ImportState.SUCCEEDED:
                return _Ended(await self._succeed(task, status))
            # Failed, or forgotten by the API (404 on a known id): send it again, a bounded
            # number of times (upsert by key makes a repeat harmless).
            word = status.status if status is not None else "importNotFound"
            if task.stored.resubmits >= self.settings.max_resubmits:
                return _Ended(
                    await self._give_up(
                        task,
                        status=word,
                        message=(
                            f"the import ended {word!r} {task.stored.resubmits + 1} times; "
                            "the records were not imported"
                        ),
                    )
                )
            log.warning(
                "import.resubmitting",
                batch_id=task.batch_id,
                import_id=task.stored.import_id,
                status=word,
                resubmits=task.stored.resubmits + 1,
            )
            task.stored = await self.journal.mark_resubmit(task.batch_id)
            await self.journal.add_counters({"resubmits": 1})

    # -------------------------------------------------------------------------- submit

    async def _submit(self, task: BatchTask) -> _Accepted | _Refused:
        """PUT the batch's body until the API takes it, or refuses it for good."""
        full_waits = 0
        while True:
            try:
                receipt = await self._put(task)
            except AccountFullError as error:
                task.stored = await self.journal.mark_refused(task.batch_id, calls=error.calls)
                full_waits += 1
                await self.journal.add_counters({"account_full_waits": 1})
                limit = self.settings.max_account_full_waits
                if limit is not None and full_waits > limit:
                    raise
                wait = min(
                    self.settings.account_full_wait * 2 ** (full_waits - 1), self.settings.poll_max
                )
                wait *= random.uniform(0.8, 1.2)
                log.warning(
                    "slot.account_full",
                    batch_id=task.batch_id,
                    wait_s=round(wait, 3),
                    waits=full_waits,
                )
                await anyio.sleep(wait)
                continue
            except RateLimitedError as error:
                task.stored = await self.journal.mark_refused(task.batch_id, calls=error.calls)
                log.warning("api.rate_limit_wait", batch_id=task.batch_id, wait_s=error.retry_after)
                await anyio.sleep(error.retry_after)
                continue
            except BodyTooLargeError as error:
                task.stored = await self.journal.mark_refused(task.batch_id, calls=error.calls)
                return _Refused(
                    "BodyTooLarge",
                    _api_message(error, "lower max_body_bytes below the API's limit"),
                    too_large=True,
                )
            except BadRequestError as error:
                task.stored = await self.journal.mark_refused(task.batch_id, calls=error.calls)
                return _Refused(
                    error.error_code or "BadRequest", _api_message(error, "fix the records")
                )
            if receipt.lost_responses:
                await self.journal.add_counters({"lost_responses": receipt.lost_responses})
            log.info(
                "import.submitted",
                batch_id=task.batch_id,
                import_id=receipt.import_id,
                records=task.stored.record_count,
                body_bytes=task.stored.body_bytes,
                attempts=receipt.attempts,
                lost_responses=receipt.lost_responses,
            )
            return _Accepted()

    async def _put(self, task: BatchTask) -> SubmitReceipt:
        """One submit: intent, PUT, import id, each journaled; the body is in memory only here
        (and while the batch waited for its slot, or came from the producer, see the top).

        At most ``max_upload_bytes`` of bodies are loaded and being written out at once, and as
        many again written and waiting for their answer (``UploadBudget``): a body is the
        biggest thing the run holds, and uploads share one network link anyway.
        """
        batch_id = task.batch_id
        async with self.uploads.hold(task.stored.body_bytes) as uploaded:
            body, task.body = task.body, None
            if body is None:
                body = await self.journal.load_body(batch_id)
            if task.stored.phase is not BatchPhase.SUBMITTING:  # else written when sealed
                task.stored = await self.journal.mark_submitting(batch_id)
            failpoints.hit("intent")
            # A submit in progress is finished even when the run is being cancelled: the import
            # id is worth recording (else the import is in doubt and sent again).
            with anyio.CancelScope(shield=True):
                try:
                    receipt = await self.client.submit_import(body, on_sent=uploaded)
                finally:
                    uploaded()
                    if not self.journal.keeps_bodies:  # else it is the journal's own copy
                        _release(body)
                task.accepted = anyio.current_time()
                failpoints.hit("accepted")
                task.stored = await self.journal.mark_submitted(
                    batch_id, receipt.import_id, time.time(), calls=receipt.attempts
                )
                failpoints.hit("submitted")
            return receipt

    # -------------------------------------------------------------------------- poll

    async def _poll_until_done(self, task: BatchTask) -> ImportStatus | None:
        """Poll within [poll_min, poll_max]: the final status, or None if the API forgot it."""
        import_id = task.stored.import_id
        assert import_id is not None
        submitted = task.accepted if task.accepted is not None else anyio.current_time()
        task.accepted = None  # a resubmit gets its own
        # The planner says when the next poll is due, the account's budget when it may go.
        track = self.planner.track(records=task.stored.record_count, submitted=submitted)
        errors_in_row = 0
        while True:
            await track.wait(self.status_budget)
            try:
                status = await self.client.import_status(import_id, retry=False)
            except NotFoundError:
                task.stored = await self.journal.mark_polled(task.batch_id)
                log.warning("import.forgotten", batch_id=task.batch_id, import_id=import_id)
                return None
            except RateLimitedError as error:
                task.stored = await self.journal.mark_polled(task.batch_id)
                # The API asked us to wait: the only case where polls may be further apart.
                await anyio.sleep(error.retry_after)
                track.answered(running=None)
                continue
            except TransientError:
                task.stored = await self.journal.mark_polled(task.batch_id)
                errors_in_row += 1
                if errors_in_row >= self.settings.status_error_budget:
                    raise
                track.answered(running=None)
                continue
            errors_in_row = 0
            track.answered(running=status.state is ImportState.RUNNING)
            failpoints.hit("polled")
            task.stored = await self.journal.mark_polled(task.batch_id)
            if status.state is ImportState.RUNNING:
                continue
            if status.state is ImportState.SUCCEEDED:
                track.finished()
            return status

    # -------------------------------------------------------------------------- split

    async def _split(self, task: BatchTask) -> _SplitInto:
        """The API refused the body as too large (its limit is below ours): send it in halves.

        The halves are cut at the records' offsets in a worker thread, and journaled with the
        parent's new state in one transaction.
        """
        body = await self.journal.load_body(task.batch_id)
        parent = Batch(body=body, refs=task.refs)
        halves = await anyio.to_thread.run_sync(split_batch, parent, self.collection)
        ids = await self.journal.split_batch(
            task.batch_id, [NewBatch(half.body, half.refs) for half in halves]
        )
        failpoints.hit("split")
        log.warning(
            "batch.split",
            batch_id=task.batch_id,
            body_bytes=task.stored.body_bytes,
            into=ids,
            detail="the API's body limit is below max_body_bytes; lower it",
        )
        tasks = []
        for batch_id, half in zip(ids, halves, strict=True):
            hashes = await anyio.to_thread.run_sync(identity_hashes, half.refs)
            tasks.append(
                BatchTask(
                    stored=StoredBatch.sealed(
                        batch_id, record_count=half.record_count, body_bytes=half.body_bytes
                    ),
                    refs=half.refs,
                    identity_hashes=hashes,
                    depends_on=(),
                    holds_capacity=False,
                )
            )
        for new in tasks:
            self.in_flight.add(new.batch_id, new.identity_hashes)
            self._launch(new)
        return _SplitInto(tuple(tasks))

    # -------------------------------------------------------------------------- outcome

    async def _succeed(self, task: BatchTask, status: ImportStatus) -> ImportOutcome:
        if status.failures:
            body = await self.journal.load_body(task.batch_id)
            failures = await anyio.to_thread.run_sync(
                _map_failures, task, status, body, self.collection
            )
        else:
            failures = ()
        imported = task.stored.record_count - len(failures)
        return await self._finish(task, status.status, imported, failures)

    async def _give_up(self, task: BatchTask, *, status: str, message: str) -> ImportOutcome:
        body = await self.journal.load_body(task.batch_id)
        collection = self.collection

        def letters() -> tuple[DeadLetter, ...]:  # one per record: made in a worker thread
            records = _record_bytes(Batch(body, task.refs), collection)
            return tuple(
                DeadLetter(
                    source=str(ref.source) if ref.source is not None else None,
                    key=ref.key,
                    reason=status,
                    message=message,
                    import_id=task.stored.import_id,
                    record=record,
                )
                for ref, record in zip(task.refs, records, strict=True)
            )

        return await self._finish(task, status, 0, await anyio.to_thread.run_sync(letters))

    async def _finish(
        self, task: BatchTask, status: str, imported: int, failures: tuple[DeadLetter, ...]
    ) -> ImportOutcome:
        failpoints.hit("terminal")
        stored = task.stored = await self.journal.mark_finished(
            task.batch_id,
            status=status,
            imported=imported,
            dead_letters=failures,
            finished_at=time.time(),
            counters={"records_imported": imported, "records_failed": len(failures)},
        )
        failpoints.hit("finished")
        outcome = ImportOutcome.of(stored, failures)
        log.info(
            "import.finished",
            batch_id=stored.batch_id,
            import_id=stored.import_id,
            status=status,
            records=stored.record_count,
            imported=imported,
            failed=len(failures),
            body_bytes=stored.body_bytes,
            attempts=stored.attempts,
            polls=stored.polls,
            resubmits=stored.resubmits,
            duration_s=outcome.duration_s,
        )
        return outcome


def _release(body: object) -> None:
    """Free a body's memory now, not when the HTTP client's reference cycles are collected.

    The request objects of aiohttp refer to the body and to each other; with the collector run
    rarely, a 50 MB body could outlive its upload by seconds and overlap with the next one.
    """
    if isinstance(body, bytearray):
        with contextlib.suppress(BufferError):  # still exported somewhere: leave it to the GC
            body.clear()


def _api_message(error: ApiError, advice: str) -> str:
    return f"the API refused the whole import ({error}); {advice}"


def _record_bytes(batch: Batch, collection: Collection) -> list[bytes | None]:
    """Each record's bytes as sent (``None`` for all when the body cannot be read back)."""
    try:
        spans = record_spans(batch, collection)
    except ValueError:
        return [None] * len(batch.refs)
    body = batch.body
    return [bytes(body[start:end]) for start, end in spans]


def _map_failures(
    task: BatchTask, status: ImportStatus, body: bytes | bytearray, collection: Collection
) -> tuple[DeadLetter, ...]:
    """Per-record failures of the API, mapped back to the records' sources and bytes."""
    # One pass over the batch's records (a worker thread runs this: a batch can hold 100,000).
    position: dict[object, int] = {}
    first_with_key: dict[str, int] = {}
    for index, identity in enumerate(task.refs.identities()):
        position[identity] = index
        first_with_key.setdefault(identity if isinstance(identity, str) else identity[2], index)
    records = _record_bytes(Batch(body, task.refs), collection)
    letters = []
    for failure in status.failures:
        found: int | None = None
        if failure.key is not None:
            if failure.contact_identity is not None:
                found = position.get((*failure.contact_identity, failure.key))
            if found is None:
                found = first_with_key.get(failure.key)
        source = task.refs.source(found) if found is not None else None
        letters.append(
            DeadLetter(
                source=str(source) if source is not None else None,
                key=failure.key,
                reason=failure.reason,
                message=f"the API rejected the record: {failure.reason}",
                details=failure.details,
                import_id=task.stored.import_id,
                record=records[found] if found is not None else None,
            )
        )
    return tuple(letters)
