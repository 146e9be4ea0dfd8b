"""The long-lived worker: drains the outbox into bulk imports, per account, forever or once.

    async with Worker(store, accounts, settings=settings) as worker:
        await worker.run()            # until worker.stop(); run(burst=True) drains, then returns

One task group holds everything: a watcher that lists the store's pending queues every
``poll_interval`` (jittered), and per account a drain loop with the account's own client, slot
gate, poll planner, upload budget and rate-limit state. Within an account the queues
(collections) with pending rows take free places in turn, least recently served first, so one
collection's backlog never holds another's rows back; accounts never wait for each other.

A queue's batch is claimed from the store (``claim``), packed by the run's own
``BatchAssembler``, sealed (``seal``) and handed to the queue's ``lifecycle.Downstream`` (the
same code as ``run``) through ``OutboxBatches``. It is sealed when the claim is full, or when its
oldest row has waited ``linger`` and a slot is free (or another queue of the account competes for
the places). Each account holds at most ``max_concurrent + 1`` unfinished batches, and the
process at most ``max_held_bytes`` of bodies being packed or sent, whatever the backlog.

Nothing is process-wide: no signal handlers, no logging configuration, metrics in a registry of
the worker's own. ``stop()`` stops claiming and cancels the rest; a submit in progress is
shielded until its import id is stored, and every step is one transaction, so what the worker
leaves is picked up by the next one (``recover``).

On a store several workers share (``SharedOutboxStore``, PostgreSQL) the same class also
heartbeats its lease next to its loops, adopts the imports of dead workers about every lease and
runs them like recovered ones, gates each account's submits with the store's slot gate (the
slots are counted in the database, for every worker together), gives up a queue's lock when it
claims without sealing, and wakes on the store's notifications as well as on the poll interval.
A ``FencedOut`` from any call ends ``run()`` at once: the worker was declared dead and another
owns its imports now.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import Self, cast

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from orchestrator.accounts import Account
from orchestrator.batching import Batch, BatchAssembler
from orchestrator.client import InsightClient
from orchestrator.errors import ConfigError, RecordError
from orchestrator.lifecycle import BatchTask, ByteBudget, Downstream, InFlight, UploadBudget
from orchestrator.logs import get_logger
from orchestrator.outbox.base import (
    Claim,
    ClaimConflict,
    ClaimedRow,
    ClaimedRun,
    FencedOut,
    ImportPhase,
    OutboxError,
    OutboxQueue,
    OutboxStore,
    Pending,
    Rejection,
    SharedOutboxStore,
    StoredImport,
)
from orchestrator.outbox.batches import OutboxBatches, stored_refs
from orchestrator.outcomes import ImportOutcome, RunStats
from orchestrator.parsing import PROCESS_AFTER, ParsePool, default_processes
from orchestrator.polling import CallBudget, PollPlanner
from orchestrator.records import Collection, EncodedRecord
from orchestrator.refs import RecordRefs
from orchestrator.settings import Settings, seconds
from orchestrator.slots import LocalSlotGate, SlotGate
from orchestrator.taskgroups import first_error_unwrapped
from orchestrator.worker_metrics import AccountState, QueueState, WorkerMetrics

__all__ = ["Worker", "WorkerStats"]

log = get_logger("orchestrator.worker")

#: A loop whose heartbeat is older than this many poll intervals (at least 30 s) is stalled.
_STALL_INTERVALS = 20
#: Seconds the store has to answer a readiness ping.
_READY_TIMEOUT = 5.0


@dataclasses.dataclass(slots=True)
class WorkerStats:
    """What the worker did since it started (the shutdown summary).

    Plain integers on the worker's event loop.
    """

    imports_finished: int = 0
    imports_recovered: int = 0
    records_imported: int = 0
    records_dead_lettered: int = 0
    rows_superseded: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)

    def summary(self) -> dict[str, object]:
        """The counters as log fields."""
        return {
            "imports_finished": self.imports_finished,
            "imports_recovered": self.imports_recovered,
            "records_imported": self.records_imported,
            "records_dead_lettered": self.records_dead_lettered,
            "rows_superseded": self.rows_superseded,
            "uptime_s": round(time.monotonic() - self.started, 3),
        }


@dataclasses.dataclass(eq=False)
class _QueueRun:
    """One queue of an account: its downstream, its channel, and when it was last served."""

    queue: OutboxQueue
    collection: Collection | None  # None: the rows name a collection the API refuses
    batches: OutboxBatches
    send: MemoryObjectSendStream[BatchTask]
    send_held: MemoryObjectSendStream[BatchTask] | None = None  # imports that hold a slot
    last_served: float = -math.inf
    quiet_rows: int | None = None  # pending rows at the last claim that was neither full nor due


class _AccountRun:
    """One account: its client and limits, its queues, and the loop that fills its slots."""

    def __init__(self, worker: Worker, account: Account, client: InsightClient) -> None:
        self.worker = worker
        self.name = account.name
        self.client = client
        concurrent = account.max_concurrent or worker.settings.max_concurrent
        self.settings = dataclasses.replace(worker.settings, max_concurrent=concurrent)
        shared = worker.shared
        if shared is None:
            self.slots: SlotGate = LocalSlotGate(concurrent)
        else:
            self.slots = shared.slot_gate(account.name)
        # Adopted imports that already hold one of the account's slots in the database pass a
        # gate of their own: behind the shared gate they would wait for their own slot.
        self.held_slots = LocalSlotGate(concurrent)
        self.uploads = UploadBudget(self.settings.max_upload_bytes, parent=worker._held)
        self.planner = PollPlanner(poll_min=self.settings.poll_min, poll_max=self.settings.poll_max)
        rate = self.settings.status_calls_per_minute  # the account's, shared by its collections
        self.status_budget = (
            CallBudget(calls_per_minute=rate, window=self.settings.status_budget_window)
            if rate is not None
            else None
        )
        # one batch being filled while every slot is busy: memory stays flat whatever the backlog
        self.capacity = anyio.Semaphore(concurrent + 1)
        self.stats = RunStats()
        self.queues: dict[OutboxQueue, _QueueRun] = {}
        self.pending: list[Pending] = []
        self.listed_at = 0.0
        self.wake = anyio.Event()
        self.busy = False
        self.recovered: list[StoredImport] = []
        self._task_group: TaskGroup | None = None

    @property
    def unfinished(self) -> int:
        return sum(q.batches.unfinished for q in self.queues.values())

    def idle(self) -> bool:
        return not self.busy and not self.recovered and self.unfinished == 0

    def listed(self, pending: list[Pending], at: float) -> None:
        self.pending = pending
        self.listed_at = at
        self.wake.set()

    # ------------------------------------------------------------------ the drain loop

    async def drain(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                task_status.started()
                await self._loop()
        finally:
            for run in self.queues.values():
                run.send.close()
                if run.send_held is not None:
                    run.send_held.close()

    def take_over(self, imports: Sequence[StoredImport]) -> None:
        """Run imports found by ``recover`` or ``adopt`` like this worker's own."""
        self.recovered.extend(imports)
        self.wake.set()

    async def _resume(self) -> None:
        """Hand the recovered imports to their queues' downstreams, oldest first."""
        while self.recovered:
            held = self.recovered[0]
            run = self._queue(held.queue)
            if run.send_held is not None and _holds_slot(held):
                # its slot is counted already: it neither waits for one nor for a place
                await run.send_held.send(
                    BatchTask(
                        stored=run.batches.register(held),
                        refs=stored_refs(held),
                        identity_hashes={},
                        depends_on=(),
                        holds_capacity=False,
                    )
                )
            else:
                await self.capacity.acquire()
                await self._send(run, held, stored_refs(held))
            self.recovered.pop(0)

    async def _release(self, run: _QueueRun) -> None:
        """Give up the queue's lock taken by a claim that is not sealed (a shared store), so
        another worker may serve the queue meanwhile."""
        shared = self.worker.shared
        if shared is not None:
            await shared.release_queue(run.queue)

    async def _loop(self) -> None:
        worker = self.worker
        while True:
            await self._resume()
            worker._beat(f"account:{self.name}")
            with anyio.move_on_after(self._next_wait()):
                await self.wake.wait()
            self.wake = anyio.Event()
            if worker.stopping:
                continue
            self.busy = True
            try:
                await self._fill()
            except FencedOut:
                raise
            except OutboxError as error:
                log.warning("outbox.unavailable", account=self.name, error=str(error))
            finally:
                self.busy = False

    def _next_wait(self) -> float:
        """Until the next look: the poll interval, or sooner when a queue comes due."""
        wait = self.worker._interval()
        linger = self.settings.linger
        elapsed = anyio.current_time() - self.listed_at
        for pending in self.pending:
            due_in = linger - pending.oldest_age_s - elapsed
            if due_in > 0:
                wait = min(wait, due_in + 0.001)
        return wait

    def _queue(self, queue: OutboxQueue) -> _QueueRun:
        found = self.queues.get(queue)
        if found is not None:
            return found
        try:
            collection: Collection | None = queue.target()
        except (ConfigError, ValueError):
            collection = None  # the claim dead-letters its rows
        batches = OutboxBatches(self.worker.store, queue, on_finished=self.worker._import_ended)
        send, receive = anyio.create_memory_object_stream[BatchTask](math.inf)
        run = self.queues[queue] = _QueueRun(queue, collection, batches, send)
        gates: list[tuple[SlotGate, MemoryObjectReceiveStream[BatchTask], str]] = [
            (self.slots, receive, f"downstream-{queue}")
        ]
        if self.worker.shared is not None:
            run.send_held, held = anyio.create_memory_object_stream[BatchTask](math.inf)
            gates.append((self.held_slots, held, f"downstream-held-{queue}"))
        for slots, channel, name in gates:
            if collection is None:
                channel.close()  # nothing is ever sealed for it
                continue
            downstream = Downstream(
                client=self.client,
                journal=batches,
                settings=self.settings,
                collection=collection,
                slots=slots,
                uploads=self.uploads,
                planner=self.planner,
                status_budget=self.status_budget,
                in_flight=InFlight(),
                capacity=self.capacity,
                stats=self.stats,
                on_outcome=lambda outcome: self._ended(run, outcome),
            )
            assert self._task_group is not None
            self._task_group.start_soon(downstream.run, channel, name=name)
        return run

    async def _fill(self) -> None:
        """Seal batches into the free places, the least recently served queue first."""
        worker = self.worker
        elapsed = anyio.current_time() - self.listed_at
        waiting = {p.queue: p for p in self.pending}
        drained: set[OutboxQueue] = set()  # its listing is stale: wait for the next one
        try:
            while waiting and self.capacity.value > 0 and not worker.stopping:
                sealed = False
                contended = len(waiting) > 1
                for pending in sorted(
                    waiting.values(), key=lambda p: self._queue(p.queue).last_served
                ):
                    if self.capacity.value == 0 or worker.stopping:
                        return
                    run = self._queue(pending.queue)
                    due = worker.burst or pending.oldest_age_s + elapsed >= self.settings.linger
                    if not due and run.quiet_rows == pending.rows:
                        continue  # nothing new since a claim that was neither full nor due
                    claim = await self._claim(run)
                    if not claim.rows:
                        del waiting[pending.queue]
                        drained.add(pending.queue)
                        continue
                    slot_free = self.unfinished < self.slots.capacity
                    if claim.full or (due and (slot_free or contended)):
                        full = claim.full
                        handed = [claim]
                        del claim  # _seal drops the records once they are in the body
                        await self._seal(run, handed)
                        sealed = True
                        if not full:
                            del waiting[pending.queue]
                            drained.add(pending.queue)
                    else:
                        run.quiet_rows = pending.rows
                        del waiting[pending.queue]
                        await self._release(run)
                if not sealed:
                    return
        finally:
            if drained:
                self.pending = [p for p in self.pending if p.queue not in drained]

    async def _claim(self, run: _QueueRun) -> Claim:
        max_body = self.settings.max_body_bytes
        if run.collection is None:
            budget = max_body
        else:
            prefix, suffix = run.collection.envelope()
            budget = max_body - len(prefix) - len(suffix)
        claim = await self.worker.store.claim(
            run.queue, budget_bytes=budget, parse_pool=self.worker.parse_pool
        )
        labels = (run.queue.account, run.queue.collection)
        events = self.worker.metrics.events
        if claim.superseded:
            events.rows_superseded[labels] += claim.superseded
            self.worker.stats.rows_superseded += claim.superseded
        if claim.dead_lettered:
            events.records_rejected[labels] += claim.dead_lettered
            self._dead_lettered(run, claim.dead_lettered)
        return claim

    def _dead_lettered(self, run: _QueueRun, count: int) -> None:
        self.worker.metrics.events.records_dead_lettered[
            (run.queue.account, run.queue.collection)
        ] += count
        self.worker.stats.records_dead_lettered += count

    async def _seal(self, run: _QueueRun, handed: list[Claim]) -> None:
        """Pack, store and send one claim (``handed``'s only item, taken from it: the records
        are freed as soon as their bytes are in the body)."""
        assert run.collection is not None
        claim = handed.pop()
        self.capacity.acquire_nowait()
        try:
            async with self.worker._held.hold(claim.records_bytes):
                batch, rows, too_large = await anyio.to_thread.run_sync(
                    _assemble, run.collection, self.settings.max_body_bytes, claim.rows
                )
                del claim
                if too_large:
                    moved = await self.worker.store.dead_letter_rows(too_large)
                    self.worker.metrics.events.records_rejected[
                        (run.queue.account, run.queue.collection)
                    ] += moved
                    self._dead_lettered(run, moved)
                if batch is None:
                    self.capacity.release()
                    await self._release(run)
                    return
                refs = batch.refs
                assert refs.ends is not None
                held = await self.worker.store.seal(run.queue, rows, batch.body, ends=refs.ends)
                del rows
        except ClaimConflict as error:
            self.capacity.release()
            log.warning("batch.claim_conflict", account=self.name, error=str(error))
            await self._release(run)
            return
        except BaseException:
            self.capacity.release()
            raise
        run.last_served = anyio.current_time()
        run.quiet_rows = None
        log.info(
            "batch.sealed",
            account=self.name,
            collection=run.queue.collection,
            batch_id=held.ref,
            records=len(held.row_ids),
            body_bytes=held.body_bytes,
        )
        # the body is stored: the first PUT sends this copy instead of reading it back
        body = batch.body if isinstance(batch.body, bytearray) else None
        del batch
        await self._send(run, held, refs, body=body)

    async def _send(
        self,
        run: _QueueRun,
        held: StoredImport,
        refs: RecordRefs,
        *,
        body: bytearray | None = None,
    ) -> None:
        stored = run.batches.register(held, body=body)
        await run.send.send(BatchTask(stored=stored, refs=refs, identity_hashes={}, depends_on=()))

    async def _ended(self, run: _QueueRun, outcome: ImportOutcome) -> None:
        worker = self.worker
        labels = (run.queue.account, run.queue.collection)
        events = worker.metrics.events
        events.records_imported[labels] += outcome.imported
        events.imports_finished[(*labels, outcome.status)] += 1
        failed = len(outcome.failures)
        if failed:
            if outcome.imported or outcome.status in ("Finished", "Succeeded"):
                events.records_rejected[labels] += failed
            self._dead_lettered(run, failed)
        full = run.batches.counters.pop("account_full_waits", 0)
        if full:
            events.account_full_waits[self.name] += full
        worker.metrics.body_bytes.labels(*labels).observe(outcome.body_bytes)
        if outcome.duration_s is not None:
            worker.metrics.import_duration.labels(*labels).observe(outcome.duration_s)
        worker.stats.imports_finished += 1
        worker.stats.records_imported += outcome.imported
        run.quiet_rows = None  # rows held back behind this import may be claimable now
        self.wake.set()


