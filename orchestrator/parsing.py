"""Parsing large inputs on every core: worker processes validate and encode chunks of lines.

``orjson.loads`` holds the GIL, so threads cannot parse in parallel; processes can. A chunk's bytes
reach a worker through a spool file in shared memory (``/dev/shm`` where it exists): sending them
down a pipe costs about as much as parsing them. Only the columns come back (keys, contacts, line
numbers; see ``records.EncodedLines``); the body segment stays in the spool, where the parent
takes it as a view: the chunk itself when every line is a clean record, else the segment the
worker wrote over it.

The pool is shared by the whole process, started on first use (in a worker thread: starting
processes blocks) and kept for later inputs. Small inputs never start it: the first
``PROCESS_AFTER`` bytes of every input are parsed in a worker thread. If a worker dies, the
chunks it held are parsed in a thread instead and later inputs start a fresh pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import multiprocessing
import os
import tempfile
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import anyio.to_thread

from orchestrator import parse_worker
from orchestrator.logs import get_logger
from orchestrator.records import EncodedLines, encode_chunk
from orchestrator.sources import LineChunk

__all__ = ["PROCESS_AFTER", "ChunkParser", "default_processes"]

log = get_logger("orchestrator.parsing")

#: Bytes of each input parsed in a worker thread before worker processes are used for it.
PROCESS_AFTER = 8 << 20
# Chunks larger than a spool slot (a very long line) travel through the pipe instead.
_SLOT_BYTES = 4 << 20

_pool: ProcessPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def default_processes() -> int:
    """One worker process per CPU this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _start_pool(processes: int) -> ProcessPoolExecutor:
    """Return the shared pool, starting it (blocking, up to a second) if needed."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != processes:
            if _pool is not None:
                _pool.shutdown(wait=False, cancel_futures=True)
            methods = multiprocessing.get_all_start_methods()
            # forkserver: safe in a process with threads (fork is not), faster than spawn
            context = multiprocessing.get_context(
                "forkserver" if "forkserver" in methods else "spawn"
            )
            if "forkserver" in methods:
                context.set_forkserver_preload(["orchestrator.parse_worker"])
            _pool = ProcessPoolExecutor(
                processes,
                mp_context=context,
                initializer=parse_worker.init,
                initargs=(os.getpid(),),
            )
            _pool_size = processes
            # wait for the workers here (in a thread), not on the first chunk's critical path
            try:
                for future in [_pool.submit(os.getpid) for _ in range(processes)]:
                    future.result()
            except BaseException:
                _pool.shutdown(wait=False, cancel_futures=True)
                _pool = None
                raise
        return _pool


def _forget_pool(broken: ProcessPoolExecutor) -> None:
    global _pool
    with _pool_lock:
        if _pool is broken:
            _pool = None
    broken.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class Started:
    """A chunk sent to a worker process: its result to come, and its spool slot (-1: none)."""

    future: asyncio.Future[tuple[EncodedLines, int]]
    offset: int


class _Spool:
    """A ring of chunk-sized slots in a file in shared memory, mapped into the parent.

    The parent writes a chunk into a slot, a worker parses it (writing the chunk's body segment
    over it when the two differ), and the parent takes the segment as a view of its mapping (no
    copy until it goes into a body). A slot is reused only ``slots`` chunks later, after its
    chunk has been consumed.
    """

    def __init__(self, slots: int) -> None:
        directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.fd, self.path = tempfile.mkstemp(prefix="insight-import-", dir=directory)
        os.ftruncate(self.fd, slots * _SLOT_BYTES)  # sparse: memory only for what is written
        self.map = mmap.mmap(self.fd, slots * _SLOT_BYTES)
        self.slots = slots
        self.next = 0

    def write(self, data: bytes) -> int:
        """Write a chunk to the next slot (run it in a thread); return its offset."""
        offset = self.next * _SLOT_BYTES
        self.next = (self.next + 1) % self.slots
        self.map[offset : offset + len(data)] = data
        return offset

    def view(self, offset: int, length: int) -> memoryview:
        """What a worker wrote into a slot, without copying it."""
        return memoryview(self.map)[offset : offset + length]

    def close(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        # views of the last chunks may still be alive: the mapping goes when they do
        with contextlib.suppress(BufferError):
            self.map.close()


class ChunkParser:
    """Parses one input's chunks in order: in a worker thread at first, then in worker processes.

    Call ``start`` for each chunk as it is read and ``result`` for each in the same order; keep
    at most ``depth + 2`` started and not yet consumed (a chunk's segment is a view of a spool
    slot, reused that many chunks later). Use as an async context manager (the spool
    file is removed on exit).

    Args:
        contact_scope: whether the collection is contact-scoped.
        processes: worker processes to use; 0 parses every chunk in a worker thread.
    """

    def __init__(self, *, contact_scope: bool, processes: int) -> None:
        self.contact_scope = contact_scope
        self.processes = processes
        # enough chunks in the air to keep every worker busy while the parent takes results
        self.depth = processes + 2 if processes else 1
        self._seen = 0
        self._spool: _Spool | None = None
        self._pool: ProcessPoolExecutor | None = None

    async def start(self, chunk: LineChunk) -> Started | None:
        """Send a chunk to a worker process; ``None`` if it is to be parsed in a thread."""
        self._seen += len(chunk.data)
        if not self.processes or self._seen <= PROCESS_AFTER:
            return None
        if self._pool is None:
            try:
                self._pool = await anyio.to_thread.run_sync(_start_pool, self.processes)
            except (BrokenProcessPool, OSError) as error:
                # e.g. a main module that is not import-safe, or a process limit: slower, not lost
                log.warning(
                    "parsing.processes_unavailable",
                    error=type(error).__name__,
                    detail="parse worker processes could not start; parsing in a thread",
                )
                self.processes = 0
                return None
            # queued chunks, plus one being queued and one being consumed
            self._spool = _Spool(self.depth + 2)
        pool, spool = self._pool, self._spool
        assert spool is not None
        offset = -1
        try:
            future: Future[tuple[EncodedLines, int]]
            if len(chunk.data) > _SLOT_BYTES:
                future = pool.submit(parse_worker.parse_bytes, chunk.data, self.contact_scope, 1)
            else:
                offset = await anyio.to_thread.run_sync(spool.write, chunk.data)
                future = pool.submit(
                    parse_worker.parse_spooled,
                    spool.path,
                    offset,
                    len(chunk.data),
                    _SLOT_BYTES,
                    self.contact_scope,
                    1,
                )
        except (BrokenProcessPool, RuntimeError):  # broken, or shut down at interpreter exit
            self._give_up(pool)
            return None
        return Started(asyncio.wrap_future(future), offset)

    async def result(
        self, chunk: LineChunk, started: Started | None
    ) -> tuple[EncodedLines, memoryview | None]:
        """The encoded chunk ``start`` was given, with its body segment when a worker made it
        (parsed in a thread if it was not sent, or its worker died). Its lines are numbered from
        1: the caller knows where the chunk starts (``EncodedLines.shift_lines``)."""
        if started is not None:
            try:
                encoded, length = await started.future
            except BrokenProcessPool:
                if self._pool is not None:
                    self._give_up(self._pool)
            else:
                if length < 0 or self._spool is None:
                    return encoded, None
                return encoded, self._spool.view(started.offset, length)
        encoded = await anyio.to_thread.run_sync(
            lambda: encode_chunk(chunk.data, contact_scope=self.contact_scope, first_line=1)
        )
        return encoded, None

    def _give_up(self, pool: ProcessPoolExecutor) -> None:
        log.warning("parsing.processes_lost", detail="a parse worker died; parsing in a thread")
        _forget_pool(pool)
        self.processes = 0
        self._pool = None

    async def __aenter__(self) -> ChunkParser:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None
