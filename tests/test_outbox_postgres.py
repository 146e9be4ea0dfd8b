"""The PostgreSQL outbox with several workers: the helper, slots, fencing, adoption, concurrency."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
import uuid
from typing import Any

import anyio
import orjson
import psycopg
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from orchestrator.errors import RecordError
from orchestrator.outbox import (
    ClaimConflict,
    ClaimedRun,
    FencedOut,
    ImportPhase,
    OutboxError,
    OutboxQueue,
    SlotsFull,
    enqueue,
    enqueue_async,
    open_outbox,
    parse_database,
)
from orchestrator.outbox.postgres import SCHEMA_VERSION, PostgresOutbox, redacted
from orchestrator.records import Collection
from tests.conftest import postgres_server

pytestmark = pytest.mark.anyio

ORDERS = Collection("Orders")
QUEUE = OutboxQueue.of("acme", ORDERS)


def line(key: str, value: object = 1) -> str:
    """One account-scope record as a JSON line."""
    return orjson.dumps({"key": key, "json": {"v": value}}).decode()


def query(url: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a statement, on a connection of its own."""
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


def state(url: str) -> list[tuple[Any, ...]]:
    """Everything a worker's write could change, to compare before and after."""
    return query(
        url,
        "SELECT 'i', id, phase, import_id, owner, fence, attempts FROM insight_import"
        " UNION ALL SELECT 'o', id, coalesce(held_by, 0)::text, record, 0, 0, 0"
        " FROM insight_outbox UNION ALL SELECT 's', import_ref, account, '', 0, 0, 0"
        " FROM insight_slot UNION ALL SELECT 'd', id, reason, record, 0, 0, 0"
        " FROM insight_dead_letter ORDER BY 1, 2",
    )


async def sealed(store: PostgresOutbox, keys: list[str]) -> int:
    """Enqueue records with these keys, claim and seal them; the new import's ref."""
    await store.enqueue("acme", ORDERS, [line(k) for k in keys])
    claim = await store.claim(QUEUE, budget_bytes=10**6)
    return (await store.seal(QUEUE, claim.rows, b"body")).ref


def test_postgresql_urls_are_read_and_never_shown_with_their_password() -> None:
    """parse_database keeps the URL; where and repr leave the password out."""
    url = "postgresql://worker:s3cret@db.example:5433/app"
    database = parse_database(url)
    assert database.shared
    assert database.conninfo == url
    assert database.where == "postgresql://worker@db.example:5433/app"
    assert "s3cret" not in repr(database)
    assert "s3cret" not in repr(open_outbox(database, worker=True))
    assert redacted("host=h dbname=d user=u password=p") == "postgresql://u@h/d"


async def test_outbox_init_runs_each_migration_once_also_when_workers_race(
    postgres_url: str,
) -> None:
    """Stores opened at once migrate once; the contract's plain INSERT works with defaults."""

    async def open_one() -> None:
        async with PostgresOutbox(postgres_url) as store:
            assert await store.schema_version() == SCHEMA_VERSION == 4

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(open_one)
    assert query(postgres_url, "SELECT version FROM insight_schema") == [(SCHEMA_VERSION,)]
    query(
        postgres_url,
        "INSERT INTO insight_outbox (account, collection, record) VALUES ('acme', 'Orders', %s)",
        (line("o-1"),),
    )
    assert query(postgres_url, "SELECT id, scope, collection_type FROM insight_outbox") == [
        (1, "account", "custom")
    ]


async def test_the_helper_writes_in_the_callers_sync_transaction(postgres_url: str) -> None:
    """Rows appear when the caller commits, vanish on rollback; a bad record writes nothing."""
    async with PostgresOutbox(postgres_url):
        pass
    exact = '{"key": "a",  "json": {"big": 123456789012345678901234567890}}'
    with psycopg.connect(postgres_url) as conn:
        records: list[object] = [exact, {"key": "b", "json": {}}]
        assert enqueue(conn, account="acme", collection=ORDERS, records=records) == 2  # type: ignore[arg-type]
        assert query(postgres_url, "SELECT count(*) FROM insight_outbox") == [(0,)]
        conn.commit()
        enqueue(conn, account="acme", collection=ORDERS, records=[line("c")])
        conn.rollback()
        with pytest.raises(RecordError, match="key"):
            enqueue(conn, account="acme", collection=ORDERS, records=[line("d"), '{"json": {}}'])
        conn.rollback()
    records = query(postgres_url, "SELECT record FROM insight_outbox ORDER BY id")
    assert records == [(exact,), ('{"key":"b","json":{}}',)]


