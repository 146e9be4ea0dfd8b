"""The outbox store on PostgreSQL: any number of workers, on any number of machines, sharing it.

Every method is one short transaction on a connection of a small pool (psycopg 3, async); none
stays open between calls, so none is open during a PUT. How several workers share the work
(registration, leases, fencing, adoption, queue locks, slots) is described in
``orchestrator.outbox.base``; this module holds the SQL.

Arrival order. ``id`` comes from an identity sequence when a row is inserted, not when its
transaction commits, so an application transaction that is still open may yet commit a row with
a lower id than rows already visible. A claim therefore only reads rows whose inserting
transaction is older than every transaction still running (``txid`` below the snapshot's
``xmin``): then no lower id can appear later, and "the highest id wins" holds. The cost: a
transaction left open anywhere on the server holds claims back until it ends.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
import orjson
import psycopg
import psycopg.conninfo
import psycopg_pool

from orchestrator.logs import get_logger
from orchestrator.outbox.base import (
    Claim,
    ClaimConflict,
    ClaimedRow,
    FencedOut,
    Finished,
    ImportPart,
    ImportPhase,
    OutboxError,
    OutboxQueue,
    Pending,
    Rejection,
    SlotsFull,
    StoredDeadLetter,
    StoredImport,
    dead_letters_query,
    identities_of,
    row_ids_of,
)
from orchestrator.outbox.scan import ClaimScan, Letter, Scanned, key_of_record
from orchestrator.records import Collection, IdentityHashes, hash_identities

if TYPE_CHECKING:
    from orchestrator.parsing import ParsePool

__all__ = [
    "INSERT_ROW",
    "SCHEMA_VERSION",
    "PostgresOutbox",
    "PostgresSlotGate",
    "migrate",
    "redacted",
]

_T = TypeVar("_T")
_Conn = psycopg.AsyncConnection[tuple[Any, ...]]

_NOW = "extract(epoch from clock_timestamp())::double precision"

# Each migration moves the schema from the version before it to its own; never edit a released
# one, append a new one. Version 1 holds the tables SQLite's version 1 holds, with the same
# meaning; version 2 adds what several workers need.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        f"""CREATE TABLE insight_outbox (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            account text NOT NULL,
            collection text NOT NULL,
            scope text NOT NULL DEFAULT 'account',
            collection_type text NOT NULL DEFAULT 'custom',
            record text NOT NULL,
            enqueued_at double precision NOT NULL DEFAULT {_NOW},
            txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
            held_by bigint,
            identity text
        )""",
        """CREATE INDEX insight_outbox_pending
            ON insight_outbox (account, collection, scope, collection_type, id)
            WHERE held_by IS NULL""",
        """CREATE INDEX insight_outbox_held ON insight_outbox (held_by)
            WHERE held_by IS NOT NULL""",
        f"""CREATE TABLE insight_dead_letter (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            account text NOT NULL,
            collection text NOT NULL,
            scope text NOT NULL,
            collection_type text NOT NULL,
            record text NOT NULL,
            reason text NOT NULL,
            message text NOT NULL,
            details text NOT NULL DEFAULT '[]',
            key text,
            source_id bigint,
            import_id text,
            created_at double precision NOT NULL DEFAULT {_NOW}
        )""",
        "CREATE INDEX insight_dead_letter_queue ON insight_dead_letter (account, collection)",
        """CREATE TABLE insight_import (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            account text NOT NULL,
            collection text NOT NULL,
            scope text NOT NULL,
            collection_type text NOT NULL,
            phase text NOT NULL CHECK (phase IN ('sealed', 'submitting', 'submitted')),
            import_id text,
            body_bytes bigint NOT NULL,
            depends_on bigint[] NOT NULL DEFAULT '{}',
            attempts integer NOT NULL DEFAULT 0,
            in_doubt integer NOT NULL DEFAULT 0,
            sealed_at double precision NOT NULL,
            submitted_at double precision,
            row_ids bigint[] NOT NULL,
            ends bigint[] NOT NULL,
            body bytea NOT NULL
        )""",
    ),
    (
        "CREATE SEQUENCE insight_fence",
        """CREATE TABLE insight_worker (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            fence bigint NOT NULL DEFAULT nextval('insight_fence'),
            name text NOT NULL,
            started_at double precision NOT NULL,
            heartbeat_at double precision NOT NULL
        )""",
        "ALTER TABLE insight_import ADD COLUMN owner bigint, ADD COLUMN fence bigint",
        "CREATE INDEX insight_import_owner ON insight_import (owner)",
        """CREATE INDEX insight_outbox_in_flight
            ON insight_outbox (account, collection, scope, collection_type, identity)
            WHERE held_by IS NOT NULL""",
        """CREATE TABLE insight_queue_lock (
            account text NOT NULL,
            collection text NOT NULL,
            scope text NOT NULL,
            collection_type text NOT NULL,
            owner bigint NOT NULL,
            fence bigint NOT NULL,
            PRIMARY KEY (account, collection, scope, collection_type)
        )""",
        """CREATE TABLE insight_slot (
            import_ref bigint PRIMARY KEY REFERENCES insight_import (id) ON DELETE CASCADE,
            account text NOT NULL,
            taken_at double precision NOT NULL
        )""",
        "CREATE INDEX insight_slot_account ON insight_slot (account)",
        """CREATE FUNCTION insight_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_notify('insight_outbox', '');
                RETURN NULL;
            END $$""",
        """CREATE TRIGGER insight_outbox_inserted AFTER INSERT ON insight_outbox
            FOR EACH STATEMENT EXECUTE FUNCTION insight_outbox_notify()""",
    ),
    ("ALTER TABLE insight_import ADD COLUMN resubmits integer NOT NULL DEFAULT 0",),
    (
        # pglz, the default, took 33 ms of the server's CPU per 2 MB body at the seal; lz4
        # takes 6 ms and compresses JSON bodies better. A server built without lz4 stores
        # bodies uncompressed (9 ms) rather than fail the migration.
        """DO $$ BEGIN
            ALTER TABLE insight_import ALTER COLUMN body SET COMPRESSION lz4;
        EXCEPTION WHEN OTHERS THEN
            ALTER TABLE insight_import ALTER COLUMN body SET STORAGE EXTERNAL;
        END $$""",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)
"""The schema version the migrations of this release lead to."""

INSERT_ROW = (
    "INSERT INTO insight_outbox (account, collection, scope, collection_type, record) "
    "VALUES (%s, %s, %s, %s, %s)"
)
"""The statement that enqueues a row: ``(account, collection, scope, collection_type, record)``."""

_MIGRATE_LOCK = 0x696E_7369_6768  # pg_advisory_xact_lock key: one migrator at a time
_PAGE_ROWS = 1000  # the fewest rows a page reads (see ClaimScan.rows_wanted)
_INTS = "string_to_array(%s, ',')::bigint[]"  # see _joined_ints
_TEXTS = "string_to_array(%s, E'\\n')"  # see _joined_texts
_QUEUE = "account = %s AND collection = %s AND scope = %s AND collection_type = %s"
_O_QUEUE = "o.account = %s AND o.collection = %s AND o.scope = %s AND o.collection_type = %s"
_VISIBLE = "txid < pg_snapshot_xmin(pg_current_snapshot())"
_IMPORT_COLUMNS = (
    "id, account, collection, scope, collection_type, phase, import_id, body_bytes, depends_on, "
    "attempts, in_doubt, sealed_at, submitted_at, row_ids, ends, resubmits"
)
_SLOT_CHANNEL = "insight_slot"
_ROW_CHANNEL = "insight_outbox"

log = get_logger("orchestrator.outbox.postgres")


def redacted(conninfo: str) -> str:
    """The connection string as it may be shown: host, port, database and user, no password."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "postgresql://(unreadable URL)"
    host = params.get("host") or "localhost"
    port = f":{params['port']}" if params.get("port") else ""
    user = f"{params['user']}@" if params.get("user") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname') or ''}"


