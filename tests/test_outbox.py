"""The outbox store on real SQLite files and a real PostgreSQL: migrations, claims, seals,
finishes, recovery (each store test runs on both backends)."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import sys
import tempfile
import textwrap
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from orchestrator.outbox import (
    SCHEMA_VERSION,
    ClaimConflict,
    ImportPart,
    ImportPhase,
    OutboxError,
    OutboxQueue,
    Rejection,
    SqliteOutbox,
    identity_text,
    migrate,
)
from orchestrator.outbox.sqlite import INSERT_ROW
from orchestrator.records import Collection, Scope

pytestmark = pytest.mark.anyio

ORDERS = Collection("Orders")
CONTACTS = Collection("Contacts", Scope.CONTACT, "orders")
QUEUE = OutboxQueue.of("acme", ORDERS)
QUEUE_VALUES = (QUEUE.account, QUEUE.collection, QUEUE.scope, QUEUE.collection_type)
CONTACT_QUEUE = OutboxQueue.of("acme", CONTACTS)


def line(key: str, value: object = 1, email: str | None = None) -> str:
    """One record as a JSON line (contact scope when an email is given)."""
    record: dict[str, object] = {"key": key, "json": {"v": value}}
    if email is not None:
        record["contactIdentity"] = {"identifier": "email", "value": email}
    return orjson.dumps(record).decode()


class Backend:
    """One outbox backend under test: opens stores on a fresh database, and reads and writes
    its tables directly (statements use ``?`` placeholders)."""

    def __init__(self, name: str, tmp_path: Path, postgres_url: str | None) -> None:
        self.name = name
        self.path = tmp_path / "outbox.sqlite"
        self.url = postgres_url or ""

    def store(self) -> Any:
        """A store, to open with ``async with`` (a registered worker on PostgreSQL)."""
        if self.name == "sqlite":
            return SqliteOutbox(self.path)
        from orchestrator.outbox.postgres import PostgresOutbox

        return PostgresOutbox(self.url, worker=True)

    def query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        """Rows of a statement, through a connection of its own."""
        if self.name == "sqlite":
            with sqlite3.connect(self.path) as conn:
                return conn.execute(sql, params).fetchall()
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []

    def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        """Run a statement once per row, in one transaction of its own."""
        if self.name == "sqlite":
            with sqlite3.connect(self.path) as conn:
                conn.executemany(sql, rows)
            return
        import psycopg

        with psycopg.connect(self.url) as conn, conn.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), rows)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend in turn, on a database of its own."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    return Backend(request.param, tmp_path, url)


def rows_of(path: Path, table: str = "insight_outbox") -> list[tuple[object, ...]]:
    """Every row of a table, read through a connection of its own."""
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


async def test_init_creates_the_tables_once_and_is_idempotent(tmp_path: Path) -> None:
    """Opening twice runs the migrations once; the schema version is recorded."""
    path = tmp_path / "db" / "outbox.sqlite"
    for _ in range(2):
        async with SqliteOutbox(path) as store:
            assert await store.schema_version() == SCHEMA_VERSION
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        assert conn.execute("SELECT count(*) FROM insight_schema").fetchone() == (1,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert {"insight_outbox", "insight_dead_letter", "insight_import", "insight_schema"} <= tables
    assert path.stat().st_mode & 0o777 == 0o600


async def test_a_database_of_a_newer_release_is_refused(tmp_path: Path) -> None:
    """A schema version above this release's says to upgrade."""
    path = tmp_path / "outbox.sqlite"
    async with SqliteOutbox(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE insight_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(OutboxError, match="newer than this release"):
        async with SqliteOutbox(path):
            pass


@contextlib.contextmanager
def at_schema(path: Path, version: int) -> Iterator[sqlite3.Connection]:
    """A connection to a new database with the outbox tables of schema ``version`` (as an
    earlier release made them), committed when the block ends."""
    from orchestrator.outbox.sqlite import _MIGRATIONS

    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE insight_schema (version INTEGER NOT NULL)")
        for statement in (s for statements in _MIGRATIONS[:version] for s in statements):
            conn.execute(statement)
        conn.execute("INSERT INTO insight_schema (version) VALUES (?)", (version,))
        yield conn


async def test_an_import_held_in_a_version_2_file_is_migrated_whole(tmp_path: Path) -> None:
    """A file of schema 2 (rows marked held, body in the import) keeps its import on upgrade."""
    path = tmp_path / "outbox.sqlite"
    with at_schema(path, 2) as conn:
        conn.executemany(INSERT_ROW, [(*QUEUE_VALUES, line(k)) for k in ("a", "b", "c")])
        conn.execute(
            "INSERT INTO insight_import (account, collection, scope, collection_type, phase,"
            " import_id, body_bytes, sealed_at, row_ids, ends, body) VALUES"
            " (?, ?, ?, ?, 'submitted', 'imp-1', 4, 0, ?, ?, x'626f6479')",
            (*QUEUE_VALUES, array("q", [1, 2]).tobytes(), array("q", [1, 3]).tobytes()),
        )
        conn.execute("UPDATE insight_outbox SET held_by = 1, identity = '\"a\"' WHERE id = 1")
        conn.execute("UPDATE insight_outbox SET held_by = 1, identity = '\"b\"' WHERE id = 2")
    async with SqliteOutbox(path) as store:
        assert await store.schema_version() == SCHEMA_VERSION
        (held,) = await store.recover()
        assert (held.import_id, held.row_ids, held.identities) == ("imp-1", (1, 2), ('"a"', '"b"'))
        assert await store.load_body(held.ref) == b"body"
        assert [r.row_id for r in (await store.claim(QUEUE, budget_bytes=10**6)).rows] == [3]
        assert (await store.finish(held.ref)).imported == 2
        assert [p.rows for p in await store.pending()] == [1]


def test_migrate_inside_the_callers_transaction_rolls_back_with_it(tmp_path: Path) -> None:
    """migrate() on an open transaction is part of it: a rollback leaves no table."""
    path = tmp_path / "app.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE orders (id TEXT)")
    conn.execute("INSERT INTO orders VALUES ('o-1')")  # opens the caller's transaction
    assert migrate(conn) == SCHEMA_VERSION
    conn.rollback()
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")]
    assert names == ["orders"]
    assert migrate(conn) == SCHEMA_VERSION  # outside a transaction: committed on its own
    conn.close()
    with sqlite3.connect(path) as other:
        version = other.execute("SELECT max(version) FROM insight_schema").fetchone()
        assert version == (SCHEMA_VERSION,)


