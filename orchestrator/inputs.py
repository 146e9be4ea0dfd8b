"""The engine's inputs: files and iterables turned into chunks of validated, encoded records.

An input is read by tasks of its own, started by ``open`` and stopped when its block is left;
they send the chunks in order down a memory object stream. Blocking reads run in worker threads;
file lines are validated in a worker thread, or for large inputs in worker processes
(``parsing``), a few 2 MB chunks ahead. An async iterable is drained by a pump task, so the
consumer can notice a pause in the source (receiving from a stream is cancellation-safe, so it
can wait with a timeout) without cancelling the iterator itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from orchestrator.chunks import RecordRun
from orchestrator.errors import RecordError
from orchestrator.parsing import ChunkParser, ParsePool, Prepared
from orchestrator.provenance import Source
from orchestrator.records import (
    Collection,
    EncodedRecord,
    RejectedRecord,
    Scope,
    encode_line,
    encode_record,
)
from orchestrator.sources import DEFAULT_MAX_LINE_BYTES, JsonLinesReader, LineChunk

__all__ = ["Chunk", "FileInput", "IterableInput", "RecordInput"]

# Bytes of a file per chunk: each chunk costs a few fixed hops (a read, a spool write, a round
# trip to a parse worker); at 2 MB they are a small share of the parsing.
_CHUNK_BYTES = 2 << 20

# How many records of an iterable are encoded between two yields to the event loop.
_ITERABLE_CHUNK = 2_000


@dataclass(slots=True)
class Chunk:
    """Validated records of consecutive lines of one input.

    File inputs give their records as one ``run`` (columns) and their rejects in ``results``;
    iterables give every result in ``results``, in order.
    """

    results: Sequence[EncodedRecord | RejectedRecord]
    first_line: int
    last_line: int
    digest_through: Callable[[int], str]
    run: RecordRun | None = None
    #: bytes of input the chunk's lines took (decompressed); 0 for records from an iterable
    size: int = 0

    @property
    def read(self) -> int:
        """How many records (valid or not) the chunk holds."""
        return len(self.results) + (len(self.run) if self.run is not None else 0)


class RecordInput(Protocol):
    """Where a run's records come from: call ``skip`` (to resume), then ``open`` once."""

    origin: str

    async def skip(self, lines: int) -> str:
        """Pass over lines handled by an earlier run; return their fingerprint ("" if none)."""
        ...

    def open(
        self, collection: Collection
    ) -> AbstractAsyncContextManager[MemoryObjectReceiveStream[Chunk]]:
        """Start reading; chunks in order. Leaving the block stops the reading tasks and frees
        their resources (spool file, reader); an error while reading is raised from the block."""
        ...

    async def aclose(self) -> None:
        """Free what ``skip`` holds when ``open`` is never called (an input already done)."""
        ...


class FileInput:
    """A JSON Lines file (or standard input), read, parsed and validated ahead of the engine.

    Args:
        path: the path as given, or ``"-"``.
        pool: worker processes for parsing (see ``parsing``); ``None`` parses in a thread.
        max_line_bytes: the longest line read whole (see ``sources.JsonLinesReader``).
    """

    def __init__(
        self,
        path: str,
        *,
        pool: ParsePool | None = None,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    ) -> None:
        self._reader = JsonLinesReader(
            path, chunk_bytes=_CHUNK_BYTES, max_line_bytes=max_line_bytes
        )
        self._pool = pool
        self.origin = self._reader.origin
        # Chunks are read unnumbered and counted by their parser; they are numbered here, in
        # order, as their results come in.
        self._next_line = 1

    async def skip(self, lines: int) -> str:
        digest = await self._reader.skip(lines)
        self._next_line = lines + 1
        return digest

    @contextlib.asynccontextmanager
    async def open(self, collection: Collection) -> AsyncIterator[MemoryObjectReceiveStream[Chunk]]:
        contact_scope = collection.scope is Scope.CONTACT
        with _one_error():
            async with (
                self._reader,
                ChunkParser(contact_scope=contact_scope, pool=self._pool) as parser,
                anyio.create_task_group() as tg,
            ):
                # One task reads each chunk and, in the same thread, parses it or sends it to a
                # worker process; the other takes their results in order: reading and parsing
                # overlap the consumer's packing. Prepared chunks wait between the two, at most
                # ``depth - 1`` (with the one in each task and the consumer's, ``depth + 2``: see
                # ChunkParser).
                send_started, receive_started = anyio.create_memory_object_stream[
                    tuple[LineChunk, Prepared]
                ](parser.depth - 1)
                send, receive = anyio.create_memory_object_stream[Chunk]()
                tg.start_soon(self._read, parser, send_started)
                tg.start_soon(self._collect, parser, receive_started, send, contact_scope)
                with receive:
                    yield receive
                tg.cancel_scope.cancel()

    async def _read(
        self,
        parser: ChunkParser,
        send: MemoryObjectSendStream[tuple[LineChunk, Prepared]],
    ) -> None:
        async with send:
            async for prepared in self._reader.prepared_chunks(parser.prepare):
                await send.send(prepared)

    async def _collect(
        self,
        parser: ChunkParser,
        receive: MemoryObjectReceiveStream[tuple[LineChunk, Prepared]],
        send: MemoryObjectSendStream[Chunk],
        contact_scope: bool,
    ) -> None:
        async with receive, send:
            async for line_chunk, prepared in receive:
                await send.send(await self._chunk(parser, line_chunk, prepared, contact_scope))

    async def _chunk(
        self,
        parser: ChunkParser,
        line_chunk: LineChunk,
        prepared: Prepared,
        contact_scope: bool,
    ) -> Chunk:
        encoded, segment = await parser.result(line_chunk, prepared)
        first = self._next_line
        self._next_line += encoded.count
        encoded.shift_lines(first - 1)  # parsed as if it started at line 1
        line_chunk = line_chunk.numbered(first, encoded.count)
        return Chunk(
            encoded.rejected(self.origin),
            line_chunk.first_line,
            line_chunk.last_line,
            line_chunk.digest_through,
            encoded.records(
                line_chunk.data, self.origin, contact_scope=contact_scope, segment=segment
            ),
            size=len(line_chunk.data),
        )

    async def aclose(self) -> None:
        await self._reader.aclose()


