"""The pipeline: producer -> batcher -> slot gate -> submit -> poller -> outcome.

One run imports one stream of records into one collection:

- the **producer** reads inputs chunk by chunk (blocking reads and validation happen in worker
  threads), feeds the batch assembler and seals batches into the journal. It holds at most
  ``max_concurrent + 1`` unfinished batches, so memory stays flat whatever the input size;
- each sealed batch gets a **batch task**: it waits for the batches it depends on (an earlier batch
  holding one of its keys: last write wins), takes one of the account's slots, submits, polls until
  a terminal status, maps failures back to the records' sources, records the outcome and frees the
  slot.

Everything runs inside one task group owned by the caller's ``await``: leaving it waits for or
cancels every task. The journal makes each step durable, so a crashed run resumes where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream

from orchestrator import failpoints
from orchestrator.batching import Batch, BatchAssembler, RecordRefs, split_batch
from orchestrator.client import ImportState, ImportStatus, InsightClient, SubmitReceipt
from orchestrator.errors import (
    AccountFullError,
    BadRequestError,
    BodyTooLargeError,
    JournalMismatch,
    NotFoundError,
    OrchestratorError,
    RateLimitedError,
    RecordError,
    TransientError,
)
from orchestrator.inputs import Chunk, FileInput, IterableInput, RecordInput
from orchestrator.journal import (
    BatchPhase,
    DeadLetter,
    InputProgress,
    Journal,
    MemoryJournal,
    NewBatch,
    RunSpec,
    StoredBatch,
)
from orchestrator.outcomes import ImportOutcome, ImportResult, RunStats
from orchestrator.parsing import default_processes
from orchestrator.polling import PollPlanner
from orchestrator.records import (
    Collection,
    EncodedRecord,
    RecordRun,
    RejectedRecord,
)
from orchestrator.settings import Settings

__all__ = ["Orchestrator"]

log = structlog.get_logger("orchestrator.engine")

OutcomeHandler = Callable[[ImportOutcome], Any]

# --------------------------------------------------------------------------- batches


@dataclass(slots=True, eq=False)
class _BatchTask:
    """The in-memory side of one unfinished batch."""

    batch_id: int
    record_count: int
    body_bytes: int
    refs: RecordRefs
    identity_hashes: frozenset[int]  # made in a worker thread: one per record
    depends_on: tuple[int, ...]
    import_id: str | None = None
    attempts: int = 0
    polls: int = 0
    resubmits: int = 0
    submitted_at: float | None = None
    accepted: float | None = None  # loop clock when the 202 arrived (this process only)
    holds_capacity: bool = True  # halves of a split batch borrow their parent's place
    finished: anyio.Event = field(default_factory=anyio.Event)


class _ByteBudget:
    """Lets holders in while the bytes they hold stay within a budget; one always gets in."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._used = 0
        self._changed: asyncio.Event | None = None

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        while self._used and self._used + size > self._budget:
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()
        self._used += size
        try:
            yield
        finally:
            self._used -= size
            changed, self._changed = self._changed, None
            if changed is not None:
                changed.set()