async def test_the_contracts_insert_statement_works_with_defaults(backend: Backend) -> None:
    """An application's plain INSERT (as documented) is claimed with scope and type defaults."""
    async with backend.store() as store:
        backend.executemany(
            "INSERT INTO insight_outbox (account, collection, record) VALUES (?, ?, ?)",
            [("acme", "Orders", line("o-1"))],
        )
        [pending] = await store.pending()
        assert pending.queue == QUEUE
        assert pending.rows == 1
        assert 0.0 <= pending.oldest_age_s < 60
        claim = await store.claim(QUEUE, budget_bytes=1000)
    assert [row.record.key for row in claim.rows] == ["o-1"]
    assert str(claim.rows[0].record.source) == f"insight_outbox:{claim.rows[0].row_id}"


async def test_pending_lists_each_queue_oldest_first(backend: Backend) -> None:
    """Queues are listed by their oldest row; held rows are not pending."""
    async with backend.store() as store:
        await store.enqueue("beta", ORDERS, [line("b-1")])
        await store.enqueue("acme", CONTACTS, [line("c-1", email="a@b.io")])
        await store.enqueue("beta", ORDERS, [line("b-2")])
        pending = await store.pending()
        assert [(p.queue.account, p.queue.collection, p.rows) for p in pending] == [
            ("beta", "Orders", 2),
            ("acme", "Contacts", 1),
        ]
        assert pending[1].queue == CONTACT_QUEUE
        beta = OutboxQueue.of("beta", ORDERS)
        claim = await store.claim(beta, budget_bytes=10_000)
        await store.seal(beta, claim.rows, b"body")
        assert [p.queue for p in await store.pending()] == [CONTACT_QUEUE]


