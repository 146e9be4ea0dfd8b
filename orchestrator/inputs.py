"""The engine's inputs: files and iterables turned into chunks of validated, encoded records.

Blocking reads run in worker threads; file lines are validated in a worker thread, or for large
inputs in worker processes (``parsing``), a few 2 MB chunks ahead. An async iterable is drained by a
pump task into a bounded stream, so a pause in the source can be noticed (the engine then seals
what is pending) without cancelling the iterator itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import orjson
from anyio.abc import TaskGroup

from orchestrator.errors import RecordError
from orchestrator.parsing import ChunkParser, Started
from orchestrator.records import (
    Collection,
    EncodedRecord,
    RecordRun,
    RejectedRecord,
    Scope,
    Source,
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

    @property
    def read(self) -> int:
        """How many records (valid or not) the chunk holds."""
        return len(self.results) + (len(self.run) if self.run is not None else 0)


class RecordInput(Protocol):
    origin: str

    async def skip(self, lines: int) -> str: ...

    def chunks(self, collection: Collection) -> AsyncIterator[Chunk | None]:
        """Chunks in order; ``None`` when the input pauses (seal what is pending)."""
        ...

    async def aclose(self) -> None: ...


class FileInput:
    """A JSON Lines file (or standard input), read, parsed and validated ahead of the engine.

    Args:
        path: the path as given, or ``"-"``.
        processes: worker processes for parsing (see ``parsing``); 0 parses in a thread.
        max_line_bytes: the longest line read whole (see ``sources.JsonLinesReader``).
    """

    def __init__(
        self, path: str, *, processes: int = 0, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
    ) -> None:
        self._reader = JsonLinesReader(
            path, chunk_bytes=_CHUNK_BYTES, max_line_bytes=max_line_bytes
        )
        self._processes = processes
        self.origin = self._reader.origin
        # Chunks are read unnumbered and counted by their parser; they are numbered here, in
        # order, as their results come in.
        self._next_line = 1

    async def skip(self, lines: int) -> str:
        digest = await self._reader.skip(lines)
        self._next_line = lines + 1
        return digest

    async def chunks(self, collection: Collection) -> AsyncIterator[Chunk | None]:
        contact_scope = collection.scope is Scope.CONTACT
        async with ChunkParser(contact_scope=contact_scope, processes=self._processes) as parser:
            # A task reads and sends chunks ahead while the caller packs earlier ones: the
            # reading (in a thread) and the parsing (in processes) overlap the packing.
            ahead: asyncio.Queue[tuple[LineChunk, Started | None] | BaseException | None]
            ahead = asyncio.Queue(maxsize=parser.depth)
            reading = asyncio.create_task(self._read_ahead(parser, ahead))
            try:
                while (item := await ahead.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield await self._chunk(parser, *item, contact_scope)
            finally:
                reading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
                while not ahead.empty():
                    left = ahead.get_nowait()
                    if isinstance(left, tuple) and left[1] is not None:
                        left[1].future.cancel()

    async def _read_ahead(
        self,
        parser: ChunkParser,
        ahead: asyncio.Queue[tuple[LineChunk, Started | None] | BaseException | None],
    ) -> None:
        try:
            async for line_chunk in self._reader.chunks(numbered=False):
                await ahead.put((line_chunk, await parser.start(line_chunk)))
        except Exception as error:  # handed to the reader of the queue
            await ahead.put(error)
            return
        await ahead.put(None)

    async def _chunk(
        self,
        parser: ChunkParser,
        line_chunk: LineChunk,
        started: Started | None,
        contact_scope: bool,
    ) -> Chunk:
        encoded, segment = await parser.result(line_chunk, started)
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
        )

    async def aclose(self) -> None:
        await self._reader.aclose()


class IterableInput:
    """Records from an iterable or async iterable of mappings (or JSON lines as bytes).

    An async iterable is drained by a pump task into a bounded stream, so a pause in the source
    can be noticed (and the pending batch sealed) without cancelling the iterator itself.
    """

    origin = "<records>"

    def __init__(
        self, records: Iterable[Any] | AsyncIterable[Any], task_group: TaskGroup, seal_after: float
    ) -> None:
        self._records = records
        self._task_group = task_group
        self._seal_after = seal_after
        self._skip = 0

    async def skip(self, lines: int) -> str:
        self._skip = lines
        return ""

    async def chunks(self, collection: Collection) -> AsyncIterator[Chunk | None]:
        if isinstance(self._records, AsyncIterable):
            async for chunk in self._async_chunks(self._records, collection):
                yield chunk
            return
        position = 0
        batch: list[EncodedRecord | RejectedRecord] = []
        for item in self._records:
            position += 1
            if position <= self._skip:
                continue
            batch.append(_encode_item(item, collection, position))
            if len(batch) >= _ITERABLE_CHUNK:
                yield Chunk(batch, position - len(batch) + 1, position, _no_digest)
                batch = []
                await anyio.lowlevel.checkpoint()
        if batch:
            yield Chunk(batch, position - len(batch) + 1, position, _no_digest)

    async def _async_chunks(
        self, records: AsyncIterable[Any], collection: Collection
    ) -> AsyncIterator[Chunk | None]:
        send, receive = anyio.create_memory_object_stream[Any](_ITERABLE_CHUNK)

        async def pump() -> None:
            async with send:
                async for item in records:
                    await send.send(item)

        self._task_group.start_soon(pump)
        position = 0
        async with receive:
            while True:
                item: Any = _PAUSE
                with anyio.move_on_after(self._seal_after):
                    try:
                        item = await receive.receive()
                    except anyio.EndOfStream:
                        return
                if item is _PAUSE:
                    yield None
                    continue
                position += 1
                if position <= self._skip:
                    continue
                batch = [_encode_item(item, collection, position)]
                while len(batch) < _ITERABLE_CHUNK:  # take what is already there, without waiting
                    try:
                        item = receive.receive_nowait()
                    except anyio.WouldBlock:
                        break
                    except anyio.EndOfStream:
                        yield Chunk(batch, position - len(batch) + 1, position, _no_digest)
                        return
                    position += 1
                    batch.append(_encode_item(item, collection, position))
                yield Chunk(batch, position - len(batch) + 1, position, _no_digest)

    async def aclose(self) -> None:
        return None


_PAUSE = object()


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