class Orchestrator:
    """Imports records into Dotdigital Insight data collections, as fast as one account allows.

    Use it as an async context manager; it owns one :class:`asyncio.Semaphore` of
    ``settings.max_concurrent`` import slots for the client's account, shared by every run started
    from it (so two concurrent :meth:`import_records` calls together respect the API's limit).

    Args:
        client: the API client of one account; entered and closed with the orchestrator.
        settings: batching, slot and polling settings (production defaults when omitted).
    """

    def __init__(self, client: InsightClient, settings: Settings | None = None) -> None:
        self.client = client
        self.settings = settings if settings is not None else Settings()
        self._slots = asyncio.Semaphore(self.settings.max_concurrent)
        self._uploads = _ByteBudget(self.settings.max_upload_bytes)
        self._planner = PollPlanner(
            poll_min=self.settings.poll_min, poll_max=self.settings.poll_max
        )
        self._entered = False

    async def __aenter__(self) -> Orchestrator:
        await self.client.__aenter__()
        self._entered = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._entered = False
        await self.client.aclose()

    async def import_records(
        self,
        collection: Collection,
        records: Iterable[Any] | AsyncIterable[Any],
        *,
        journal: Journal | None = None,
        on_outcome: OutcomeHandler | None = None,
        stats: RunStats | None = None,
    ) -> ImportResult:
        """Import records from an iterable or async iterable into ``collection``.

        Records are mappings ``{"key", "json", "contactIdentity"?}`` (or JSON lines as bytes).
        Invalid records do not stop the run: they end in ``result.dead_letters`` with their
        position and the rule they broke.

        Args:
            collection: where the records go (name, scope, type).
            records: the records, in order; for one key the last occurrence wins.
            journal: durable state to resume from; in memory when omitted.
            on_outcome: called with each :class:`ImportOutcome` as its batch ends.
            stats: live counters to update (for a progress display).
        """
        return await self._run(
            collection,
            lambda tg: [IterableInput(records, tg, self.settings.seal_after)],
            inputs=("<records>",),
            journal=journal,
            on_outcome=on_outcome,
            stats=stats,
        )

    @contextlib.asynccontextmanager
    async def stream(
        self,
        collection: Collection,
        records: Iterable[Any] | AsyncIterable[Any],
        *,
        journal: Journal | None = None,
    ) -> AsyncIterator[MemoryObjectReceiveStream[ImportOutcome]]:
        """Import like :meth:`import_records`, receiving each batch's outcome as it ends.

        Use it as ``async with orch.stream(collection, records) as outcomes:`` then
        ``async for outcome in outcomes:``. Leaving the block early cancels the import (its state
        is in the journal); an error of the run is raised from the block.

        Args:
            collection: where the records go.
            records: the records, in order.
            journal: durable state to resume from; in memory when omitted.
        """
        send, receive = anyio.create_memory_object_stream[ImportOutcome](math.inf)

        async def run() -> None:
            async with send:
                await self.import_records(
                    collection, records, journal=journal, on_outcome=send.send
                )

        with _first_error_unwrapped():
            async with anyio.create_task_group() as tg, receive:
                tg.start_soon(run)
                yield receive
                tg.cancel_scope.cancel()

    async def import_files(
        self,
        collection: Collection,
        paths: Sequence[str],
        *,
        journal: Journal | None = None,
        fresh: bool = False,
        on_outcome: OutcomeHandler | None = None,
        stats: RunStats | None = None,
    ) -> ImportResult:
        """Import JSON Lines files (``.gz`` allowed, ``-`` for stdin) into ``collection``.

        Args:
            collection: where the records go.
            paths: input files, read in order.
            journal: durable state; with the same journal a re-run resumes after a crash.
            fresh: discard what the journal holds and start over.
            on_outcome: called with each :class:`ImportOutcome` as its batch ends.
            stats: live counters to update (for a progress display).
        """
        processes = self.settings.parse_processes
        if processes is None:
            processes = default_processes()
        # A line longer than the largest record a body can hold is dropped as it is read.
        longest = self.settings.max_body_bytes - sum(map(len, collection.envelope()))
        return await self._run(
            collection,
            lambda tg: [
                FileInput(path, processes=processes, max_line_bytes=max(longest, 1))
                for path in paths
            ],
            inputs=tuple(paths),
            journal=journal,
            fresh=fresh,
            on_outcome=on_outcome,
            stats=stats,
        )

    async def _run(
        self,
        collection: Collection,
        make_inputs: Callable[[TaskGroup], list[RecordInput]],
        *,
        inputs: tuple[str, ...],
        journal: Journal | None,
        fresh: bool = False,
        on_outcome: OutcomeHandler | None,
        stats: RunStats | None,
    ) -> ImportResult:
        if not self._entered:
            raise OrchestratorError(
                "the Orchestrator is not open: use `async with Orchestrator(client) as orch:`"
            )
        own_journal = journal is None
        journal = journal if journal is not None else MemoryJournal()
        run = _Run(
            orchestrator=self,
            collection=collection,
            journal=journal,
            on_outcome=on_outcome,
            stats=stats if stats is not None else RunStats(),
        )
        try:
            spec = RunSpec(
                collection=collection.name,
                scope=str(collection.scope),
                collection_type=collection.type,
                inputs=inputs,
                account=_account_id(self.client),
            )
            return await run.execute(spec, make_inputs, fresh=fresh)
        finally:
            if own_journal:
                await journal.close()