async def migrate(connection: _Conn) -> int:
    """Create or upgrade the outbox tables on ``connection``; return the schema version.

    Idempotent, and safe when several workers start at once (an advisory lock orders them). It
    runs inside a transaction (a savepoint of the caller's, when one is open; the caller
    commits).

    Args:
        connection: an async psycopg connection to the outbox database.

    Raises:
        OutboxError: the database was made by a newer release.
        psycopg.Error: the database cannot be written.
    """
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATE_LOCK,))
        await connection.execute(
            "CREATE TABLE IF NOT EXISTS insight_schema (version integer NOT NULL)"
        )
        row = await (await connection.execute("SELECT max(version) FROM insight_schema")).fetchone()
        version = int(row[0] or 0) if row is not None else 0
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"the outbox tables have schema version {version}, newer than this release "
                f"knows ({SCHEMA_VERSION}): upgrade insight-orchestrator"
            )
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                await connection.execute(statement)
        if version < SCHEMA_VERSION:
            await connection.execute("DELETE FROM insight_schema")
            await connection.execute(
                "INSERT INTO insight_schema (version) VALUES (%s)", (SCHEMA_VERSION,)
            )
    return SCHEMA_VERSION


class PostgresOutbox:
    """The outbox store on PostgreSQL (see ``OutboxStore`` and ``SharedOutboxStore``).

    Entering ``async with`` opens a small pool of connections and runs the migrations; with
    ``worker=True`` it also registers this worker (leaving deregisters it: its imports still in
    flight are released for another worker to adopt at once). Other users (the ``enqueue`` and
    ``dead-letters`` commands) open it without ``worker``; they cannot claim or import.

    Args:
        conninfo: a ``postgresql://`` URL or a libpq connection string.
        worker: register as a worker (needed to claim, seal and import).
        name: how the worker is named in ``insight_worker`` (host and pid, say).
        lease: seconds without a heartbeat after which a worker is dead and adoptable.
        capacity: slots per account (``max_concurrent``): one number, or a mapping by account
            name (accounts not in it get 5).
        clock: epoch seconds for heartbeats and lease checks; ``None`` uses the database's
            clock (the one clock every worker shares). Tests pass a clock of their own.
        pool_size: the most connections the store opens for its calls (plus one for heartbeats
            and one for ``LISTEN``, when used).
        connect_timeout: seconds to wait for the first connection.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        worker: bool = False,
        name: str = "worker",
        lease: float = 15.0,
        capacity: int | Mapping[str, int] = 5,
        clock: Callable[[], float] | None = None,
        pool_size: int = 4,
        connect_timeout: float = 10.0,
    ) -> None:
        if lease <= 0:
            raise ValueError("lease must be positive")
        self._conninfo = conninfo
        self._worker = worker
        self._name = name
        self._lease = float(lease)
        self._capacity = capacity
        self._clock = clock
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._pool: psycopg_pool.AsyncConnectionPool[_Conn] | None = None
        self._me: tuple[int, int] | None = None  # (worker id, fence)
        self._beat_conn: _Conn | None = None
        self._listen_conn: _Conn | None = None
        self._beat_lock = anyio.Lock()
        self._listen_lock = anyio.Lock()
        self._listen_moved: anyio.Event | None = None  # set and replaced as notifications come
        self._notified: Counter[str] = Counter()  # notifications received, per channel
        # import ref -> (its queue, hashes of its records' identities): an import's identities
        # never change once sealed (a split makes new refs), so each is read once
        self._in_flight: dict[int, tuple[OutboxQueue, IdentityHashes]] = {}

    def __repr__(self) -> str:
        return f"PostgresOutbox({redacted(self._conninfo)!r})"

    @property
    def where(self) -> str:
        """The database, as it may be shown (no password)."""
        return redacted(self._conninfo)

    @property
    def worker_id(self) -> int:
        """See ``SharedOutboxStore.worker_id``."""
        return self._identity()[0]

    @property
    def fence(self) -> int:
        """This worker's fence token."""
        return self._identity()[1]

    @property
    def lease(self) -> float:
        """Seconds without a heartbeat after which a worker is dead."""
        return self._lease

    def capacity_of(self, account: str) -> int:
        """The slots of ``account``."""
        if isinstance(self._capacity, int):
            return self._capacity
        return int(self._capacity.get(account, 5))

    def slot_gate(self, account: str) -> PostgresSlotGate:
        """The slot gate of ``account`` for the engine (see ``PostgresSlotGate``)."""
        return PostgresSlotGate(self, account)

    async def __aenter__(self) -> Self:
        # One connection first, outside the pool: a wrong URL or a server that is down is told
        # at once (a pool would keep retrying), and the migrations run on it.
        try:
            first = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=self._timeout_s()
            )
        except psycopg.Error as error:
            raise OutboxError(
                f"outbox database {self.where}: cannot connect: {_server_message(error)}; "
                "check the URL, that the server runs and accepts connections from this host, "
                "and the credentials"
            ) from None
        try:
            async with first:
                await migrate(first)
        except psycopg.Error as error:
            raise OutboxError(
                self._explain("create or upgrade the outbox tables", error)
            ) from error
        pool: psycopg_pool.AsyncConnectionPool[_Conn] = psycopg_pool.AsyncConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=self._pool_size,
            kwargs={"autocommit": True},
            open=False,
            timeout=self._connect_timeout,
            configure=self._configure,
            # a session the server ended (the idle timeout below, a restart) is replaced on
            # checkout rather than failing the step of an import that drew it
            check=psycopg_pool.AsyncConnectionPool.check_connection,
        )
        try:
            try:
                await pool.open(wait=True, timeout=self._connect_timeout)
            except psycopg_pool.PoolTimeout:
                raise OutboxError(
                    f"outbox database {self.where}: cannot connect within "
                    f"{self._connect_timeout:g} s; check that the server accepts more connections"
                ) from None
            self._pool = pool
            if self._worker:
                await self._register()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await pool.close()
                self._pool = None
                await self.aclose()
            raise
        return self

    async def _configure(self, conn: _Conn) -> None:
        # A worker stopped in the middle of a transaction (SIGSTOP, a frozen VM) would hold
        # the lock on its own worker row for ever, and adoption skips locked rows: the server
        # ends such a session after a lease, so the worker can be declared dead. (Not for the
        # other users: an application's enqueue may think longer between its statements.)
        if self._worker:
            idle_ms = max(1000, round(self._lease * 1000))
            await conn.execute(f"SET idle_in_transaction_session_timeout = {idle_ms}")

    def _timeout_s(self) -> int:
        return max(1, round(self._connect_timeout))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            if self._me is not None and self._pool is not None:
                with contextlib.suppress(OutboxError):
                    await self._deregister()
            await self.aclose()

    async def aclose(self) -> None:
        """Close every connection (idempotent); a registered worker is not deregistered."""
        for conn in (self._beat_conn, self._listen_conn):
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await conn.close()
        self._beat_conn = self._listen_conn = None
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # ------------------------------------------------------------------ the OutboxStore methods

    async def schema_version(self) -> int:
        """See ``OutboxStore.schema_version``."""

        async def read(conn: _Conn) -> int:
            return int(await _value(conn, "SELECT max(version) FROM insight_schema"))

        return await self._call(read, "read the schema version")

    async def ping(self) -> None:
        """See ``OutboxStore.ping``."""

        async def read(conn: _Conn) -> None:
            await conn.execute("SELECT 1")

        await self._call(read, "reach the database")

    async def enqueue(
        self,
        account: str,
        collection: Collection,
        records: Sequence[object],
        *,
        check: bool = True,
    ) -> int:
        """See ``OutboxStore.enqueue``."""
        from orchestrator.outbox.enqueue import stored_texts

        texts = await stored_texts(account, collection, records, check=check)
        queue = OutboxQueue.of(account, collection)
        if not texts:
            return 0

        async def write(conn: _Conn) -> int:
            await conn.execute(
                "INSERT INTO insight_outbox (account, collection, scope, collection_type, record)"
                " SELECT %s, %s, %s, %s, r FROM unnest(%s::text[]) WITH ORDINALITY AS t(r, n)"
                " ORDER BY n",
                (*_queue_values(queue), texts),
            )
            return len(texts)

        return await self._call(write, "enqueue records")

    async def pending(self) -> list[Pending]:
        """See ``OutboxStore.pending``: queues locked by another live worker are left out."""

        async def read(conn: _Conn) -> list[Pending]:
            rows = await (
                await conn.execute(
                    f"""SELECT p.account, p.collection, p.scope, p.collection_type, p.n, p.oldest,
                           greatest(0.0, {_NOW} - o.enqueued_at)
                    FROM (SELECT account, collection, scope, collection_type, count(*) AS n,
                                 min(id) AS oldest
                          FROM insight_outbox WHERE held_by IS NULL AND {_VISIBLE}
                          GROUP BY account, collection, scope, collection_type) AS p
                    JOIN insight_outbox AS o ON o.id = p.oldest
                    WHERE NOT EXISTS (
                        SELECT 1 FROM insight_queue_lock AS l JOIN insight_worker AS w
                            ON w.id = l.owner
                        WHERE l.account = p.account AND l.collection = p.collection
                          AND l.scope = p.scope AND l.collection_type = p.collection_type
                          AND l.owner <> %s AND w.heartbeat_at >= %s - %s)
                    ORDER BY p.oldest""",
                    (self._me[0] if self._me else -1, await self._now(conn), self._lease),
                )
            ).fetchall()
            return [
                Pending(OutboxQueue(a, c, s, t), rows=n, oldest_id=oldest, oldest_age_s=age)
                for a, c, s, t, n, oldest, age in rows
            ]

        return await self._call(read, "list pending rows")

    async def claim(
        self,
        queue: OutboxQueue,
        *,
        budget_bytes: int,
        max_scan_rows: int = 100_000,
        parse_pool: ParsePool | None = None,
    ) -> Claim:
        """See ``OutboxStore.claim``; a queue another live worker holds gives an empty claim."""
        if budget_bytes < 1 or max_scan_rows < 1:
            raise ValueError("budget_bytes and max_scan_rows must be at least 1")

        async def write(conn: _Conn) -> Claim:
            await self._check_alive(conn)
            if not await self._lock_queue(conn, queue):
                return Claim(queue, (), 0, False, 0, 0, 0)
            in_flight = await self._in_flight_hashes(conn, queue)
            found = await _scan(conn, queue, in_flight, budget_bytes, max_scan_rows, parse_pool)
            deleted = await _delete_pending(conn, found.superseded)
            moved = await _dead_letter_pending(conn, found.invalid)
            if not found.rows:
                await self._unlock_queue(conn, queue)
            return found.claim(queue, superseded=deleted, dead_lettered=moved)

        return await self._call(write, "claim rows")

    async def seal(
        self,
        queue: OutboxQueue,
        rows: Sequence[ClaimedRow],
        body: bytes | bytearray,
        *,
        ends: Sequence[int] = (),
        depends_on: Sequence[int] = (),
    ) -> StoredImport:
        """See ``OutboxStore.seal``; also releases the queue's lock."""
        if not rows:
            raise ValueError("a sealed import holds at least one row")
        if ends and len(ends) != len(rows):
            raise ValueError(f"ends has {len(ends)} offsets for {len(rows)} rows")
        row_ids = row_ids_of(rows)
        # off the event loop: a 50 MB body holds some 40,000 records
        identities = await anyio.to_thread.run_sync(identities_of, rows)
        joined_identities = _joined_texts(identities)
        sealed_at = time.time()
        me, fence = self._identity()

        async def write(conn: _Conn) -> int:
            await self._check_alive(conn)
            lock = await (
                await conn.execute(
                    f"SELECT owner FROM insight_queue_lock WHERE {_QUEUE} FOR UPDATE",
                    _queue_values(queue),
                )
            ).fetchone()
            if lock is not None and lock[0] != me:
                raise FencedOut(
                    "another worker took over this queue while the batch was being built: "
                    "drop the batch (its rows stay pending)"
                )
            ref = int(
                await _value(
                    conn,
                    "INSERT INTO insight_import (account, collection, scope, collection_type,"
                    " phase, body_bytes, depends_on, sealed_at, row_ids, ends, body, owner, fence)"
                    f" VALUES (%s, %s, %s, %s, 'sealed', %s, %s, %s, {_INTS}, {_INTS}, %s, %s, %s)"
                    " RETURNING id",
                    (
                        *_queue_values(queue),
                        len(body),
                        list(depends_on),
                        sealed_at,
                        _joined_ints(row_ids),
                        _joined_ints(ends),
                        body,
                        me,
                        fence,
                    ),
                )
            )
            cursor = await conn.execute(
                f"UPDATE insight_outbox AS o SET held_by = %s, identity = v.identity"
                f" FROM unnest({_INTS}, {_TEXTS}) AS v(id, identity)"
                f" WHERE o.id = v.id AND o.held_by IS NULL AND {_O_QUEUE}",
                (ref, _joined_ints(row_ids), joined_identities, *_queue_values(queue)),
            )
            if cursor.rowcount != len(row_ids):
                raise ClaimConflict(
                    f"{len(row_ids) - cursor.rowcount} of the {len(row_ids)} rows of the batch "
                    "are no longer pending (taken or deleted since they were claimed): claim again"
                )
            clash = await (
                await conn.execute(
                    f"SELECT count(*) FROM insight_outbox WHERE held_by IS NOT NULL AND {_QUEUE}"
                    f" AND held_by <> %s AND identity = ANY({_TEXTS})",
                    (*_queue_values(queue), ref, joined_identities),
                )
            ).fetchone()
            if clash is not None and clash[0]:
                raise ClaimConflict(
                    f"{clash[0]} records of the batch are already in an import in flight: "
                    "claim again"
                )
            await self._unlock_queue(conn, queue)
            return ref

        ref = await self._call(write, "seal a batch")
        self._in_flight[ref] = (queue, hash_identities(identities))
        return StoredImport(
            ref=ref,
            queue=queue,
            phase=ImportPhase.SEALED,
            import_id=None,
            row_ids=row_ids,
            identities=identities,
            ends=tuple(ends),
            body_bytes=len(body),
            depends_on=tuple(depends_on),
            attempts=0,
            in_doubt=0,
            sealed_at=sealed_at,
            submitted_at=None,
        )

    async def mark_submitting(self, ref: int) -> None:
        """See ``OutboxStore.mark_submitting``: also takes the import's slot.

        Raises:
            SlotsFull: every slot of the account is held; nothing was written.
            FencedOut: another worker owns the import now.
        """

        async def write(conn: _Conn) -> None:
            await self._check_alive(conn)
            account, phase = await self._owned(conn, ref, "mark it submitting")
            if phase not in ("sealed", "submitted"):
                raise OutboxError(
                    f"cannot mark it submitting: import {ref} is {phase}, not sealed or submitted"
                )
            held = await (
                await conn.execute("SELECT 1 FROM insight_slot WHERE import_ref = %s", (ref,))
            ).fetchone()
            if held is None:
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended('insight_slot:' || %s, 0))",
                    (account,),
                )
                in_use = int(
                    await _value(
                        conn, "SELECT count(*) FROM insight_slot WHERE account = %s", (account,)
                    )
                )
                capacity = self.capacity_of(account)
                if in_use >= capacity:
                    raise SlotsFull(account, capacity)
                await conn.execute(
                    "INSERT INTO insight_slot (import_ref, account, taken_at) VALUES (%s, %s, %s)",
                    (ref, account, time.time()),
                )
            await conn.execute(
                "UPDATE insight_import SET phase = 'submitting', attempts = attempts + 1 "
                "WHERE id = %s",
                (ref,),
            )

        await self._call(write, "record a submit intent")

    async def mark_submitted(self, ref: int, import_id: str) -> None:
        """See ``OutboxStore.mark_submitted``."""
        if not import_id:
            raise ValueError("import_id must not be empty")

        async def write(conn: _Conn) -> None:
            await self._check_alive(conn)
            _, phase = await self._owned(conn, ref, "mark it submitted")
            if phase != "submitting":
                raise OutboxError(
                    f"cannot mark it submitted: import {ref} is {phase}, not submitting"
                )
            await conn.execute(
                "UPDATE insight_import SET phase = 'submitted', import_id = %s, submitted_at = %s "
                "WHERE id = %s",
                (import_id, time.time(), ref),
            )

        await self._call(write, "record an import id")

    async def mark_refused(self, ref: int) -> None:
        """See ``OutboxStore.mark_refused``: the import's slot is freed (nothing started)."""

        async def write(conn: _Conn) -> None:
            await self._check_alive(conn)
            account, phase = await self._owned(conn, ref, "mark it refused")
            if phase != "submitting":
                raise OutboxError(
                    f"cannot mark it refused: import {ref} is {phase}, not submitting"
                )
            await conn.execute(
                "UPDATE insight_import SET phase = 'sealed', import_id = NULL WHERE id = %s", (ref,)
            )
            await self._free_slot(conn, ref, account)

        await self._call(write, "record a refused submit")

    async def mark_resubmit(self, ref: int) -> None:
        """See ``OutboxStore.mark_resubmit``: the import keeps its slot for the resend."""

        async def write(conn: _Conn) -> None:
            await self._check_alive(conn)
            _, phase = await self._owned(conn, ref, "send it again")
            if phase != "submitted":
                raise OutboxError(f"cannot send it again: import {ref} is {phase}, not submitted")
            await conn.execute(
                "UPDATE insight_import SET phase = 'sealed', import_id = NULL, "
                "resubmits = resubmits + 1 WHERE id = %s",
                (ref,),
            )

        await self._call(write, "record a resubmit")

    async def split(self, ref: int, parts: Sequence[ImportPart]) -> list[StoredImport]:
        """See ``OutboxStore.split``: the parts are this worker's, the old import's slot is freed
        (each part takes its own at its intent)."""
        if not parts:
            raise ValueError("an import is split into at least one part")
        for part in parts:
            if not part.row_ids or len(part.ends) != len(part.row_ids):
                raise ValueError("each part holds rows, with one end offset per row")
        sealed_at = time.time()
        me, fence = self._identity()

        async def write(conn: _Conn) -> list[StoredImport]:
            await self._check_alive(conn)
            account, phase = await self._owned(conn, ref, "split it")
            if phase == "submitted":
                raise OutboxError(f"cannot split: import {ref} is submitted")
            row = await (
                await conn.execute(
                    f"SELECT {_IMPORT_COLUMNS} FROM insight_import WHERE id = %s", (ref,)
                )
            ).fetchone()
            assert row is not None  # _owned found it, under its row lock
            old = await _stored_import(conn, row)
            given = [row_id for part in parts for row_id in part.row_ids]
            if sorted(given) != sorted(old.row_ids):
                raise OutboxError(f"cannot split: the parts do not hold exactly the rows of {ref}")
            new_refs = []
            for part in parts:
                new = int(
                    await _value(
                        conn,
                        "INSERT INTO insight_import (account, collection, scope, collection_type,"
                        " phase, body_bytes, depends_on, sealed_at, row_ids, ends, body, owner,"
                        " fence) VALUES (%s, %s, %s, %s, 'sealed', %s, %s, %s, %s, %s, %s, %s, %s)"
                        " RETURNING id",
                        (
                            *_queue_values(old.queue),
                            len(part.body),
                            list(old.depends_on),
                            sealed_at,
                            list(part.row_ids),
                            list(part.ends),
                            part.body,
                            me,
                            fence,
                        ),
                    )
                )
                new_refs.append(new)
                await conn.execute(
                    "UPDATE insight_outbox SET held_by = %s WHERE id = ANY(%s) AND held_by = %s",
                    (new, list(part.row_ids), ref),
                )
            # whatever waited for the old import waits for its parts
            await conn.execute(
                "UPDATE insight_import SET depends_on = ARRAY(SELECT DISTINCT d FROM"
                " unnest(array_remove(depends_on, %s) || %s::bigint[]) AS d ORDER BY d)"
                " WHERE %s = ANY(depends_on)",
                (ref, new_refs, ref),
            )
            await self._free_slot(conn, ref, account)
            await conn.execute("DELETE FROM insight_import WHERE id = %s", (ref,))
            rows = await (
                await conn.execute(
                    f"SELECT {_IMPORT_COLUMNS} FROM insight_import WHERE id = ANY(%s) ORDER BY id",
                    (new_refs,),
                )
            ).fetchall()
            return [await _stored_import(conn, found) for found in rows]

        return await self._call(write, "split an import")

    async def _free_slot(self, conn: _Conn, ref: int, account: str) -> None:
        freed = await conn.execute("DELETE FROM insight_slot WHERE import_ref = %s", (ref,))
        if freed.rowcount:
            await conn.execute("SELECT pg_notify(%s, %s)", (_SLOT_CHANNEL, account))

    async def finish(
        self,
        ref: int,
        *,
        failures: Mapping[int, Rejection] | None = None,
        reject_all: Rejection | None = None,
    ) -> Finished:
        """See ``OutboxStore.finish``: also frees the import's slot."""
        given = dict(failures or {})

        async def write(conn: _Conn) -> Finished:
            await self._check_alive(conn)
            account, _ = await self._owned(conn, ref, "finish it", finished_twice=True)
            import_id = await _value(
                conn, "SELECT import_id FROM insight_import WHERE id = %s", (ref,)
            )
            held = []
            if given or reject_all is not None:
                held = await (
                    await conn.execute(
                        "SELECT id, identity FROM insight_outbox WHERE held_by = %s ORDER BY id",
                        (ref,),
                    )
                ).fetchall()
            letters: list[Letter] = []
            for row_id, identity in held:
                rejection = given.get(row_id, reject_all)
                if rejection is not None:
                    letters.append((row_id, rejection, _key_of_identity(identity)))
            await _insert_dead_letters(conn, letters, import_id=import_id, pending_only=False)
            cursor = await conn.execute("DELETE FROM insight_outbox WHERE held_by = %s", (ref,))
            deleted = cursor.rowcount
            freed = await conn.execute("DELETE FROM insight_slot WHERE import_ref = %s", (ref,))
            await conn.execute("DELETE FROM insight_import WHERE id = %s", (ref,))
            if freed.rowcount:
                await conn.execute("SELECT pg_notify(%s, %s)", (_SLOT_CHANNEL, account))
            return Finished(imported=deleted - len(letters), dead_lettered=len(letters))

        return await self._call(write, "finish an import")

    async def dead_letter_rows(self, rejections: Mapping[int, Rejection]) -> int:
        """See ``OutboxStore.dead_letter_rows``."""
        given = dict(rejections)
        if not given:
            return 0

        async def write(conn: _Conn) -> int:
            if self._me is not None:
                await self._check_alive(conn)
            rows = await (
                await conn.execute(
                    "SELECT id, record FROM insight_outbox WHERE id = ANY(%s) AND held_by IS NULL"
                    " ORDER BY id FOR UPDATE",
                    (list(given),),
                )
            ).fetchall()
            letters = [(row_id, given[row_id], key_of_record(text)) for row_id, text in rows]
            return await _dead_letter_pending(conn, letters)

        return await self._call(write, "dead-letter rows")

    async def recover(self) -> list[StoredImport]:
        """See ``OutboxStore.recover``: on a shared database, adopts what dead or stopped
        workers left (their SUBMITTING imports come back SEALED, in doubt), then returns every
        import this worker owns."""
        await self.adopt()
        return await self.owned()

    async def load_body(self, ref: int) -> bytes:
        """See ``OutboxStore.load_body``."""

        async def read(conn: _Conn) -> bytes:
            row = await (
                await conn.execute("SELECT body FROM insight_import WHERE id = %s", (ref,))
            ).fetchone()
            if row is None:
                raise OutboxError(f"import {ref} is not held by the outbox store")
            return bytes(row[0])

        return await self._call(read, "load a body")

    async def dead_letters(
        self,
        *,
        account: str | None = None,
        collection: str | None = None,
        after: int = 0,
        limit: int = 1000,
    ) -> list[StoredDeadLetter]:
        """See ``OutboxStore.dead_letters``."""
        query, values = dead_letters_query(
            "%s", account=account, collection=collection, after=after, limit=limit
        )

        async def read(conn: _Conn) -> list[StoredDeadLetter]:
            rows = await (await conn.execute(query, values)).fetchall()
            return [StoredDeadLetter.from_row(row) for row in rows]

        return await self._call(read, "list dead letters")

    async def requeue(self, ids: Sequence[int]) -> int:
        """See ``OutboxStore.requeue``."""
        ordered = sorted(set(ids))
        if not ordered:
            return 0

        async def write(conn: _Conn) -> int:
            cursor = await conn.execute(
                "WITH moved AS (DELETE FROM insight_dead_letter WHERE id = ANY(%s)"
                " RETURNING id, account, collection, scope, collection_type, record)"
                " INSERT INTO insight_outbox (account, collection, scope, collection_type, record)"
                " SELECT account, collection, scope, collection_type, record FROM moved"
                " ORDER BY id",
                (ordered,),
            )
            return cursor.rowcount

        return await self._call(write, "requeue dead letters")

    # ------------------------------------------------------------------ several workers

    async def heartbeat(self) -> None:
        """See ``SharedOutboxStore.heartbeat``."""
        me, fence = self._identity()
        async with self._beat_lock:
            try:
                if self._beat_conn is None or self._beat_conn.closed:
                    self._beat_conn = await psycopg.AsyncConnection.connect(
                        self._conninfo,
                        autocommit=True,
                        connect_timeout=self._timeout_s(),
                    )
                conn = self._beat_conn
                now = self._clock() if self._clock is not None else None
                cursor = await conn.execute(
                    f"UPDATE insight_worker SET heartbeat_at = coalesce(%s, {_NOW})"
                    " WHERE id = %s AND fence = %s",
                    (now, me, fence),
                )
            except psycopg.Error as error:
                raise OutboxError(self._explain("renew this worker's lease", error)) from error
        if cursor.rowcount != 1:
            raise FencedOut(
                f"worker {me} was declared dead (no heartbeat within {self._lease:g} s) and its "
                "imports adopted by another worker: stop this worker"
            )

    async def run_heartbeats(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """See ``SharedOutboxStore.run_heartbeats``."""
        await self.heartbeat()
        task_status.started()
        while True:
            await anyio.sleep(self._lease / 3 * random.uniform(0.8, 1.0))
            try:
                await self.heartbeat()
            except FencedOut:
                raise
            except OutboxError as error:
                # the database may be back before the lease runs out: try again next time
                # (a worker that stays cut off is adopted, and fenced out when it returns)
                log.warning("worker.heartbeat_failed", error=str(error))

    async def adopt(self) -> list[StoredImport]:
        """See ``SharedOutboxStore.adopt``."""
        me, fence = self._identity()

        async def write(conn: _Conn) -> list[StoredImport]:
            await self._check_alive(conn)
            now = await self._now(conn)
            dead = [
                row[0]
                for row in await (
                    await conn.execute(
                        "SELECT id FROM insight_worker WHERE id <> %s AND heartbeat_at < %s - %s"
                        " FOR UPDATE SKIP LOCKED",
                        (me, now, self._lease),
                    )
                ).fetchall()
            ]
            adopted = await (
                await conn.execute(
                    "UPDATE insight_import SET owner = %s, fence = %s,"
                    " in_doubt = in_doubt + (phase = 'submitting')::int,"
                    " phase = CASE phase WHEN 'submitting' THEN 'sealed' ELSE phase END"
                    " WHERE owner IS NULL OR owner = ANY(%s) RETURNING id",
                    (me, fence, dead),
                )
            ).fetchall()
            if dead:
                await conn.execute("DELETE FROM insight_queue_lock WHERE owner = ANY(%s)", (dead,))
                await conn.execute("DELETE FROM insight_worker WHERE id = ANY(%s)", (dead,))
            refs = sorted(row[0] for row in adopted)
            rows = await (
                await conn.execute(
                    f"SELECT {_IMPORT_COLUMNS} FROM insight_import WHERE id = ANY(%s) ORDER BY id",
                    (refs,),
                )
            ).fetchall()
            return [await _stored_import(conn, row) for row in rows]

        return await self._call(write, "adopt imports")

    async def owned(self) -> list[StoredImport]:
        """Every import this worker owns now, in ref order."""
        me, _ = self._identity()

        async def read(conn: _Conn) -> list[StoredImport]:
            rows = await (
                await conn.execute(
                    f"SELECT {_IMPORT_COLUMNS} FROM insight_import WHERE owner = %s ORDER BY id",
                    (me,),
                )
            ).fetchall()
            return [await _stored_import(conn, row) for row in rows]

        return await self._call(read, "list imports")

    async def release_queue(self, queue: OutboxQueue) -> None:
        """See ``SharedOutboxStore.release_queue``."""

        async def write(conn: _Conn) -> None:
            await self._unlock_queue(conn, queue)

        await self._call(write, "release a queue")

    async def slots_in_use(self, account: str) -> int:
        """See ``SharedOutboxStore.slots_in_use``."""

        async def read(conn: _Conn) -> int:
            return int(
                await _value(
                    conn, "SELECT count(*) FROM insight_slot WHERE account = %s", (account,)
                )
            )

        return await self._call(read, "count slots")

    async def wait_for_slot(self, account: str, *, max_wait: float | None = None) -> None:
        """See ``SharedOutboxStore.wait_for_slot``: a freed slot's notification, or a poll
        every ``lease / 3`` seconds (jittered) as the fallback."""
        limit = self._lease / 3 if max_wait is None else max_wait
        with anyio.move_on_after(limit * random.uniform(0.8, 1.0)):
            while await self.slots_in_use(account) >= self.capacity_of(account):
                await self._wait_notify(_SLOT_CHANNEL, limit)

    async def wait_for_rows(self, max_wait: float) -> bool:
        """See ``SharedOutboxStore.wait_for_rows``."""
        return await self._wait_notify(_ROW_CHANNEL, max_wait)

    # ------------------------------------------------------------------ plumbing

    def _identity(self) -> tuple[int, int]:
        if self._me is None:
            raise RuntimeError(
                "this outbox store is not a registered worker: open it with worker=True"
            )
        return self._me

    async def _now(self, conn: _Conn) -> float:
        if self._clock is not None:
            return self._clock()
        return float(await _value(conn, f"SELECT {_NOW}"))

    async def _register(self) -> None:
        async def write(conn: _Conn) -> tuple[int, int]:
            now = await self._now(conn)
            row = await (
                await conn.execute(
                    "INSERT INTO insight_worker (name, started_at, heartbeat_at)"
                    " VALUES (%s, %s, %s) RETURNING id, fence",
                    (self._name, now, now),
                )
            ).fetchone()
            assert row is not None
            return int(row[0]), int(row[1])

        self._me = await self._call(write, "register this worker")

    async def _deregister(self) -> None:
        me, fence = self._identity()

        async def write(conn: _Conn) -> None:
            await conn.execute(
                "UPDATE insight_import SET owner = NULL WHERE owner = %s AND fence = %s",
                (me, fence),
            )
            await conn.execute("DELETE FROM insight_queue_lock WHERE owner = %s", (me,))
            await conn.execute(
                "DELETE FROM insight_worker WHERE id = %s AND fence = %s", (me, fence)
            )

        await self._call(write, "deregister this worker")
        self._me = None

    async def _check_alive(self, conn: _Conn) -> None:
        """Lock this worker's row for the transaction: an adopter's delete waits for it, or it
        is gone and nothing of the transaction is written. (KEY SHARE: the adopter's FOR UPDATE
        and DELETE wait for it, this worker's own heartbeat, an UPDATE of no key, does not.)"""
        me, fence = self._identity()
        row = await (
            await conn.execute(
                "SELECT 1 FROM insight_worker WHERE id = %s AND fence = %s FOR KEY SHARE",
                (me, fence),
            )
        ).fetchone()
        if row is None:
            raise FencedOut(
                f"worker {me} was declared dead and its imports adopted by another worker: "
                "nothing was written; stop this worker"
            )

    async def _owned(
        self, conn: _Conn, ref: int, action: str, *, finished_twice: bool = False
    ) -> tuple[str, str]:
        me, fence = self._identity()
        row = await (
            await conn.execute(
                "SELECT account, phase, owner, fence FROM insight_import WHERE id = %s FOR UPDATE",
                (ref,),
            )
        ).fetchone()
        if row is None:
            hint = " (finished twice?)" if finished_twice else ""
            raise OutboxError(
                f"cannot {action}: import {ref} is not held by the outbox store{hint}"
            )
        account, phase, owner, token = row
        if owner != me or token != fence:
            raise FencedOut(
                f"cannot {action}: import {ref} belongs to another worker now (adopted); "
                "nothing was written"
            )
        return str(account), str(phase)

    async def _lock_queue(self, conn: _Conn, queue: OutboxQueue) -> bool:
        """Take the queue's lock row for this worker; ``False`` when a live worker holds it."""
        me, fence = self._identity()
        row = await (
            await conn.execute(
                f"SELECT owner FROM insight_queue_lock WHERE {_QUEUE} FOR UPDATE SKIP LOCKED",
                _queue_values(queue),
            )
        ).fetchone()
        if row is None:
            inserted = await (
                await conn.execute(
                    "INSERT INTO insight_queue_lock"
                    " (account, collection, scope, collection_type, owner, fence)"
                    " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING owner",
                    (*_queue_values(queue), me, fence),
                )
            ).fetchone()
            return inserted is not None  # else locked by a claim in progress elsewhere
        if row[0] == me:
            return True
        alive = await (
            await conn.execute(
                "SELECT 1 FROM insight_worker WHERE id = %s AND heartbeat_at >= %s - %s",
                (row[0], await self._now(conn), self._lease),
            )
        ).fetchone()
        if alive is not None:
            return False
        await conn.execute(
            f"UPDATE insight_queue_lock SET owner = %s, fence = %s WHERE {_QUEUE}",
            (me, fence, *_queue_values(queue)),
        )
        return True

    async def _in_flight_hashes(self, conn: _Conn, queue: OutboxQueue) -> set[int]:
        """The hashes of the identities in the queue's imports, by any worker: the imports this
        store has not seen yet are read, in the statement that lists the queue's imports (one
        snapshot: a split committed meanwhile cannot hide its rows)."""
        known = [ref for ref, (cached, _) in self._in_flight.items() if cached == queue]
        found = await (
            await conn.execute(
                "SELECT i.id, CASE WHEN i.id = ANY(" + _INTS + ") THEN NULL ELSE"
                " (SELECT string_agg(o.identity, E'\\n') FROM insight_outbox AS o"
                "  WHERE o.held_by = i.id) END"
                f" FROM insight_import AS i WHERE {_QUEUE}",
                (_joined_ints(known), *_queue_values(queue)),
            )
        ).fetchall()
        refs = {ref for ref, _ in found}
        for ref in known:
            if ref not in refs:
                self._in_flight.pop(ref, None)  # ended (by any worker)
        hashes: set[int] = set()
        for ref, identities in found:
            if identities is not None or ref not in self._in_flight:
                self._in_flight[ref] = (
                    queue,
                    hash_identities(identities.split("\n")) if identities else {},
                )
            hashes.update(self._in_flight[ref][1])
        return hashes

    async def _unlock_queue(self, conn: _Conn, queue: OutboxQueue) -> None:
        me, _ = self._identity()
        await conn.execute(
            f"DELETE FROM insight_queue_lock WHERE {_QUEUE} AND owner = %s",
            (*_queue_values(queue), me),
        )

    async def _wait_notify(self, channel: str, max_wait: float) -> bool:
        """Wait for a notification on ``channel``, at most ``max_wait`` seconds.

        One connection listens on both channels for every waiter: whichever waiter finds it
        free reads it and counts what arrives per channel, the others wait for the counts to
        move (a slot waiter and a row waiter never steal each other's notifications).
        """
        start = self._notified[channel]
        with anyio.move_on_after(max_wait):
            while self._notified[channel] == start:
                if self._listen_lock.locked():
                    if self._listen_moved is None:
                        self._listen_moved = anyio.Event()
                    await self._listen_moved.wait()
                    continue
                async with self._listen_lock:
                    try:
                        await self._read_notifies(channel, start)
                    finally:
                        self._moved()  # another waiter takes over the reading
            return True
        return False

    async def _read_notifies(self, channel: str, start: int) -> None:
        try:
            if self._listen_conn is None or self._listen_conn.closed:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, connect_timeout=self._timeout_s()
                )
                await conn.execute(f"LISTEN {_ROW_CHANNEL}")
                await conn.execute(f"LISTEN {_SLOT_CHANNEL}")
                self._listen_conn = conn
            async for notify in self._listen_conn.notifies():
                self._notified[notify.channel] += 1
                self._moved()
                if self._notified[channel] != start:
                    return
        except psycopg.Error:
            # A lost connection only loses the wake-up: callers poll anyway.
            if self._listen_conn is not None:
                with contextlib.suppress(psycopg.Error):
                    await self._listen_conn.close()
            self._listen_conn = None
            await anyio.sleep_forever()  # until the caller's time is up

    def _moved(self) -> None:
        moved, self._listen_moved = self._listen_moved, None
        if moved is not None:
            moved.set()

    async def _call(self, fn: Callable[[_Conn], Awaitable[_T]], what: str) -> _T:
        pool = self._pool
        if pool is None:
            raise RuntimeError("the outbox store is not open: use `async with PostgresOutbox(...)`")
        try:
            async with pool.connection() as conn, conn.transaction():
                return await fn(conn)
        except psycopg_pool.PoolTimeout:
            raise OutboxError(
                f"outbox database {self.where}: cannot {what}: no connection within "
                f"{self._connect_timeout:g} s; check that the server runs"
            ) from None
        except psycopg.Error as error:
            raise OutboxError(self._explain(what, error)) from error

    def _explain(self, what: str, error: psycopg.Error) -> str:
        summary = _server_message(error)
        if isinstance(error, psycopg.OperationalError):
            advice = "check that the server runs and accepts connections"
        elif isinstance(error, psycopg.errors.UndefinedTable):
            advice = "create the tables with: insight-import outbox init"
        elif isinstance(error, psycopg.errors.InsufficientPrivilege):
            advice = "grant the database user the rights on the insight_* tables"
        else:
            advice = "check the database and its logs"
        state = f" [{error.sqlstate}]" if error.sqlstate else ""
        return f"outbox database {self.where}: cannot {what}: {summary}{state}; {advice}"


