"""What the poll planner learned about an account's imports, kept between runs of the command.

A run learns how long the account's imports take (``polling.PollPlanner``). Before it has, it
probes for each import's end with growing gaps from ``poll_min``: five imports of two minutes
make about 20 status calls in their first minute at the API's 5 s minimum, and every import of
the first wave ends up to a gap before it is seen. A command run from cron every few minutes
would pay that at each run. So ``insight-import run`` keeps its planner's history in a small
file beside its journal, one per account (``polls-<digest>.json``; default journals share the
state directory, so every command of an account does), and the next run starts from it: its
first imports are aimed, not probed for.

The file holds numbers only (record counts and durations, and when they were saved): no
credentials, no record contents. It is a hint, so a missing, unreadable or malformed file is an
empty history, and a history older than ``MAX_AGE`` is not used (the API's speed changes).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import orjson

from orchestrator.logs import get_logger

__all__ = ["MAX_AGE", "history_path", "load_history", "save_history"]

log = get_logger("orchestrator.poll_history")

#: A history saved longer ago than this (seconds) is not used.
MAX_AGE = 7 * 24 * 3600.0
_VERSION = 1

History = list[tuple[int, float]]


def history_path(directory: Path, *, api_root: str, username: str) -> Path:
    """The history file of one account (API root and user) in ``directory``."""
    digest = hashlib.sha256(f"{api_root}\n{username}".encode()).hexdigest()[:12]
    return directory / f"polls-{digest}.json"


def load_history(path: Path, *, now: float | None = None) -> History:
    """The ``(records, seconds)`` pairs saved at ``path``; empty if there are none to use."""
    try:
        saved = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, orjson.JSONDecodeError) as error:
        log.debug("poll_history.unreadable", path=str(path), error=type(error).__name__)
        return []
    try:
        if saved["version"] != _VERSION:
            return []
        age = (time.time() if now is None else now) - float(saved["saved_at"])
        if not 0.0 <= age <= MAX_AGE:
            return []
        return [(int(records), float(seconds)) for records, seconds in saved["imports"]]
    except (KeyError, TypeError, ValueError):
        log.debug("poll_history.malformed", path=str(path))
        return []


def save_history(path: Path, history: History, *, now: float | None = None) -> None:
    """Replace the history at ``path`` (atomically: a reader sees the old file or the new one).

    Raises:
        OSError: the file could not be written (the caller logs it; the run is not affected).
    """
    saved = {
        "version": _VERSION,
        "saved_at": time.time() if now is None else now,
        "imports": [[records, seconds] for records, seconds in history],
    }
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(orjson.dumps(saved))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