def _holds_slot(held: StoredImport) -> bool:
    """Whether an import taken over holds one of its account's slots in a shared store: a
    submitted one, or one whose submit was in doubt (it is sent again in the slot it took)."""
    return held.phase is ImportPhase.SUBMITTED or held.in_doubt > 0


def _shared(store: OutboxStore) -> SharedOutboxStore | None:
    """The store as a ``SharedOutboxStore`` when several workers may share it (duck-typed:
    the protocols are not runtime-checkable)."""
    needed = ("adopt", "slot_gate", "run_heartbeats", "release_queue", "wait_for_rows")
    if all(callable(getattr(store, name, None)) for name in needed):
        return cast(SharedOutboxStore, store)
    return None


def _assemble(
    collection: Collection, max_body_bytes: int, rows: Sequence[ClaimedRow]
) -> tuple[Batch | None, Sequence[ClaimedRow], dict[int, Rejection]]:
    """Pack claimed rows into one body (in a worker thread): the batch, its rows, the rows too
    large for any body."""
    if isinstance(rows, ClaimedRun):
        packed = _assemble_run(collection, max_body_bytes, rows)
        if packed is not None:
            return packed
        rows = list(rows)  # a record too large, or more than one body: record by record
    assembler = BatchAssembler(collection, max_body_bytes=max_body_bytes)
    kept: list[ClaimedRow] = []
    too_large: dict[int, Rejection] = {}
    for row in rows:
        try:
            sealed = assembler.add(row.record)
        except RecordError as error:
            too_large[row.row_id] = Rejection(error.rule, error.message)
            continue
        if sealed is not None:  # the claim's budget should prevent it: keep the first body
            return sealed, kept, too_large
        # the body holds the record's bytes now: keep what sealing needs (id, key, contact), so
        # a body's worth of records is not held twice while the body is stored
        kept.append(
            ClaimedRow(row.row_id, EncodedRecord(row.record.key, row.record.contact, b"", None))
        )
    return assembler.seal(), kept, too_large


