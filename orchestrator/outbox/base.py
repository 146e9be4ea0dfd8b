"""The outbox store's interface: its value types and the ``OutboxStore`` protocol the worker calls.

An application writes records into ``insight_outbox`` (in its own transaction); the worker drains
them through the store, one import at a time:

1. ``pending()`` lists the queues (account, collection, scope, type) that hold pending rows, with
   the age of each one's oldest row (what linger decides on).
2. ``claim(queue, budget_bytes=...)`` reads a queue's pending rows in id order and returns the
   valid ones that fit the budget, as encoded records. In the same step it deletes the rows
   superseded by a later valid row with the same identity (last write wins; counted), moves the
   rows that break a record rule to ``insight_dead_letter``, and holds back the rows whose identity
   is in an import still in flight (they wait for it to end). A claim reserves nothing: the rows
   stay pending until ``seal``, so a claim that is not sealed (a batch still lingering) is simply
   dropped and claimed again later.
3. ``seal(queue, rows, body)`` stores the body and marks the rows as held by the new import, in
   one transaction (``ClaimConflict`` when a row was taken or deleted meanwhile).
4. ``mark_submitting`` before the PUT, ``mark_submitted`` with the import id after it.
5. ``finish`` deletes the import's rows in one statement, with a dead letter (record text
   included) for each record the API rejected, or for every record of an import that failed.

After a crash, ``recover()`` returns every import still held: SUBMITTED ones are polled by their
import id; SUBMITTING ones were in doubt (the PUT may have started an import) and come back SEALED
with ``in_doubt`` counted, to be sent again with the same body (records are upserted by key).

Every state change is one transaction; a backend keeps its SQL to itself.

Several workers on one database (PostgreSQL; ``SharedOutboxStore`` adds what they need):

- **Registration and leases.** A worker's store registers a row in ``insight_worker`` (its id and
  a fence token from a sequence) and heartbeats it on a connection of its own
  (``run_heartbeats``). A worker whose heartbeat is older than the lease is dead.
- **Fencing.** Every write of a worker runs in a transaction that first locks its own worker
  row, and every write to an import also requires ``owner = me AND fence = my token``; a worker
  whose row was taken away (adopted) gets ``FencedOut`` and nothing it asked for is written.
  It must stop: its imports belong to another worker now.
- **Adoption.** ``recover()`` (and ``adopt()``, to be called every lease or so) takes over, in one
  transaction, the imports of dead workers and of workers that stopped cleanly with imports in
  flight: SUBMITTED ones are polled by their import id (never sent again), SUBMITTING ones come
  back SEALED and in doubt, to be sent again with the same body.
- **One builder per queue.** ``claim`` takes the queue's lock row (``FOR UPDATE SKIP LOCKED``:
  a queue another live worker is building a batch for is skipped, its claim comes back empty,
  and ``pending`` does not list it); ``seal`` releases it, as does an empty claim or
  ``release_queue``. No transaction stays open between calls (none during a PUT).
- **Slots belong to imports.** ``mark_submitting`` takes the import's slot in the transaction
  that records the intent (unless the import already holds one: a resend keeps its slot),
  counting the account's slots under a per-account lock so that ``max_concurrent`` holds for
  every worker together; ``SlotsFull`` and nothing written when none is free. ``finish`` frees
  it in the transaction that ends the import. No slot ever expires by time; a dead worker's
  slots pass to the adopter with its imports.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, overload

import orjson

from orchestrator.chunks import RecordRun
from orchestrator.errors import JournalError
from orchestrator.records import Collection, EncodedRecord, Scope
from orchestrator.slots import SlotGate

if TYPE_CHECKING:
    from orchestrator.parsing import ParsePool

__all__ = [
    "RECORD_ORIGIN",
    "Claim",
    "ClaimConflict",
    "ClaimedRow",
    "ClaimedRun",
    "FencedOut",
    "Finished",
    "ImportPart",
    "ImportPhase",
    "OutboxError",
    "OutboxQueue",
    "OutboxStore",
    "Pending",
    "Rejection",
    "SharedOutboxStore",
    "SlotsFull",
    "StoredDeadLetter",
    "StoredImport",
    "identity_text",
    "identity_texts",
]

RECORD_ORIGIN = "insight_outbox"
"""The ``Source.origin`` of a record claimed from the outbox; its ``line`` is the row's id."""