async def test_the_helper_writes_in_the_callers_async_transaction(postgres_url: str) -> None:
    """enqueue_async joins the caller's transaction; in autocommit it makes one of its own."""
    async with PostgresOutbox(postgres_url):
        pass
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        await enqueue_async(conn, account="acme", collection=ORDERS, records=[line("a")])
        assert query(postgres_url, "SELECT count(*) FROM insight_outbox") == [(0,)]
        await conn.rollback()
        await conn.set_autocommit(True)
        await enqueue_async(conn, account="acme", collection=ORDERS, records=[line("b")])
    assert query(postgres_url, "SELECT record FROM insight_outbox") == [(line("b"),)]


async def test_the_helper_says_how_to_create_missing_tables(postgres_url: str) -> None:
    """Without the outbox tables the helper names the command that makes them."""
    with psycopg.connect(postgres_url) as conn, pytest.raises(OutboxError, match="outbox init"):
        enqueue(conn, account="acme", collection=ORDERS, records=[line("a")])


async def test_slots_hold_for_every_worker_together(postgres_url: str) -> None:
    """Two workers share an account's 2 slots; a resend keeps its slot; finish frees it."""
    async with (
        PostgresOutbox(postgres_url, worker=True, capacity=2) as one,
        PostgresOutbox(postgres_url, worker=True, capacity={"acme": 2}) as two,
    ):
        first = await sealed(one, ["a"])
        second = await sealed(two, ["b"])
        third = await sealed(two, ["c"])
        await one.mark_submitting(first)
        await two.mark_submitting(second)
        before = state(postgres_url)
        with pytest.raises(SlotsFull, match="all its 2 import slots"):
            await two.mark_submitting(third)
        assert state(postgres_url) == before
        await one.mark_submitted(first, "import-1")
        await one.mark_submitting(first)  # a resend of a Failed import keeps its slot
        assert await one.slots_in_use("acme") == 2
        gate = two.slot_gate("acme")
        waited = anyio.Event()

        async def submit_third() -> None:
            async with gate.hold():
                waited.set()
                await two.mark_submitting(third)

        async with anyio.create_task_group() as tg:
            tg.start_soon(submit_third)
            await anyio.sleep(0.2)
            assert not waited.is_set()
            await one.finish(first)
        assert await two.slots_in_use("acme") == 2
        assert gate.capacity == 2


async def test_a_worker_adopted_while_stalled_is_fenced_out(postgres_url: str) -> None:
    """After adoption every write of the old owner raises FencedOut and changes nothing."""
    now = [1000.0]

    def clock() -> float:
        return now[0]

    async with (
        PostgresOutbox(postgres_url, worker=True, lease=10, clock=clock) as stalled,
        PostgresOutbox(postgres_url, worker=True, lease=10, clock=clock) as adopter,
    ):
        accepted = await sealed(stalled, ["a"])
        await stalled.mark_submitting(accepted)
        await stalled.mark_submitted(accepted, "import-1")
        in_doubt = await sealed(stalled, ["b"])
        await stalled.mark_submitting(in_doubt)
        await stalled.enqueue("acme", ORDERS, [line("c")])
        lingering = await stalled.claim(QUEUE, budget_bytes=10**6)
        assert [r.record.key for r in lingering.rows] == ["c"]
        assert await adopter.adopt() == []  # the lease has not run out
        assert (await adopter.claim(QUEUE, budget_bytes=10**6)).rows == ()  # queue is taken
        now[0] += 11
        await adopter.heartbeat()
        adopted = {imp.ref: imp for imp in await adopter.adopt()}
        assert adopted[accepted].phase is ImportPhase.SUBMITTED
        assert adopted[accepted].import_id == "import-1"
        assert (adopted[in_doubt].phase, adopted[in_doubt].in_doubt) == (ImportPhase.SEALED, 1)
        assert await adopter.slots_in_use("acme") == 2  # the slots went with the imports
        before = state(postgres_url)
        for write in (
            stalled.mark_submitted(in_doubt, "import-2"),
            stalled.finish(accepted),
            stalled.seal(QUEUE, lingering.rows, b"body"),
            stalled.heartbeat(),
            stalled.claim(QUEUE, budget_bytes=10**6),
        ):
            with pytest.raises(FencedOut):
                await write
        assert state(postgres_url) == before
        await adopter.mark_submitting(in_doubt)  # sent again, with the same body
        assert await adopter.load_body(in_doubt) == b"body"
        assert (await adopter.finish(accepted)).imported == 1


