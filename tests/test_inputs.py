"""Inputs read in tasks of their own: chunks in order, errors raised from the block."""

from __future__ import annotations

import gzip
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import inputs, parsing
from orchestrator.errors import InputError
from orchestrator.inputs import Chunk, FileInput, IterableInput, RecordInput
from orchestrator.parsing import ParsePool
from orchestrator.records import Collection, EncodedRecord, Scope

pytestmark = pytest.mark.anyio

CONTACT = Collection("Orders", scope=Scope.CONTACT, type="orders")


def record(i: int) -> dict[str, Any]:
    return {
        "key": f"k{i}",
        "contactIdentity": {"identifier": "email", "value": f"c{i}@example.com"},
        "json": {"n": i, "text": "x" * (i % 200)},
    }


def write_records(path: Path, count: int) -> Path:
    path.write_bytes(b"".join(orjson.dumps(record(i)) + b"\n" for i in range(count)))
    return path


def spool_files() -> set[str]:
    directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else "/tmp"
    return {name for name in os.listdir(directory) if name.startswith("insight-import-")}


async def read_all(source: RecordInput) -> list[Chunk]:
    async with source.open(CONTACT) as chunks:
        return [chunk async for chunk in chunks]


def positions(chunks: list[Chunk]) -> list[int]:
    lines: list[int] = []
    for chunk in chunks:
        for result in chunk.results:
            assert isinstance(result, EncodedRecord)
            assert result.source is not None
            lines.append(result.source.line)
    return lines


async def test_leaving_a_file_early_stops_reading_and_frees_the_spool_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leaving the block after one chunk stops the reading, removes the spool, closes the file."""
    monkeypatch.setattr(parsing, "PROCESS_AFTER", 0)
    monkeypatch.setattr(inputs, "_CHUNK_BYTES", 1 << 14)
    path = write_records(tmp_path / "in.jsonl", 5_000)
    spools_before = spool_files()
    async with ParsePool(1) as pool:
        source = FileInput(str(path), pool=pool)
        with anyio.fail_after(30):
            async with source.open(CONTACT) as chunks:
                first = await chunks.receive()
                assert spool_files() - spools_before  # parsed by the worker, through a spool
        assert first.first_line == 1
        assert first.run is not None
        assert not spool_files() - spools_before  # ours are gone (other processes may come and go)
        assert source._reader._opened is None


async def test_a_read_error_is_raised_from_the_block_as_itself(tmp_path: Path) -> None:
    """A corrupt gzip file raises InputError from the block, not an ExceptionGroup."""
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(write_records(tmp_path / "in.jsonl", 99).read_bytes())[:60])
    with pytest.raises(InputError, match="not a valid gzip file"):
        await read_all(FileInput(str(path)))


async def test_an_error_of_the_consumer_comes_out_of_the_block_as_itself(tmp_path: Path) -> None:
    """An error raised inside the block is not wrapped in an ExceptionGroup."""
    source = FileInput(str(write_records(tmp_path / "in.jsonl", 10)))

    async def fail_on_the_first_chunk() -> None:
        async with source.open(CONTACT) as chunks:
            await chunks.receive()
            raise KeyError("the consumer's")

    with pytest.raises(KeyError):
        await fail_on_the_first_chunk()


async def test_an_async_source_that_pauses_is_seen_to_pause_and_is_stopped_with_the_block() -> None:
    """The consumer gets what came before a pause, then waits; leaving the block stops the pump."""
    stopped = anyio.Event()

    async def trickle() -> AsyncIterator[dict[str, Any]]:
        try:
            for i in range(3):
                yield record(i)
            await anyio.sleep_forever()
        finally:
            stopped.set()

    received: list[Chunk] = []
    with anyio.fail_after(10):
        async with IterableInput(trickle()).open(CONTACT) as chunks:
            while True:
                with anyio.move_on_after(0.05) as waited:
                    received.append(await chunks.receive())
                if waited.cancelled_caught:  # the pause
                    break
        await stopped.wait()
    assert positions(received) == [1, 2, 3]


@settings(max_examples=40, deadline=None)
@given(
    count=st.integers(0, 5_000),
    skip=st.integers(0, 5_100),
    asynchronous=st.booleans(),
    pause_every=st.integers(1, 3_000),
)
def test_iterable_chunks_cover_every_position_after_the_skip_in_order(
    count: int, skip: int, asynchronous: bool, pause_every: int
) -> None:
    """Sync or async, pausing or not: chunks hold positions skip+1..count, in order, each once."""

    async def items() -> AsyncIterator[dict[str, Any]]:
        for i in range(count):
            if i % pause_every == 0:
                await anyio.lowlevel.checkpoint()
            yield record(i)

    async def read() -> list[Chunk]:
        source = IterableInput(items() if asynchronous else [record(i) for i in range(count)])
        assert await source.skip(skip) == ""
        return await read_all(source)

    chunks = anyio.run(read)
    assert positions(chunks) == list(range(skip + 1, count + 1))
    for chunk in chunks:
        assert positions([chunk]) == list(range(chunk.first_line, chunk.last_line + 1))
