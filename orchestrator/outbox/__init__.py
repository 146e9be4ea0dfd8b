"""The outbox: records an application writes in its own transaction, drained by the worker.

``enqueue(connection, collection=..., records=...)`` writes rows into ``insight_outbox`` on the
application's own ``sqlite3`` connection; ``SqliteOutbox`` is the store the worker drains them
through (its interface is ``OutboxStore``, documented in ``orchestrator.outbox.base``);
``open_outbox(url)`` opens the store a ``--database`` URL names (``PostgresOutbox`` from
``orchestrator.outbox.postgres`` for PostgreSQL, with the ``postgres`` extra installed).
"""

from __future__ import annotations

from orchestrator.outbox.base import (
    RECORD_ORIGIN,
    Claim,
    ClaimConflict,
    ClaimedRow,
    ClaimedRun,
    FencedOut,
    Finished,
    ImportPart,
    ImportPhase,
    OutboxError,
    OutboxQueue,
    OutboxStore,
    Pending,
    Rejection,
    SharedOutboxStore,
    SlotsFull,
    StoredDeadLetter,
    StoredImport,
    identity_text,
)
from orchestrator.outbox.database import (
    DATABASE_ENV,
    Database,
    database_path,
    default_database,
    open_outbox,
    parse_database,
)
from orchestrator.outbox.enqueue import enqueue, enqueue_async, record_texts
from orchestrator.outbox.sqlite import SCHEMA_VERSION, SqliteOutbox, migrate

__all__ = [
    "DATABASE_ENV",
    "RECORD_ORIGIN",
    "SCHEMA_VERSION",
    "Claim",
    "ClaimConflict",
    "ClaimedRow",
    "ClaimedRun",
    "Database",
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
    "SqliteOutbox",
    "StoredDeadLetter",
    "StoredImport",
    "database_path",
    "default_database",
    "enqueue",
    "enqueue_async",
    "identity_text",
    "migrate",
    "open_outbox",
    "parse_database",
    "record_texts",
]