async def test_a_stopped_worker_hands_its_imports_over(postgres_url: str) -> None:
    """Leaving the store releases its imports and queue locks; the next worker adopts them."""
    async with PostgresOutbox(postgres_url, worker=True) as first:
        ref = await sealed(first, ["a"])
        await first.enqueue("acme", ORDERS, [line("b")])
        await first.claim(QUEUE, budget_bytes=10**6)  # a lingering claim holds the queue
    async with PostgresOutbox(postgres_url, worker=True) as second:
        assert [imp.ref for imp in await second.recover()] == [ref]
        claim = await second.claim(QUEUE, budget_bytes=10**6)
        assert [r.record.key for r in claim.rows] == ["b"]


async def test_bodies_are_stored_without_the_slow_default_compression(postgres_url: str) -> None:
    """The body column uses lz4, or no compression where the server lacks it, never pglz."""
    async with PostgresOutbox(postgres_url):
        [(compression, storage)] = query(
            postgres_url,
            "SELECT attcompression::text, attstorage::text FROM pg_attribute"
            " WHERE attrelid = 'insight_import'::regclass AND attname = 'body'",
        )
    assert compression == "l" or storage == "e"


async def test_claims_come_in_columns_and_wait_for_another_workers_import(
    postgres_url: str,
) -> None:
    """A claim is a ClaimedRun; a key sealed by another worker holds its newer row back."""
    async with (
        PostgresOutbox(postgres_url, worker=True) as first,
        PostgresOutbox(postgres_url, worker=True) as second,
    ):
        assert (await second.claim(QUEUE, budget_bytes=10**6)).rows == ()
        await sealed(first, ["a", "b"])
        await second.enqueue("acme", ORDERS, [line(k) for k in ["a", "c", "a", "d"]])
        claim = await second.claim(QUEUE, budget_bytes=10**6)
        assert isinstance(claim.rows, ClaimedRun)
        assert [r.record.key for r in claim.rows] == ["c", "d"]
        assert (claim.held_back, claim.superseded) == (1, 1)
        held = await second.seal(QUEUE, claim.rows, b"body")
        assert held.identities == ('"c"', '"d"')


async def test_rows_of_an_open_transaction_wait_even_when_later_rows_committed(
    postgres_url: str,
) -> None:
    """A lower id still uncommitted holds later rows back, so it can never be imported last."""
    async with PostgresOutbox(postgres_url, worker=True) as store:
        with psycopg.connect(postgres_url) as slow:
            enqueue(slow, account="acme", collection=ORDERS, records=[line("a", "old")])
            await store.enqueue("acme", ORDERS, [line("a", "new")])
            assert (await store.claim(QUEUE, budget_bytes=10**6)).rows == ()
            assert await store.pending() == []
            slow.commit()
        claim = await store.claim(QUEUE, budget_bytes=10**6)
    assert [(r.row_id, orjson.loads(r.record.data)["json"]["v"]) for r in claim.rows] == [
        (2, "new")
    ]
    assert claim.superseded == 1