@contextlib.contextmanager
def _first_error_unwrapped() -> Iterator[None]:
    """Raise the run's own error rather than the task group's ExceptionGroup around it.

    One task failing cancels the others, so the group holds one real error (and maybe
    cancellations); callers then catch ``AuthenticationError`` instead of an ExceptionGroup.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        errors = _leaves(group)
        real = [e for e in errors if not isinstance(e, anyio.get_cancelled_exc_class())]
        if len(real) == 1 or (real and all(type(e) is type(real[0]) for e in real)):
            raise real[0] from group
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            leaves.extend(_leaves(error))
        else:
            leaves.append(error)
    return leaves


def _identity_hashes(refs: RecordRefs) -> frozenset[int]:
    """The hashes of the records' identities (run it in a worker thread: one per record)."""
    return frozenset(map(hash, refs.identities()))


class _InFlight:
    """Which unfinished imports hold which records (identities as hashes), for last write wins.

    One set per import, made off the event loop when the batch is sealed: adding or dropping an
    import is then one step on the loop, where a dict of every record in flight (hundreds of
    thousands) took tens of milliseconds to update, or to resize.
    """

    __slots__ = ("_imports",)

    def __init__(self) -> None:
        self._imports: dict[int, frozenset[int]] = {}

    def __bool__(self) -> bool:
        return bool(self._imports)

    def add(self, batch_id: int, identity_hashes: frozenset[int]) -> None:
        self._imports[batch_id] = identity_hashes

    def discard(self, batch_id: int) -> None:
        self._imports.pop(batch_id, None)

    def holder(self, identity_hash: int) -> int | None:
        """The newest unfinished import holding this identity, if any."""
        found = None
        for batch_id, held in self._imports.items():
            if identity_hash in held and (found is None or batch_id > found):
                found = batch_id
        return found

    def holds_any(self, identity_hashes: Iterable[int]) -> bool:
        """Whether any unfinished import holds one of these identities."""
        probe = set(identity_hashes)
        return any(not held.isdisjoint(probe) for held in self._imports.values())


def _account_id(client: InsightClient) -> str:
    """An opaque id of the client's account (API root and user, hashed; never the password)."""
    identity = f"{client.settings.api_root}\0{client.settings.username}".encode()
    return hashlib.sha256(identity).hexdigest()[:16]