COLLECTION_INVALID = "collection-invalid"
"""The dead-letter reason of rows whose collection name, scope or type breaks the API's rules."""


class OutboxError(JournalError):
    """The outbox database cannot be read or written; the message says what to do."""


class ClaimConflict(OutboxError):
    """A claimed row was taken by another import or deleted before its batch was sealed."""


class FencedOut(OutboxError):
    """This worker no longer owns what it tried to write: another worker adopted it.

    Nothing of the write was done. The worker must stop working on its imports (their new owner
    polls or resends them) and should exit or register again.
    """


class SlotsFull(OutboxError):
    """Every slot of the account is held (by imports of any worker): wait for one to be freed.

    Args:
        account: the account.
        capacity: its slots.
    """

    def __init__(self, account: str, capacity: int) -> None:
        super().__init__(
            f"account {account!r} has all its {capacity} import slots in use: "
            "wait for an import to end, then mark the intent again"
        )
        self.account = account
        self.capacity = capacity


def identity_text(key: str, contact: tuple[str, str] | None) -> str:
    """What "the same record" means to the API, as stored text: the key, or the key per contact.

    Args:
        key: the record's key.
        contact: ``(identifier, value)`` of the owning contact (contact scope), or ``None``.
    """
    if contact is None:
        return orjson.dumps(key).decode()
    return orjson.dumps([contact[0], contact[1], key]).decode()


def identity_texts(
    keys: Sequence[str], identifiers: Sequence[str] | None, values: Sequence[str]
) -> list[str]:
    """``identity_text`` of many records at once, from their columns (a ``RecordRun``'s).

    Args:
        keys: the records' keys.
        identifiers: their contacts' identifiers, or ``None`` for account scope.
        values: their contacts' values (ignored for account scope).
    """
    decode = bytes.decode
    if identifiers is None:
        return list(map(decode, map(orjson.dumps, keys)))
    # a tuple is written as the list identity_text writes
    return list(map(decode, map(orjson.dumps, zip(identifiers, values, keys, strict=True))))


@dataclass(frozen=True, slots=True)
class OutboxQueue:
    """The rows of one account bound for one collection: what one import body can hold.

    The values are as the rows hold them (an application may have written a scope or type the
    API refuses; ``collection()`` says so).

    Args:
        account: the account name.
        collection: the collection name.
        scope: ``account`` or ``contact``.
        collection_type: the collection type.
    """

    account: str
    collection: str
    scope: str = "account"
    collection_type: str = "custom"

    @classmethod
    def of(cls, account: str, collection: Collection) -> OutboxQueue:
        """The queue of ``account`` for ``collection``."""
        return cls(account, collection.name, Scope(collection.scope).value, collection.type)

    def target(self) -> Collection:
        """The ``Collection`` these rows go to.

        Raises:
            errors.ConfigError: the name, scope or type breaks the API's rules.
        """
        return Collection(self.collection, Scope(self.scope), self.collection_type)


@dataclass(frozen=True, slots=True)
class Pending:
    """One queue with pending rows (rows held back behind an import in flight included).

    Args:
        queue: the queue.
        rows: how many rows are pending.
        oldest_id: the id of the oldest pending row.
        oldest_age_s: seconds that row had waited when listed (by the database's clock, which
            also stamped it, so clocks of other machines do not matter); never negative.
    """

    queue: OutboxQueue
    rows: int
    oldest_id: int
    oldest_age_s: float


@dataclass(frozen=True, slots=True)
class ClaimedRow:
    """A valid pending row, encoded: what goes into a body.

    Args:
        row_id: the row's ``id`` in ``insight_outbox``.
        record: the encoded record; its source is ``insight_outbox:<row id>``.
    """

    row_id: int
    record: EncodedRecord

    @property
    def identity(self) -> str:
        """The record's identity as stored text (see ``identity_text``)."""
        return identity_text(self.record.key, self.record.contact)


