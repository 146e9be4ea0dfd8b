"""JSON Lines readers (plain, gzip, standard input) that keep each line's file and number.

Blocking reads, gzip decompression and hashing run in a worker thread, one chunk of about
``chunk_bytes`` (cut at a line boundary) per hop, so the event loop never blocks; a reader reads
when asked (``inputs.FileInput`` asks ahead of the packing when parse processes do the parsing).
Each chunk carries a running fingerprint of the input up to it (XXH3-128: it
catches an accidental change, which is all it is for, at ten times SHA-256's speed), which lets a
journal notice that an input changed between a crash and the re-run that resumes it.

Lines are numbered from 1; a final line without a newline counts; ``\\r\\n`` endings are stripped;
a UTF-8 byte order mark at the start of the input is dropped. gzip is recognised by its magic bytes,
whatever the file is called.

Named pipes and process substitution (``<(cat file)``, a ``/dev/fd/N`` path) are read like
standard input: opened once (never by ``check_inputs``), read as data arrives, and not seekable, so
a resumed run cannot jump past what an earlier run read: it reads the pipe again from its start and
skips the lines the journal holds when their fingerprint matches. A read waiting on a pipe (stdin
too, when it is one) gives up within ``_PIPE_POLL_S`` once the reader is closed, so a cancelled
run does not wait for the writer.

Memory stays bounded whatever the input: a line longer than ``max_line_bytes`` (no body could hold
it) is not kept. Once it grows past the limit the rest of it is read and dropped; in its place the
chunk holds ``records.oversized_line`` (its length and first ``KEPT_PREFIX_BYTES`` bytes), which the
parser rejects as ``record-too-large``; the next line is read as usual.
"""

from __future__ import annotations

import gzip
import io
import os
import select
import stat
import sys
import threading
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, BinaryIO, TypeVar

import anyio
import anyio.to_thread
import xxhash

from orchestrator import errors
from orchestrator.logs import get_logger
from orchestrator.records import OVERSIZED_LINE_START, oversized_line

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "KEPT_PREFIX_BYTES",
    "JsonLinesReader",
    "LineChunk",
    "check_inputs",
    "is_stream",
    "validate_inputs",
]

T = TypeVar("T")

log = get_logger("orchestrator.sources")

DEFAULT_MAX_LINE_BYTES = 50_000_000
"""The longest line read whole by default: the API's cap on a request body."""

KEPT_PREFIX_BYTES = 1024
"""How much of a line longer than the limit is kept (for its dead letter)."""

STDIN = "-"
STDIN_ORIGIN = "<stdin>"
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class LineChunk:
    """A run of consecutive lines of one input.

    Args:
        origin: the input's display name: the path as given, or ``"<stdin>"``.
        first_line: the 1-based line number of the chunk's first line; 0 when the chunk was read
            unnumbered (``JsonLinesReader.chunks(numbered=False)``: whoever parses it counts).
        data: the lines' contents, each followed by ``b"\\n"`` (blank lines kept).
        count: how many lines ``data`` holds (counted when not given, unless unnumbered).
    """

    origin: str
    first_line: int
    data: bytes
    count: int = field(default=-1, compare=False)
    # the running hash of every line before this chunk; None means the chunk starts the input
    _start: xxhash.xxh3_128 | None = field(default=None, repr=False, compare=False)
    _end: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.data and not self.data.endswith(b"\n"):
            raise ValueError("a chunk's data must end with a newline")
        if self.count < 0 and self.first_line:
            object.__setattr__(self, "count", self.data.count(b"\n"))

    def numbered(self, first_line: int, count: int) -> LineChunk:
        """This chunk with its line numbers, once its lines were counted (by its parser)."""
        return LineChunk(self.origin, first_line, self.data, count, self._start, self._end)

    @property
    def lines(self) -> list[bytes]:
        """The lines' contents without their newlines."""
        lines = self.data.split(b"\n")
        lines.pop()
        return lines

    def _hash_through(self, count: int) -> xxhash.xxh3_128:
        if self._start is None:
            if self.first_line != 1:
                raise ValueError("a chunk built without its start hash must start at line 1")
            state = xxhash.xxh3_128()
        else:
            state = self._start.copy()
        end = 0
        for _ in range(count):
            end = self.data.index(b"\n", end) + 1
        state.update(memoryview(self.data)[:end])
        return state

    def digest_through(self, count: int) -> str:
        """Return the fingerprint of the input from its start through the chunk's line ``count``.

        The fingerprint is the hex XXH3-128 over every line's content followed by ``b"\\n"``, from
        line 1 to line ``first_line - 1 + count``.

        Args:
            count: how many of this chunk's lines to include, 0 to ``count``.
        """
        if not 0 <= count <= self.count:
            raise ValueError(f"count must be between 0 and {self.count}, not {count}")
        if count == self.count and self._end is not None:
            return self._end
        return self._hash_through(count).hexdigest()

    @property
    def end_digest(self) -> str:
        """The fingerprint of the input through this chunk's last line."""
        return self.digest_through(self.count)

    @property
    def last_line(self) -> int:
        """The 1-based line number of the chunk's last line (``first_line - 1`` when empty)."""
        return self.first_line + self.count - 1

    def after(self, count: int) -> LineChunk:
        """The chunk without its first ``count`` lines (keeping the fingerprints right)."""
        start = 0
        for _ in range(count):
            start = self.data.index(b"\n", start) + 1
        return LineChunk(
            self.origin,
            self.first_line + count,
            self.data[start:],
            self.count - count,
            self._hash_through(count),
            self._end,
        )