class PostgresSlotGate:
    """An account's slot gate for the engine, shared by every worker of the database.

    ``hold()`` waits (locally, first come first served, then for the database's count to show a
    free slot) and holds a local place for the block. The slot itself is the import's and is
    taken by ``mark_submitting`` in the intent's transaction, so the gate's look and the take
    may race with another worker: ``mark_submitting`` then raises ``SlotsFull`` and the caller
    awaits ``wait_for_slot`` and marks again. ``in_use`` is the count last read.

    Args:
        store: the registered store.
        account: the account.
    """

    def __init__(self, store: PostgresOutbox, account: str) -> None:
        self._store = store
        self._account = account
        self._capacity = store.capacity_of(account)
        self._local = anyio.Semaphore(self._capacity)
        self._seen = 0

    def __repr__(self) -> str:
        return (
            f"PostgresSlotGate({self._account!r}, in_use={self._seen}, capacity={self._capacity})"
        )

    @property
    def capacity(self) -> int:
        """See ``SlotGate.capacity``."""
        return self._capacity

    @property
    def in_use(self) -> int:
        """See ``SlotGate.in_use``."""
        return max(self._seen, self._capacity - self._local.value)

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """See ``SlotGate.hold``."""
        async with self._local:
            while True:
                try:
                    self._seen = await self._store.slots_in_use(self._account)
                except OutboxError as error:  # the database is away: look again later
                    log.warning("slot.count_failed", account=self._account, error=str(error))
                    await anyio.sleep(self._store.lease / 3 * random.uniform(0.8, 1.2))
                    continue
                if self._seen < self._capacity:
                    break
                await self._store.wait_for_slot(self._account)
            yield