class IterableInput:
    """Records from an iterable or async iterable of mappings (or JSON lines as bytes).

    An async iterable is drained by a pump task into a bounded stream, and a chunk holds what had
    arrived: a pause in the source ends the chunk, so the consumer sees the pause too.
    """

    origin = "<records>"

    def __init__(self, records: Iterable[Any] | AsyncIterable[Any]) -> None:
        self._records = records
        self._skip = 0

    async def skip(self, lines: int) -> str:
        self._skip = lines
        return ""

    @contextlib.asynccontextmanager
    async def open(self, collection: Collection) -> AsyncIterator[MemoryObjectReceiveStream[Chunk]]:
        send, receive = anyio.create_memory_object_stream[Chunk]()
        with _one_error():
            async with anyio.create_task_group() as tg:
                if isinstance(self._records, AsyncIterable):
                    send_items, receive_items = anyio.create_memory_object_stream[Any](
                        _ITERABLE_CHUNK
                    )
                    tg.start_soon(self._pump, self._records, send_items)
                    tg.start_soon(self._encode_arrived, receive_items, send, collection)
                else:
                    tg.start_soon(self._encode, self._records, send, collection)
                with receive:
                    yield receive
                tg.cancel_scope.cancel()

    async def _encode(
        self, records: Iterable[Any], send: MemoryObjectSendStream[Chunk], collection: Collection
    ) -> None:
        async with send:
            position = 0
            batch: list[EncodedRecord | RejectedRecord] = []
            for item in records:
                position += 1
                if position <= self._skip:
                    continue
                batch.append(_encode_item(item, collection, position))
                if len(batch) >= _ITERABLE_CHUNK:
                    await send.send(Chunk(batch, position - len(batch) + 1, position, _no_digest))
                    batch = []
            if batch:
                await send.send(Chunk(batch, position - len(batch) + 1, position, _no_digest))

    async def _pump(self, records: AsyncIterable[Any], send: MemoryObjectSendStream[Any]) -> None:
        async with send:
            position = 0
            async for item in records:
                position += 1
                if position > self._skip:
                    await send.send(item)

    async def _encode_arrived(
        self,
        receive: MemoryObjectReceiveStream[Any],
        send: MemoryObjectSendStream[Chunk],
        collection: Collection,
    ) -> None:
        position = self._skip  # of the last record sent on
        async with receive, send:
            async for item in receive:
                batch = [_encode_item(item, collection, position + 1)]
                while len(batch) < _ITERABLE_CHUNK:  # take what is already there, without waiting
                    try:
                        item = receive.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    batch.append(_encode_item(item, collection, position + len(batch) + 1))
                await send.send(Chunk(batch, position + 1, position + len(batch), _no_digest))
                position += len(batch)

    async def aclose(self) -> None:
        return None


@contextlib.contextmanager
def _one_error() -> Iterator[None]:
    """Raise the single error of an input's task group (a read failing, or the consumer's own)
    as itself, not wrapped in an ExceptionGroup."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from group
        raise


def _no_digest(count: int) -> str:
    return ""


def _encode_item(
    item: Any, collection: Collection, position: int
) -> EncodedRecord | RejectedRecord:
    source = Source("<records>", position)
    try:
        if isinstance(item, bytes | bytearray | memoryview):
            return encode_line(bytes(item), collection, source=source)
        return encode_record(item, collection, source=source)
    except RecordError as error:
        return RejectedRecord(error=error, raw=_raw_of(item))


def _raw_of(item: Any) -> bytes:
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    try:
        return orjson.dumps(item, default=str)
    except TypeError:
        return b"null"