def _display(path: str) -> str:
    return STDIN_ORIGIN if path == STDIN else path


def _open_error(path: str, error: OSError) -> errors.InputError:
    shown = repr(_display(path))
    if isinstance(error, FileNotFoundError):
        return errors.InputError(f"input file {shown} does not exist; check the path")
    if isinstance(error, IsADirectoryError):
        return errors.InputError(
            f"input {shown} is a directory; give a JSON Lines file (.jsonl or .jsonl.gz)"
        )
    if isinstance(error, PermissionError):
        return errors.InputError(
            f"input file {shown} cannot be read (permission denied); check its permissions"
        )
    return errors.InputError(f"input {shown} cannot be read ({error.strerror or error}); check it")


def _corrupt_error(path: str) -> errors.InputError:
    return errors.InputError(
        f"input {_display(path)!r} is not a valid gzip file (corrupt or truncated); re-create it"
        " or give the uncompressed file"
    )


def is_stream(path: str) -> bool:
    """Whether an input is read as a stream: standard input, a named pipe, ``/dev/fd/N``.

    Such an input can be read only once and not seeked; a missing path is not a stream.

    Args:
        path: the input as given.
    """
    if path == STDIN:
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


_PIPE_POLL_S = 0.1


class _Stopped(Exception):
    """A read from a pipe given up because its reader was closed."""


class _Pipe(io.RawIOBase):
    """A pipe read in a worker thread that waits for data in short polls, so closing the reader
    ends a wait on a writer that is slow or gone quiet (a blocking read would hold the thread,
    and the run with it, until the writer writes)."""

    def __init__(self, fd: int, stop: threading.Event) -> None:
        super().__init__()
        self._fd = fd
        self._stop = stop
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN | select.POLLPRI)

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer: Any) -> int:
        while True:
            if self._stop.is_set():
                raise _Stopped
            if self._poll.poll(_PIPE_POLL_S * 1000):
                try:
                    return os.readv(self._fd, [buffer])
                except BlockingIOError:
                    continue

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _Opened:
    """An open input: the raw stream and, for gzip, the decompressing reader on top of it."""

    __slots__ = ("own", "pipe", "raw", "reader", "stdin")

    def __init__(self, path: str, stop: threading.Event) -> None:
        self.stdin = path == STDIN
        self.pipe = self.stdin or is_stream(path)
        raw: BinaryIO
        self.own = True  # whether close() closes raw
        try:
            if self.stdin:
                raw = _stdin_pipe(stop) or sys.stdin.buffer
                self.own = raw is not sys.stdin.buffer
            elif self.pipe:
                # O_NONBLOCK: opening a named pipe would otherwise wait for a writer, out of
                # reach of the stop flag. Until a writer comes, poll() reports nothing (no EOF).
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                raw = io.BufferedReader(_Pipe(fd, stop))
            else:
                raw = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as error:
            raise _open_error(path, error) from None
        self.raw = raw
        self.reader: BinaryIO = raw
        try:
            head = _peek(raw, 2)
        except OSError as error:
            self.close()
            raise _open_error(path, error) from None
        if head == _GZIP_MAGIC:
            self.reader = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]

    def close(self) -> None:
        if self.reader is not self.raw:
            self.reader.close()  # a GzipFile given a fileobj leaves it open
        if self.own:
            self.raw.close()