class _Run:
    def __init__(
        self,
        *,
        orchestrator: Orchestrator,
        collection: Collection,
        journal: Journal,
        on_outcome: OutcomeHandler | None,
        stats: RunStats,
    ) -> None:
        self.orch = orchestrator
        self.settings = orchestrator.settings
        self.client = orchestrator.client
        self.collection = collection
        self.journal = journal
        self.on_outcome = on_outcome
        self.stats = stats
        self.planner = orchestrator._planner
        self.tasks: dict[int, _BatchTask] = {}
        # hash(identity) -> id of the newest unfinished batch holding that identity. Hashes keep
        # this map small (no tuple per record); a collision only holds a record back needlessly.
        self.in_flight = _InFlight()
        self.capacity = anyio.Semaphore(self.settings.max_concurrent + 1)
        self.task_group: TaskGroup  # the run's own, set when it starts

    # ----------------------------------------------------------------- the run

    async def execute(
        self,
        spec: RunSpec,
        make_inputs: Callable[[TaskGroup], list[RecordInput]],
        *,
        fresh: bool,
    ) -> ImportResult:
        started = time.monotonic()
        state = await self.journal.open(spec, fresh=fresh)
        if state.complete:
            log.info("run.nothing_to_do", collection=self.collection.name)
            return await self._result(started, nothing_to_do=True)
        if not state.fresh:
            log.info(
                "run.resumed",
                collection=self.collection.name,
                unfinished_batches=len(state.unfinished),
                lines_done=[progress.lines for progress in state.inputs],
            )
        with (
            structlog.contextvars.bound_contextvars(collection=self.collection.name),
            _first_error_unwrapped(),
        ):
            async with anyio.create_task_group() as tg:
                self.task_group = tg
                for stored in state.unfinished:
                    await self._resume_batch(tg, stored)
                inputs = make_inputs(tg)
                try:
                    await self._produce(tg, inputs, state.inputs)
                finally:
                    with anyio.CancelScope(shield=True):
                        for source in inputs:
                            await source.aclose()
        await self.journal.mark_complete()
        return await self._result(started, nothing_to_do=False)

    async def _result(self, started: float, *, nothing_to_do: bool) -> ImportResult:
        return ImportResult(
            collection=self.collection.name,
            counters=await self.journal.counters(),
            imports=tuple(await self.journal.batches()),
            dead_letters=tuple(await self.journal.dead_letters()),
            duration_s=time.monotonic() - started,
            nothing_to_do=nothing_to_do,
        )

    # ----------------------------------------------------------------- producer

    async def _produce(
        self, tg: TaskGroup, inputs: list[RecordInput], progress: Sequence[InputProgress]
    ) -> None:
        producer = _Producer(self, tg)
        for index, source in enumerate(inputs):
            done = progress[index] if index < len(progress) else None
            if done is not None and done.lines:
                # Read through what was handled before and compare fingerprints: an input edited
                # since would otherwise mix old and new records silently.
                digest = await source.skip(done.lines)
                if digest and done.digest and digest != done.digest:
                    raise JournalMismatch(
                        f"{source.origin} changed since the journal recorded its first "
                        f"{done.lines} lines; re-run with --fresh to import it anew, or restore "
                        "the original file to resume"
                    )
            if done is not None and done.done:
                continue
            await producer.consume(index, source)
        await producer.finish()

    async def _launch(self, tg: TaskGroup, task: _BatchTask) -> None:
        self.tasks[task.batch_id] = task
        self.in_flight.add(task.batch_id, task.identity_hashes)
        tg.start_soon(self._run_batch, task, name=f"batch-{task.batch_id}")

    async def _resume_batch(self, tg: TaskGroup, stored: StoredBatch) -> None:
        await self.capacity.acquire()
        refs = await self.journal.load_refs(stored.batch_id)
        task = _BatchTask(
            batch_id=stored.batch_id,
            record_count=stored.record_count,
            body_bytes=stored.body_bytes,
            refs=refs,
            identity_hashes=await anyio.to_thread.run_sync(_identity_hashes, refs),
            depends_on=tuple(d for d in stored.depends_on if d in self.tasks),
            import_id=stored.import_id if stored.phase is BatchPhase.SUBMITTED else None,
            attempts=stored.attempts,
            polls=stored.polls,
            resubmits=stored.resubmits,
            submitted_at=stored.submitted_at,
        )
        await self._launch(tg, task)

    # ----------------------------------------------------------------- one batch

    async def _run_batch(self, task: _BatchTask) -> None:
        try:
            for dependency in task.depends_on:
                waiting_for = self.tasks.get(dependency)
                if waiting_for is not None:
                    await waiting_for.finished.wait()
            if self.orch._slots.locked():
                log.debug("slot.waiting", batch_id=task.batch_id)
            async with self.orch._slots:
                self.stats.imports_in_flight += 1
                try:
                    outcome = await self._import_batch(task)
                finally:
                    self.stats.imports_in_flight -= 1
            if isinstance(outcome, list):  # split in two: this batch ends when both halves do
                for half in outcome:
                    await half.finished.wait()
                return
            self.stats.imports_finished += 1
            self.stats.records_imported += outcome.imported
            self.stats.records_failed += len(outcome.failures)
            if self.on_outcome is not None:
                result = self.on_outcome(outcome)
                if hasattr(result, "__await__"):
                    await result
        finally:
            self.in_flight.discard(task.batch_id)
            task.finished.set()
            self.tasks.pop(task.batch_id, None)
            if task.holds_capacity:
                self.capacity.release()

    async def _import_batch(self, task: _BatchTask) -> ImportOutcome | list[_BatchTask]:
        """Submit, then poll until the batch ends; a Failed import is sent again (bounded).

        Returns the outcome, or the two halves the batch was split into after a 413.
        """
        while True:
            if task.import_id is None:
                error = await self._submit(task)
                if error is not None and error[0] == _TOO_LARGE and task.record_count > 1:
                    return await self._split(task)
                if error is not None:
                    return await self._give_up(task, status=error[0], message=error[1])
            status = await self._poll_until_done(task)
            if status is not None and status.state is ImportState.SUCCEEDED:
                return await self._succeed(task, status)
            # Failed, or forgotten by the API (404 on a known id): send it again, a bounded
            # number of times (upsert by key makes a repeat harmless).
            word = status.status if status is not None else "importNotFound"
            if task.resubmits < self.settings.max_resubmits:
                log.warning(
                    "import.resubmitting",
                    batch_id=task.batch_id,
                    import_id=task.import_id,
                    status=word,
                    resubmits=task.resubmits + 1,
                )
                task.resubmits += 1
                await self.journal.mark_resubmit(task.batch_id)
                await self.journal.add_counters({"resubmits": 1})
                task.import_id = None
                continue
            return await self._give_up(
                task,
                status=word,
                message=(
                    f"the import ended {word!r} {task.resubmits + 1} times; "
                    "the records were not imported"
                ),
            )

    async def _submit(self, task: _BatchTask) -> tuple[str, str] | None:
        """PUT the batch's body; on success ``task.import_id`` is set, else (status, message)."""
        full_waits = 0
        while True:
            try:
                receipt = await self._put(task)
            except AccountFullError:
                task.attempts += 1
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
                log.warning("api.rate_limit_wait", batch_id=task.batch_id, wait_s=error.retry_after)
                await anyio.sleep(error.retry_after)
                continue
            except BodyTooLargeError as error:
                return (_TOO_LARGE, _api_message(error, "lower --max-body-bytes"))
            except BadRequestError as error:
                return (error.error_code or "BadRequest", _api_message(error, "fix the records"))
            if receipt.lost_responses:
                await self.journal.add_counters({"lost_responses": receipt.lost_responses})
            log.info(
                "import.submitted",
                batch_id=task.batch_id,
                import_id=receipt.import_id,
                records=task.record_count,
                body_bytes=task.body_bytes,
                attempts=receipt.attempts,
                lost_responses=receipt.lost_responses,
            )
            return None

    async def _put(self, task: _BatchTask) -> SubmitReceipt:
        """One submit: intent, PUT, import id, each journaled; the body is in memory only here.

        At most ``max_upload_bytes`` of bodies are loaded and sent at once: a body is the biggest
        thing the run holds, and uploads share one network link anyway.
        """
        async with self.orch._uploads.hold(task.body_bytes):
            body = await self.journal.load_body(task.batch_id)
            await self.journal.mark_submitting(task.batch_id)
            failpoints.hit("intent")
            # A submit in progress is finished even when the run is being cancelled: the import
            # id is worth recording (else the import is in doubt and sent again).
            with anyio.CancelScope(shield=True):
                try:
                    receipt = await self.client.submit_import(body)
                finally:
                    if not self.journal.keeps_bodies:  # else it is the journal's own copy
                        _release(body)
                task.accepted = anyio.current_time()
                failpoints.hit("accepted")
                task.attempts += receipt.attempts
                task.import_id = receipt.import_id
                task.submitted_at = time.time()
                await self.journal.mark_submitted(
                    task.batch_id, receipt.import_id, task.submitted_at
                )
                failpoints.hit("submitted")
            return receipt

    async def _poll_until_done(self, task: _BatchTask) -> ImportStatus | None:
        """Poll within [poll_min, poll_max]: the final status, or None if the API forgot it."""
        assert task.import_id is not None
        settings = self.settings
        now = anyio.current_time()
        submitted = task.accepted if task.accepted is not None else now
        task.accepted = None  # a resubmit gets its own
        # poll_min is counted from the answer of the previous call (the later end) and poll_max
        # from its sending (the earlier end), less a little for the way to the server: seen from
        # the server, polls stay inside [poll_min, poll_max] whatever the round trip.
        last_answer = last_sent = submitted
        safety = min(0.02 * settings.poll_max, 0.25)
        running_at: float | None = None
        aimed_with = (
            self.planner.version
            if self.planner.expected_duration(task.record_count) is not None
            else None
        )
        errors_in_row = 0
        while True:
            elapsed = anyio.current_time() - submitted
            delay = self.planner.next_delay(records=task.record_count, elapsed=elapsed)
            wake = max(
                min(last_answer + delay, last_sent + settings.poll_max - safety),
                last_answer + settings.poll_min,
            )
            await anyio.sleep(max(0.0, wake - anyio.current_time()))
            asked_at = last_sent = anyio.current_time()
            try:
                status = await self.client.import_status(task.import_id, retry=False)
            except NotFoundError:
                log.warning("import.forgotten", batch_id=task.batch_id, import_id=task.import_id)
                return None
            except RateLimitedError as error:
                # The API asked us to wait: the only case where polls may be further apart.
                await anyio.sleep(error.retry_after)
                last_answer = anyio.current_time()
                continue
            except TransientError:
                errors_in_row += 1
                if errors_in_row >= settings.status_error_budget:
                    raise
                last_answer = anyio.current_time()
                continue
            finally:
                task.polls += 1
            errors_in_row = 0
            last_answer = anyio.current_time()
            failpoints.hit("polled")
            await self.journal.mark_polled(task.batch_id, task.polls)
            if status.state is ImportState.RUNNING:
                running_at = asked_at - submitted
                continue
            if status.state is ImportState.SUCCEEDED:
                self.planner.observe(
                    records=task.record_count,
                    running_at=running_at,
                    finished_by=asked_at - submitted,
                    aimed_with=aimed_with,
                )
            return status

    async def _split(self, task: _BatchTask) -> list[_BatchTask]:
        """The API refused the body as too large (its limit is below ours): send it in halves."""
        body = await self.journal.load_body(task.batch_id)
        halves = split_batch(Batch(body=body, refs=task.refs), self.collection)
        ids = await self.journal.seal_batches(
            batches=[NewBatch(half.body, half.refs, ()) for half in halves],
            progress=None,
            dead_letters=(),
            counters={},
        )
        await self.journal.mark_finished(
            task.batch_id,
            status="split",
            imported=0,
            dead_letters=(),
            finished_at=time.time(),
            counters={},
        )
        log.warning(
            "batch.split",
            batch_id=task.batch_id,
            body_bytes=task.body_bytes,
            into=ids,
            hint="the API's body limit is below --max-body-bytes; lower it",
        )
        tasks = [
            _BatchTask(
                batch_id=batch_id,
                record_count=half.record_count,
                body_bytes=half.body_bytes,
                refs=half.refs,
                identity_hashes=await anyio.to_thread.run_sync(_identity_hashes, half.refs),
                depends_on=(),
                holds_capacity=False,
            )
            for batch_id, half in zip(ids, halves, strict=True)
        ]
        for new in tasks:
            await self._launch(self.task_group, new)
        return tasks

    async def _succeed(self, task: _BatchTask, status: ImportStatus) -> ImportOutcome:
        failures = await anyio.to_thread.run_sync(_map_failures, task, status)
        imported = task.record_count - len(failures)
        return await self._finish(task, status.status, imported, failures)

    async def _give_up(self, task: _BatchTask, *, status: str, message: str) -> ImportOutcome:
        def letters() -> tuple[DeadLetter, ...]:  # one per record: made in a worker thread
            return tuple(
                DeadLetter(
                    source=str(ref.source) if ref.source is not None else None,
                    key=ref.key,
                    reason=status,
                    message=message,
                    import_id=task.import_id,
                )
                for ref in task.refs
            )

        return await self._finish(task, status, 0, await anyio.to_thread.run_sync(letters))

    async def _finish(
        self, task: _BatchTask, status: str, imported: int, failures: tuple[DeadLetter, ...]
    ) -> ImportOutcome:
        finished_at = time.time()
        failpoints.hit("terminal")
        await self.journal.mark_finished(
            task.batch_id,
            status=status,
            imported=imported,
            dead_letters=failures,
            finished_at=finished_at,
            counters={"records_imported": imported, "records_failed": len(failures)},
        )
        failpoints.hit("finished")
        log.info(
            "import.finished",
            batch_id=task.batch_id,
            import_id=task.import_id,
            status=status,
            records=task.record_count,
            imported=imported,
            failed=len(failures),
            body_bytes=task.body_bytes,
            attempts=task.attempts,
            polls=task.polls,
            resubmits=task.resubmits,
            duration_s=round(finished_at - task.submitted_at, 3) if task.submitted_at else None,
        )
        return ImportOutcome(
            batch_id=task.batch_id,
            import_id=task.import_id,
            status=status,
            records=task.record_count,
            imported=imported,
            failures=failures,
            body_bytes=task.body_bytes,
            attempts=task.attempts,
            polls=task.polls,
            submitted_at=task.submitted_at,
            finished_at=finished_at,
        )