async def test_an_insert_wakes_a_waiting_worker(postgres_url: str) -> None:
    """LISTEN/NOTIFY: wait_for_rows returns on an insert, and after its time without one."""
    async with PostgresOutbox(postgres_url, worker=True) as store:
        assert not await store.wait_for_rows(0.2)
        async with anyio.create_task_group() as tg:

            async def insert() -> None:
                await anyio.sleep(0.3)
                query(
                    postgres_url,
                    "INSERT INTO insight_outbox (account, collection, record) VALUES (%s, %s, %s)",
                    ("acme", "Orders", line("a")),
                )

            tg.start_soon(insert)
            with anyio.fail_after(5):
                assert await store.wait_for_rows(10)


async def test_kill_9_of_a_worker_then_adoption_by_another(postgres_url: str) -> None:
    """A killed worker's imports are adopted after its lease, accepted or in doubt, slots kept."""
    script = textwrap.dedent(
        f"""
        import os, anyio
        from orchestrator.outbox import OutboxQueue
        from orchestrator.outbox.postgres import PostgresOutbox
        from orchestrator.records import Collection

        async def main():
            queue = OutboxQueue.of("acme", Collection("Orders"))
            async with PostgresOutbox({postgres_url!r}, worker=True, lease=1.0) as store:
                await store.enqueue("acme", Collection("Orders"), [{line("a")!r}, {line("b")!r}])
                first = await store.claim(queue, budget_bytes=40)
                one = await store.seal(queue, first.rows, b"body-one")
                await store.mark_submitting(one.ref)
                await store.mark_submitted(one.ref, "import-1")
                second = await store.claim(queue, budget_bytes=40)
                two = await store.seal(queue, second.rows, b"body-two")
                await store.mark_submitting(two.ref)
                os.kill(os.getpid(), 9)

        anyio.run(main)
        """
    )
    done = await anyio.run_process([sys.executable, "-c", script], check=False)
    assert done.returncode == -9, done.stderr.decode()
    async with PostgresOutbox(postgres_url, worker=True, lease=1.0) as adopter:
        assert await adopter.recover() == []  # its lease has not run out yet
        await anyio.sleep(1.2)
        one, two = await adopter.recover()
        assert (one.phase, one.import_id, one.in_doubt) == ("submitted", "import-1", 0)
        assert (two.phase, two.import_id, two.in_doubt, two.attempts) == ("sealed", None, 1, 1)
        assert await adopter.load_body(two.ref) == b"body-two"
        assert await adopter.slots_in_use("acme") == 2
        await adopter.mark_submitting(two.ref)
        await adopter.mark_submitted(two.ref, "import-2")
        for imp in (one, two):
            await adopter.finish(imp.ref)
        assert await adopter.slots_in_use("acme") == 0
    assert query(postgres_url, "SELECT count(*) FROM insight_worker") == [(0,)]


_CLAIMER = textwrap.dedent(
    """
    import sys, anyio, psycopg
    from orchestrator.outbox import ClaimConflict, OutboxQueue, SlotsFull
    from orchestrator.outbox.postgres import PostgresOutbox
    from orchestrator.records import Collection

    url, capacity = sys.argv[1], int(sys.argv[2])

    async def main():
        queues = [OutboxQueue.of("acme", Collection(name)) for name in ("Orders", "Carts")]
        idle = 0
        async with PostgresOutbox(url, worker=True, capacity=capacity) as store:
            log = await psycopg.AsyncConnection.connect(url, autocommit=True)
            while idle < 30:
                claimed = False
                for queue in queues:
                    claim = await store.claim(queue, budget_bytes=120)
                    if not claim.rows:
                        continue
                    try:
                        imp = await store.seal(queue, claim.rows, b"body")
                    except ClaimConflict:
                        continue
                    claimed = True
                    while True:
                        try:
                            await store.mark_submitting(imp.ref)
                            break
                        except SlotsFull:
                            await store.wait_for_slot("acme", max_wait=0.05)
                    await store.mark_submitted(imp.ref, f"import-{imp.ref}")
                    await anyio.sleep(0.01)
                    for row_id, identity in zip(imp.row_ids, imp.identities):
                        await log.execute(
                            "INSERT INTO test_log (collection, identity, row_id)"
                            " VALUES (%s, %s, %s)",
                            (queue.collection, identity, row_id),
                        )
                    await store.finish(imp.ref)
                idle = 0 if claimed else idle + 1
                if not claimed:
                    await anyio.sleep(0.02)
            await log.close()

    anyio.run(main)
    """
)