# ---------------------------------------------------------------------------- SQL helpers


def _server_message(error: psycopg.Error) -> str:
    """The server's own message, never the statement's parameters or the error's details (they
    may quote record values); a connection error's text names host and port, not the password."""
    primary = error.diag.message_primary if error.diag is not None else None
    if primary:
        return primary
    if isinstance(error, psycopg.OperationalError):
        lines = [line for line in str(error).splitlines() if line.strip()]
        text = lines[-1] if lines else ""
        return text.split("failed: ", 1)[-1].strip() or type(error).__name__
    return type(error).__name__


def _queue_values(queue: OutboxQueue) -> tuple[str, str, str, str]:
    return (queue.account, queue.collection, queue.scope, queue.collection_type)


async def _value(conn: _Conn, query: str, params: Sequence[object] = ()) -> Any:
    row = await (await conn.execute(query, params)).fetchone()
    return None if row is None else row[0]


async def _scan(
    conn: _Conn,
    queue: OutboxQueue,
    in_flight: set[int],
    budget: int,
    max_scan: int,
    pool: ParsePool | None,
) -> Scanned:
    """Which rows to return, delete, dead-letter and hold back (the read half of a claim).

    Pages hold 1,000 rows or, for a large budget, as many as it looks to need (from the rows'
    average size so far): a 50 MB body is read in two pages, not forty; each page is encoded
    off the event loop while the transaction waits.
    """
    scan = ClaimScan(queue, in_flight, budget, pool=pool)
    scanned = 0
    after = 0
    while scanned < max_scan and scan.wants_more:
        limit = scan.rows_wanted(_PAGE_ROWS, max_scan - scanned)
        page = await (
            await conn.execute(
                # the text as stored bytes (UTF-8, binary): no decoding and encoding again
                "SELECT id, convert_to(record, 'UTF8') FROM insight_outbox"
                f" WHERE held_by IS NULL AND {_QUEUE} AND id > %s AND {_VISIBLE}"
                " ORDER BY id LIMIT %s",
                (*_queue_values(queue), after, limit),
                binary=True,
            )
        ).fetchall()
        if not page:
            break
        scanned += len(page)
        after = page[-1][0]
        await anyio.to_thread.run_sync(scan.add, page)
        if len(page) < limit:
            break
    return await anyio.to_thread.run_sync(scan.result)  # joins up to a body's bytes


