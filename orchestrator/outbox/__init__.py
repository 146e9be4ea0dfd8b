"""The outbox: records an application writes in its own transaction, drained by the worker.

``enqueue(connection, collection=..., records=...)`` writes rows into ``insight_outbox`` on the
application's own ``sqlite3`` connection; ``SqliteOutbox`` is the store the worker drains them
through (its interface is ``OutboxStore``, documented in ``orchestrator.outbox.base``);
``database_path`` reads a ``--database`` URL.
"""

from __future__ import annotations

from orchestrator.outbox.base import (
    RECORD_ORIGIN,
    Claim,
    ClaimConflict,
    ClaimedRow,
    Finished,
    ImportPart,
    ImportPhase,
    OutboxError,
    OutboxQueue,
    OutboxStore,
    Pending,
    Rejection,
    StoredDeadLetter,
    StoredImport,
    identity_text,
)
from orchestrator.outbox.database import DATABASE_ENV, database_path, default_database
from orchestrator.outbox.enqueue import enqueue, record_texts
from orchestrator.outbox.sqlite import SCHEMA_VERSION, SqliteOutbox, migrate

__all__ = [
    "DATABASE_ENV",
    "RECORD_ORIGIN",
    "SCHEMA_VERSION",
    "Claim",
    "ClaimConflict",
    "ClaimedRow",
    "Finished",
    "ImportPart",
    "ImportPhase",
    "OutboxError",
    "OutboxQueue",
    "OutboxStore",
    "Pending",
    "Rejection",
    "SqliteOutbox",
    "StoredDeadLetter",
    "StoredImport",
    "database_path",
    "default_database",
    "enqueue",
    "identity_text",
    "migrate",
    "record_texts",
]