_TOO_LARGE = "BodyTooLarge"


def _release(body: object) -> None:
    """Free a body's memory now, not when the HTTP client's reference cycles are collected.

    The request objects of aiohttp refer to the body and to each other; with the collector run
    rarely, a 50 MB body could outlive its upload by seconds and overlap with the next one.
    """
    if isinstance(body, bytearray):
        with contextlib.suppress(BufferError):  # still exported somewhere: leave it to the GC
            body.clear()


def _api_message(error: OrchestratorError, advice: str) -> str:
    return f"the API refused the whole import ({error}); {advice}"


def _map_failures(task: _BatchTask, status: ImportStatus) -> tuple[DeadLetter, ...]:
    """Per-record failures of the API, mapped back to the records' sources."""
    if not status.failures:
        return ()
    # One pass over the batch's records (a worker thread runs this: a batch can hold 100,000).
    position: dict[object, int] = {}
    first_with_key: dict[str, int] = {}
    for index, identity in enumerate(task.refs.identities()):
        position[identity] = index
        first_with_key.setdefault(identity if isinstance(identity, str) else identity[2], index)
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
                import_id=task.import_id,
            )
        )
    return tuple(letters)


# --------------------------------------------------------------------------- producer


# A sealed batch with the hashes of its records' identities (both made in a worker thread).
_Sealed = tuple[Batch, frozenset[int]]