def _joined_ints(values: Sequence[int]) -> str:
    """Integers as one text parameter for ``_INTS``: psycopg dumps a list element by element
    in Python, some 2 us each (40,000 row ids of a 50 MB body: 80 ms)."""
    return ",".join(map(str, values))


def _joined_texts(values: Sequence[str]) -> str:
    """Identity texts as one parameter for ``_TEXTS`` (JSON text never holds a raw newline)."""
    return "\n".join(values)


async def _delete_pending(conn: _Conn, row_ids: Sequence[int]) -> int:
    if not row_ids:
        return 0
    cursor = await conn.execute(
        f"DELETE FROM insight_outbox WHERE id = ANY({_INTS}) AND held_by IS NULL",
        (_joined_ints(row_ids),),
    )
    return cursor.rowcount


async def _insert_dead_letters(
    conn: _Conn, letters: Sequence[Letter], *, import_id: str | None, pending_only: bool
) -> None:
    if not letters:
        return
    await conn.execute(
        "INSERT INTO insight_dead_letter (account, collection, scope, collection_type, record,"
        " reason, message, details, key, source_id, import_id)"
        " SELECT o.account, o.collection, o.scope, o.collection_type, o.record,"
        " v.reason, v.message, v.details, v.key, o.id, %s"
        " FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::text[])"
        " WITH ORDINALITY AS v(id, reason, message, details, key, n)"
        " JOIN insight_outbox AS o ON o.id = v.id"
        + (" WHERE o.held_by IS NULL" if pending_only else "")
        + " ORDER BY v.n",
        (
            import_id,
            [row_id for row_id, _, _ in letters],
            [r.reason for _, r, _ in letters],
            [r.message for _, r, _ in letters],
            [orjson.dumps(list(r.details)).decode() for _, r, _ in letters],
            [key for _, _, key in letters],
        ),
    )