class ClaimedRun(Sequence[ClaimedRow]):
    """Claimed rows in columns: the records of a ``RecordRun`` whose lines are the rows' ids.

    What a store may return as ``Claim.rows`` instead of a tuple: a batch assembler packs the
    whole run in one copy (``BatchAssembler.add_run``), and no object is made per row unless
    one is asked for. It compares equal to the tuple of its rows.

    Args:
        run: the records, in row id order; ``run.lines`` are the rows' ids.
        identities: the rows' identity texts, when the claim already made them.
    """

    __slots__ = ("_identities", "run")

    def __init__(self, run: RecordRun, identities: tuple[str, ...] | None = None) -> None:
        self.run = run
        self._identities = identities

    def __repr__(self) -> str:
        return f"ClaimedRun({len(self)} rows)"

    def __len__(self) -> int:
        return len(self.run)

    @overload
    def __getitem__(self, index: int) -> ClaimedRow: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[ClaimedRow, ...]: ...

    def __getitem__(self, index: int | slice) -> ClaimedRow | tuple[ClaimedRow, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("claimed row index out of range")
        return ClaimedRow(self.run.lines[index], self.run.record(index))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ClaimedRun | tuple):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    @property
    def row_ids(self) -> tuple[int, ...]:
        """The rows' ids, in order."""
        return tuple(self.run.lines)

    def identities(self) -> tuple[str, ...]:
        """Each row's identity as stored text (see ``identity_text``), in order."""
        if self._identities is None:
            run = self.run
            self._identities = tuple(identity_texts(run.keys, run.identifiers, run.values))
        return self._identities


def row_ids_of(rows: Sequence[ClaimedRow]) -> tuple[int, ...]:
    """The ids of claimed rows, in order (``ClaimedRun`` or ``ClaimedRow`` objects)."""
    if isinstance(rows, ClaimedRun):
        return rows.row_ids
    return tuple(row.row_id for row in rows)


def identities_of(rows: Sequence[ClaimedRow]) -> tuple[str, ...]:
    """The identity texts of claimed rows, in order (one per record: run it off the event
    loop for a body's worth)."""
    if isinstance(rows, ClaimedRun):
        return rows.identities()
    return tuple(row.identity for row in rows)


@dataclass(frozen=True, slots=True)
class Claim:
    """What ``claim`` found in one queue.

    Args:
        queue: the queue claimed from.
        rows: valid rows in id order, each identity once, whose records joined with commas take
            at most the budget (one row larger than the budget comes alone, so it is never stuck:
            the batcher dead-letters a record too large for any body); a tuple, or a
            ``ClaimedRun`` (the same rows in columns).
        records_bytes: the bytes of ``rows``' records joined with commas.
        full: rows that would have fitted were left pending for lack of budget.
        superseded: rows deleted because a later valid row has the same identity.
        dead_lettered: rows moved to ``insight_dead_letter`` (a record rule, or the queue's
            collection is invalid).
        held_back: rows left pending because their identity is in an import still in flight.
    """

    queue: OutboxQueue
    rows: Sequence[ClaimedRow]
    records_bytes: int
    full: bool
    superseded: int
    dead_lettered: int
    held_back: int


class ImportPhase(enum.StrEnum):
    """Where an import of outbox rows stands; a finished import is deleted."""

    SEALED = "sealed"  # body stored, not yet sent (or in doubt and to be sent again)
    SUBMITTING = "submitting"  # intent written before the PUT: a crash now leaves it in doubt
    SUBMITTED = "submitted"  # import id known: poll it


@dataclass(frozen=True, slots=True)
class StoredImport:
    """One import the store holds, without its body (``load_body`` reads it).

    Args:
        ref: the store's id of the import (not the API's import id).
        queue: the queue its rows came from.
        phase: where it stands.
        import_id: the API's import id once submitted.
        row_ids: the outbox rows in the body, in body order (ascending ids).
        identities: each row's identity text, parallel to ``row_ids``.
        ends: where each record ends in the body (its separator's offset), parallel to
            ``row_ids``; empty when the sealer did not give them.
        body_bytes: the body's size in bytes.
        depends_on: refs of imports that must end before this one is submitted.
        attempts: PUT intents written so far.
        in_doubt: times a crash left its submit in doubt.
        sealed_at: epoch seconds of the seal.
        submitted_at: epoch seconds of the last ``mark_submitted``.
        resubmits: times an import that ended ``Failed`` was sent again (``mark_resubmit``).
    """

    ref: int
    queue: OutboxQueue
    phase: ImportPhase
    import_id: str | None
    row_ids: tuple[int, ...]
    identities: tuple[str, ...]
    ends: tuple[int, ...]
    body_bytes: int
    depends_on: tuple[int, ...]
    attempts: int
    in_doubt: int
    sealed_at: float
    submitted_at: float | None
    resubmits: int = 0

    def row_of(self) -> dict[str, int]:
        """Row ids by identity text: maps the API's per-record failures back to rows."""
        return dict(zip(self.identities, self.row_ids, strict=True))