async def test_claim_takes_rows_in_id_order_up_to_the_budget(backend: Backend) -> None:
    """Records joined with commas fit the budget; `full` says some were left for later."""
    async with backend.store() as store:
        texts = [line(f"k{i}") for i in range(10)]
        await store.enqueue("acme", ORDERS, texts)
        size = len(texts[0])  # every line has the same length
        claim = await store.claim(QUEUE, budget_bytes=3 * size + 2)
        assert [r.record.key for r in claim.rows] == ["k0", "k1", "k2"]
        assert claim.records_bytes == 3 * size + 2
        assert claim.full
        assert (claim.superseded, claim.dead_lettered, claim.held_back) == (0, 0, 0)
        claim = await store.claim(QUEUE, budget_bytes=3 * size + 1)
        assert len(claim.rows) == 2
        everything = await store.claim(QUEUE, budget_bytes=10**6)
        assert len(everything.rows) == 10
        assert not everything.full


async def test_a_row_larger_than_the_budget_comes_alone(backend: Backend) -> None:
    """A record over the budget is returned by itself, so it never blocks its queue."""
    async with backend.store() as store:
        await store.enqueue("acme", ORDERS, [line("big", "x" * 500), line("small")])
        claim = await store.claim(QUEUE, budget_bytes=100)
        assert [r.record.key for r in claim.rows] == ["big"]
        assert claim.full


async def test_claim_deletes_rows_superseded_by_a_later_valid_row(backend: Backend) -> None:
    """Last write wins: earlier rows of an identity are deleted and counted; an invalid later
    row supersedes nothing and is dead-lettered."""
    async with backend.store() as store:
        await store.enqueue(
            "acme",
            ORDERS,
            [line("a", 1), line("b", 1), line("a", 2), line("a", 3), '{"key": "b", "json": 5}'],
            check=False,
        )
        claim = await store.claim(QUEUE, budget_bytes=10**6)
        assert [(r.row_id, r.record.key) for r in claim.rows] == [(2, "b"), (4, "a")]
        assert orjson.loads(claim.rows[1].record.data)["json"] == {"v": 3}
        assert (claim.superseded, claim.dead_lettered) == (2, 1)
        [letter] = await store.dead_letters()
        assert (letter.reason, letter.key, letter.source_id) == ("json-type", "b", 5)
        assert letter.record == '{"key": "b", "json": 5}'
    assert backend.query("SELECT id FROM insight_outbox ORDER BY id") == [(2,), (4,)]


async def test_contact_scope_identity_is_the_key_per_contact(backend: Backend) -> None:
    """The same key for two contacts is two records; for the same contact, one."""
    async with backend.store() as store:
        await store.enqueue(
            "acme",
            CONTACTS,
            [line("k", 1, "a@b.io"), line("k", 2, "c@d.io"), line("k", 3, "a@b.io")],
        )
        claim = await store.claim(CONTACT_QUEUE, budget_bytes=10**6)
        assert [r.row_id for r in claim.rows] == [2, 3]
        assert claim.superseded == 1
        assert claim.rows[1].identity == identity_text("k", ("email", "a@b.io"))


async def test_rows_of_an_identity_in_flight_wait_for_its_import(backend: Backend) -> None:
    """A row whose identity is in an import in flight is held back until that import ends."""
    async with backend.store() as store:
        await store.enqueue("acme", ORDERS, [line("a", 1), line("b", 1)])
        first = await store.claim(QUEUE, budget_bytes=10**6)
        sealed = await store.seal(QUEUE, first.rows, b"body-1")
        await store.enqueue("acme", ORDERS, [line("a", 2), line("c", 1), line("a", 3)])
        second = await store.claim(QUEUE, budget_bytes=10**6)
        assert [r.record.key for r in second.rows] == ["c"]
        assert (second.held_back, second.superseded) == (1, 1)  # a=2 superseded by a=3
        await store.seal(QUEUE, second.rows, b"body-2")
        await store.mark_submitting(sealed.ref)
        await store.mark_submitted(sealed.ref, "import-1")
        finished = await store.finish(sealed.ref)
        assert (finished.imported, finished.dead_lettered) == (2, 0)
        third = await store.claim(QUEUE, budget_bytes=10**6)
        assert [(r.record.key, orjson.loads(r.record.data)["json"]["v"]) for r in third.rows] == [
            ("a", 3)
        ]
        assert third.held_back == 0


