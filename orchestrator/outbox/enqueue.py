"""Writing records into the outbox from an application, inside the application's own transaction.

    with connection:  # the application's sqlite3 connection: its transaction, its commit
        connection.execute("UPDATE orders SET total = ? WHERE id = ?", (12.5, "o-1"))
        enqueue(connection, account="acme", collection=Collection("Orders"), records=[order])

Each record is checked with the same rules as ``insight-import run`` before anything is written: a
record that breaks one raises ``RecordError`` naming the rule, and none of the call's records is
written. A line given as ``str`` or ``bytes`` is stored exactly as given (surrounding whitespace
aside), so its numbers reach the API as written; a mapping is stored as the JSON that
``encode_record`` makes of it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping

from orchestrator.errors import RecordError
from orchestrator.outbox import sqlite as sqlite_sql
from orchestrator.provenance import Source
from orchestrator.records import Collection, Scope, encode_line, encode_record

__all__ = ["enqueue", "record_texts"]

_ORIGIN = "<records>"
_JSON_SYNTAX = "the line is not valid UTF-8 JSON; each line must hold one complete JSON object"


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
    connection: sqlite3.Connection,
    *,
    collection: Collection,
    records: Iterable[Mapping[str, object] | str | bytes],
    account: str = "default",
) -> int:
    """Write records into ``insight_outbox`` in the caller's transaction; return how many.

    Nothing is committed: the rows become visible to the worker when the caller commits, and go
    away if it rolls back. On a connection in autocommit mode (``isolation_level=None``) outside
    a transaction, the call's rows are written in one transaction of their own.

    Args:
        connection: the application's connection to the outbox database.
        collection: the collection the records go to; its scope and type are stored with them.
        records: mappings, or JSON Lines lines as ``str`` or ``bytes``.
        account: the account name from the worker's accounts file (``default`` without one).

    Raises:
        errors.RecordError: a record breaks a rule (nothing of this call is written).
        errors.ConfigError: ``account`` is empty.
        OutboxError: the outbox tables are missing (``insight-import outbox init`` makes them).
    """
    sqlite_sql.check_account(account)
    texts = record_texts(records, collection)
    if not texts:
        return 0
    queue = (account, collection.name, Scope(collection.scope).value, collection.type)
    rows = [(*queue, text) for text in texts]
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


def _autocommits(connection: sqlite3.Connection) -> bool:
    # Python 3.12's ``autocommit`` attribute wins when set; before it, isolation_level=None.
    mode = getattr(connection, "autocommit", -1)
    if mode is True:
        return True
    return mode == -1 and connection.isolation_level is None
