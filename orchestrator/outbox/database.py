"""Where the outbox lives: a ``--database`` URL (or ``INSIGHT_IMPORT_DATABASE``) as a path."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote

import platformdirs

from orchestrator.errors import ConfigError

__all__ = ["DATABASE_ENV", "database_path", "default_database"]

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
        errors.ConfigError: the URL is not a SQLite URL with an absolute path, or names
            PostgreSQL (not available in this release).
    """
    given = url or environ.get(DATABASE_ENV) or ""
    if not given:
        return default_database()
    if given.startswith(_POSTGRESQL):
        raise ConfigError(
            "PostgreSQL is not available yet in this release: use a SQLite database, "
            "sqlite:///ABSOLUTE/PATH (one worker at a time)"
        )
    if not given.startswith(_SQLITE):
        # not echoed: a URL of another database may carry a password
        raise ConfigError(
            "the database URL is not one this release reads: use sqlite:///ABSOLUTE/PATH, "
            "e.g. sqlite:///var/lib/myapp/outbox.sqlite"
        )
    path = unquote(given[len(_SQLITE) :].split("?", 1)[0])
    if not path.startswith("/"):
        raise ConfigError(
            f"database URL {given!r}: the path must be absolute, as in sqlite:///var/lib/outbox.sqlite"
            " (three slashes, then the path)"
        )
    return Path(path)