async def test_concurrent_workers_never_share_a_row_or_an_identity_nor_exceed_slots(
    postgres_url: str,
) -> None:
    """Three worker processes: rows imported once, identities never doubled, slots kept, LWW."""
    async with PostgresOutbox(postgres_url) as store:
        query(
            postgres_url,
            "CREATE TABLE test_log (seq bigserial, collection text, identity text, row_id bigint)",
        )
        last: dict[tuple[str, str], int] = {}
        rows = 0
        for round_ in range(6):
            for name in ("Orders", "Carts"):
                keys = [f"k{(round_ * 7 + i) % 11}" for i in range(15)]
                await store.enqueue("acme", Collection(name), [line(k, round_) for k in keys])
                for k in keys:
                    rows += 1
                    last[(name, orjson.dumps(k).decode())] = rows
        capacity = 2
        seen_slots: list[int] = []
        clashes: list[tuple[Any, ...]] = []
        processes = [
            await anyio.open_process(
                [sys.executable, "-c", _CLAIMER, postgres_url, str(capacity)],
                env={**os.environ},
            )
            for _ in range(3)
        ]
        while any(p.returncode is None for p in processes):
            seen_slots.append(int(query(postgres_url, "SELECT count(*) FROM insight_slot")[0][0]))
            clashes += query(
                postgres_url,
                "SELECT collection, identity FROM insight_outbox WHERE held_by IS NOT NULL"
                " GROUP BY 1, 2 HAVING count(DISTINCT held_by) > 1",
            )
            await anyio.sleep(0.01)
        for p in processes:
            assert await p.wait() == 0
        assert max(seen_slots) <= capacity
        assert clashes == []
        assert query(postgres_url, "SELECT count(*) FROM insight_outbox") == [(0,)]
        log = query(postgres_url, "SELECT collection, identity, row_id FROM test_log ORDER BY seq")
        imported = [row_id for _, _, row_id in log]
        assert len(imported) == len(set(imported))  # no row in two imports
        final = {(c, i): row_id for c, i, row_id in log}
        assert final == last
        assert len(imported) < rows  # superseded rows were deleted, not imported
        await store.ping()


# --------------------------------------------------------------------------- stateful model

REPLICAS = 3
CAPACITY = 2
LEASE = 10.0