@dataclass(frozen=True, slots=True)
class ImportPart:
    """One of the imports that replace an import the API found too large (``split``).

    Args:
        row_ids: the outbox rows in its body, in body order (all held by the import split).
        body: its request body exactly as it will be sent.
        ends: each record's end offset in ``body``, parallel to ``row_ids``.
    """

    row_ids: tuple[int, ...]
    body: bytes | bytearray
    ends: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a row was not imported, as its dead letter says.

    Args:
        reason: a rule id (``key-missing``), ``record-too-large``, or the API's ``failureReason``.
        message: a human explanation (never the record's values).
        details: further explanations, e.g. the API's ``details``.
    """

    reason: str
    message: str
    details: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Finished:
    """What ``finish`` did.

    Args:
        imported: rows deleted as imported.
        dead_lettered: rows moved to ``insight_dead_letter``.
    """

    imported: int
    dead_lettered: int


#: The columns ``StoredDeadLetter.from_row`` reads, in its order.
DEAD_LETTER_COLUMNS = (
    "id, account, collection, scope, collection_type, record, reason, message, details, key, "
    "source_id, import_id, created_at"
)


def dead_letters_query(
    placeholder: str, *, account: str | None, collection: str | None, after: int, limit: int
) -> tuple[str, list[object]]:
    """The query of ``OutboxStore.dead_letters`` and its values, for a driver whose parameters
    are written ``placeholder`` (``?`` for sqlite3, ``%s`` for psycopg)."""
    where = [f"id > {placeholder}"]
    values: list[object] = [after]
    if account is not None:
        where.append(f"account = {placeholder}")
        values.append(account)
    if collection is not None:
        where.append(f"collection = {placeholder}")
        values.append(collection)
    values.append(limit)
    query = (
        f"SELECT {DEAD_LETTER_COLUMNS} FROM insight_dead_letter "
        f"WHERE {' AND '.join(where)} ORDER BY id LIMIT {placeholder}"
    )
    return query, values


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """One row of ``insight_dead_letter``.

    Args:
        id: the dead letter's id (ascending in the order rows were dead-lettered).
        queue: the queue the row was in.
        record: the record text exactly as it was enqueued.
        reason: why it was not imported (see ``Rejection``).
        message: a human explanation.
        details: further explanations.
        key: the record's key, when it could be read.
        source_id: the outbox row's id.
        import_id: the API's import id, for records the API rejected.
        created_at: epoch seconds when it was dead-lettered.
    """

    id: int
    queue: OutboxQueue
    record: str
    reason: str
    message: str
    details: tuple[str, ...]
    key: str | None
    source_id: int | None
    import_id: str | None
    created_at: float

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> StoredDeadLetter:
        """A row of ``SELECT {DEAD_LETTER_COLUMNS} FROM insight_dead_letter`` (either store)."""
        (id_, account, collection, scope, collection_type, record, reason, message, details, key,
         source_id, import_id, created_at) = row  # fmt: skip
        return cls(
            id=id_,
            queue=OutboxQueue(account, collection, scope, collection_type),
            record=record,
            reason=reason,
            message=message,
            details=tuple(orjson.loads(details)),
            key=key,
            source_id=source_id,
            import_id=import_id,
            created_at=created_at,
        )

    def to_json(self) -> bytes:
        """This dead letter as one JSON line (no newline), for ``insight-import dead-letters``.

        ``record`` is embedded as JSON when it parses (its text kept exactly, so large numbers
        survive), else as a string.
        """
        return orjson.dumps(
            {
                "id": self.id,
                "account": self.queue.account,
                "collection": self.queue.collection,
                "scope": self.queue.scope,
                "collection_type": self.queue.collection_type,
                "reason": self.reason,
                "message": self.message,
                "details": list(self.details),
                "key": self.key,
                "source_id": self.source_id,
                "import_id": self.import_id,
                "created_at": self.created_at,
                "record": _embedded(self.record),
            }
        )


def _embedded(record: str) -> object:
    raw = record.strip()
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return record
    # A line break inside the record would split the JSON line: re-encode those.
    if "\n" in raw or "\r" in raw:
        return parsed
    return orjson.Fragment(raw)


class OutboxStore(Protocol):
    """The outbox tables and the worker's durable state, as the worker uses them.

    Open it with ``async with``: entering connects and runs the migrations. Every method runs
    off the event loop; every state change is one transaction; errors are ``OutboxError``.
    """

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def schema_version(self) -> int:
        """The schema version of the database (after the migrations ran)."""
        ...

    async def ping(self) -> None:
        """Raise ``OutboxError`` unless the database answers (for readiness)."""
        ...

    async def enqueue(
        self,
        account: str,
        collection: Collection,
        records: Sequence[object],
        *,
        check: bool = True,
    ) -> int:
        """Append records to the outbox in one transaction; return how many were written.

        Args:
            account: the account name.
            collection: the collection they go to.
            records: mappings, or JSON Lines lines as ``str`` or ``bytes``.
            check: validate each record first (``RecordError`` and nothing written when one
                breaks a rule); ``False`` writes texts already validated as they are.
        """
        ...

    async def pending(self) -> list[Pending]:
        """Every queue with pending rows, the oldest first."""
        ...

    async def claim(
        self,
        queue: OutboxQueue,
        *,
        budget_bytes: int,
        max_scan_rows: int = 100_000,
        parse_pool: ParsePool | None = None,
    ) -> Claim:
        """Read a queue's pending rows in id order and return the valid ones that fit.

        Deletes superseded rows and dead-letters invalid ones in one transaction; reserves
        nothing (see the module docstring).

        Args:
            queue: the queue.
            budget_bytes: the most bytes the returned records may take joined with commas.
            max_scan_rows: read at most this many rows (bounds one claim's work).
            parse_pool: worker processes to validate and encode large pages in.
        """
        ...

    async def seal(
        self,
        queue: OutboxQueue,
        rows: Sequence[ClaimedRow],
        body: bytes | bytearray,
        *,
        ends: Sequence[int] = (),
        depends_on: Sequence[int] = (),
    ) -> StoredImport:
        """Store a body and hold its rows for the new import, in one transaction.

        Args:
            queue: the queue the rows were claimed from.
            rows: the claimed rows in the body, in body order.
            body: the request body exactly as it will be sent.
            ends: each record's end offset in the body, parallel to ``rows`` (optional).
            depends_on: refs of imports that must end before this one is submitted.

        Raises:
            ClaimConflict: a row is no longer pending; nothing was written.
        """
        ...

    async def mark_submitting(self, ref: int) -> None:
        """Record the intent to PUT import ``ref`` (from SEALED, or SUBMITTED for a resubmit)."""
        ...

    async def mark_submitted(self, ref: int, import_id: str) -> None:
        """Record the API's import id of ``ref`` (from SUBMITTING)."""
        ...

    async def mark_refused(self, ref: int) -> None:
        """Record that the API refused the PUT of ``ref`` without starting an import (account
        full, rate limited, body refused): SUBMITTING back to SEALED, no longer in doubt."""
        ...

    async def mark_resubmit(self, ref: int) -> None:
        """Put import ``ref``, whose import ended ``Failed`` or was forgotten, back to SEALED to
        send it again (from SUBMITTED; ``resubmits`` + 1, the import id cleared)."""
        ...

    async def split(self, ref: int, parts: Sequence[ImportPart]) -> list[StoredImport]:
        """Replace import ``ref`` (not submitted) by ``parts``, in one transaction.

        The parts are sealed; their rows move from ``ref`` to them; imports that depended on
        ``ref`` depend on the parts instead; ``ref`` is forgotten. A crash keeps all of it or
        none, so a body is never split twice nor a row lost.

        Args:
            ref: the import the API refused as too large.
            parts: its replacements, in order; together they hold exactly its rows.

        Returns:
            The new imports, in order.
        """
        ...

    async def finish(
        self,
        ref: int,
        *,
        failures: Mapping[int, Rejection] | None = None,
        reject_all: Rejection | None = None,
    ) -> Finished:
        """End import ``ref``: dead-letter its failed rows, delete the rest, forget the import.

        Args:
            ref: the import.
            failures: rejections by row id (records the API rejected one by one).
            reject_all: when set, every row not in ``failures`` is dead-lettered with it (an
                import that failed as a whole, past its resubmits).
        """
        ...

    async def dead_letter_rows(self, rejections: Mapping[int, Rejection]) -> int:
        """Move pending rows to ``insight_dead_letter`` (e.g. a record too large for any body);
        return how many were moved (rows no longer pending are skipped)."""
        ...

    async def recover(self) -> list[StoredImport]:
        """Every import held, after a restart: SUBMITTING ones come back SEALED, in doubt."""
        ...

    async def load_body(self, ref: int) -> bytes | bytearray:
        """The body of import ``ref`` exactly as sealed (a ``bytearray`` is the caller's own:
        it may free it)."""
        ...

    async def dead_letters(
        self,
        *,
        account: str | None = None,
        collection: str | None = None,
        after: int = 0,
        limit: int = 1000,
    ) -> list[StoredDeadLetter]:
        """Dead letters with an id above ``after``, in id order, at most ``limit``.

        Args:
            account: only this account's.
            collection: only this collection's.
            after: page on from this id.
            limit: the most to return.
        """
        ...

    async def requeue(self, ids: Sequence[int]) -> int:
        """Put dead letters back into the outbox as new rows, in id order, in one transaction;
        return how many (ids no longer dead letters are skipped)."""
        ...


class SharedOutboxStore(OutboxStore, Protocol):
    """An outbox store several workers share (PostgreSQL): leases, adoption, shared slots.

    The worker opens it with its identity (``PostgresOutbox(url, worker=True, ...)``) and, besides
    the ``OutboxStore`` calls:

    - starts ``await task_group.start(store.run_heartbeats)`` next to its loops (a ``FencedOut``
      from it means the worker was declared dead and adopted: stop);
    - calls ``recover()`` once at start and ``adopt()`` about every lease, and runs each import
      they return (polls SUBMITTED ones, resends SEALED ones from ``load_body``);
    - gates submits with the account's ``slot_gate(account)`` (a ``slots.SlotGate``) and, inside
      ``hold()``, calls ``mark_submitting(ref)``: on ``SlotsFull`` (another worker took the last
      slot between the gate's look and the intent) it awaits ``wait_for_slot(account)`` and marks
      again; ``finish(ref)`` frees the slot;
    - awaits ``wait_for_rows(max_wait)`` between passes over ``pending()``: it returns early when
      an application inserts rows (``LISTEN``), else after ``max_wait`` seconds (add jitter).
    """

    @property
    def worker_id(self) -> int:
        """This worker's id in ``insight_worker``."""
        ...

    async def heartbeat(self) -> None:
        """Renew this worker's lease once (``FencedOut`` when it was adopted)."""
        ...

    async def run_heartbeats(self, *, task_status: object = ...) -> None:
        """Heartbeat every third of the lease, forever, on a connection of its own."""
        ...

    async def adopt(self) -> list[StoredImport]:
        """Take over the imports of dead workers (and released ones) in one transaction."""
        ...

    async def release_queue(self, queue: OutboxQueue) -> None:
        """Give up the queue's lock taken by a claim that will not be sealed."""
        ...

    def slot_gate(self, account: str) -> SlotGate:
        """The account's slot gate for the downstream, counted in the store for every worker."""
        ...

    async def slots_in_use(self, account: str) -> int:
        """How many of the account's slots are held now, by every worker together."""
        ...

    async def wait_for_slot(self, account: str, *, max_wait: float | None = None) -> None:
        """Return when the account may have a free slot (at most after ``max_wait`` seconds)."""
        ...

    async def wait_for_rows(self, max_wait: float) -> bool:
        """Wait for an insert into the outbox; ``False`` when ``max_wait`` seconds passed first."""
        ...
