"""Parsing large inputs on every core: worker processes validate and encode chunks of lines.

``orjson.loads`` holds the GIL, so threads cannot parse in parallel; processes can. A chunk's bytes
reach a worker through a spool file in shared memory (``/dev/shm`` where it exists): sending them
down a pipe costs about as much as parsing them. Only the columns come back (keys, contacts, line
numbers; see ``records.EncodedLines``); the body segment stays in the spool, where the parent
takes it as a view: the chunk itself when every line is a clean record, else the segment the
worker wrote over it.

The workers belong to a ``ParsePool``, which an ``Orchestrator`` owns and shares between its runs:
started on first use (in a worker thread: starting processes blocks), stopped when the
orchestrator closes. Small inputs never start it: the first ``PROCESS_AFTER`` bytes of every input
are parsed in a worker thread. If a worker dies, the chunks it held are parsed in a thread instead
and later inputs start fresh workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import mmap
import os
import sys
import tempfile
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import forkserver, popen_forkserver, process, reduction, util
from multiprocessing.context import ForkServerContext, ForkServerProcess, set_spawning_popen
from multiprocessing.process import BaseProcess
from typing import Any

import anyio.to_thread

from orchestrator import parse_worker
from orchestrator.chunks import EncodedLines, encode_chunk
from orchestrator.errors import OrchestratorError
from orchestrator.logs import get_logger
from orchestrator.sources import LineChunk

__all__ = ["PROCESS_AFTER", "ChunkParser", "ParsePool", "Prepared", "Started", "default_processes"]

log = get_logger("orchestrator.parsing")

#: Bytes of each input parsed in a worker thread before worker processes are used for it.
PROCESS_AFTER = 8 << 20
# Chunks larger than a spool slot (a very long line) travel through the pipe instead.
_SLOT_BYTES = 4 << 20


def default_processes() -> int:
    """One worker process per CPU this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ParsePool:
    """The parse worker processes of one owner (an ``Orchestrator``), shared by its inputs.

    Nothing starts until an input asks for the workers (``executor``: the first chunk past
    ``PROCESS_AFTER``), so small runs never pay for them. The workers come from a fork server of
    the pool's own and import only the record rules, whatever the program's main module is; the
    program's multiprocessing settings are left alone. ``aclose`` (or leaving the ``async with``
    block) stops the workers and waits for them to end.

    Args:
        processes: how many worker processes to start (at least 1).
    """

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"a parse pool needs at least 1 process, got {processes}")
        self.processes = processes
        self._lock = threading.Lock()  # taken in worker threads: starting and stopping block
        self._executor: ProcessPoolExecutor | None = None
        self._server: forkserver.ForkServer | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"ParsePool(processes={self.processes})"

    async def executor(self) -> ProcessPoolExecutor:
        """The running workers, started (in a worker thread: up to a second) on first use.

        Raises:
            BrokenProcessPool, OSError: the workers could not start (parse in a thread instead).
        """
        return await anyio.to_thread.run_sync(self._start)

    def started(self) -> ProcessPoolExecutor:
        """``executor`` for a caller already in a worker thread (blocking: up to a second)."""
        return self._start()

    def submit_bytes(
        self, data: bytes, *, contact_scope: bool
    ) -> Future[tuple[EncodedLines, int]] | None:
        """Encode a chunk in a worker process, its bytes sent through the pipe (blocking: call it
        in a worker thread). ``None`` when the workers cannot start or take it (said in the
        log): the caller encodes the chunk itself. A result that raises ``BrokenProcessPool``
        goes to ``lost``."""
        executor = None
        try:
            executor = self._start()
            return executor.submit(parse_worker.parse_bytes, data, contact_scope, 1)
        except (BrokenProcessPool, OSError, RuntimeError) as error:  # RuntimeError: shut down
            log.warning(
                "parsing.processes_unavailable",
                error=type(error).__name__,
                detail="parse worker processes are unavailable; encoding in a thread",
            )
            if executor is not None:
                self.discard(executor)
            return None

    def lost(self, broken: ProcessPoolExecutor | None = None) -> None:
        """A worker died under a chunk (its result raised ``BrokenProcessPool``): drop the
        workers (``broken``, or the running ones), and the next chunk starts fresh ones."""
        log.warning("parsing.processes_lost", detail="a parse worker died; parsing in a thread")
        with self._lock:
            broken = broken or self._executor
        if broken is not None:
            self.discard(broken)

    def discard(self, broken: ProcessPoolExecutor) -> None:
        """Forget workers that died: the next ``executor`` call starts fresh ones."""
        with self._lock:
            if self._executor is broken:
                self._executor = None
        broken.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        """Stop the workers and wait for them to end; the pool cannot be used again."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._shutdown)

    async def __aenter__(self) -> ParsePool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _start(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise OrchestratorError(
                    "the parse pool was closed while a run still used it: keep every run inside"
                    " `async with Orchestrator(...)`"
                )
            if self._executor is not None:
                return self._executor
            if self._server is None:
                self._server = forkserver.ForkServer()
                self._server.set_forkserver_preload([])  # not even ``__main__``
            executor = ProcessPoolExecutor(
                self.processes,
                mp_context=_WorkerContext(self._server),
                initializer=parse_worker.init,
                initargs=(os.getpid(),),
            )
            # wait for the workers here (in a thread), not on the first chunk's critical path
            try:
                for future in [executor.submit(os.getpid) for _ in range(self.processes)]:
                    future.result()
            except BaseException as error:
                executor.shutdown(wait=False, cancel_futures=True)
                if isinstance(error, Exception) and not isinstance(error, BrokenProcessPool):
                    # e.g. a daemonic process (a prefork task worker's) may have no children,
                    # which multiprocessing asserts: the callers parse in a thread instead
                    raise BrokenProcessPool(
                        f"parse worker processes cannot start here: {type(error).__name__}"
                    ) from error
                raise
            self._executor = executor
            return executor

    def _shutdown(self) -> None:
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
            server, self._server = self._server, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if server is not None:
            server._stop()  # type: ignore[attr-defined] # its workers are gone: ends it


class _WorkerContext(ForkServerContext):
    """A multiprocessing context whose processes come from one pool's own fork server."""

    def __init__(self, server: forkserver.ForkServer) -> None:
        self._server = server

    def Process(self, *args: Any, **kwargs: Any) -> _WorkerProcess:  # type: ignore[override]
        return _WorkerProcess(self._server, *args, **kwargs)