def _stdin_pipe(stop: threading.Event) -> BinaryIO | None:
    """Standard input read through a ``_Pipe`` when it is a pipe (else ``None``), so a wait on
    its writer can be given up. A duplicate descriptor: closing it leaves stdin open, and it
    stays blocking (poll() comes first), so the process's stdin is not changed."""
    try:
        fd = sys.stdin.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
    except (AttributeError, OSError, ValueError):  # replaced, closed or not a real file
        return None
    return io.BufferedReader(_Pipe(os.dup(fd), stop))


def _peek(raw: BinaryIO, size: int) -> bytes:
    peek = getattr(raw, "peek", None)
    if peek is not None:
        return bytes(peek(size)[:size])
    if raw.seekable():
        position = raw.tell()
        head = raw.read(size)
        raw.seek(position)
        return head
    raise OSError("the input can neither peek nor seek")


class JsonLinesReader:
    """Reads a JSON Lines input (a path, a gzip file, or ``"-"`` for standard input) in chunks.

    Use it as an async context manager (or call ``aclose``), optionally ``skip`` lines already
    handled, then iterate ``chunks()`` once. Not safe for concurrent use by several tasks.

    Args:
        path: the input path as given, or ``"-"`` for standard input.
        chunk_bytes: about how many bytes to read per hop to the worker thread.
        max_line_bytes: the longest line kept whole; a longer one is dropped as it is read and
            rejected as ``record-too-large`` (see the module's docstring).
    """

    def __init__(
        self,
        path: str,
        *,
        chunk_bytes: int = 1 << 20,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        if chunk_bytes < 1:
            raise errors.ConfigError(f"chunk_bytes must be at least 1, not {chunk_bytes}")
        if max_line_bytes < 1:
            raise errors.ConfigError(f"max_line_bytes must be at least 1, not {max_line_bytes}")
        self.path = path
        self.origin = _display(path)
        self._chunk_bytes = chunk_bytes
        self._max_line_bytes = max_line_bytes
        self._opened: _Opened | None = None
        self._tail: list[bytes | memoryview] = []
        self._next_line = 1
        self._started = False  # a chunk was read (a byte order mark can only start the first)
        self._hash = xxhash.xxh3_128()
        self._eof = False
        self._closed = False
        self._pending: LineChunk | None = None
        self._stop = threading.Event()  # ends a read waiting on a pipe (see _Pipe)
        self._stream = is_stream(path)

    def __repr__(self) -> str:
        return f"JsonLinesReader({self.path!r}, chunk_bytes={self._chunk_bytes})"

    def _read(self, size: int) -> bytes:
        if self._opened is None:
            if self._stream:
                log.info("input.opened", input=self.origin, kind="stream", resumable=False)
            self._opened = _Opened(self.path, self._stop)
        opened = self._opened
        try:
            if opened.pipe:
                # latency over throughput on a pipe: take what is there
                return opened.reader.read1(size)  # type: ignore[attr-defined,no-any-return]
            return opened.reader.read(size)
        except (gzip.BadGzipFile, EOFError, zlib.error):
            raise _corrupt_error(self.path) from None
        except OSError as error:
            raise _open_error(self.path, error) from None

    def _read_chunk(self, numbered: bool = True) -> LineChunk | None:
        """Read the next chunk (in a worker thread); ``None`` at the end of the input."""
        if self._closed:
            raise errors.InputError(f"input {self.origin!r} was closed; open a new reader")
        if self._eof:
            return None
        parts = self._tail
        held = sum(map(len, parts))  # the bytes of the line being read (the tail has no newline)
        limit = self._max_line_bytes
        while True:
            block = self._read(self._chunk_bytes)
            if not block:
                self._eof = True
                self._tail = []
                if not parts:
                    return None
                data = b"".join(parts) + b"\n"  # the last line had no newline
                break
            cut = block.rfind(b"\n") + 1
            if cut:
                if held + block.index(b"\n") > limit:
                    data = self._after_oversized(parts, held, block, first=not self._started)
                    break
                # one copy: the tail of the last read and this block up to its last newline
                parts.append(memoryview(block)[:cut] if cut < len(block) else block)
                data = b"".join(parts) if len(parts) > 1 or cut < len(block) else block
                self._tail = [block[cut:]] if cut < len(block) else []
                break
            held += len(block)
            parts.append(block)
            if held > limit:
                data = self._drop_oversized(parts, held)
                break
        if len(data) > limit + 1:  # a line inside it may be too long (only when limit < chunk)
            data = self._replace_long_lines(data)
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        if not self._started and data.startswith(_BOM):
            data = data[len(_BOM) :]
        self._started = True
        start = self._hash.copy()
        self._hash.update(data)
        if not numbered:  # counting costs the parent ~0.5 ms a MB: the parser counts instead
            return LineChunk(self.origin, 0, data, -1, start, self._hash.hexdigest())
        count = data.count(b"\n")
        chunk = LineChunk(self.origin, self._next_line, data, count, start, self._hash.hexdigest())
        self._next_line += count
        return chunk

    def _prefix(self, parts: list[bytes | memoryview], *, first: bool) -> bytes:
        """The first ``KEPT_PREFIX_BYTES`` of a line that starts with ``parts``; ``first``: the
        line is the input's first, whose byte order mark is not part of it."""
        want = KEPT_PREFIX_BYTES + (len(_BOM) if first else 0)
        prefix = b""
        for part in parts:
            prefix += part[: want - len(prefix)]
            if len(prefix) >= want:
                break
        if first and prefix.startswith(_BOM):
            prefix = prefix[len(_BOM) :]
        return prefix[:KEPT_PREFIX_BYTES]

    def _replace_long_lines(self, data: bytes) -> bytes:
        """``data`` with each line longer than the limit replaced by its stand-in."""
        limit = self._max_line_bytes
        parts: list[bytes | memoryview] = []
        view = memoryview(data)
        start = done = 0
        while (end := data.find(b"\n", start)) != -1:
            if end - start > limit and not data.startswith(OVERSIZED_LINE_START, start):
                first = start == 0 and not self._started
                parts += (view[done:start], self._stand_in(view[start:end], end - start, first))
                done = end
            start = end + 1
        if not parts:
            return data
        parts.append(view[done:])
        return b"".join(parts)

    def _stand_in(self, line: bytes | memoryview, size: int, first: bool) -> bytes:
        return oversized_line(size, self._max_line_bytes, self._prefix([line], first=first))

    def _after_oversized(
        self, parts: list[bytes | memoryview], size: int, block: bytes, *, first: bool
    ) -> bytes:
        """The chunk when an over-long line, of ``size`` bytes before ``block`` and starting with
        ``parts``, ends in ``block``: its stand-in, then the whole lines after it."""
        end = block.index(b"\n")
        prefix = self._prefix([*parts, block[:end]], first=first)
        line = oversized_line(size + end, self._max_line_bytes, prefix)
        cut = block.rfind(b"\n") + 1
        self._tail = [block[cut:]] if cut < len(block) else []
        return line + block[end:cut]

    def _drop_oversized(self, parts: list[bytes | memoryview], size: int) -> bytes:
        """Read the rest of an over-long line, keeping only its first bytes; return the chunk
        that ends it (see ``_after_oversized``)."""
        first = not self._started
        # The line's first bytes as read, with room for a byte order mark that _prefix drops
        # (read one byte at a time, a mark comes in pieces).
        want = KEPT_PREFIX_BYTES + len(_BOM)
        head = b"".join(bytes(part[:want]) for part in parts)[:want]
        parts.clear()
        while True:
            block = self._read(self._chunk_bytes)
            if not block:
                self._eof = True
                self._tail = []
                prefix = self._prefix([head], first=first)
                return oversized_line(size, self._max_line_bytes, prefix) + b"\n"
            if b"\n" in block:
                return self._after_oversized([head], size, block, first=first)
            if len(head) < want:
                head += block[: want - len(head)]
            size += len(block)

    async def skip(self, lines: int) -> str:
        """Consume the first ``lines`` lines (to resume) and return their fingerprint.

        Call it before ``chunks()``. The fingerprint is what ``LineChunk.digest_through`` gives for
        the same lines, so a journal can check that the input did not change.

        Args:
            lines: how many lines to skip.

        Raises:
            errors.InputError: the input has fewer lines than that (it changed since).
        """
        if lines < 0:
            raise ValueError(f"lines must be >= 0, not {lines}")
        if self._started or self._pending is not None:
            raise RuntimeError("skip() must be called once, before chunks()")
        digest = xxhash.xxh3_128().hexdigest()
        remaining = lines
        while remaining > 0:
            chunk = await self._next_chunk()
            if chunk is None:
                read = lines - remaining
                raise errors.InputError(
                    f"input {self.origin!r} has only {read} lines, but {lines} were already"
                    " handled by the run being resumed: the input changed; use a new journal"
                    " or restore the original input"
                )
            count = chunk.count
            if count <= remaining:
                remaining -= count
                digest = chunk.end_digest
                continue
            self._pending = chunk.after(remaining)
            digest = chunk.digest_through(remaining)
            remaining = 0
        return digest

    async def chunks(self, *, numbered: bool = True) -> AsyncIterator[LineChunk]:
        """Yield the input's chunks in order, each ending at a line boundary.

        Args:
            numbered: give each chunk its line numbers; with ``False`` the chunks come
                unnumbered (``first_line`` 0, ``count`` -1, except a chunk left by ``skip``) and
                the caller numbers them as it counts their lines.

        Raises:
            errors.InputError: the input cannot be read or is a corrupt gzip file.
        """
        if self._pending is not None:
            pending, self._pending = self._pending, None
            yield pending
        while True:
            chunk = await self._next_chunk(numbered)
            if chunk is None:
                return
            yield chunk

    async def prepared_chunks(
        self, prepare: Callable[[LineChunk], T]
    ) -> AsyncIterator[tuple[LineChunk, T]]:
        """The chunks ``chunks(numbered=False)`` gives, each with ``prepare(chunk)``, which runs
        in the reading thread right after the read (parsing it, or handing it to a parse worker).

        One thread hop a chunk instead of two, and one thread at a time doing the input's work:
        each more thread that wants the GIL makes the event loop wait longer for it.

        Args:
            prepare: what to do with each chunk, blocking.

        Raises:
            errors.InputError: the input cannot be read or is a corrupt gzip file.
        """
        if self._pending is not None:
            pending, self._pending = self._pending, None
            yield pending, await anyio.to_thread.run_sync(prepare, pending)
        while True:
            prepared = await anyio.to_thread.run_sync(
                self._read_prepared, prepare, abandon_on_cancel=self._stream
            )
            if prepared is None:
                return
            yield prepared

    def _read_prepared(self, prepare: Callable[[LineChunk], T]) -> tuple[LineChunk, T] | None:
        chunk = self._read_chunk(False)
        if chunk is None or self._closed:  # closed: an abandoned read of a pipe
            return None
        return chunk, prepare(chunk)

    async def _next_chunk(self, numbered: bool = True) -> LineChunk | None:
        # A read from a pipe may wait on its writer for ever: on cancellation the task leaves at
        # once, and aclose() makes the thread give up. A file read always ends soon: waited for.
        return await anyio.to_thread.run_sync(
            self._read_chunk, numbered, abandon_on_cancel=self._stream
        )

    async def aclose(self) -> None:
        """Close the input (standard input itself stays open)."""
        self._closed = True
        self._stop.set()
        opened, self._opened = self._opened, None
        if opened is not None:
            await anyio.to_thread.run_sync(opened.close)

    async def __aenter__(self) -> JsonLinesReader:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()


def check_inputs(paths: Iterable[str]) -> None:
    """Check up front, blocking, that every input exists and can be read (before an event loop).

    The same checks as ``validate_inputs``, for synchronous code such as a CLI's argument handling.

    Args:
        paths: the inputs as given; ``"-"`` (standard input) may appear once.

    Raises:
        errors.InputError: an input is missing, a directory, unreadable or a corrupt gzip file.
    """
    given = list(paths)
    if not given:
        raise errors.InputError("no input given; name at least one JSON Lines file, or '-'")
    if given.count(STDIN) > 1:
        raise errors.InputError("standard input ('-') can be given only once")
    for path in given:
        if path == STDIN:
            continue
        if is_stream(path):  # opening a pipe to look would take data from it (or end its writer)
            if not os.access(path, os.R_OK):
                raise _open_error(path, PermissionError())
            continue
        opened = _Opened(path, threading.Event())
        try:
            if opened.reader is not opened.raw:
                opened.reader.read(1)  # checks the gzip header
        except (gzip.BadGzipFile, EOFError, zlib.error):
            raise _corrupt_error(path) from None
        except OSError as error:
            raise _open_error(path, error) from None
        finally:
            opened.close()


async def validate_inputs(paths: Iterable[str]) -> None:
    """Check up front that every input exists and can be read, before any import starts.

    Args:
        paths: the inputs as given; ``"-"`` (standard input) may appear once.

    Raises:
        errors.InputError: an input is missing, a directory, unreadable or a corrupt gzip file.
    """
    await anyio.to_thread.run_sync(check_inputs, list(paths))