def _assemble_run(
    collection: Collection, max_body_bytes: int, rows: ClaimedRun
) -> tuple[Batch | None, ClaimedRun, dict[int, Rejection]] | None:
    """The common case in one copy: every row of the run fits in one body. ``None`` otherwise."""
    assembler = BatchAssembler(collection, max_body_bytes=max_body_bytes)
    run = rows.run
    try:
        if assembler.add_run(run) != len(run):
            return None
    except RecordError:
        return None
    # the body holds the records' bytes now: keep what sealing needs (ids, keys, contacts), so
    # a body's worth of records is not held twice while the body is stored
    # (with the identities the claim made, for the seal)
    return (
        assembler.seal(),
        ClaimedRun(dataclasses.replace(run, segment=b""), rows.identities()),
        {},
    )


class Worker:
    """Drains an outbox store into bulk imports, for every account of the accounts file.

    Use it as ``async with Worker(store, accounts) as worker: await worker.run()``. Entering
    opens one API client per account and recovers what an earlier worker left (submitted
    imports are polled by id, submits in doubt sent again with the same body); leaving closes
    the clients and stops the parse worker processes that large claims were encoded in
    (``settings.parse_processes``, one per CPU by default, none when bodies are capped at 8 MB
    or less; started by ``run()``). It installs no
    signal handler and configures no logging: call ``stop()`` (from a signal handler of the
    application, for one).

    Args:
        store: the outbox store, open (``async with SqliteOutbox(...)``).
        accounts: the accounts by name (``accounts.load_accounts``).
        settings: batching, slot, polling and linger settings for every account (an account's
            ``max_concurrent`` overrides the settings' own).
        poll_interval: seconds between looks at the store for new rows (jittered by 20%).
        max_held_bytes: bytes of bodies being packed or sent at once in the whole process (one
            body always goes); bounds memory whatever the backlog.
    """

    def __init__(
        self,
        store: OutboxStore,
        accounts: Mapping[str, Account],
        *,
        settings: Settings | None = None,
        poll_interval: float = 0.5,
        max_held_bytes: int = 100_000_000,
    ) -> None:
        if not accounts:
            raise ConfigError("the worker needs at least one account")
        self.store = store
        #: the store as a ``SharedOutboxStore`` when several workers share it, else ``None``
        self.shared = _shared(store)
        self.accounts = dict(accounts)
        self.settings = settings if settings is not None else Settings()
        self.poll_interval = seconds("poll_interval", poll_interval, positive=True)
        if max_held_bytes < 1:
            raise ConfigError(f"max_held_bytes must be >= 1, got {max_held_bytes}")
        self.stats = WorkerStats()
        self.burst = False
        self._held = ByteBudget(max_held_bytes)
        processes = self.settings.parse_processes
        if processes is None:
            processes = default_processes()
        if self.settings.max_body_bytes <= PROCESS_AFTER:
            # as `run` parses the first 8 MB of each input in a thread: for claims that small,
            # handing rows to processes costs more than it saves (with replicas on 2 cores,
            # 2 MB bodies drained 25-30% slower)
            processes = 0
        #: the processes that validate large claims (``None``: claims are encoded in a thread)
        self.parse_pool = ParsePool(processes) if processes else None
        self._runs: dict[str, _AccountRun] = {}
        self._beats: dict[str, float] = {}  # loop -> monotonic time of its last tick
        self._last_beat = 0.0  # epoch seconds of the last tick of any loop
        self._stopping = anyio.Event()
        self._ended = anyio.Event()  # set when an import ends: a burst may be done
        self._running = False
        self._unknown: set[OutboxQueue] = set()
        self._queue_states: dict[tuple[str, str], QueueState] = {}
        self.metrics = WorkerMetrics(
            queues=lambda: dict(self._queue_states),
            accounts=self._account_states,
            heartbeat=lambda: self._last_beat,
        )

    def __repr__(self) -> str:
        return f"Worker(accounts={sorted(self.accounts)}, stopping={self.stopping})"

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` was called (or a burst is done)."""
        return self._stopping.is_set()

    @property
    def dead_lettered(self) -> int:
        """Outbox rows this worker moved to ``insight_dead_letter``."""
        return self.stats.records_dead_lettered

    async def __aenter__(self) -> Self:
        try:
            for name, account in self.accounts.items():
                client = InsightClient(
                    account.client, trace_configs=[self.metrics.trace_config(name)]
                )
                self._runs[name] = _AccountRun(self, account, client)
            self._take_over(await self.store.recover())
        except BaseException:
            await self._close_clients()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self._close_clients()
            if self.parse_pool is not None:
                await self.parse_pool.aclose()

    def _take_over(self, imports: Sequence[StoredImport]) -> int:
        """Give imports found by ``recover`` or ``adopt`` to their accounts' runs."""
        by_account: dict[str, list[StoredImport]] = {}
        for held in imports:
            if held.queue.account in self._runs:
                by_account.setdefault(held.queue.account, []).append(held)
            else:
                self._warn_unknown(held.queue)
        for name, found in by_account.items():
            self._runs[name].take_over(found)
        taken = sum(len(found) for found in by_account.values())
        self.stats.imports_recovered += taken
        return taken

    async def _close_clients(self) -> None:
        for run in self._runs.values():
            await run.client.aclose()

    def stop(self) -> None:
        """Stop claiming and end ``run()``: submits in progress get their import id first;
        imports still running are left to the next worker (safe to call from any task)."""
        self._stopping.set()

    async def run(self, *, burst: bool = False) -> None:
        """Drain the outbox until ``stop()``; with ``burst``, until what it holds (and what
        arrives meanwhile) is imported.

        Args:
            burst: drain, wait for those imports to end, then return.

        Raises:
            AuthenticationError: an account's credentials are refused (fatal).
            OutboxError: the store failed a step of an import (the next worker resumes it).
        """
        if not self._runs:
            raise ConfigError("the Worker is not open: use `async with Worker(...) as worker:`")
        self.burst = burst
        self._running = True
        log.info(
            "worker.started",
            accounts=sorted(self.accounts),
            burst=burst,
            linger_s=self.settings.linger,
            imports_recovered=self.stats.imports_recovered,
        )
        try:
            try:
                with first_error_unwrapped():
                    await self._run_all()
            except BaseExceptionGroup as group:
                # fenced out, the rest (a lost session, say) follows from it: say that
                fenced, _ = group.split(FencedOut)
                if fenced is None:
                    raise
                first: BaseException = fenced
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from group
        except FencedOut as error:
            log.error(
                "worker.fenced_out",
                error=str(error),
                detail="another worker adopted this worker's imports: stopped without writing",
            )
            raise
        finally:
            self._running = False
            log.info("worker.stopped", **self.stats.summary())

    async def _run_all(self) -> None:
        async with anyio.create_task_group() as tg:
            if self.shared is not None:
                await tg.start(self.shared.run_heartbeats)
                tg.start_soon(self._adopt)
            if self.parse_pool is not None:
                tg.start_soon(self._start_parse_pool)
            for run in self._runs.values():
                await tg.start(run.drain)
            tg.start_soon(self._watch)
            await self._stopping.wait()
            log.info("worker.stopping", **self._in_flight())
            tg.cancel_scope.cancel()

    async def _start_parse_pool(self) -> None:
        """Start the parse workers beside the first claim, not inside it (0.2-0.3 s)."""
        pool = self.parse_pool
        assert pool is not None
        try:
            await pool.executor()
        except (BrokenProcessPool, OSError) as error:  # e.g. a daemonic process, a process limit
            log.warning(
                "parsing.processes_unavailable",
                error=type(error).__name__,
                detail="parse worker processes cannot start; claims encode in a thread",
            )
            self.parse_pool = None
            await pool.aclose()

    # ------------------------------------------------------------------ watching the store

    async def _adopt(self) -> None:
        """About every lease, take over the imports of workers that died (or stopped with
        imports in flight): accepted ones are polled by id, ones in doubt sent again."""
        assert self.shared is not None
        lease = float(getattr(self.shared, "lease", 15.0))
        while True:
            await anyio.sleep(lease * random.uniform(0.5, 1.0))
            self._beat("adopter")
            try:
                adopted = await self.shared.adopt()
            except FencedOut:
                raise
            except OutboxError as error:
                log.warning("outbox.unavailable", error=str(error))
                continue
            if adopted:
                log.info(
                    "worker.adopted",
                    imports=self._take_over(adopted),
                    in_doubt=sum(1 for held in adopted if held.in_doubt),
                )

    def _import_ended(self) -> None:
        self._ended.set()

    async def _watch(self) -> None:
        failures = 0
        while True:
            self._beat("watcher")
            ended = self._ended = anyio.Event()
            try:
                listing = await self.store.pending()
            except FencedOut:
                raise
            except OutboxError as error:
                failures += 1
                log.warning("outbox.unavailable", error=str(error), failures=failures)
                await anyio.sleep(min(self._interval() * 2**failures, 30.0))
                continue
            failures = 0
            at = anyio.current_time()
            by_account: dict[str, list[Pending]] = {name: [] for name in self._runs}
            states: dict[tuple[str, str], QueueState] = {
                key: QueueState() for key in self._queue_states
            }
            for pending in listing:
                queue = pending.queue
                state = states.setdefault((queue.account, queue.collection), QueueState())
                state.pending_rows += pending.rows
                state.oldest_age_s = max(state.oldest_age_s, pending.oldest_age_s)
                if queue.account in by_account:
                    by_account[queue.account].append(pending)
                else:
                    self._warn_unknown(queue)
            self._queue_states = states
            for name, pending_list in by_account.items():
                self._runs[name].listed(pending_list, at)
            if self.burst and not any(by_account.values()):
                await (
                    anyio.lowlevel.checkpoint()
                )  # let the accounts' loops take what was just listed
                if all(run.idle() for run in self._runs.values()):
                    log.info("worker.burst_done", **self.stats.summary())
                    self._stopping.set()
                    return
            if self.shared is not None:
                try:
                    await self.shared.wait_for_rows(self._interval())  # an insert wakes it
                except OutboxError:
                    await anyio.sleep(self._interval())
            elif self.burst:
                # the last import's end ends a burst: seen at once, not at the next look
                with anyio.move_on_after(self._interval()):
                    await ended.wait()
            else:
                await anyio.sleep(self._interval())

    def _warn_unknown(self, queue: OutboxQueue) -> None:
        if queue not in self._unknown:
            self._unknown.add(queue)
            log.warning(
                "outbox.unknown_account",
                account=queue.account,
                collection=queue.collection,
                detail="rows stay pending: add the account to the accounts file",
            )

    def _interval(self) -> float:
        return self.poll_interval * random.uniform(0.8, 1.2)

    # ------------------------------------------------------------------ health

    def _beat(self, loop: str) -> None:
        self._beats[loop] = time.monotonic()
        self._last_beat = time.time()

    def healthy(self) -> bool:
        """Whether the worker's loops tick (liveness: never the database nor the API)."""
        if not self._running or not self._beats:
            return False
        stale = max(30.0, _STALL_INTERVALS * self.poll_interval)
        now = time.monotonic()
        return all(now - beat < stale for beat in self._beats.values())

    async def ready(self) -> bool:
        """Whether the store answers within 5 s and the worker is not stopping (readiness)."""
        if self.stopping:
            return False
        with anyio.move_on_after(_READY_TIMEOUT):
            try:
                await self.store.ping()
            except OutboxError:
                return False
            return True
        return False

    def _account_states(self) -> dict[str, AccountState]:
        return {
            name: AccountState(
                imports_in_flight=run.stats.imports_in_flight,
                slots_in_use=run.slots.in_use,
                slots=run.slots.capacity,
                unfinished=run.unfinished,
            )
            for name, run in self._runs.items()
        }

    def _in_flight(self) -> dict[str, int]:
        return {
            "imports_unfinished": sum(run.unfinished for run in self._runs.values()),
            "imports_in_flight": sum(run.stats.imports_in_flight for run in self._runs.values()),
        }
