"""The enqueue helper: rows written in the application's own sqlite3 transaction, checked first."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orchestrator.errors import ConfigError, RecordError
from orchestrator.outbox import OutboxError, OutboxQueue, SqliteOutbox, enqueue, migrate
from orchestrator.records import Collection, Scope

pytestmark = pytest.mark.anyio

ORDERS = Collection("Orders", Scope.CONTACT, "orders")
IDENTITY = {"identifier": "email", "value": "a@b.io"}


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """A database file with the application's table and the outbox tables."""
    path = tmp_path / "app.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE orders (id TEXT PRIMARY KEY, total REAL)")
    conn.close()
    conn = sqlite3.connect(path)
    migrate(conn)
    conn.close()
    return path


def outbox_rows(path: Path) -> list[tuple[object, ...]]:
    """What another connection sees in the outbox."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT account, collection, scope, collection_type, record FROM insight_outbox"
            " ORDER BY id"
        ).fetchall()
    conn.close()
    return rows


def test_rows_commit_with_the_callers_transaction(database: Path) -> None:
    """The rows appear for others only when the caller commits, with its own change."""
    conn = sqlite3.connect(database)
    conn.execute("INSERT INTO orders VALUES ('o-1', 3)")
    line = '{"key": "o-1", "json": {"total": 3}, "contactIdentity": {"identifier": "email", "value": "a@b.io"}}'  # noqa: E501
    written = enqueue(conn, account="acme", collection=ORDERS, records=[line])
    assert written == 1
    assert outbox_rows(database) == []  # not committed by the helper
    conn.commit()
    assert outbox_rows(database) == [("acme", "Orders", "contact", "orders", line)]
    conn.close()


def test_a_rolled_back_transaction_leaves_nothing(database: Path) -> None:
    """Rolling back the caller's transaction drops its order and its outbox rows alike."""
    conn = sqlite3.connect(database)
    conn.execute("INSERT INTO orders VALUES ('o-1', 3)")
    record = {"key": "o-1", "json": {}, "contactIdentity": IDENTITY}
    assert enqueue(conn, collection=ORDERS, records=[record]) == 1
    assert conn.in_transaction
    conn.rollback()
    conn.close()
    assert outbox_rows(database) == []
    with sqlite3.connect(database) as check:
        assert check.execute("SELECT count(*) FROM orders").fetchone() == (0,)
    check.close()


def test_a_bad_record_raises_its_rule_and_nothing_of_the_call_is_written(database: Path) -> None:
    """A record breaking a rule raises RecordError naming it; the good ones are not written."""
    conn = sqlite3.connect(database)
    good = {"key": "o-1", "json": {}, "contactIdentity": IDENTITY}
    with pytest.raises(RecordError) as raised:
        enqueue(conn, collection=ORDERS, records=[good, {"key": "o-2", "json": {}}])
    assert raised.value.rule == "contact-identity-missing"
    assert str(raised.value.source) == "<records>:2"
    with pytest.raises(RecordError, match="json-syntax"):
        enqueue(conn, collection=ORDERS, records=[b"{not json"])
    with pytest.raises(RecordError, match="json-syntax"):
        enqueue(conn, collection=ORDERS, records=["\ud800"])
    conn.commit()
    conn.close()
    assert outbox_rows(database) == []


def test_lines_are_stored_exactly_and_mappings_as_encoded(database: Path) -> None:
    """str and bytes keep their text (numbers as written); a mapping is stored as sent."""
    conn = sqlite3.connect(database)
    account_scope = Collection("Events")
    text = '{"key": "e-1", "json": {"n": 123456789012345678901, "f": 1.50}}'
    records: list[object] = [
        f"  {text}\n",
        text.replace("e-1", "e-2").encode() + b"\r\n",
        {"key": 3, "json": {"x": [1, 2]}},
    ]
    assert enqueue(conn, account="acme", collection=account_scope, records=records) == 3  # type: ignore[arg-type]
    conn.commit()
    conn.close()
    stored = [row[4] for row in outbox_rows(database)]
    assert stored == [text, text.replace("e-1", "e-2"), '{"key":"3","json":{"x":[1,2]}}']
    assert outbox_rows(database)[0][:4] == ("acme", "Events", "account", "custom")


def test_an_autocommit_connection_writes_the_call_in_one_transaction(database: Path) -> None:
    """With isolation_level=None the call's rows are committed together by the helper."""
    conn = sqlite3.connect(database, isolation_level=None)
    enqueue(conn, collection=Collection("Events"), records=['{"key": "a", "json": {}}'] * 3)
    assert not conn.in_transaction
    conn.close()
    assert len(outbox_rows(database)) == 3


def test_missing_tables_say_how_to_create_them(tmp_path: Path) -> None:
    """Without the outbox tables the error names `insight-import outbox init`."""
    conn = sqlite3.connect(tmp_path / "empty.sqlite")
    with pytest.raises(OutboxError, match="outbox init"):
        enqueue(conn, collection=Collection("Events"), records=['{"key": "a", "json": {}}'])
    conn.close()


def test_an_empty_account_is_a_config_error(database: Path) -> None:
    """The account must be a name."""
    conn = sqlite3.connect(database)
    with pytest.raises(ConfigError, match="account"):
        enqueue(conn, account=" ", collection=ORDERS, records=[])
    assert enqueue(conn, collection=ORDERS, records=[]) == 0
    conn.close()


async def test_the_worker_store_claims_what_the_helper_wrote(database: Path) -> None:
    """Rows from the helper are what the store claims, under the default account."""
    conn = sqlite3.connect(database)
    enqueue(
        conn, collection=ORDERS, records=[{"key": "o-1", "json": {}, "contactIdentity": IDENTITY}]
    )
    conn.commit()
    conn.close()
    async with SqliteOutbox(database) as store:
        claim = await store.claim(OutboxQueue.of("default", ORDERS), budget_bytes=10_000)
    assert [row.record.contact for row in claim.rows] == [("email", "a@b.io")]