async def test_seal_holds_the_rows_and_refuses_rows_no_longer_pending(backend: Backend) -> None:
    """Sealed rows leave the pending set; sealing a taken row writes nothing."""
    async with backend.store() as store:
        await store.enqueue("acme", ORDERS, [line("a"), line("b")])
        claim = await store.claim(QUEUE, budget_bytes=10**6)
        sealed = await store.seal(QUEUE, claim.rows[:1], b"body", ends=[10], depends_on=[7])
        assert sealed.phase is ImportPhase.SEALED
        assert (sealed.row_ids, sealed.ends, sealed.depends_on) == ((1,), (10,), (7,))
        assert [r.row_id for r in (await store.claim(QUEUE, budget_bytes=10**6)).rows] == [2]
        with pytest.raises(ClaimConflict, match="1 of the 2 rows"):
            await store.seal(QUEUE, claim.rows, b"body-again")
        assert [imp.ref for imp in await store.recover()] == [sealed.ref]
        assert await store.load_body(sealed.ref) == b"body"
    holder = (
        "(SELECT ref FROM insight_held WHERE row_id = o.id)"
        if backend.name == "sqlite"
        else "held_by"
    )
    held = dict(backend.query(f"SELECT id, {holder} FROM insight_outbox AS o ORDER BY id"))
    assert held == {1: sealed.ref, 2: None}


@pytest.mark.parametrize("json", [True, False])
async def test_a_seal_holds_every_row_with_or_without_sqlites_json_functions(
    tmp_path: Path, json: bool
) -> None:
    """Rows are held in one statement through ``json_each``, or one by one on a SQLite built
    without it; either way a row held already refuses the seal."""
    path = tmp_path / "outbox.sqlite"
    async with SqliteOutbox(path) as store:
        store._json = json
        await store.enqueue("acme", ORDERS, [line(f"k{i}") for i in range(300)])
        claim = await store.claim(QUEUE, budget_bytes=10**6)
        sealed = await store.seal(QUEUE, claim.rows[:250], b"body")
        with pytest.raises(ClaimConflict, match="1 of the 51 rows"):
            await store.seal(QUEUE, claim.rows[249:], b"again")
    assert rows_of_table(path, "insight_held") == [(i, sealed.ref) for i in range(1, 251)]


async def test_phases_move_forward_only(backend: Backend) -> None:
    """submitting needs sealed (or submitted, to resubmit); submitted needs submitting."""
    async with backend.store() as store:
        await store.enqueue("acme", ORDERS, [line("a")])
        claim = await store.claim(QUEUE, budget_bytes=10**6)
        ref = (await store.seal(QUEUE, claim.rows, b"body")).ref
        with pytest.raises(OutboxError, match="is sealed, not submitting"):
            await store.mark_submitted(ref, "import-1")
        await store.mark_submitting(ref)
        await store.mark_submitted(ref, "import-1")
        await store.mark_submitting(ref)  # a resubmit of a Failed import
        await store.mark_submitted(ref, "import-2")
        [stored] = await store.recover()
        assert (stored.phase, stored.import_id, stored.attempts) == ("submitted", "import-2", 2)
        await store.finish(ref)
        with pytest.raises(OutboxError, match="not held"):
            await store.mark_submitting(ref)
        with pytest.raises(OutboxError, match="not held"):
            await store.finish(ref)


async def test_finish_dead_letters_api_failures_with_the_record_text(backend: Backend) -> None:
    """Rejected rows become dead letters holding the record as enqueued; the rest are deleted."""
    exact = '{"key": "a",  "json": {"big": 123456789012345678901234567890, "f": 1.10}}'
    async with backend.store() as store:
        await store.enqueue("acme", ORDERS, [exact, line("b"), line("c")])
        claim = await store.claim(QUEUE, budget_bytes=10**6)
        ref = (await store.seal(QUEUE, claim.rows, b"body")).ref
        await store.mark_submitting(ref)
        await store.mark_submitted(ref, "import-9")
        [stored] = await store.recover()
        row_of = stored.row_of()
        failure = Rejection("JsonValueTooLong", "a value is too long", ("field big",))
        finished = await store.finish(ref, failures={row_of[identity_text("a", None)]: failure})
        assert (finished.imported, finished.dead_lettered) == (2, 1)
        [letter] = await store.dead_letters()
        assert letter.record == exact
        assert (letter.reason, letter.details, letter.key) == (
            "JsonValueTooLong",
            ("field big",),
            "a",
        )
        assert (letter.import_id, letter.source_id, letter.queue) == ("import-9", 1, QUEUE)
        assert b'"record":' + exact.encode() + b"}" in letter.to_json()
        assert await store.recover() == []
    assert backend.query("SELECT id FROM insight_outbox") == []


