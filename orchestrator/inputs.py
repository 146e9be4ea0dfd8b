"""The engine's inputs: files and iterables turned into chunks of validated, encoded records.

Blocking reads and validation of file lines run in worker threads; an async iterable is drained by
a pump task into a bounded stream, so a pause in the source can be noticed (the engine then seals
what is pending) without cancelling the iterator itself.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import orjson
from anyio.abc import TaskGroup

from orchestrator.errors import RecordError
from orchestrator.records import (
    Collection,
    EncodedRecord,
    RejectedRecord,
    Source,
    encode_line,
    encode_lines,
    encode_record,
)
from orchestrator.sources import JsonLinesReader

__all__ = ["Chunk", "FileInput", "IterableInput", "RecordInput"]

# How many records of an iterable are encoded between two yields to the event loop.
_ITERABLE_CHUNK = 2_000


@dataclass(slots=True)
class Chunk:
    """Validated records of consecutive lines of one input."""

    results: list[EncodedRecord | RejectedRecord]
    first_line: int
    last_line: int
    digest_through: Callable[[int], str]


class RecordInput(Protocol):
    origin: str

    async def skip(self, lines: int) -> str: ...

    def chunks(self, collection: Collection) -> AsyncIterator[Chunk | None]:
        """Chunks in order; ``None`` when the input pauses (seal what is pending)."""
        ...

    async def aclose(self) -> None: ...


class FileInput:
    def __init__(self, path: str) -> None:
        self._reader = JsonLinesReader(path)
        self.origin = self._reader.origin

    async def skip(self, lines: int) -> str:
        return await self._reader.skip(lines)

    async def chunks(self, collection: Collection) -> AsyncIterator[Chunk | None]:
        async for chunk in self._reader.chunks():
            results = await anyio.to_thread.run_sync(
                functools.partial(
                    encode_lines,
                    chunk.lines,
                    collection,
                    origin=chunk.origin,
                    first_line=chunk.first_line,
                )
            )
            yield Chunk(results, chunk.first_line, chunk.last_line, chunk.digest_through)

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