async def _dead_letter_pending(conn: _Conn, letters: Sequence[Letter]) -> int:
    """Move pending rows to the dead letters; rows no longer pending are skipped."""
    if not letters:
        return 0
    await _insert_dead_letters(conn, letters, import_id=None, pending_only=True)
    return await _delete_pending(conn, [row_id for row_id, _, _ in letters])


def _key_of_identity(identity: str | None) -> str | None:
    if identity is None:
        return None
    value = orjson.loads(identity)
    key = value if isinstance(value, str) else value[2]
    return key if isinstance(key, str) else None


async def _stored_import(conn: _Conn, row: tuple[Any, ...]) -> StoredImport:
    (ref, account, collection, scope, collection_type, phase, import_id, body_bytes, depends_on,
     attempts, in_doubt, sealed_at, submitted_at, row_ids, ends, resubmits) = row  # fmt: skip
    identities: dict[int, str] = dict(
        await (
            await conn.execute("SELECT id, identity FROM insight_outbox WHERE held_by = %s", (ref,))
        ).fetchall()
    )
    return StoredImport(
        ref=ref,
        queue=OutboxQueue(account, collection, scope, collection_type),
        phase=ImportPhase(phase),
        import_id=import_id,
        row_ids=tuple(row_ids),
        identities=tuple(identities.get(row_id, "") for row_id in row_ids),
        ends=tuple(ends),
        body_bytes=body_bytes,
        depends_on=tuple(depends_on),
        attempts=attempts,
        in_doubt=in_doubt,
        sealed_at=sealed_at,
        submitted_at=submitted_at,
        resubmits=resubmits,
    )
