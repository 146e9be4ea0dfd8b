"""Where the outbox lives: a ``--database`` URL (or ``INSIGHT_IMPORT_DATABASE``), and the store
that reads it (``open_outbox``): a SQLite file, or a PostgreSQL database that several workers share.

A URL is never echoed whole in messages: a PostgreSQL URL may carry a password.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import platformdirs

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.outbox.base import OutboxStore

__all__ = [
    "DATABASE_ENV",
    "Database",
    "database_path",
    "default_database",
    "open_outbox",
    "parse_database",
]

DATABASE_ENV = "INSIGHT_IMPORT_DATABASE"
"""The environment variable that gives the database URL when none is passed."""

_SQLITE = "sqlite://"
_POSTGRESQL = ("postgresql://", "postgres://")


def default_database() -> Path:
    """The embedded default: ``outbox.sqlite`` in the user's state directory."""
    state = Path(platformdirs.user_state_dir("insight-orchestrator", appauthor=False))
    return state / "outbox.sqlite"


def database_path(url: str | None = None, *, environ: Mapping[str, str] = os.environ) -> Path:
    """The SQLite file a database URL names.

    Args:
        url: ``sqlite:///ABSOLUTE/PATH``; when ``None`` or empty, ``INSIGHT_IMPORT_DATABASE`` from
            ``environ``, else ``default_database()``.
        environ: where to read ``INSIGHT_IMPORT_DATABASE``.

    Raises:
        errors.ConfigError: the URL is not a SQLite URL with an absolute path (a PostgreSQL
            URL included: ``parse_database`` reads both).
    """
    database = parse_database(url, environ=environ)
    if database.path is None:
        raise ConfigError(
            f"{database.where} is a PostgreSQL database; this needs a SQLite file: "
            "sqlite:///ABSOLUTE/PATH"
        )
    return database.path


@dataclass(frozen=True, slots=True)
class Database:
    """A database URL, read: a SQLite file or a PostgreSQL connection.

    Args:
        path: the SQLite file, or ``None`` for PostgreSQL.
        conninfo: the PostgreSQL URL as given (it may hold a password: never show it).
    """

    path: Path | None = None
    conninfo: str = ""

    def __repr__(self) -> str:
        return f"Database({self.where!r})"

    @property
    def where(self) -> str:
        """The database as it may be shown: the SQLite path, or the PostgreSQL URL without its
        password."""
        if self.path is not None:
            return str(self.path)
        return _redacted(self.conninfo)

    @property
    def shared(self) -> bool:
        """Several workers may share it (PostgreSQL)."""
        return self.path is None


def parse_database(url: str | None = None, *, environ: Mapping[str, str] = os.environ) -> Database:
    """Read a database URL: ``sqlite:///ABSOLUTE/PATH`` or ``postgresql://USER@HOST:PORT/DB``.

    Args:
        url: the URL; when ``None`` or empty, ``INSIGHT_IMPORT_DATABASE`` from ``environ``, else
            ``default_database()``.
        environ: where to read ``INSIGHT_IMPORT_DATABASE``.

    Raises:
        errors.ConfigError: the URL is neither (its text is not echoed: it may hold a password).
    """
    given = url or environ.get(DATABASE_ENV) or ""
    if not given:
        return Database(path=default_database())
    if given.startswith(_POSTGRESQL):
        return Database(conninfo=given)
    if not given.startswith(_SQLITE):
        # not echoed: a URL of another database may carry a password
        raise ConfigError(
            "the database URL is not one this release reads: use sqlite:///ABSOLUTE/PATH "
            "(e.g. sqlite:///var/lib/myapp/outbox.sqlite) or postgresql://USER@HOST:PORT/DB"
        )
    path = unquote(given[len(_SQLITE) :].split("?", 1)[0])
    if not path.startswith("/"):
        raise ConfigError(
            f"database URL {given!r}: the path must be absolute, as in sqlite:///var/lib/outbox.sqlite"
            " (three slashes, then the path)"
        )
    return Database(path=Path(path))


def open_outbox(
    database: Database | str | None = None, *, worker: bool = False, **options: Any
) -> OutboxStore:
    """The outbox store of a database, to open with ``async with``.

    Args:
        database: a ``Database`` or a URL (``None``: ``INSIGHT_IMPORT_DATABASE``, else the
            default SQLite file).
        worker: open it for a worker: on SQLite, hold the one-worker lock; on PostgreSQL,
            register the worker (leases, fencing).
        options: keyword options of the backend (``PostgresOutbox``'s ``lease``, ``capacity``,
            ``name``...; ``SqliteOutbox``'s ``busy_timeout``).

    Raises:
        errors.ConfigError: the URL is not one this release reads, or PostgreSQL is asked for
            without its extra installed.
    """
    if not isinstance(database, Database):
        database = parse_database(database)
    if database.path is not None:
        from orchestrator.outbox.sqlite import SqliteOutbox

        return SqliteOutbox(database.path, exclusive=worker, **options)
    try:
        from orchestrator.outbox.postgres import PostgresOutbox
    except ImportError:
        raise ConfigError(
            "a PostgreSQL outbox needs psycopg: pip install 'insight-orchestrator[postgres]'"
        ) from None
    return PostgresOutbox(database.conninfo, worker=worker, **options)


def _redacted(conninfo: str) -> str:
    try:
        from orchestrator.outbox.postgres import redacted
    except ImportError:
        return "a PostgreSQL database"
    return redacted(conninfo)
