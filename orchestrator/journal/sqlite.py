"""The durable journal: one SQLite file per run, every state change one fsync'd transaction.

The file is in WAL mode with ``synchronous=FULL``, so a committed change survives a crash of the
process and a loss of power; only poll counts are written without an fsync (they become durable
with the next commit). All SQLite calls run on a worker thread, one at a time, never on the event
loop. An exclusive ``flock`` on ``<journal>.lock`` keeps a second process out while the journal is
open; the kernel drops it when the process dies, so a kill -9 never leaves a stale lock.

Request bodies live in files of their own, in ``<journal>.bodies/`` beside the journal: stored in
SQLite, a 50 MB body took 0.7-1.0 s to write (4 KB pages, ~70 MB/s) and 0.5-0.7 s to delete
(SQLite walks its overflow chain page by page); as a file it takes 0.1 s to write and fsync and
30 ms to unlink. A body file is written and fsync'd (and its directory entry with it) before the
transaction that names it commits, so a committed batch always has its body; it is unlinked after
the transaction that drops the batch. A crash between the two leaves a file no row names: opening
the journal removes those. Journals of schema 2 and older kept bodies in the ``payloads`` table;
they are read from there until their batches end (new bodies go to files).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.to_thread
import orjson

from orchestrator.body_files import BodyFiles
from orchestrator.errors import JournalError, JournalMismatchError, JournalStateError
from orchestrator.journal.base import (
    SUBMITS_IN_DOUBT,
    BatchPhase,
    DeadLetter,
    InputProgress,
    NewBatch,
    RecordedRun,
    RunSpec,
    RunState,
    SealOne,
    StoredBatch,
    check_phase,
    mismatch_message,
    progress_list,
    redirected,
)
from orchestrator.logs import get_logger
from orchestrator.refs import RecordRef, RecordRefs, RefColumns

__all__ = ["SqliteJournal"]

_log = get_logger("orchestrator.journal")

_T = TypeVar("_T")

_SCHEMA_VERSION = 3
# What each older schema needs to become the current one.
_MIGRATIONS = {
    1: ("ALTER TABLE batches ADD COLUMN submits INTEGER NOT NULL DEFAULT 0",),
    # bodies move to files: a row names its file; older rows keep theirs in ``body``
    2: ("ALTER TABLE payloads ADD COLUMN body_file TEXT",),
}
_BLOB_CHUNK = 1 << 20
_APPLICATION_ID = 0x494E5349  # "INSI": marks the file as one of our journals

_SCHEMA = """
CREATE TABLE run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    spec BLOB NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE inputs (
    idx INTEGER PRIMARY KEY,
    lines INTEGER NOT NULL,
    digest TEXT NOT NULL,
    done INTEGER NOT NULL
);
CREATE TABLE batches (
    batch_id INTEGER PRIMARY KEY AUTOINCREMENT,
    phase TEXT NOT NULL,
    import_id TEXT,
    record_count INTEGER NOT NULL,
    body_bytes INTEGER NOT NULL,
    depends_on BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    resubmits INTEGER NOT NULL DEFAULT 0,
    in_doubt INTEGER NOT NULL DEFAULT 0,
    polls INTEGER NOT NULL DEFAULT 0,
    submitted_at REAL,
    finished_at REAL,
    status TEXT,
    imported INTEGER,
    submits INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX batches_unfinished ON batches (phase) WHERE phase != 'finished';
CREATE TABLE payloads (
    batch_id INTEGER PRIMARY KEY,
    refs BLOB NOT NULL,
    body BLOB NOT NULL,
    body_file TEXT
);
CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT,
    key TEXT,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    details BLOB NOT NULL,
    import_id TEXT,
    record BLOB
);
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
"""

_BATCH_COLUMNS = (
    "batch_id, phase, import_id, record_count, body_bytes, depends_on, attempts, resubmits, "
    "in_doubt, polls, submitted_at, finished_at, status, imported, submits"
)
_UNFINISHED = (BatchPhase.SEALED, BatchPhase.SUBMITTING, BatchPhase.SUBMITTED)

_IN_USE = "another process is using the journal: let it finish or use another journal file"
# What to do about a failure, by SQLite's primary result code.
_ADVICE = {
    "SQLITE_FULL": "the disk is full: free some space, then run the same command again to resume",
    "SQLITE_READONLY": "the journal is read-only: fix its permissions or use another journal file",
    "SQLITE_CANTOPEN": (
        "the journal cannot be opened: check that it and its directory are writable, "
        "or use another journal file"
    ),
    "SQLITE_PERM": "permission denied: fix the journal's permissions or use another journal file",
    "SQLITE_BUSY": _IN_USE,
    "SQLITE_LOCKED": _IN_USE,
    "SQLITE_CORRUPT": "the journal file is damaged: move it away or use another journal file",
    "SQLITE_NOTADB": "the file is not a journal: move it away or use another journal file",
    "SQLITE_IOERR": "the disk failed a read or write: check it, then run the same command again",
}
_DEFAULT_ADVICE = "check the journal file and its disk, then run the same command again to resume"


class SqliteJournal(SealOne):
    """The durable journal of one run, in a SQLite file (WAL mode, fsync'd commits).

    The file and its parent directories are created when missing (the file with mode 0600: bodies
    hold customer data). While open, the journal holds an exclusive lock on ``<path>.lock``; a
    second process opening it gets ``JournalError``. Usable as an async context manager, which
    connects on entry and closes on exit; ``open`` connects on its own otherwise.

    Args:
        path: the journal file.
        busy_timeout: seconds SQLite waits for a lock held by another reader of the file.
    """

    keeps_bodies = False  # bodies are written into the file and read back as new objects

    def __init__(self, path: str | Path, *, busy_timeout: float = 2.0) -> None:
        self._path = Path(path).expanduser()
        self._bodies = BodyFiles(self._path.with_name(self._path.name + ".bodies"))
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._spec: RunSpec | None = None
        self._limiter: anyio.CapacityLimiter | None = None

    def __repr__(self) -> str:
        return f"SqliteJournal({str(self._path)!r})"

    @property
    def path(self) -> Path:
        """The journal file."""
        return self._path

    async def __aenter__(self) -> Self:
        await self._ensure_connected()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(
        self, spec: RunSpec, *, fresh: bool = False, start_after: Sequence[InputProgress] = ()
    ) -> RunState:
        """Open the run ``spec``; see ``Journal.open``."""
        starts = progress_list(spec, start_after) if fresh else ()
        connected_here = await self._ensure_connected()
        try:
            state, in_doubt = await self._run(
                lambda conn: self._transaction(
                    conn, lambda: self._open_sync(conn, spec, fresh, starts)
                ),
                "open the run",
            )
            await self._run(self._sweep_bodies, "remove the bodies of dropped batches")
        except BaseException:
            if connected_here:
                await self.close()
            raise
        self._spec = spec
        _log.info(
            "journal.opened",
            path=str(self._path),
            fresh=state.fresh,
            complete=state.complete,
            unfinished=len(state.unfinished),
            submits_in_doubt=in_doubt,
        )
        return state

    async def recorded(self) -> RecordedRun | None:
        """Return the run held, or ``None``; see ``Journal.recorded``."""
        await self._ensure_connected()

        def read(conn: sqlite3.Connection) -> RecordedRun | None:
            row = conn.execute("SELECT spec, complete FROM run").fetchone()
            if row is None:
                return None
            return RecordedRun(
                spec=_decode_spec(row[0]), complete=bool(row[1]), inputs=_inputs(conn)
            )

        return await self._run(read, "read the run")

    async def seal_batches(
        self,
        *,
        batches: Sequence[NewBatch],
        progress: InputProgress | Sequence[InputProgress] | None,
        dead_letters: Sequence[DeadLetter],
        counters: Mapping[str, int],
    ) -> list[int]:
        """Store sealed batches in one transaction; see ``Journal.seal_batches``."""
        progresses = progress_list(self._require_spec(), progress)
        # Copies taken on the loop: the caller may reuse its lists while the thread writes.
        frozen = [
            (len(b.body), _packed(b.refs), tuple(b.depends_on), b.submitting) for b in batches
        ]
        letters = tuple(dead_letters)
        deltas = dict(counters)
        files = await self._store_bodies([b.body for b in batches])

        def write(conn: sqlite3.Connection) -> list[int]:
            ids = [
                _insert_batch(conn, file, size, refs, deps, submitting=submitting)
                for file, (size, refs, deps, submitting) in zip(files, frozen, strict=True)
            ]
            _apply(conn, progresses, letters, deltas)
            return ids

        return await self._write_naming(files, write, "seal a batch")

    async def save_progress(
        self,
        *,
        progress: InputProgress | Sequence[InputProgress] | None,
        dead_letters: Sequence[DeadLetter],
        counters: Mapping[str, int],
    ) -> None:
        """Record progress, dead letters and counter deltas in one transaction.

        See ``Journal.save_progress``.
        """
        progresses = progress_list(self._require_spec(), progress)
        letters = tuple(dead_letters)
        deltas = dict(counters)
        await self._write(lambda conn: _apply(conn, progresses, letters, deltas), "save progress")

    async def add_counters(self, counters: Mapping[str, int]) -> None:
        """Add deltas to the run's counters, in one transaction (see ``Journal.add_counters``)."""
        deltas = dict(counters)
        await self._write(lambda conn: _add_counters(conn, deltas), "add to the counters")

    async def mark_submitting(self, batch_id: int) -> StoredBatch:
        """Write the intent to PUT a batch; see ``Journal.mark_submitting``."""

        def write(conn: sqlite3.Connection) -> StoredBatch:
            _check(conn, batch_id, (BatchPhase.SEALED, BatchPhase.SUBMITTING), "mark it submitting")
            conn.execute(
                "UPDATE batches SET phase = ?, submits = submits + 1 WHERE batch_id = ?",
                (BatchPhase.SUBMITTING.value, batch_id),
            )
            return _stored(conn, batch_id)

        return await self._write(write, f"mark batch {batch_id} submitting")

    async def mark_refused(self, batch_id: int, *, calls: int) -> StoredBatch:
        """Record a refused submit; see ``Journal.mark_refused``."""

        def write(conn: sqlite3.Connection) -> StoredBatch:
            _check(conn, batch_id, (BatchPhase.SUBMITTING,), "mark it refused")
            conn.execute(
                "UPDATE batches SET phase = ?, attempts = attempts + ? WHERE batch_id = ?",
                (BatchPhase.SEALED.value, calls, batch_id),
            )
            return _stored(conn, batch_id)

        return await self._write(write, f"mark batch {batch_id} refused")

    async def mark_submitted(
        self, batch_id: int, import_id: str, submitted_at: float, *, calls: int = 1
    ) -> StoredBatch:
        """Record a batch's import id; see ``Journal.mark_submitted``."""

        def write(conn: sqlite3.Connection) -> StoredBatch:
            _check(conn, batch_id, (BatchPhase.SUBMITTING,), "mark it submitted")
            conn.execute(
                "UPDATE batches SET phase = ?, import_id = ?, submitted_at = ?, "
                "attempts = attempts + ? WHERE batch_id = ?",
                (BatchPhase.SUBMITTED.value, import_id, submitted_at, calls, batch_id),
            )
            return _stored(conn, batch_id)

        return await self._write(write, f"mark batch {batch_id} submitted")

    async def mark_polled(self, batch_id: int, *, calls: int = 1) -> StoredBatch:
        """Count a batch's status requests without an fsync; the next commit makes it durable.

        See ``Journal.mark_polled``.
        """

        def write(conn: sqlite3.Connection) -> StoredBatch:
            _check(conn, batch_id, tuple(BatchPhase), "record its polls")
            conn.execute(
                "UPDATE batches SET polls = polls + ? WHERE batch_id = ?", (calls, batch_id)
            )
            return _stored(conn, batch_id)

        def cheap(conn: sqlite3.Connection) -> StoredBatch:
            # Under WAL, NORMAL skips the fsync of this commit; losing a poll count is harmless.
            conn.execute("PRAGMA synchronous = NORMAL")
            try:
                return self._transaction(conn, lambda: write(conn))
            finally:
                conn.execute("PRAGMA synchronous = FULL")

        self._require_spec()
        return await self._run(cheap, f"record the polls of batch {batch_id}")

    async def mark_resubmit(self, batch_id: int) -> StoredBatch:
        """Put a failed batch back to SEALED; see ``Journal.mark_resubmit``."""

        def write(conn: sqlite3.Connection) -> StoredBatch:
            _check(conn, batch_id, _UNFINISHED, "resubmit it")
            conn.execute(
                "UPDATE batches SET phase = ?, import_id = NULL, resubmits = resubmits + 1 "
                "WHERE batch_id = ?",
                (BatchPhase.SEALED.value, batch_id),
            )
            return _stored(conn, batch_id)

        return await self._write(write, f"mark batch {batch_id} for resubmission")

    async def split_batch(self, batch_id: int, halves: Sequence[NewBatch]) -> list[int]:
        """Replace a batch by smaller ones in one transaction; see ``Journal.split_batch``."""
        frozen = [(len(b.body), _packed(b.refs)) for b in halves]
        files = await self._store_bodies([b.body for b in halves])
        dropped: list[str] = []

        def write(conn: sqlite3.Connection) -> list[int]:
            _check(conn, batch_id, _UNFINISHED, "split it")
            ids = [
                _insert_batch(conn, file, size, refs, ())
                for file, (size, refs) in zip(files, frozen, strict=True)
            ]
            conn.execute(
                "UPDATE batches SET phase = ?, status = 'split' WHERE batch_id = ?",
                (BatchPhase.FINISHED.value, batch_id),
            )
            dropped.extend(_drop_payload(conn, batch_id))
            for dependent in _batches(conn, "phase != 'finished'"):
                if batch_id in dependent.depends_on:
                    conn.execute(
                        "UPDATE batches SET depends_on = ? WHERE batch_id = ?",
                        (
                            orjson.dumps(redirected(dependent.depends_on, batch_id, ids)),
                            dependent.batch_id,
                        ),
                    )
            return ids

        ids = await self._write_naming(files, write, f"split batch {batch_id}")
        await self._unlink_bodies(dropped)
        return ids

    async def mark_finished(
        self,
        batch_id: int,
        *,
        status: str,
        imported: int,
        dead_letters: Sequence[DeadLetter],
        finished_at: float,
        counters: Mapping[str, int],
    ) -> StoredBatch:
        """Finish a batch in one transaction, dropping its body and refs.

        See ``Journal.mark_finished``.
        """
        letters = tuple(dead_letters)
        deltas = dict(counters)
        dropped: list[str] = []

        def write(conn: sqlite3.Connection) -> StoredBatch:
            _check(conn, batch_id, _UNFINISHED, "finish it")
            conn.execute(
                "UPDATE batches SET phase = ?, status = ?, imported = ?, finished_at = ? "
                "WHERE batch_id = ?",
                (BatchPhase.FINISHED.value, status, imported, finished_at, batch_id),
            )
            dropped.extend(_drop_payload(conn, batch_id))
            _apply(conn, (), letters, deltas)
            return _stored(conn, batch_id)

        stored = await self._write(write, f"finish batch {batch_id}")
        await self._unlink_bodies(dropped)
        return stored

    async def load_body(self, batch_id: int) -> bytes | bytearray:
        """Return the stored body of an unfinished batch (see ``Journal.load_body``)."""
        what = f"load the body of batch {batch_id}"
        file = await self._read(lambda conn: _body_file(conn, batch_id), what)
        if file is None:  # kept in the table by an older version
            return await self._read(lambda conn: _read_blob(conn, batch_id), what)
        # Read outside the journal's thread: other batches' transactions go on meanwhile.
        try:
            return await anyio.to_thread.run_sync(self._bodies.read, file)
        except OSError as exc:
            raise JournalError(
                f"journal {self._path}: cannot {what}: {exc.strerror or exc} ({file}); "
                f"{_DEFAULT_ADVICE}"
            ) from exc

    async def load_refs(self, batch_id: int) -> RecordRefs:
        """Return the record refs of an unfinished batch; see ``Journal.load_refs``."""
        return await self._read(
            lambda conn: _decode_refs(_payload(conn, batch_id, "refs", "load its refs")),
            f"load the refs of batch {batch_id}",
        )

    async def mark_complete(self) -> None:
        """Mark the run complete, then give the space of dropped bodies back to the disk."""
        await self._write(lambda conn: conn.execute("UPDATE run SET complete = 1"), "complete")
        await self._run(self._vacuum, "reclaim space")
        # not there, or a body file someone else left in it: kept
        await anyio.to_thread.run_sync(self._bodies.remove_directory)

    async def dead_letters(self) -> list[DeadLetter]:
        """Return every dead letter of the run, in insertion order."""

        def read(conn: sqlite3.Connection) -> list[DeadLetter]:
            rows = conn.execute(
                "SELECT source, key, reason, message, details, import_id, record "
                "FROM dead_letters ORDER BY id"
            )
            return [
                DeadLetter(
                    source=source,
                    key=key,
                    reason=reason,
                    message=message,
                    details=tuple(orjson.loads(details)),
                    import_id=import_id,
                    record=None if record is None else bytes(record),
                )
                for source, key, reason, message, details, import_id, record in rows
            ]

        return await self._read(read, "read the dead letters")

    async def batches(self) -> list[StoredBatch]:
        """Return every batch of the run, in ``batch_id`` order."""
        return await self._read(
            lambda conn: _batches(conn, "1 = 1"),
            "read the batches",
        )

    async def counters(self) -> dict[str, int]:
        """Return the run's counters."""
        return await self._read(_counters, "read the counters")

    async def close(self) -> None:
        """Close the file and release the lock; safe to call twice."""
        if self._conn is None and self._lock_fd is None:
            return
        # Shielded: a cancelled caller must still release the lock and the file.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close_sync, limiter=self._limiter)
        self._spec = None
        _log.debug("journal.closed", path=str(self._path))

    # -- body files -------------------------------------------------------------------------

    async def _store_bodies(self, bodies: Sequence[bytes | bytearray]) -> list[str]:
        """Write each body to a new file, durably, outside the journal's thread; their names."""
        if not bodies:
            return []
        self._require_spec()
        try:
            return await anyio.to_thread.run_sync(self._bodies.store, bodies)
        except OSError as exc:
            advice = _ADVICE["SQLITE_FULL"] if exc.errno == errno.ENOSPC else _DEFAULT_ADVICE
            raise JournalError(
                f"journal {self._path}: cannot store a body in {self._bodies.directory}: "
                f"{exc.strerror or exc}; {advice}"
            ) from exc

    async def _write_naming(
        self, files: list[str], fn: Callable[[sqlite3.Connection], _T], what: str
    ) -> _T:
        """``_write`` of a transaction that names new body files: they go if it fails."""
        try:
            return await self._write(fn, what)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._unlink_bodies(files)
            raise

    async def _unlink_bodies(self, files: list[str]) -> None:
        if files:
            # A file left behind (an error, a crash) is removed at the next open.
            await anyio.to_thread.run_sync(self._bodies.unlink, files)

    def _sweep_bodies(self, conn: sqlite3.Connection) -> None:
        """Remove body files no batch names: written for a seal that never committed, or kept
        by a crash between a batch's end and the file's unlink."""
        self._bodies.sweep(
            {
                row[0]
                for row in conn.execute(
                    "SELECT body_file FROM payloads WHERE body_file IS NOT NULL"
                )
            }
        )

    # -- plumbing ---------------------------------------------------------------------------

    async def _ensure_connected(self) -> bool:
        if self._conn is not None:
            return False
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)
        try:
            await anyio.to_thread.run_sync(self._connect_sync, limiter=self._limiter)
        except BaseException:
            await self.close()  # cancelled while connecting: the thread finished, drop the lock
            raise
        return True

    def _require_spec(self) -> RunSpec:
        if self._spec is None or self._conn is None:
            raise JournalStateError("the journal is not open: call open() first")
        return self._spec

    async def _run(self, fn: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        """Run ``fn`` on the worker thread; SQLite and OS errors become ``JournalError``."""
        conn = self._conn
        if conn is None:
            raise JournalStateError("the journal is not open: call open() first")

        def call() -> _T:
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                raise JournalError(self._explain(what, exc)) from exc

        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    async def _write(self, fn: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        self._require_spec()
        return await self._run(lambda conn: self._transaction(conn, lambda: fn(conn)), what)

    async def _read(self, fn: Callable[[sqlite3.Connection], _T], what: str) -> _T:
        self._require_spec()
        return await self._run(fn, what)

    @staticmethod
    def _transaction(conn: sqlite3.Connection, body: Callable[[], _T]) -> _T:
        # IMMEDIATE takes the write lock up front, so a transaction never fails half-way on it.
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                # SQLite rolls back by itself when it cannot; the first error is the one to report.
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        return result

    def _explain(self, what: str, exc: sqlite3.Error) -> str:
        name = getattr(exc, "sqlite_errorname", "") or ""
        advice = next(
            (text for code, text in _ADVICE.items() if name == code or name.startswith(code + "_")),
            _DEFAULT_ADVICE,
        )
        return f"journal {self._path}: cannot {what}: {exc}; {advice}"

    def _connect_sync(self) -> None:
        lock_path = self._path.with_name(self._path.name + ".lock")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = _lock(lock_path)
        except BlockingIOError:
            raise JournalError(
                f"journal {self._path}: the journal is in use by another process "
                "(another run of the same command?); let it finish or use another journal file"
            ) from None
        except OSError as exc:
            raise JournalError(
                f"journal {self._path}: cannot open it: {exc.strerror or exc}; check that its "
                "directory is writable, or use another journal file"
            ) from exc
        try:
            self._conn = self._open_file()
        except BaseException:
            self._close_sync()
            raise

    def _open_file(self) -> sqlite3.Connection:
        try:
            # Created here with 0600 (bodies hold customer data); SQLite gives -wal/-shm the same.
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise JournalError(
                f"journal {self._path}: cannot create it: {exc.strerror or exc}; check that its "
                "directory is writable, or use another journal file"
            ) from exc
        if not os.access(self._path, os.R_OK | os.W_OK):
            raise JournalError(
                f"journal {self._path}: the file is not readable and writable by this user: "
                "fix its permissions or use another journal file"
            )
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
            self._prepare(conn)
        except sqlite3.Error as exc:
            if conn is not None:
                conn.close()
            raise JournalError(self._explain("open it", exc)) from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]
        if app_id not in (0, _APPLICATION_ID) or (app_id == 0 and tables):
            raise JournalError(
                f"journal {self._path}: the file is an SQLite database but not a journal of "
                "insight-import; use another journal file"
            )
        if version > _SCHEMA_VERSION:
            raise JournalError(
                f"journal {self._path}: written by a newer insight-import (schema {version}); "
                "upgrade, or use another journal file"
            )
        if tables == 0:
            # Only settable before the first table: lets mark_complete hand freed pages back.
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(
                f"journal {self._path}: cannot switch it to WAL mode (got {mode}); check that it "
                "and its directory are writable, or use another journal file"
            )
        conn.execute("PRAGMA synchronous = FULL")
        if tables == 0:

            def create() -> None:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

            self._transaction(conn, create)
        elif version < _SCHEMA_VERSION:

            def migrate() -> None:
                for step in range(version, _SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step]:
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

            self._transaction(conn, migrate)

    def _open_sync(
        self,
        conn: sqlite3.Connection,
        spec: RunSpec,
        fresh: bool,
        starts: Sequence[InputProgress] = (),
    ) -> tuple[RunState, int]:
        row = conn.execute("SELECT spec, complete FROM run").fetchone()
        created = fresh or row is None
        if not created:
            theirs = _decode_spec(row[0])
            if theirs != spec:
                raise JournalMismatchError(mismatch_message(theirs, spec))
        if created:
            for table in ("run", "inputs", "batches", "payloads", "dead_letters", "counters"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("DELETE FROM sqlite_sequence")
            conn.execute(
                "INSERT INTO run (id, spec, complete, created_at) VALUES (1, ?, 0, ?)",
                (_encode_spec(spec), time.time()),
            )
            conn.executemany(
                "INSERT INTO inputs (idx, lines, digest, done) VALUES (?, 0, '', 0)",
                [(i,) for i in range(len(spec.inputs))],
            )
            conn.executemany(
                "UPDATE inputs SET lines = ?, digest = ? WHERE idx = ?",
                [(start.lines, start.digest, start.index) for start in starts],
            )
        doubtful = conn.execute(
            "UPDATE batches SET phase = ?, in_doubt = in_doubt + 1 WHERE phase = ?",
            (BatchPhase.SEALED.value, BatchPhase.SUBMITTING.value),
        ).rowcount
        if doubtful:
            _add_counters(conn, {SUBMITS_IN_DOUBT: doubtful})
        state = RunState(
            fresh=created,
            inputs=_inputs(conn),
            unfinished=tuple(_batches(conn, "phase != 'finished'")),
            complete=bool(conn.execute("SELECT complete FROM run").fetchone()[0]),
            counters=_counters(conn),
        )
        return state, doubtful

    @staticmethod
    def _vacuum(conn: sqlite3.Connection) -> None:
        try:
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            kept = conn.execute("PRAGMA page_count").fetchone()[0] - free
            if free > kept:
                # The usual end of a run: the dropped bodies are most of the file. VACUUM writes
                # only the pages kept (a few, unless many dead letters); incremental_vacuum
                # would write every freed page into the WAL first: 200 MB of dropped bodies
                # took 2-5 s, on the way to the command's exit.
                conn.execute("VACUUM")
            elif free:
                # executescript steps the pragma to the end; execute() frees only one page.
                conn.executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error as exc:
            # The run is already recorded complete; a file larger than needed is no failure.
            _log.warning("journal.vacuum_failed", error=str(exc))

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        fd, self._lock_fd = self._lock_fd, None
        try:
            if conn is not None:
                # Checkpoint first: a statement lets other threads run while SQLite works, but
                # close() checkpoints the WAL into the database holding the GIL (tens of ms).
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                conn.close()
        finally:
            if fd is not None:
                os.close(fd)  # closing the descriptor releases the flock


def _lock(lock_path: Path) -> int:
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except PermissionError as refused:
        # A read-only directory: the lock file may still exist, and a read-only fd can hold it.
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise refused from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _insert_batch(
    conn: sqlite3.Connection,
    body_file: str,
    size: int,
    refs: RecordRefs,
    deps: tuple[int, ...],
    *,
    submitting: bool = False,
) -> int:
    phase = BatchPhase.SUBMITTING if submitting else BatchPhase.SEALED
    cursor = conn.execute(
        "INSERT INTO batches (phase, record_count, body_bytes, depends_on, submits) "
        "VALUES (?, ?, ?, ?, ?)",
        (phase.value, len(refs), size, orjson.dumps(deps), int(submitting)),
    )
    batch_id = cursor.lastrowid
    assert batch_id is not None  # an INSERT into a rowid table always sets it
    conn.execute(
        "INSERT INTO payloads (batch_id, refs, body, body_file) VALUES (?, ?, x'', ?)",
        (batch_id, _encode_refs(refs), body_file),
    )
    return batch_id


def _drop_payload(conn: sqlite3.Connection, batch_id: int) -> list[str]:
    """Delete a batch's payload row; the name of its body file, to unlink after the commit."""
    row = conn.execute("SELECT body_file FROM payloads WHERE batch_id = ?", (batch_id,)).fetchone()
    conn.execute("DELETE FROM payloads WHERE batch_id = ?", (batch_id,))
    return [row[0]] if row is not None and row[0] is not None else []


def _body_file(conn: sqlite3.Connection, batch_id: int) -> str | None:
    """The name of a batch's body file; ``None`` when its body is in the table (schema 2)."""
    _check(conn, batch_id, _UNFINISHED, "load its body")
    row = conn.execute("SELECT body_file FROM payloads WHERE batch_id = ?", (batch_id,)).fetchone()
    if row is None:
        raise sqlite3.DatabaseError(f"the payload of unfinished batch {batch_id} is missing")
    return row[0]  # type: ignore[no-any-return]


def _check(
    conn: sqlite3.Connection, batch_id: int, allowed: tuple[BatchPhase, ...], action: str
) -> None:
    row = conn.execute("SELECT phase FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
    check_phase(batch_id, None if row is None else BatchPhase(row[0]), allowed, action)


def _payload(conn: sqlite3.Connection, batch_id: int, column: str, action: str) -> bytes:
    _check(conn, batch_id, _UNFINISHED, action)
    row = conn.execute(
        f"SELECT {column} FROM payloads WHERE batch_id = ?",
        (batch_id,),
    ).fetchone()
    if row is None:
        raise sqlite3.DatabaseError(f"the payload of unfinished batch {batch_id} is missing")
    return bytes(row[0])


def _read_blob(conn: sqlite3.Connection, batch_id: int) -> bytearray:
    """Read a body kept in the table (schema 2 and older) in 1 MB pieces into one buffer.

    Fetched whole, the 50 MB bytes object would be allocated and filled (page faults included)
    in one step while holding the GIL, pausing the event loop thread for 50-150 ms; piece by
    piece the GIL is handed over between pieces.
    """
    _check(conn, batch_id, _UNFINISHED, "load its body")
    try:
        blob = conn.blobopen("payloads", "body", batch_id, readonly=True)
    except sqlite3.OperationalError as error:  # no such row
        raise sqlite3.DatabaseError(
            f"the payload of unfinished batch {batch_id} is missing"
        ) from error
    with blob:
        # Grown piece by piece: bytearray(size) would zero all of it (page faults included) in
        # one call, holding the GIL for tens of ms.
        body = bytearray()
        for _ in range(0, len(blob), _BLOB_CHUNK):
            body += blob.read(_BLOB_CHUNK)
    return body


def _apply(
    conn: sqlite3.Connection,
    progresses: Iterable[InputProgress],
    dead_letters: Iterable[DeadLetter],
    counters: Mapping[str, int],
) -> None:
    for progress in progresses:
        conn.execute(
            "UPDATE inputs SET lines = ?, digest = ?, done = ? WHERE idx = ?",
            (progress.lines, progress.digest, int(progress.done), progress.index),
        )
    conn.executemany(
        "INSERT INTO dead_letters (source, key, reason, message, details, import_id, record) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            (
                d.source,
                d.key,
                d.reason,
                d.message,
                orjson.dumps(list(d.details)),
                d.import_id,
                d.record,
            )
            for d in dead_letters
        ),
    )
    _add_counters(conn, counters)


def _inputs(conn: sqlite3.Connection) -> tuple[InputProgress, ...]:
    return tuple(
        InputProgress(index=idx, lines=lines, digest=digest, done=bool(done))
        for idx, lines, digest, done in conn.execute(
            "SELECT idx, lines, digest, done FROM inputs ORDER BY idx"
        )
    )


def _add_counters(conn: sqlite3.Connection, counters: Mapping[str, int]) -> None:
    conn.executemany(
        "INSERT INTO counters (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        counters.items(),
    )


def _counters(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT name, value FROM counters ORDER BY name"))


def _batches(conn: sqlite3.Connection, where: str) -> list[StoredBatch]:
    rows = conn.execute(f"SELECT {_BATCH_COLUMNS} FROM batches WHERE {where} ORDER BY batch_id")
    return [_stored_batch(row) for row in rows]


def _stored_batch(row: tuple[Any, ...]) -> StoredBatch:
    (
        batch_id,
        phase,
        import_id,
        record_count,
        body_bytes,
        depends_on,
        attempts,
        resubmits,
        in_doubt,
        polls,
        submitted_at,
        finished_at,
        status,
        imported,
        submits,
    ) = row
    return StoredBatch(
        batch_id=batch_id,
        phase=BatchPhase(phase),
        import_id=import_id,
        record_count=record_count,
        body_bytes=body_bytes,
        depends_on=tuple(orjson.loads(depends_on)),
        attempts=attempts,
        resubmits=resubmits,
        in_doubt=in_doubt,
        polls=polls,
        submitted_at=submitted_at,
        finished_at=finished_at,
        status=status,
        imported=imported,
        submits=submits,
    )


def _stored(conn: sqlite3.Connection, batch_id: int) -> StoredBatch:
    (batch,) = _batches(conn, f"batch_id = {int(batch_id)}")
    return batch


def _encode_spec(spec: RunSpec) -> bytes:
    return orjson.dumps(
        {
            "collection": spec.collection,
            "scope": spec.scope,
            "collection_type": spec.collection_type,
            "inputs": list(spec.inputs),
            "account": spec.account,
        }
    )


def _decode_spec(raw: bytes) -> RunSpec:
    data = orjson.loads(raw)
    return RunSpec(
        collection=data["collection"],
        scope=data["scope"],
        collection_type=data["collection_type"],
        inputs=tuple(data["inputs"]),
        account=data["account"],
    )


def _packed(refs: Sequence[RecordRef]) -> RecordRefs:
    return refs if isinstance(refs, RecordRefs) else RecordRefs.of(refs)


def _encode_refs(refs: RecordRefs) -> bytes:
    # Column by column, so that no object is made per record (a batch can hold 100,000): keys,
    # contacts as two columns (null where there is none), and origins named by number.
    columns = refs.columns()
    has_contact = columns.has_contact
    identifiers: Sequence[str | None] = columns.identifiers
    values: Sequence[str | None] = columns.values
    if not all(has_contact):
        identifiers = [i if has else None for i, has in zip(identifiers, has_contact, strict=True)]
        values = [v if has else None for v, has in zip(values, has_contact, strict=True)]
    return orjson.dumps(
        {
            "keys": columns.keys,
            "identifiers": identifiers,
            "values": values,
            "origins": list(columns.origin_numbers),
            "origin_names": list(columns.origins),
            "lines": list(columns.lines),
            "ends": None if refs.ends is None else list(refs.ends),
        }
    )


def _decode_refs(raw: bytes) -> RecordRefs:
    columns = orjson.loads(raw)
    identifiers, values = columns["identifiers"], columns["values"]
    has_contact = bytes(identifier is not None for identifier in identifiers)
    if not all(has_contact):
        identifiers = [identifier or "" for identifier in identifiers]
        values = [value or "" for value in values]
    return RecordRefs.of_columns(
        RefColumns(
            keys=columns["keys"],
            identifiers=identifiers,
            values=values,
            has_contact=has_contact,
            origin_numbers=columns["origins"],
            origins=columns["origin_names"],
            lines=columns["lines"],
        ),
        columns.get("ends"),
    )