class _WorkerProcess(ForkServerProcess):
    """A parse worker: started by ``_WorkerPopen``, sent to the child as a plain process."""

    def __init__(self, server: forkserver.ForkServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._server = server

    def _Popen(self, process_obj: BaseProcess) -> _WorkerPopen:  # type: ignore[override]
        return _WorkerPopen(process_obj, self._server)

    def __reduce__(self) -> tuple[Any, ...]:
        # the child needs neither the fork server nor this module (it would import the engine)
        state = {name: value for name, value in vars(self).items() if name != "_server"}
        return object.__new__, (ForkServerProcess,), state


class _WorkerPopen(popen_forkserver.Popen):
    """Starts a process through a given fork server, without the program's main module.

    This is ``popen_forkserver.Popen._launch`` with two changes. The child is told nothing of
    ``__main__``: multiprocessing would have it import the main module again (as ``__mp_main__``),
    which for the ``insight-import`` script is the whole CLI, for every worker. And the
    preparation data is built here, because multiprocessing's own fixes the program's default
    start method as a side effect.
    """

    def __init__(self, process_obj: BaseProcess, server: forkserver.ForkServer) -> None:
        self._server = server
        super().__init__(process_obj)

    def _launch(self, process_obj: BaseProcess) -> None:
        original_dir = process.ORIGINAL_DIR  # type: ignore[attr-defined]
        prep_data = {
            "name": process_obj.name,
            "authkey": process.current_process().authkey,
            "sys_path": [original_dir if entry == "" else entry for entry in sys.path],
            "sys_argv": sys.argv,
            "orig_dir": original_dir,
            "dir": os.getcwd(),
        }
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        fds = self._fds  # type: ignore[attr-defined]
        self.sentinel, w = self._server.connect_to_new_process(fds)
        # a duplicate of the data pipe's write end tells the child when its parent is gone
        parent_w = os.dup(w)
        close_fds = util.close_fds  # type: ignore[attr-defined]
        self.finalizer = util.Finalize(self, close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


@dataclass(frozen=True, slots=True)
class Started:
    """A chunk sent to a worker process: its result to come, and its spool slot (-1: none)."""

    future: Future[tuple[EncodedLines, int]]
    offset: int


Prepared = EncodedLines | Started | None
"""What ``ChunkParser.prepare`` made of a chunk: encoded already, sent to a worker process, or
``None`` (to be parsed in a thread: the workers could not take it)."""


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

    Call ``prepare`` for each chunk as it is read and ``result`` for each in the same order; keep
    at most ``depth + 2`` started and not yet consumed (a chunk's segment is a view of a spool
    slot, reused that many chunks later). Use as an async context manager: on exit the chunks
    still with the workers are cancelled and the spool file is removed.

    Args:
        contact_scope: whether the collection is contact-scoped.
        pool: the worker processes to use; ``None`` parses every chunk in a worker thread.
    """

    def __init__(self, *, contact_scope: bool, pool: ParsePool | None) -> None:
        self.contact_scope = contact_scope
        self.pool = pool
        # enough chunks in the air to keep every worker busy while the parent takes results
        self.depth = pool.processes + 2 if pool is not None else 1
        self._seen = 0
        self._spool: _Spool | None = None
        self._executor: ProcessPoolExecutor | None = None
        self._pending: set[Future[tuple[EncodedLines, int]]] = set()

    def prepare(self, chunk: LineChunk) -> Prepared:
        """Parse a chunk, or send it to a worker process: blocking, run it in the thread that
        read the chunk (``JsonLinesReader.prepared_chunks``), in the order of the chunks."""
        self._seen += len(chunk.data)
        if self.pool is None or self._seen <= PROCESS_AFTER:
            return encode_chunk(chunk.data, contact_scope=self.contact_scope, first_line=1)
        if self._executor is None:
            try:
                self._executor = self.pool._start()
            except (BrokenProcessPool, OSError) as error:
                # e.g. a process limit: slower, not lost
                log.warning(
                    "parsing.processes_unavailable",
                    error=type(error).__name__,
                    detail="parse worker processes could not start; parsing in a thread",
                )
                self.pool = None
                return encode_chunk(chunk.data, contact_scope=self.contact_scope, first_line=1)
            # queued chunks, plus one being queued and one being consumed
            self._spool = _Spool(self.depth + 2)
        executor, spool = self._executor, self._spool
        assert spool is not None
        offset = -1
        try:
            future: Future[tuple[EncodedLines, int]]
            if len(chunk.data) > _SLOT_BYTES:
                future = executor.submit(
                    parse_worker.parse_bytes, chunk.data, self.contact_scope, 1
                )
            else:
                offset = spool.write(chunk.data)
                future = executor.submit(
                    parse_worker.parse_spooled,
                    spool.path,
                    offset,
                    len(chunk.data),
                    _SLOT_BYTES,
                    self.contact_scope,
                    1,
                )
        except (BrokenProcessPool, RuntimeError):  # broken, or shut down at interpreter exit
            self._give_up(executor)
            return None
        self._pending.add(future)
        return Started(future, offset)

    async def result(
        self, chunk: LineChunk, prepared: Prepared
    ) -> tuple[EncodedLines, memoryview | None]:
        """The encoded chunk ``prepare`` was given, with its body segment when a worker made it
        (parsed in a thread if it was not sent, or its worker died). Its lines are numbered from
        1: the caller knows where the chunk starts (``EncodedLines.shift_lines``)."""
        if isinstance(prepared, EncodedLines):
            return prepared, None
        if prepared is not None:
            try:
                encoded, length = await asyncio.wrap_future(prepared.future)
            except BrokenProcessPool:
                if self._executor is not None:
                    self._give_up(self._executor)
            else:
                if length < 0 or self._spool is None:
                    return encoded, None
                return encoded, self._spool.view(prepared.offset, length)
            finally:
                self._pending.discard(prepared.future)
        encoded = await anyio.to_thread.run_sync(
            lambda: encode_chunk(chunk.data, contact_scope=self.contact_scope, first_line=1)
        )
        return encoded, None

    def _give_up(self, executor: ProcessPoolExecutor) -> None:
        if self.pool is not None:
            self.pool.lost(executor)
        self.pool = None
        self._executor = None

    async def __aenter__(self) -> ChunkParser:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for future in self._pending:  # no worker should keep at a chunk nobody will take
            future.cancel()
        self._pending.clear()
        if self._spool is not None:
            self._spool.close()
            self._spool = None
