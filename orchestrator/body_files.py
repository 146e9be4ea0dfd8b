"""Request bodies kept as files of their own, beside the SQLite database that names them.

Stored in SQLite, a 50 MB body took 0.5-1.0 s to write (4 KB pages) and 0.5-0.7 s to delete
(SQLite walks its overflow chain page by page), and its freed pages stayed in the file; as a file
it takes ~0.1 s to write and fsync and ~30 ms to unlink. The rules that keep a body durable: a
file is written and fsync'd, and its directory entry with it, before the transaction that names
it commits; it is unlinked only after the transaction that forgets it commits; a file no row
names (a seal that never committed, a crash before an unlink) is removed by ``sweep`` when its
owner holds the database alone. All calls block: run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Container, Iterable, Sequence
from pathlib import Path

__all__ = ["BodyFiles"]

_PIECE = 1 << 20  # bodies are written and read in pieces: the GIL is handed over between them
_SUFFIX = ".body"


class BodyFiles:
    """The body files of one database, in ``directory`` (created, 0700, on the first store).

    Args:
        directory: where the files live, e.g. ``<database>.bodies``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __repr__(self) -> str:
        return f"BodyFiles({str(self.directory)!r})"

    def store(self, bodies: Sequence[bytes | bytearray]) -> list[str]:
        """Write each body to a new file, durably (names included); return their names.

        Raises:
            OSError: nothing is left behind.
        """
        names: list[str] = []
        directory = self.directory
        try:
            if not directory.is_dir():
                directory.mkdir(mode=0o700, exist_ok=True)
                _fsync_directory(directory.parent)
            for body in bodies:
                name = secrets.token_hex(8) + _SUFFIX
                names.append(name)
                _write_file(directory / name, body)
            _fsync_directory(directory)  # the files' names are durable before a row names them
        except BaseException:
            self.unlink(names)
            raise
        return names

    def read(self, name: str) -> bytearray:
        """A body, read in 1 MB pieces into one buffer: ``bytearray(size)`` would zero all of it
        in one call, holding the GIL for tens of ms."""
        body = bytearray()
        with open(self.directory / name, "rb", buffering=0) as handle:
            while piece := handle.read(_PIECE):
                body += piece
        return body

    def unlink(self, names: Iterable[str]) -> None:
        """Remove files (those already gone are fine)."""
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / name)

    def sweep(self, named: Container[str]) -> None:
        """Remove the body files no row names; call it only while no one else may be storing
        one (a file is written before the row that names it commits)."""
        try:
            present = [p.name for p in self.directory.iterdir() if p.name.endswith(_SUFFIX)]
        except FileNotFoundError:
            return
        self.unlink([name for name in present if name not in named])

    def remove_directory(self) -> None:
        """Remove the directory if it is empty (it is made again when needed)."""
        with contextlib.suppress(OSError):  # not there, or not empty
            self.directory.rmdir()


def _write_file(path: Path, body: bytes | bytearray) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(body)
        written = 0
        while written < len(view):  # in pieces: the GIL is handed over between them
            written += os.write(fd, view[written : written + _PIECE])
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