async def test_finish_with_reject_all_dead_letters_every_row(backend: Backend) -> None:
    """An import that failed as a whole dead-letters all its rows with one reason."""
    async with backend.store() as store:
        await store.enqueue("acme", ORDERS, [line("a"), line("b")])
        claim = await store.claim(QUEUE, budget_bytes=10**6)
        ref = (await store.seal(QUEUE, claim.rows, b"body")).ref
        finished = await store.finish(
            ref,
            failures={1: Rejection("InvalidJson", "bad")},
            reject_all=Rejection("import-failed", "the import failed 3 times"),
        )
        assert (finished.imported, finished.dead_lettered) == (0, 2)
        reasons = [letter.reason for letter in await store.dead_letters()]
        assert reasons == ["InvalidJson", "import-failed"]


async def test_recover_after_kill_9_finds_submits_in_doubt(tmp_path: Path) -> None:
    """A process killed after the intent leaves the import SEALED and in doubt, same body."""
    path = tmp_path / "outbox.sqlite"
    script = textwrap.dedent(
        f"""
        import os, anyio
        from orchestrator.outbox import OutboxQueue, SqliteOutbox
        from orchestrator.records import Collection

        async def main():
            queue = OutboxQueue.of("acme", Collection("Orders"))
            async with SqliteOutbox({str(path)!r}, exclusive=True) as store:
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
    async with SqliteOutbox(path, exclusive=True) as store:  # the dead process left no lock
        one, two = await store.recover()
        assert (one.phase, one.import_id, one.in_doubt) == ("submitted", "import-1", 0)
        assert (two.phase, two.import_id, two.in_doubt, two.attempts) == ("sealed", None, 1, 1)
        assert (one.row_ids, two.row_ids) == ((1,), (2,))
        assert two.identities == (identity_text("b", None),)
        assert await store.load_body(two.ref) == b"body-two"
        again = await store.recover()
        assert [imp.in_doubt for imp in again] == [0, 1]  # counted once


def body_files(path: Path) -> list[bytes]:
    """The contents of the SQLite store's body files, sorted."""
    directory = path.with_name(path.name + ".bodies")
    return sorted(f.read_bytes() for f in directory.iterdir()) if directory.exists() else []


async def test_bodies_are_files_beside_the_database_until_their_import_ends(
    tmp_path: Path,
) -> None:
    """A sealed body is a file, not rows of the database; a seal refused, a split and a finish
    leave no file behind; the worker's store removes the empty directory when it closes."""
    path = tmp_path / "outbox.sqlite"
    async with SqliteOutbox(path, exclusive=True) as store:
        await store.enqueue("acme", ORDERS, [line("a"), line("b"), line("c")])
        claim = await store.claim(QUEUE, budget_bytes=10**6)
        one = await store.seal(QUEUE, claim.rows[:2], b"body-one")
        with pytest.raises(ClaimConflict):
            await store.seal(QUEUE, claim.rows, b"refused")
        two = await store.seal(QUEUE, claim.rows[2:], b"body-two")
        assert body_files(path) == [b"body-one", b"body-two"]
        assert rows_of_table(path, "insight_body") == []
        assert await store.load_body(one.ref) == b"body-one"
        halves = [ImportPart((1,), b"half-1", (3,)), ImportPart((2,), b"half-2", (3,))]
        first, second = await store.split(one.ref, halves)
        assert body_files(path) == [b"body-two", b"half-1", b"half-2"]
        for ref in (first.ref, second.ref, two.ref):
            await store.finish(ref)
        assert body_files(path) == []
    assert not path.with_name("outbox.sqlite.bodies").exists()


def rows_of_table(path: Path, table: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT * FROM {table}").fetchall()


async def test_the_worker_store_removes_body_files_no_import_names(tmp_path: Path) -> None:
    """A file left by a seal that never committed (or a crash before an unlink) goes when the
    worker's store opens; a store opened beside a worker (the CLI) leaves every file alone."""
    path = tmp_path / "outbox.sqlite"
    async with SqliteOutbox(path, exclusive=True) as store:
        await store.enqueue("acme", ORDERS, [line("a")])
        sealed = await store.seal(
            QUEUE, (await store.claim(QUEUE, budget_bytes=10**6)).rows, b"kept"
        )
    stray = path.with_name("outbox.sqlite.bodies") / "0123456789abcdef.body"
    stray.write_bytes(b"never committed")
    async with SqliteOutbox(path) as store:
        assert await store.load_body(sealed.ref) == b"kept"
    assert stray.exists()
    async with SqliteOutbox(path, exclusive=True) as store:
        assert await store.load_body(sealed.ref) == b"kept"
        assert body_files(path) == [b"kept"]


async def test_a_body_an_earlier_release_kept_in_the_database_is_still_sent(
    tmp_path: Path,
) -> None:
    """An import sealed with its body in ``insight_body`` (schema 3) loads it from there and
    drops it when it ends."""
    path = tmp_path / "outbox.sqlite"
    with at_schema(path, 3) as conn:
        conn.executemany(INSERT_ROW, [(*QUEUE_VALUES, line("a"))])
        conn.execute(
            "INSERT INTO insight_import (account, collection, scope, collection_type, phase,"
            " body_bytes, sealed_at, row_ids, ends, body, identities) VALUES"
            " (?, ?, ?, ?, 'sealed', 8, 0, ?, ?, x'', ?)",
            (
                *QUEUE_VALUES,
                array("q", [1]).tobytes(),
                array("q", [7]).tobytes(),
                orjson.dumps([identity_text("a", None)]).decode(),
            ),
        )
        conn.execute("INSERT INTO insight_held (row_id, ref) VALUES (1, 1)")
        conn.execute("INSERT INTO insight_body (ref, body) VALUES (1, x'6f6c642d626f6479')")
    async with SqliteOutbox(path, exclusive=True) as store:
        (held,) = await store.recover()
        assert await store.load_body(held.ref) == b"old-body"
        assert (await store.finish(held.ref)).imported == 1
    assert rows_of_table(path, "insight_body") == []
    assert body_files(path) == []


async def test_a_second_worker_on_the_same_file_is_refused(tmp_path: Path) -> None:
    """exclusive=True holds the worker lock; other users of the file need none."""
    path = tmp_path / "outbox.sqlite"
    async with SqliteOutbox(path, exclusive=True):
        with pytest.raises(OutboxError, match="another worker"):
            async with SqliteOutbox(path, exclusive=True):
                pass
        async with SqliteOutbox(path) as other:
            await other.ping()


async def test_rows_of_an_invalid_collection_are_dead_lettered(backend: Backend) -> None:
    """A scope or type the API refuses sends every row of its queue to the dead letters."""
    async with backend.store() as store:
        backend.executemany(
            "INSERT INTO insight_outbox (account, collection, scope, record) "
            "VALUES ('acme', 'Orders', 'everyone', ?)",
            [(line("a"),), ("not json",)],
        )
        queue = OutboxQueue("acme", "Orders", "everyone")
        claim = await store.claim(queue, budget_bytes=10**6)
        assert (claim.rows, claim.dead_lettered) == ((), 2)
        letters = await store.dead_letters()
        assert [(d.reason, d.key, d.record) for d in letters] == [
            ("collection-invalid", "a", line("a")),
            ("collection-invalid", None, "not json"),
        ]
        assert "everyone" in letters[0].message


async def test_dead_letter_rows_moves_pending_rows_only(backend: Backend) -> None:
    """Rows the worker rejects (too large for a body) move; held rows are skipped."""
    async with backend.store() as store:
        await store.enqueue("acme", ORDERS, [line("a"), '{"key": 7, "json": {}}', line("c")])
        claim = await store.claim(QUEUE, budget_bytes=10**6)
        await store.seal(QUEUE, claim.rows[2:], b"body")
        too_large = Rejection("record-too-large", "over the body limit")
        moved = await store.dead_letter_rows({2: too_large, 3: too_large})
        assert moved == 1
        [letter] = await store.dead_letters()
        assert (letter.key, letter.source_id, letter.record) == ("7", 2, '{"key": 7, "json": {}}')
        assert [r.row_id for r in (await store.claim(QUEUE, budget_bytes=10**6)).rows] == [1]


async def test_dead_letters_filter_page_and_requeue_in_order(backend: Backend) -> None:
    """Listing filters by account and collection and pages by id; requeue keeps the order."""
    async with backend.store() as store:
        await store.enqueue("acme", ORDERS, ['{"n": 1}', '{"n": 2}'], check=False)
        await store.enqueue("beta", ORDERS, ['{"n": 3}'], check=False)
        await store.enqueue("acme", CONTACTS, ['{"n": 4}'], check=False)
        for queue in (QUEUE, OutboxQueue.of("beta", ORDERS), CONTACT_QUEUE):
            await store.claim(queue, budget_bytes=10**6)
        assert len(await store.dead_letters()) == 4
        acme = await store.dead_letters(account="acme")
        assert [d.record for d in acme] == ['{"n": 1}', '{"n": 2}', '{"n": 4}']
        orders = await store.dead_letters(account="acme", collection="Orders", limit=1)
        assert [d.record for d in orders] == ['{"n": 1}']
        page = await store.dead_letters(account="acme", after=orders[0].id)
        assert [d.record for d in page] == ['{"n": 2}', '{"n": 4}']
        assert await store.requeue([acme[2].id, acme[0].id, 999]) == 2
        assert [d.record for d in await store.dead_letters()] == ['{"n": 2}', '{"n": 3}']
        back = backend.query(
            "SELECT collection, scope, collection_type, record FROM insight_outbox ORDER BY id"
        )
        assert back == [
            ("Orders", "account", "custom", '{"n": 1}'),
            ("Contacts", "contact", "orders", '{"n": 4}'),
        ]


async def test_a_store_that_is_not_open_says_so(tmp_path: Path) -> None:
    """Calls before `async with` raise a clear RuntimeError."""
    store = SqliteOutbox(tmp_path / "outbox.sqlite")
    with pytest.raises(RuntimeError, match="not open"):
        await store.pending()


async def test_an_unwritable_database_is_an_outbox_error(tmp_path: Path) -> None:
    """A path that cannot be created names the database and the fix."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutboxError, match="cannot open it"):
        async with SqliteOutbox(blocker / "outbox.sqlite"):
            pass


# --------------------------------------------------------------------------- invariant

_KEYS = ["a", "b"]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("enqueue"), st.lists(st.sampled_from([*_KEYS, "!bad"]), max_size=6)),
        st.tuples(st.just("claim"), st.integers(min_value=1, max_value=200)),
        st.tuples(st.just("finish"), st.integers(min_value=0, max_value=3)),
    ),
    max_size=25,
)


@given(steps=steps, seed=st.integers(0, 2**16))
@example(  # an older version in flight, a newer one sealed after it, the newer finishing first
    steps=[("enqueue", ["a"]), ("claim", 99), ("enqueue", ["a"]), ("claim", 99), ("finish", 1)],
    seed=0,
)
@settings(max_examples=100, deadline=None)
def test_the_last_valid_row_of_each_key_is_what_the_collection_holds(
    steps: list[tuple[str, object]], seed: int
) -> None:
    """Any mix of enqueues, claims and out-of-order finishes: every row ends imported,
    superseded or dead-lettered, and each key's last valid row is imported last."""
    shuffle = random.Random(seed)
    with tempfile.TemporaryDirectory() as folder:
        anyio.run(_drive, Path(folder) / "outbox.sqlite", steps, shuffle)


async def _drive(path: Path, steps: list[tuple[str, object]], shuffle: random.Random) -> None:
    collection: dict[str, int] = {}  # key -> row id of the version imported last
    last_valid: dict[str, int] = {}
    enqueued = imported = superseded = dead = 0
    in_flight: list[int] = []
    async with SqliteOutbox(path) as store:

        async def finish(index: int) -> None:
            nonlocal imported
            ref = in_flight.pop(index % len(in_flight))
            [stored] = [imp for imp in await store.recover() if imp.ref == ref]
            for row_id, identity in zip(stored.row_ids, stored.identities, strict=True):
                collection[orjson.loads(identity)] = row_id
            imported += (await store.finish(ref)).imported

        async def claim(budget: int) -> None:
            nonlocal superseded, dead
            found = await store.claim(QUEUE, budget_bytes=budget)
            superseded += found.superseded
            dead += found.dead_lettered
            if found.rows:
                in_flight.append((await store.seal(QUEUE, found.rows, b"body")).ref)

        for action, value in steps:
            if action == "enqueue":
                assert isinstance(value, list)
                texts = ["{}" if key == "!bad" else line(key, enqueued + i) for i, key in
                         enumerate(value)]  # fmt: skip
                await store.enqueue("acme", ORDERS, texts, check=False)
                for offset, key in enumerate(value):
                    if key != "!bad":
                        last_valid[key] = enqueued + offset + 1
                enqueued += len(value)
            elif action == "claim":
                assert isinstance(value, int)
                await claim(value)
            elif in_flight:
                assert isinstance(value, int)
                await finish(value)
        while in_flight or await store.pending():  # drain
            if in_flight:
                await finish(shuffle.randrange(len(in_flight)))
            else:
                await claim(10**6)
    assert collection == last_valid
    assert imported + superseded + dead == enqueued


async def test_a_claim_encodes_rows_exactly_as_one_line_each_would_be(tmp_path: Path) -> None:
    """Rows checked a page at a time give what encode_line gives each: data, key, rule."""
    from orchestrator.errors import RecordError
    from orchestrator.provenance import Source
    from orchestrator.records import encode_line

    path = tmp_path / "outbox.sqlite"
    orders = Collection("Orders", Scope.ACCOUNT, "custom")
    texts = [
        '{"key": "a", "json": {"n": 1}}',
        '{\n  "key": "b",\n  "json": {"n": 2}\n}',  # pretty-printed: more than one line
        "   ",
        '{"key": 7, "json": {}}',
        '{"key": "c", "json": [1]}',
        '{"key": "d", "json": {"big": 123456789012345678901234567890}}',
        '{"key": "e", "json": {"x": "\\ud800"}}',  # an escaped lone surrogate
        "not json",
    ]
    async with SqliteOutbox(path) as store:
        with sqlite3.connect(path) as conn:
            conn.executemany(
                "INSERT INTO insight_outbox (account, collection, record)"
                " VALUES ('acme', 'Orders', ?)",
                [(t,) for t in texts],
            )
        claim = await store.claim(OutboxQueue.of("acme", orders), budget_bytes=10_000)
        letters = {letter.source_id: letter for letter in await store.dead_letters()}
    claimed = {row.row_id: row.record for row in claim.rows}
    for row_id, text in enumerate(texts, start=1):
        rule = None
        try:
            expected = encode_line(text.encode(), orders, source=Source("insight_outbox", row_id))
        except RecordError as error:
            rule = error.rule
        if rule is not None:
            assert letters[row_id].reason == rule, text
        else:
            assert claimed[row_id] == expected, text
    assert len(claimed) + len(letters) == len(texts)


async def test_refused_resubmitted_and_split_imports_keep_their_rows(backend: Backend) -> None:
    """A refused submit is sealed again; a resubmit counts and clears the id; a split replaces
    the import by its parts (same rows, each held once) in one step, on every backend."""
    async with backend.store() as store:
        await store.enqueue("acme", ORDERS, [line(f"s{i}") for i in range(4)])
        claim = await store.claim(QUEUE, budget_bytes=10_000)
        row_ids = tuple(row.row_id for row in claim.rows)
        sealed = await store.seal(QUEUE, claim.rows, b"body")
        await store.mark_submitting(sealed.ref)
        await store.mark_refused(sealed.ref)
        await store.mark_submitting(sealed.ref)
        await store.mark_submitted(sealed.ref, "imp-1")
        await store.mark_resubmit(sealed.ref)
        (again,) = await store.recover()
        assert (again.phase, again.import_id, again.resubmits) == (ImportPhase.SEALED, None, 1)
        halves = [
            ImportPart(row_ids[:2], b"first", (3, 5)),
            ImportPart(row_ids[2:], b"second", (3, 6)),
        ]
        parts = await store.split(sealed.ref, halves)
        assert [part.row_ids for part in parts] == [row_ids[:2], row_ids[2:]]
        assert [await store.load_body(part.ref) for part in parts] == [b"first", b"second"]
        assert sorted(i.ref for i in await store.recover()) == sorted(p.ref for p in parts)
        with pytest.raises(OutboxError):
            await store.load_body(sealed.ref)
        for part in parts:
            await store.mark_submitting(part.ref)
            await store.mark_submitted(part.ref, f"imp-{part.ref}")
            finished = await store.finish(part.ref)
            assert finished.imported == 2
    assert backend.query("SELECT count(*) FROM insight_outbox") == [(0,)]