class Replicas(RuleBasedStateMachine):
    """Three workers on one database, a shared clock, and every step they may take."""

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        server = postgres_server()
        self.schema = f"test_{uuid.uuid4().hex[:12]}"
        self.server = server
        query(server, f"CREATE SCHEMA {self.schema}")
        self.url = f"{server}{'&' if '?' in server else '?'}options=-csearch_path%3D{self.schema}"
        self.now = 1000.0
        self.stores: list[PostgresOutbox] = [self._open() for _ in range(REPLICAS)]
        self.enqueued = 0
        self.imported = 0
        self.dropped = 0  # superseded or dead-lettered
        self.fenced = 0

    def _open(self) -> PostgresOutbox:
        store = PostgresOutbox(
            self.url, worker=True, lease=LEASE, capacity=CAPACITY, clock=lambda: self.now
        )
        return self.runner.run(store.__aenter__())

    def _imports(self, replica: int) -> list[tuple[int, str]]:
        return [
            (ref, phase)
            for ref, phase in query(
                self.url,
                "SELECT id, phase FROM insight_import WHERE owner = %s ORDER BY id",
                (self.stores[replica].worker_id,),
            )
        ]

    def _write(self, replica: int, write: Any) -> None:
        """Run one write; a fenced-out one must change nothing, then the replica restarts."""
        before = state(self.url)
        try:
            self.runner.run(write)
        except FencedOut:
            assert state(self.url) == before
            self.fenced += 1
            old = self.stores[replica]
            self.runner.run(old.aclose())
            self.stores[replica] = self._open()
        except (SlotsFull, ClaimConflict):
            assert state(self.url) == before

    @rule(keys=st.lists(st.sampled_from(["a", "b", "c", "!bad"]), min_size=1, max_size=4))
    def enqueue(self, keys: list[str]) -> None:
        texts = ["{}" if k == "!bad" else line(k, self.enqueued + i) for i, k in enumerate(keys)]
        self.runner.run(self.stores[0].enqueue("acme", ORDERS, texts, check=False))
        self.enqueued += len(keys)

    @rule(replica=st.integers(0, REPLICAS - 1), budget=st.integers(20, 200))
    def claim_and_seal(self, replica: int, budget: int) -> None:
        store = self.stores[replica]

        async def step() -> None:
            claim = await store.claim(QUEUE, budget_bytes=budget)
            self.dropped += claim.superseded + claim.dead_lettered
            if claim.rows:
                await store.seal(QUEUE, claim.rows, b"body")

        self._write(replica, step())

    @rule(replica=st.integers(0, REPLICAS - 1), pick=st.integers(0, 5))
    def submit(self, replica: int, pick: int) -> None:
        mine = [ref for ref, phase in self._imports(replica) if phase != "submitting"]
        if mine:
            self._write(replica, self.stores[replica].mark_submitting(mine[pick % len(mine)]))

    @rule(replica=st.integers(0, REPLICAS - 1), pick=st.integers(0, 5))
    def accepted(self, replica: int, pick: int) -> None:
        mine = [ref for ref, phase in self._imports(replica) if phase == "submitting"]
        if mine:
            ref = mine[pick % len(mine)]
            self._write(replica, self.stores[replica].mark_submitted(ref, f"import-{ref}"))

    @rule(replica=st.integers(0, REPLICAS - 1), pick=st.integers(0, 5))
    def finish(self, replica: int, pick: int) -> None:
        mine = [ref for ref, phase in self._imports(replica) if phase == "submitted"]
        if mine:
            ref = mine[pick % len(mine)]
            rows = len(query(self.url, "SELECT id FROM insight_outbox WHERE held_by = %s", (ref,)))
            before = self.fenced
            self._write(replica, self.stores[replica].finish(ref))
            if self.fenced == before:
                self.imported += rows

    @rule(replica=st.integers(0, REPLICAS - 1))
    def heartbeat(self, replica: int) -> None:
        self._write(replica, self.stores[replica].heartbeat())

    @rule(replica=st.integers(0, REPLICAS - 1))
    def adopt(self, replica: int) -> None:
        self._write(replica, self.stores[replica].adopt())

    @rule(seconds=st.sampled_from([1.0, 4.0, 11.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @invariant()
    def slots_never_exceed_the_accounts_capacity(self) -> None:
        [(held,)] = query(self.url, "SELECT count(*) FROM insight_slot WHERE account = 'acme'")
        assert held <= CAPACITY

    @invariant()
    def each_import_has_one_live_owner_and_no_identity_is_in_two(self) -> None:
        orphans = query(
            self.url,
            "SELECT i.id FROM insight_import AS i LEFT JOIN insight_worker AS w"
            " ON w.id = i.owner AND w.fence = i.fence WHERE w.id IS NULL",
        )
        assert orphans == []
        clashes = query(
            self.url,
            "SELECT identity FROM insight_outbox WHERE held_by IS NOT NULL"
            " GROUP BY identity HAVING count(*) > 1",
        )
        assert clashes == []

    @invariant()
    def no_row_is_lost(self) -> None:
        [(left,)] = query(self.url, "SELECT count(*) FROM insight_outbox")
        assert left + self.imported + self.dropped == self.enqueued

    def teardown(self) -> None:
        for store in self.stores:
            self.runner.run(store.__aexit__(None, None, None))
        self.runner.close()
        query(self.server, f"DROP SCHEMA {self.schema} CASCADE")


@pytest.fixture
def _postgres_available() -> None:
    postgres_server()


@pytest.mark.usefixtures("_postgres_available")
def test_replicas_keep_slots_ownership_fences_and_rows_in_any_interleaving() -> None:
    """Any interleaving of three replicas' steps under a shared clock keeps every invariant."""
    run = Replicas.TestCase
    run.settings = settings(max_examples=15, stateful_step_count=25, deadline=None)
    run().runTest()
