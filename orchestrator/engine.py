"""The engine's facade: ``Orchestrator`` and the wiring of one run.

One run imports one stream of records into one collection, in one direction:

    inputs -> Producer -> (channel of sealed batches) -> Downstream -> outcomes
              producer.py                               lifecycle.py

- ``inputs`` read and validate records in tasks of their own (``inputs.RecordInput``);
- the ``Producer`` packs them into bodies, journals each sealed batch and sends it downstream;
- the ``Downstream`` takes each batch through the account's slot gate (``slots``), submit, polls
  and outcome.

The ``Orchestrator`` owns what one account's runs share: the slot gate, the upload budget, the
poll planner and the parse-process pool. Everything runs inside one task group owned by the
caller's ``await``: leaving it waits for or cancels every task. The journal makes each step
durable, so a crashed run resumes where it was.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Sequence,
)
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from orchestrator.client import InsightClient
from orchestrator.errors import OrchestratorError
from orchestrator.inputs import FileInput, IterableInput, RecordInput
from orchestrator.journal import Journal, MemoryJournal, RunSpec, RunState, account_id
from orchestrator.lifecycle import (
    BatchTask,
    Downstream,
    InFlight,
    OutcomeSink,
    UploadBudget,
    identity_hashes,
)
from orchestrator.logs import get_logger
from orchestrator.outcomes import ImportOutcome, ImportResult, RunStats
from orchestrator.parsing import PROCESS_AFTER, ParsePool, default_processes
from orchestrator.polling import CallBudget, PollPlanner
from orchestrator.producer import Producer
from orchestrator.records import Collection
from orchestrator.settings import Settings
from orchestrator.slots import LocalSlotGate
from orchestrator.taskgroups import first_error_unwrapped

__all__ = ["Orchestrator"]

log = get_logger("orchestrator.engine")

#: Called with each outcome as it happens; a plain function or a coroutine function.
OutcomeHandler = Callable[[ImportOutcome], Any]


class Orchestrator:
    """Imports records into Dotdigital Insight data collections, as fast as one account allows.

    Use it as an async context manager; it owns one :class:`asyncio.Semaphore` of
    ``settings.max_concurrent`` import slots for the client's account, shared by every run started
    from it (so two concurrent :meth:`import_records` calls together respect the API's limit).

    Args:
        client: the API client of one account; entered and closed with the orchestrator.
        settings: batching, slot and polling settings (production defaults when omitted).
    """

    def __init__(self, client: InsightClient, *, settings: Settings | None = None) -> None:
        self.client = client
        self.settings = settings if settings is not None else Settings()
        self._slots = LocalSlotGate(self.settings.max_concurrent)
        self._uploads = UploadBudget(self.settings.max_upload_bytes)
        self._planner = PollPlanner(
            poll_min=self.settings.poll_min, poll_max=self.settings.poll_max
        )
        # The account's status calls a minute, shared by every import of every run (as the
        # planner and the slots are).
        rate = self.settings.status_calls_per_minute
        self._status_budget = (
            CallBudget(calls_per_minute=rate, window=self.settings.status_budget_window)
            if rate is not None
            else None
        )
        self._entered = False
        # worker processes for large files, shared by this orchestrator's runs
        self._parse_pool: ParsePool | None = None

    async def __aenter__(self) -> Orchestrator:
        await self.client.__aenter__()
        processes = self.settings.parse_processes
        if processes is None:
            processes = default_processes()
        # started only when a file is large enough to need it
        self._parse_pool = ParsePool(processes) if processes else None
        self._entered = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._entered = False
        pool, self._parse_pool = self._parse_pool, None
        try:
            if pool is not None:
                await pool.aclose()
        finally:
            await self.client.aclose()

    def poll_history(self) -> list[tuple[int, float]]:
        """What this orchestrator's poll planner learned: ``(records, seconds)`` of the
        account's recent finished imports, oldest first. Keep it and hand it to
        :meth:`restore_poll_history` of a later orchestrator (the command keeps it beside its
        journal), and that one aims its first polls instead of probing for each import's end."""
        return self._planner.history()

    def restore_poll_history(self, history: Iterable[tuple[int, float]]) -> bool:
        """Start the poll planner from an earlier orchestrator's :meth:`poll_history` of the
        same account. Ignored once this one has learned from an import of its own.

        Returns:
            whether the planner now has a model of the account's imports.
        """
        return self._planner.restore(history)

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
            [IterableInput(records)],
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

        with first_error_unwrapped():
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
        pool = self._parse_pool
        # A line longer than the largest record a body can hold is dropped as it is read.
        longest = self.settings.max_body_bytes - sum(map(len, collection.envelope()))
        return await self._run(
            collection,
            [FileInput(path, pool=pool, max_line_bytes=max(longest, 1)) for path in paths],
            inputs=tuple(paths),
            journal=journal,
            fresh=fresh,
            on_outcome=on_outcome,
            stats=stats,
            warm_up=(lambda: _start_pool_for(pool, paths)) if pool is not None else None,
        )

    async def _run(
        self,
        collection: Collection,
        sources: Sequence[RecordInput],
        *,
        inputs: tuple[str, ...],
        journal: Journal | None,
        fresh: bool = False,
        on_outcome: OutcomeHandler | None,
        stats: RunStats | None,
        warm_up: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> ImportResult:
        if not self._entered:
            raise OrchestratorError(
                "the Orchestrator is not open: use `async with Orchestrator(client) as orch:`"
            )
        own_journal = journal is None
        journal = journal if journal is not None else MemoryJournal()
        spec = RunSpec(
            collection=collection.name,
            scope=str(collection.scope),
            collection_type=collection.type,
            inputs=inputs,
            account=_account_id(self.client),
        )
        try:
            return await self._execute(
                collection,
                spec,
                sources,
                journal=journal,
                fresh=fresh,
                on_outcome=_as_sink(on_outcome),
                stats=stats if stats is not None else RunStats(),
                warm_up=warm_up,
            )
        finally:
            if own_journal:
                await journal.close()

    async def _execute(
        self,
        collection: Collection,
        spec: RunSpec,
        sources: Sequence[RecordInput],
        *,
        journal: Journal,
        fresh: bool,
        on_outcome: OutcomeSink | None,
        stats: RunStats,
        warm_up: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> ImportResult:
        started = time.monotonic()
        state = await journal.open(spec, fresh=fresh)
        if state.complete:
            log.info("run.nothing_to_do", collection=collection.name)
            return await _result(journal, collection, started, nothing_to_do=True)
        # (a journal the caller opened already counts as fresh while it holds no progress)
        if state.unfinished or any(progress.lines for progress in state.inputs):
            stats.resume(await journal.counters())
            log.info(
                "run.resumed",
                collection=collection.name,
                unfinished_batches=len(state.unfinished),
                lines_done=[progress.lines for progress in state.inputs],
            )
        in_flight = InFlight()
        # The producer holds at most this many unfinished batches: one being filled while every
        # slot is busy, so memory stays flat whatever the input size.
        capacity = anyio.Semaphore(self.settings.max_concurrent + 1)
        send, receive = anyio.create_memory_object_stream[BatchTask](math.inf)
        downstream = Downstream(
            client=self.client,
            journal=journal,
            settings=self.settings,
            collection=collection,
            slots=self._slots,
            uploads=self._uploads,
            planner=self._planner,
            status_budget=self._status_budget,
            in_flight=in_flight,
            capacity=capacity,
            stats=stats,
            on_outcome=on_outcome,
        )
        producer = Producer(
            collection=collection,
            settings=self.settings,
            journal=journal,
            slots=self._slots,
            uploads=self._uploads,
            in_flight=in_flight,
            capacity=capacity,
            batches=send,
            stats=stats,
            on_outcome=on_outcome,
        )
        with (
            structlog.contextvars.bound_contextvars(collection=collection.name),
            first_error_unwrapped(),
        ):
            async with anyio.create_task_group() as tg:
                if warm_up is not None:
                    tg.start_soon(warm_up)
                tg.start_soon(downstream.run, receive)
                try:
                    async with send:
                        await _resume(state, journal, in_flight, capacity, send)
                        await producer.produce(sources, state.inputs)
                        stats.reading_done = True
                finally:
                    with anyio.CancelScope(shield=True):
                        for source in sources:
                            await source.aclose()
        await journal.mark_complete()
        return await _result(journal, collection, started, nothing_to_do=False)


async def _resume(
    state: RunState,
    journal: Journal,
    in_flight: InFlight,
    capacity: anyio.Semaphore,
    batches: MemoryObjectSendStream[BatchTask],
) -> None:
    """Send the batches a crashed run left unfinished downstream, in order, before any new one."""
    unfinished = {stored.batch_id for stored in state.unfinished}
    for stored in state.unfinished:
        await capacity.acquire()
        refs = await journal.load_refs(stored.batch_id)
        hashes = await anyio.to_thread.run_sync(identity_hashes, refs)
        in_flight.add(stored.batch_id, hashes)
        await batches.send(
            BatchTask(
                stored=stored,
                refs=refs,
                identity_hashes=hashes,
                # a batch finished before the crash is nothing to wait for
                depends_on=tuple(d for d in stored.depends_on if d in unfinished),
            )
        )


async def _start_pool_for(pool: ParsePool, paths: Sequence[str]) -> None:
    """Start the parse processes now if an input is large enough to use them.

    A parser asks for the processes when its input passes ``PROCESS_AFTER`` bytes; started only
    then, they held that input's producer for 0.3 s on an idle machine, seconds on a busy one.
    Started as the run opens, beside the first chunks' parsing in a thread, they are ready by
    then. An input's size on disk is what is known up front (a gzip file's is smaller than what
    it holds; standard input has none).
    """

    def large() -> bool:
        for path in paths:
            if path == "-":
                continue
            with contextlib.suppress(OSError):  # the input's own open will say what is wrong
                if os.stat(path).st_size > PROCESS_AFTER:
                    return True
        return False

    if not await anyio.to_thread.run_sync(large):
        return
    with contextlib.suppress(BrokenProcessPool, OSError, OrchestratorError):
        # the input's parser asks again, says why it cannot have them, and parses in a thread
        await pool.executor()


async def _result(
    journal: Journal, collection: Collection, started: float, *, nothing_to_do: bool
) -> ImportResult:
    return ImportResult(
        collection=collection.name,
        counters=await journal.counters(),
        imports=tuple(await journal.batches()),
        dead_letters=tuple(await journal.dead_letters()),
        duration_s=time.monotonic() - started,
        nothing_to_do=nothing_to_do,
    )


def _as_sink(handler: OutcomeHandler | None) -> OutcomeSink | None:
    """One async callable for outcomes, whether the caller gave a function or a coroutine one."""
    if handler is None:
        return None
    if inspect.iscoroutinefunction(handler):
        return handler
    call = handler

    async def sink(outcome: ImportOutcome) -> None:
        call(outcome)

    return sink


def _account_id(client: InsightClient) -> str:
    """An opaque id of the client's account (API root and user, hashed; never the password)."""
    return account_id(client.settings.api_root, client.settings.username)
