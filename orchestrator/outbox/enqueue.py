"""Writing records into the outbox from an application, inside the application's own transaction.

    with connection:  # the application's sqlite3 connection: its transaction, its commit
        connection.execute("UPDATE orders SET total = ? WHERE id = ?", (12.5, "o-1"))
        enqueue(connection, account="acme", collection=Collection("Orders"), records=[order])

On PostgreSQL, the same call takes the application's ``psycopg.Connection`` (its transaction,
its commit), and ``enqueue_async`` an ``psycopg.AsyncConnection``.

Each record is checked with the same rules as ``insight-import run`` before anything is written: a
record that breaks one raises ``RecordError`` naming the rule, and none of the call's records is
written. A line given as ``str`` or ``bytes`` is stored exactly as given (surrounding whitespace
aside), so its numbers reach the API as written; a mapping is stored as the JSON that
``encode_record`` makes of it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import anyio.to_thread

from orchestrator.errors import RecordError
from orchestrator.outbox import sqlite as sqlite_sql
from orchestrator.provenance import Source
from orchestrator.records import Collection, Scope, encode_line, encode_record

if TYPE_CHECKING:
    import psycopg

__all__ = ["enqueue", "enqueue_async", "record_texts"]

_PG_INSERT = (
    "INSERT INTO insight_outbox (account, collection, scope, collection_type, record) "
    "VALUES (%s, %s, %s, %s, %s)"
)
_PG_MISSING = (
    "the outbox tables are missing in this database: create them with "
    "insight-import outbox init (from Python: await orchestrator.outbox.postgres.migrate(conn) "
    "on an async connection)"
)

_ORIGIN = "<records>"
_JSON_SYNTAX = "the line is not valid UTF-8 JSON; each line must hold one complete JSON object"


async def stored_texts(
    account: str, collection: Collection, records: Sequence[object], *, check: bool
) -> list[str]:
    """The texts an outbox store's ``enqueue`` stores for ``records``: checked with the record
    rules off the event loop, or taken as they are when ``check`` is false (checked already).

    Raises:
        errors.ConfigError: ``account`` is not an account name.
        errors.RecordError: a record breaks a rule (with ``check``).
    """
    sqlite_sql.check_account(account)
    if check:
        return await anyio.to_thread.run_sync(record_texts, records, collection)
    return [r if isinstance(r, str) else bytes(cast(bytes, r)).decode() for r in records]


def record_texts(
    records: Iterable[object], collection: Collection, *, origin: str = _ORIGIN
) -> list[str]:
    """Check records with the record rules and return the text each one is stored as.

    Args:
        records: mappings, or JSON Lines lines as ``str`` or ``bytes``.
        collection: the collection they go to (its scope decides the rules).
        origin: the name errors give the records' source (``origin:position``).

    Raises:
        errors.RecordError: a record breaks a rule; ``rule`` says which, ``source`` where.
    """
    texts: list[str] = []
    append = texts.append
    for position, record in enumerate(records, start=1):
        source = Source(origin, position)
        if isinstance(record, str):
            text = record.strip()
            try:
                line = text.encode()
            except UnicodeEncodeError:  # a lone surrogate: not UTF-8
                raise RecordError("json-syntax", _JSON_SYNTAX, source=source) from None
            encode_line(line, collection, source=source)
            append(text)
        elif isinstance(record, (bytes, bytearray, memoryview)):
            line = bytes(record).strip()
            encode_line(line, collection, source=source)
            append(line.decode())  # orjson accepted it, so it is UTF-8
        else:
            append(encode_record(record, collection, source=source).data.decode())
    return texts


def enqueue(
    connection: sqlite3.Connection | psycopg.Connection[Any],
    *,
    collection: Collection,
    records: Iterable[Mapping[str, object] | str | bytes],
    account: str = "default",
) -> int:
    """Write records into ``insight_outbox`` in the caller's transaction; return how many.

    Nothing is committed: the rows become visible to the worker when the caller commits, and go
    away if it rolls back. On a connection in autocommit mode (``isolation_level=None`` for
    sqlite3, ``autocommit=True`` for psycopg) outside a transaction, the call's rows are written
    in one transaction of their own.

    Args:
        connection: the application's connection to the outbox database: ``sqlite3`` or a
            ``psycopg.Connection`` (PostgreSQL).
        collection: the collection the records go to; its scope and type are stored with them.
        records: mappings, or JSON Lines lines as ``str`` or ``bytes``.
        account: the account name from the worker's accounts file (``default`` without one).

    Raises:
        errors.RecordError: a record breaks a rule (nothing of this call is written).
        errors.ConfigError: ``account`` is empty.
        OutboxError: the outbox tables are missing (``insight-import outbox init`` makes them).
    """
    rows = _rows(account, collection, records)
    if not rows:
        return 0
    if not isinstance(connection, sqlite3.Connection):
        return _enqueue_psycopg(connection, rows)
    own_transaction = not connection.in_transaction and _autocommits(connection)
    try:
        if own_transaction:
            connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(sqlite_sql.INSERT_ROW, rows)
        except BaseException:
            if own_transaction and connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        if own_transaction:
            connection.execute("COMMIT")
    except sqlite3.OperationalError as error:
        raise sqlite_sql.explain_missing_tables(error) from error
    return len(rows)


async def enqueue_async(
    connection: psycopg.AsyncConnection[Any],
    *,
    collection: Collection,
    records: Iterable[Mapping[str, object] | str | bytes],
    account: str = "default",
) -> int:
    """``enqueue`` on the application's ``psycopg.AsyncConnection``, in its transaction.

    Args:
        connection: the application's async connection to the PostgreSQL outbox database.
        collection: the collection the records go to.
        records: mappings, or JSON Lines lines as ``str`` or ``bytes``.
        account: the account name (``default`` without an accounts file).

    Raises:
        errors.RecordError: a record breaks a rule (nothing of this call is written).
        errors.ConfigError: ``account`` is empty.
        OutboxError: the outbox tables are missing.
    """
    import psycopg

    rows = _rows(account, collection, records)
    if not rows:
        return 0
    try:
        if connection.autocommit:
            async with connection.transaction(), connection.cursor() as cursor:
                await cursor.executemany(_PG_INSERT, rows)
        else:
            async with connection.cursor() as cursor:
                await cursor.executemany(_PG_INSERT, rows)
    except psycopg.errors.UndefinedTable as error:
        from orchestrator.outbox.base import OutboxError

        raise OutboxError(_PG_MISSING) from error
    return len(rows)


def _rows(account: str, collection: Collection, records: Iterable[object]) -> list[tuple[str, ...]]:
    sqlite_sql.check_account(account)
    texts = record_texts(records, collection)
    queue = (account, collection.name, Scope(collection.scope).value, collection.type)
    return [(*queue, text) for text in texts]


def _enqueue_psycopg(connection: psycopg.Connection[Any], rows: list[tuple[str, ...]]) -> int:
    import psycopg

    try:
        if connection.autocommit:  # no transaction of the caller's: one of our own
            with connection.transaction(), connection.cursor() as cursor:
                cursor.executemany(_PG_INSERT, rows)
        else:  # inside (or opening) the caller's transaction; the caller commits
            with connection.cursor() as cursor:
                cursor.executemany(_PG_INSERT, rows)
    except psycopg.errors.UndefinedTable as error:
        from orchestrator.outbox.base import OutboxError

        raise OutboxError(_PG_MISSING) from error
    return len(rows)


def _autocommits(connection: sqlite3.Connection) -> bool:
    # Python 3.12's ``autocommit`` attribute wins when set; before it, isolation_level=None.
    mode = getattr(connection, "autocommit", -1)
    if mode is True:
        return True
    return mode == -1 and connection.isolation_level is None