def _progress_after(index: int, chunk: Chunk) -> InputProgress:
    """Progress through the last line of ``chunk``."""
    return InputProgress(
        index=index,
        lines=chunk.last_line,
        digest=chunk.digest_through(chunk.last_line - chunk.first_line + 1),
    )


class _Producer:
    """Turns inputs into sealed batches, saving input progress with each seal.

    Records go to the *main* batch, except those whose identity is still in an unfinished import:
    those go to a *held* batch that depends on the imports holding their keys, so the newer
    version can never be applied before the older one (last write wins) while the main stream
    keeps all slots busy. The held batch is sealed together with the main one, so every line
    before the progress mark is in a sealed batch or dead-lettered: a crash loses nothing and
    re-sends nothing that was sealed.
    """

    def __init__(self, run: _Run, tg: TaskGroup) -> None:
        self.run = run
        self.tg = tg
        self.main = BatchAssembler(
            run.collection,
            max_body_bytes=run.settings.max_body_bytes,
            on_superseded=self._superseded,
        )
        self.held = BatchAssembler(
            run.collection,
            max_body_bytes=run.settings.max_body_bytes,
            on_superseded=self._superseded,
        )
        self.held_depends_on: set[int] = set()
        self.dead_letters: list[DeadLetter] = []
        self.counters: dict[str, int] = {}
        # inputs read to the end whose last records are still in an open batch
        self.finished_inputs: list[InputProgress] = []

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _superseded(self, record: EncodedRecord) -> None:
        self._count("records_superseded")

    async def consume(self, index: int, source: RecordInput) -> None:
        run = self.run
        last: Chunk | None = None
        async for chunk in source.chunks(run.collection):
            if chunk is None:  # the source paused: do not keep what we have waiting
                if last is not None:
                    await self._seal_open(progress=_progress_after(index, last))
                continue
            last = chunk
            failpoints.hit("read")
            if chunk.run is not None:
                await self._add_run(chunk, chunk.run, index)
            else:
                for result in chunk.results:
                    if isinstance(result, RejectedRecord):
                        self._reject(result.error, result.raw)
                        continue
                    await self._add(result, index, chunk)
            run.stats.records_read += chunk.read
        end = _progress_after(index, last) if last is not None else InputProgress(index, 0, "")
        self.finished_inputs.append(
            InputProgress(index=end.index, lines=end.lines, digest=end.digest, done=True)
        )

    async def _add(self, record: EncodedRecord, index: int, chunk: Chunk) -> None:
        identity = record.identity
        holder = self.run.in_flight.holder(hash(identity))
        target = self.held if holder is not None or identity in self.held else self.main
        if not target.fits(record):
            # One of the open batches is full: seal both, with the progress up to this record
            # (which starts the next batch), in one journal transaction.
            line = record.source.line if record.source is not None else chunk.first_line
            progress = InputProgress(
                index=index,
                lines=line - 1,
                digest=chunk.digest_through(line - chunk.first_line),
            )
            await self._seal_open(progress=progress)
            # An older version of this record may have just been sealed: it is in flight now.
            holder = self.run.in_flight.holder(hash(identity))
            target = self.held if holder is not None else self.main
        try:
            target.add(record)  # never seals now: the record fits, or the batch is empty
        except RecordError as error:
            self._reject(error, record.data)
            return
        if holder is not None:
            self.held_depends_on.add(holder)
        self._count("records_read")

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

        in_flight = self.run.in_flight
        hashes = list(map(hash, records.identities()))
        position = 0
        total = len(records)
        while position < total:
            if (in_flight and in_flight.holds_any(hashes[position:])) or (
                self.held and self.held.holds_any(records.identities(position))
            ):
                for at in range(position, total):  # rare: updates of records still in flight
                    reject_before(records.lines[at])
                    await self._add(records.record(at), index, chunk)
                break
            try:
                stop = self.main.add_run(records, position)
            except RecordError as error:
                reject_before(records.lines[position])
                self._reject(error, records.record(position).data)
                position += 1
                continue
            self._count("records_read", stop - position)
            if stop == position:
                # the main batch is full: seal both, with the progress up to this record
                line = records.lines[stop]
                reject_before(line)
                progress = InputProgress(
                    index=index,
                    lines=line - 1,
                    digest=chunk.digest_through(line - chunk.first_line),
                )
                await self._seal_open(progress=progress)
            position = stop
        reject_before(chunk.last_line + 1)

    def _take_held_depends(self) -> tuple[int, ...]:
        depends_on = tuple(sorted(self.held_depends_on))
        self.held_depends_on = set()
        return depends_on

    def _reject(self, error: RecordError, raw: bytes) -> None:
        self._count("records_read")
        self._count("records_rejected")
        self.run.stats.records_rejected += 1
        self.dead_letters.append(
            DeadLetter(
                source=str(error.source) if error.source is not None else None,
                key=error.key,
                reason=error.rule,
                message=error.message,
                record=raw,
            )
        )

    async def _seal_open(self, *, progress: InputProgress | None) -> None:
        """Seal both open batches (if not empty) with the progress mark.

        Sealing copies up to a whole body and makes one ref per record: done in a worker
        thread, so the event loop is not held for it (the producer alone touches the assemblers).
        """

        def seal(assembler: BatchAssembler) -> _Sealed | None:
            hashes = assembler.identity_hashes()
            batch = assembler.seal()
            return None if batch is None else (batch, hashes)

        main, held = await anyio.to_thread.run_sync(lambda: (seal(self.main), seal(self.held)))
        if main is None and held is None:
            if progress is not None:
                await self._save(progress)
            return
        await self._seal(main=main, held=held, progress=progress)

    async def _seal(
        self, *, main: _Sealed | None, held: _Sealed | None, progress: InputProgress | None
    ) -> None:
        """Journal the sealed batches with the progress, rejects and counters of their records.

        Held records come before the main batch's last records in the input, so the two are
        journaled together: a crash can never keep one and re-read the other.
        """
        plans: list[tuple[Batch, frozenset[int], tuple[int, ...]]] = []
        if held is not None:
            plans.append((*held, self._take_held_depends()))
        if main is not None:
            plans.append((*main, ()))
        for _ in plans:
            await self.run.capacity.acquire()
        self._count("records_submitted", sum(batch.record_count for batch, _, _ in plans))
        progresses = [*self.finished_inputs, *([progress] if progress is not None else [])]
        batch_ids = await self.run.journal.seal_batches(
            batches=[NewBatch(batch.body, batch.refs, deps) for batch, _, deps in plans],
            progress=progresses,
            dead_letters=self.dead_letters,
            counters=self.counters,
        )
        self.finished_inputs = []
        self.dead_letters = []
        self.counters = {}
        failpoints.hit("sealed")
        if not self.run.journal.keeps_bodies:
            # The journal holds copies of the bodies now: the next ones are built in their memory.
            if main is not None:
                self.main.recycle(main[0].body)
            if held is not None:
                self.held.recycle(held[0].body)
        for batch_id, (batch, hashes, depends_on) in zip(batch_ids, plans, strict=True):
            self.run.stats.batches_sealed += 1
            log.info(
                "batch.sealed",
                batch_id=batch_id,
                records=batch.record_count,
                body_bytes=batch.body_bytes,
                fill=round(batch.body_bytes / self.run.settings.max_body_bytes, 4),
                depends_on=list(depends_on),
            )
            task = _BatchTask(
                batch_id=batch_id,
                record_count=batch.record_count,
                body_bytes=batch.body_bytes,
                refs=batch.refs,
                identity_hashes=hashes,
                depends_on=depends_on,
            )
            await self.run._launch(self.tg, task)

    async def _save(self, progress: InputProgress | None) -> None:
        await self.run.journal.save_progress(
            progress=[*self.finished_inputs, *([progress] if progress is not None else [])],
            dead_letters=self.dead_letters,
            counters=self.counters,
        )
        self.finished_inputs = []
        self.dead_letters = []
        self.counters = {}

    async def finish(self) -> None:
        """Seal what is left and record that every input was read."""
        await self._seal_open(progress=None)
        if self.finished_inputs or self.dead_letters or self.counters:
            await self._save(None)
