from __future__ import annotations

import gzip
import io
import os
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path

import anyio
import pytest
import xxhash
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from orchestrator import errors
from orchestrator.records import OVERSIZED_LINE_START, oversized_line
from orchestrator.sources import (
    KEPT_PREFIX_BYTES,
    JsonLinesReader,
    LineChunk,
    check_inputs,
    is_stream,
    validate_inputs,
)

pytestmark = pytest.mark.anyio


def fingerprint(lines: list[bytes]) -> str:
    """The documented digest: XXH3-128 over each line followed by a newline."""
    state = xxhash.xxh3_128()
    for line in lines:
        state.update(line + b"\n")
    return state.hexdigest()


async def read_all(path: str, chunk_bytes: int = 1 << 20) -> list[LineChunk]:
    async with JsonLinesReader(path, chunk_bytes=chunk_bytes) as reader:
        return [chunk async for chunk in reader.chunks()]


def flatten(chunks: list[LineChunk]) -> list[bytes]:
    lines: list[bytes] = []
    for chunk in chunks:
        assert chunk.first_line == len(lines) + 1
        lines.extend(chunk.lines)
    return lines


async def test_reads_lines_with_numbers_and_digests(tmp_path: Path) -> None:
    """Chunks cover every line once, numbered from 1, each with the running fingerprint."""
    content = [b'{"key": "%d", "json": {}}' % i for i in range(500)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(content) + b"\n")
    chunks = await read_all(str(path), chunk_bytes=1000)
    assert len(chunks) > 5
    assert flatten(chunks) == content
    for chunk in chunks:
        assert chunk.origin == str(path)
        assert chunk.last_line == chunk.first_line + len(chunk.lines) - 1
        assert chunk.end_digest == fingerprint(content[: chunk.last_line])
        assert chunk.digest_through(0) == fingerprint(content[: chunk.first_line - 1])
        assert chunk.digest_through(3) == fingerprint(content[: chunk.first_line + 2])


async def test_final_line_without_newline_and_crlf_and_blanks(tmp_path: Path) -> None:
    """CRLF is stripped, blank lines are kept, and a last line without newline counts."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"a\r\n\r\n\nb\r\nc")
    chunks = await read_all(str(path), chunk_bytes=3)
    assert flatten(chunks) == [b"a", b"", b"", b"b", b"c"]
    assert chunks[-1].end_digest == fingerprint([b"a", b"", b"", b"b", b"c"])


async def test_lf_and_crlf_give_the_same_digest(tmp_path: Path) -> None:
    """The fingerprint depends on line contents only, not on the line endings."""
    lf, crlf = tmp_path / "lf.jsonl", tmp_path / "crlf.jsonl"
    lf.write_bytes(b"x\ny\n")
    crlf.write_bytes(b"x\r\ny")
    assert (await read_all(str(lf)))[-1].end_digest == (await read_all(str(crlf)))[-1].end_digest


async def test_bom_is_dropped(tmp_path: Path) -> None:
    """A UTF-8 byte order mark at the start of the input is removed from line 1."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf{}\n{}\n")
    assert flatten(await read_all(str(path))) == [b"{}", b"{}"]


async def test_empty_file_has_no_chunks(tmp_path: Path) -> None:
    """An empty input yields nothing."""
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert await read_all(str(path)) == []


async def test_line_longer_than_chunk(tmp_path: Path) -> None:
    """A line longer than chunk_bytes is read whole."""
    path = tmp_path / "long.jsonl"
    long = b"x" * 10_000
    path.write_bytes(b"a\n" + long + b"\nb\n")
    assert flatten(await read_all(str(path), chunk_bytes=7)) == [b"a", long, b"b"]


async def test_gzip_detected_by_magic_bytes(tmp_path: Path) -> None:
    """gzip input is recognised by its magic bytes, whatever its name, and digests match."""
    content = [b'{"n": %d}' % i for i in range(2000)]
    path = tmp_path / "data.jsonl"  # no .gz suffix on purpose
    path.write_bytes(gzip.compress(b"\n".join(content)))
    chunks = await read_all(str(path), chunk_bytes=4096)
    assert flatten(chunks) == content
    assert chunks[-1].end_digest == fingerprint(content)


async def test_corrupt_gzip_is_an_input_error(tmp_path: Path) -> None:
    """A truncated gzip file raises InputError naming the path."""
    path = tmp_path / "bad.jsonl.gz"
    packed = gzip.compress(b"\n".join(os.urandom(30).hex().encode() for _ in range(1000)))
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(errors.InputError, match=r"bad\.jsonl\.gz.*not a valid gzip"):
        await read_all(str(path))
    garbled = bytearray(packed)
    garbled[len(garbled) // 2 : len(garbled) // 2 + 50] = bytes(50)
    path.write_bytes(bytes(garbled))
    with pytest.raises(errors.InputError, match="not a valid gzip"):
        await read_all(str(path))


async def test_missing_and_directory_inputs(tmp_path: Path) -> None:
    """A missing file or a directory is an InputError that says what to do."""
    with pytest.raises(errors.InputError, match="does not exist"):
        await read_all(str(tmp_path / "nope.jsonl"))
    with pytest.raises(errors.InputError, match="is a directory"):
        await read_all(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
async def test_unreadable_input(tmp_path: Path) -> None:
    """A file without read permission is an InputError."""
    path = tmp_path / "secret.jsonl"
    path.write_bytes(b"{}\n")
    path.chmod(0)
    with pytest.raises(errors.InputError, match="permission"):
        await validate_inputs([str(path)])


async def test_validate_inputs(tmp_path: Path) -> None:
    """validate_inputs accepts readable files and rejects bad lists before any import."""
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"{}\n")
    packed = tmp_path / "good.jsonl.gz"
    packed.write_bytes(gzip.compress(b"{}\n"))
    await validate_inputs([str(good), str(packed), "-"])
    with pytest.raises(errors.InputError, match="does not exist"):
        await validate_inputs([str(good), str(tmp_path / "missing.jsonl")])
    with pytest.raises(errors.InputError, match="only once"):
        await validate_inputs(["-", "-"])
    with pytest.raises(errors.InputError, match="no input"):
        await validate_inputs([])
    not_gzip = tmp_path / "fake.gz"
    not_gzip.write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(errors.InputError, match="gzip"):
        await validate_inputs([str(not_gzip)])


async def test_skip_resumes_and_returns_the_digest(tmp_path: Path) -> None:
    """skip(n) consumes n lines, returns their fingerprint, and chunks continue at line n+1."""
    content = [b"line-%d" % i for i in range(100)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(content) + b"\n")
    for skipped in (0, 1, 37, 64, 100):
        async with JsonLinesReader(str(path), chunk_bytes=64) as reader:
            digest = await reader.skip(skipped)
            chunks = [chunk async for chunk in reader.chunks()]
        assert digest == fingerprint(content[:skipped])
        rest = [line for chunk in chunks for line in chunk.lines]
        assert rest == content[skipped:]
        if chunks:
            assert chunks[0].first_line == skipped + 1
            assert chunks[0].digest_through(1) == fingerprint(content[: skipped + 1])
            assert chunks[-1].end_digest == fingerprint(content)


async def test_prepared_chunks_run_prepare_in_the_reading_thread(tmp_path: Path) -> None:
    """prepared_chunks gives chunks(numbered=False)'s chunks, each with prepare's result made
    off the event loop, the chunk left by skip() first."""
    content = [b"line-%d" % i for i in range(100)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(content) + b"\n")
    loop_thread = threading.get_ident()
    async with JsonLinesReader(str(path), chunk_bytes=64) as reader:
        await reader.skip(37)
        prepared = [
            pair
            async for pair in reader.prepared_chunks(
                lambda chunk: (threading.get_ident(), len(chunk.data))
            )
        ]
    assert [line for chunk, _ in prepared for line in chunk.lines] == content[37:]
    assert all(thread != loop_thread for _, (thread, _) in prepared)
    assert [size for _, (_, size) in prepared] == [len(chunk.data) for chunk, _ in prepared]


async def test_skip_past_the_end_is_an_input_error(tmp_path: Path) -> None:
    """Skipping more lines than the input has means the input changed: InputError."""
    path = tmp_path / "short.jsonl"
    path.write_bytes(b"a\nb\n")
    async with JsonLinesReader(str(path)) as reader:
        with pytest.raises(errors.InputError, match="has only 2 lines"):
            await reader.skip(3)


async def test_skip_only_before_chunks(tmp_path: Path) -> None:
    """skip() after reading started is a programming error."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"a\nb\n")
    async with JsonLinesReader(str(path), chunk_bytes=1) as reader:
        async for _ in reader.chunks():
            break
        with pytest.raises(RuntimeError, match="before chunks"):
            await reader.skip(1)


async def test_closed_reader_refuses_to_read(tmp_path: Path) -> None:
    """Reading after aclose raises InputError instead of reading a closed file."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"a\n")
    reader = JsonLinesReader(str(path))
    await reader.aclose()
    with pytest.raises(errors.InputError, match="closed"):
        async for _ in reader.chunks():
            pass


async def test_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    """'-' reads standard input (plain or gzip) with the origin '<stdin>'."""
    for data in (b"a\nb\n", gzip.compress(b"a\nb\n")):
        fake = io.TextIOWrapper(io.BufferedReader(io.BytesIO(data)))
        monkeypatch.setattr(sys, "stdin", fake)
        chunks = await read_all("-")
        assert flatten(chunks) == [b"a", b"b"]
        assert chunks[0].origin == "<stdin>"
        assert not fake.closed


def test_chunk_without_start_hash() -> None:
    """A LineChunk built by hand at line 1 digests from scratch; elsewhere it refuses."""
    chunk = LineChunk("x", 1, b"a\nb\n")
    assert chunk.end_digest == fingerprint([b"a", b"b"])
    with pytest.raises(ValueError, match="between 0 and 2"):
        chunk.digest_through(3)
    with pytest.raises(ValueError, match="start hash"):
        LineChunk("x", 5, b"a\n").end_digest  # noqa: B018


def test_invalid_chunk_bytes() -> None:
    """chunk_bytes below 1 is a ConfigError."""
    with pytest.raises(errors.ConfigError):
        JsonLinesReader("x", chunk_bytes=0)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    lines=st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"").rstrip(b"\r"))),
    chunk_bytes=st.integers(1, 50),
    trailing_newline=st.booleans(),
    crlf=st.booleans(),
    packed=st.booleans(),
)
def test_any_content_round_trips(
    tmp_path: Path,
    lines: list[bytes],
    chunk_bytes: int,
    trailing_newline: bool,
    crlf: bool,
    packed: bool,
) -> None:
    """Whatever the content, chunk size, endings or compression, lines and digests are exact."""
    import anyio

    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    if not packed and lines and lines[0].startswith(b"\x1f\x8b"):
        # gzip is told by its magic bytes; JSON text never starts with them
        lines[0] = lines[0][2:]
    ending = b"\r\n" if crlf else b"\n"
    data = ending.join(lines) + (ending if trailing_newline and lines else b"")
    if lines and lines[-1] == b"" and not trailing_newline:
        lines = lines[:-1]  # nothing after the last newline is no line
    path = tmp_path / "prop.jsonl"
    path.write_bytes(gzip.compress(data) if packed else data)
    chunks = anyio.run(read_all, str(path), chunk_bytes)
    assert flatten(chunks) == lines
    if chunks:
        assert chunks[-1].end_digest == fingerprint(lines)


def test_open_errors_say_what_to_do() -> None:
    """OS errors map to InputErrors naming the path and the fix."""
    from orchestrator.sources import _open_error

    denied = _open_error("a.jsonl", PermissionError(13, "Permission denied"))
    assert "permission denied" in str(denied)
    assert "'a.jsonl'" in str(denied)
    other = _open_error("a.jsonl", OSError(5, "Input/output error"))
    assert "Input/output error" in str(other)


def test_check_inputs_is_the_blocking_twin(tmp_path: Path) -> None:
    """check_inputs runs the same checks synchronously, for code outside an event loop."""
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"{}\n")
    check_inputs([str(good), "-"])
    with pytest.raises(errors.InputError, match="does not exist"):
        check_inputs([str(tmp_path / "missing.jsonl")])


class _FakeStdin:
    def __init__(self, buffer: object) -> None:
        self.buffer = buffer


class _Unseekable(io.RawIOBase):
    def readable(self) -> bool:
        return True

    def readinto(self, buffer: object) -> int:
        return 0


async def test_stdin_without_peek(monkeypatch: pytest.MonkeyPatch) -> None:
    """A seekable stdin without peek works; one that can neither peek nor seek is an InputError."""
    monkeypatch.setattr(sys, "stdin", _FakeStdin(io.BytesIO(gzip.compress(b"x\ny\n"))))
    assert flatten(await read_all("-")) == [b"x", b"y"]
    monkeypatch.setattr(sys, "stdin", _FakeStdin(_Unseekable()))
    with pytest.raises(errors.InputError, match="'<stdin>' cannot be read"):
        await read_all("-")


async def test_skip_rejects_negative_and_repr(tmp_path: Path) -> None:
    """skip() refuses a negative count; the reader's repr names its path."""
    reader = JsonLinesReader(str(tmp_path / "x.jsonl"), chunk_bytes=10)
    assert repr(reader) == f"JsonLinesReader({str(tmp_path / 'x.jsonl')!r}, chunk_bytes=10)"
    with pytest.raises(ValueError, match=">= 0"):
        await reader.skip(-1)


async def test_unnumbered_chunks_number_to_the_same(tmp_path: Path) -> None:
    """Chunks read unnumbered (their parser counts the lines) and numbered afterwards carry the
    same lines, numbers and fingerprints as chunks the reader numbers itself."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(b"line %d\r\n" % i if i % 7 else b"\n" for i in range(2_000)))
    numbered = await read_all(str(path), chunk_bytes=1_000)
    async with JsonLinesReader(str(path), chunk_bytes=1_000) as reader:
        raw = [chunk async for chunk in reader.chunks(numbered=False)]
    assert len(raw) == len(numbered) > 5
    assert all((chunk.first_line, chunk.count) == (0, -1) for chunk in raw)
    first = 1
    for chunk, expected in zip(raw, numbered, strict=True):
        count = chunk.data.count(b"\n")
        made = chunk.numbered(first, count)
        first += count
        assert (made.first_line, made.count, made.lines) == (
            expected.first_line,
            expected.count,
            expected.lines,
        )
        for lines in {0, 1, count // 2, count}:
            assert made.digest_through(lines) == expected.digest_through(lines)


# --------------------------------------------------------------------------- over-long lines


def stand_in(line: bytes, limit: int) -> bytes:
    return oversized_line(len(line), limit, line[:KEPT_PREFIX_BYTES])


async def read_limited(path: str, chunk_bytes: int, limit: int) -> list[LineChunk]:
    async with JsonLinesReader(path, chunk_bytes=chunk_bytes, max_line_bytes=limit) as reader:
        return [chunk async for chunk in reader.chunks()]


@given(
    lines=st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b""))),
    chunk_bytes=st.integers(1, 80),
    limit=st.integers(1, 40),
    trailing_newline=st.booleans(),
)
@example(lines=[b"", b"\xef\xbb\xbf", b""], chunk_bytes=5, limit=1, trailing_newline=False)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_every_line_longer_than_the_limit_gets_its_stand_in(
    tmp_path: Path, lines: list[bytes], chunk_bytes: int, limit: int, trailing_newline: bool
) -> None:
    """Whatever the chunk size, each line over the limit is replaced by its stand-in, the
    others are kept, and the line numbers and fingerprints follow the lines as read."""
    import anyio

    if lines and lines[0].startswith((b"\xef\xbb\xbf", b"\x1f\x8b")):
        lines[0] = lines[0][3:]
    # a line that starts like a stand-in is taken for one (it is rejected either way: the NUL
    # it starts with is never JSON)
    assume(not any(line.startswith(OVERSIZED_LINE_START) for line in lines))
    data = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
    if lines and lines[-1] == b"" and not trailing_newline:
        lines = lines[:-1]
    path = tmp_path / "long.jsonl"
    path.write_bytes(data)
    expected = [stand_in(line, limit) if len(line) > limit else line for line in lines]
    chunks = anyio.run(read_limited, str(path), chunk_bytes, limit)
    assert flatten(chunks) == expected
    if chunks:
        assert chunks[-1].end_digest == fingerprint(expected)


@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 5, 64, 4096])
async def test_only_the_first_lines_byte_order_mark_is_left_out_of_a_stand_in(
    tmp_path: Path, chunk_bytes: int
) -> None:
    """An over-long first line's stand-in keeps its text without the input's byte order mark,
    however the mark is split across reads; a later line's mark is its own text and stays."""
    first, later = b"x" * 50, b"\xef\xbb\xbf" + b"y" * 50
    path = tmp_path / "marked.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + first + b"\n" + later + b"\n")
    lines = flatten(await read_limited(str(path), chunk_bytes, 10))
    # a stand-in ends with the line's first bytes, after the last of its NUL separators
    assert [line.rsplit(b"\x00", 1)[1] for line in lines] == [first, later]


async def test_a_long_line_keeps_only_its_prefix_and_resumes_the_same(tmp_path: Path) -> None:
    """A 5 MB line is dropped as read (1 KiB kept); skip() over it gives the same fingerprint."""
    long = b'{"key": "big", "json": {"x": "' + b"0" * 5_000_000 + b'"}}'
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\r\n' + long + b'\r\n{"b": 2}\r\n{"c": 3}')
    chunks = await read_limited(str(path), 64 * 1024, 1_000_000)
    lines = flatten(chunks)
    assert lines == [b'{"a": 1}', stand_in(long + b"\r", 1_000_000), b'{"b": 2}', b'{"c": 3}']
    assert len(lines[1]) < KEPT_PREFIX_BYTES + 100
    async with JsonLinesReader(str(path), chunk_bytes=4096, max_line_bytes=1_000_000) as reader:
        assert await reader.skip(2) == fingerprint(lines[:2])
        assert [line async for chunk in reader.chunks() for line in chunk.lines] == lines[2:]
    with pytest.raises(errors.ConfigError, match="max_line_bytes"):
        JsonLinesReader(str(path), max_line_bytes=0)


def _zeros_gzip(path: Path, megabytes: int) -> None:
    """A valid line, then ``megabytes`` MB of zeros without a newline, then two valid lines."""
    squeeze = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: a gzip header and trailer
    zeros = bytes(1 << 20)
    with path.open("wb") as out:
        out.write(squeeze.compress(b'{"key": "first", "json": {}}\n'))
        for _ in range(megabytes):
            out.write(squeeze.compress(zeros))
        out.write(
            squeeze.compress(b'\n{"key": "after", "json": {}}\n{"key": "last", "json": {}}\n')
        )
        out.write(squeeze.flush())


async def test_a_newline_free_gzip_bomb_is_read_in_bounded_memory(tmp_path: Path) -> None:
    """300 MB of zeros in one line (a 300 KB gzip) cost a few MB: the line is dropped as read."""
    path = tmp_path / "bomb.jsonl.gz"
    _zeros_gzip(path, 300)
    assert path.stat().st_size < 2_000_000
    tracemalloc.start()
    try:
        lines = []
        async with JsonLinesReader(
            str(path), chunk_bytes=1 << 20, max_line_bytes=4 << 20
        ) as reader:
            async for chunk in reader.chunks():
                lines.extend(chunk.lines)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lines[0] == b'{"key": "first", "json": {}}'
    assert lines[1].startswith(oversized_line(300 << 20, 4 << 20, b"\0" * 10)[:40])
    assert lines[2:] == [b'{"key": "after", "json": {}}', b'{"key": "last", "json": {}}']
    assert peak < 24 << 20, peak


# --------------------------------------------------------------------------- pipes


def test_a_named_pipe_is_checked_without_being_opened_and_read_once(tmp_path: Path) -> None:
    """check_inputs leaves a FIFO's data in it; the reader then gets every line, gzip too."""
    import subprocess

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    assert is_stream(str(fifo))
    assert is_stream("-")
    assert not is_stream(str(tmp_path))
    assert not is_stream(str(tmp_path / "missing"))
    payload = gzip.compress(b"".join(b'{"n": %d}\n' % i for i in range(1000)))
    script = "import sys; open(sys.argv[1], 'wb').write(sys.stdin.buffer.read())"
    writer = subprocess.Popen([sys.executable, "-c", script, str(fifo)], stdin=subprocess.PIPE)
    assert writer.stdin is not None
    writer.stdin.write(payload)
    writer.stdin.close()
    check_inputs([str(fifo)])
    lines = flatten(anyio.run(read_all, str(fifo), 4096))
    assert lines == [b'{"n": %d}' % i for i in range(1000)]
    assert writer.wait(timeout=10) == 0


def test_closing_a_reader_ends_a_wait_on_a_quiet_writer(tmp_path: Path) -> None:
    """A read waiting on a FIFO whose writer is silent is given up when the read is cancelled."""
    import subprocess
    import time

    fifo = tmp_path / "quiet.fifo"
    os.mkfifo(fifo)
    script = (
        "import sys, time; f = open(sys.argv[1], 'wb'); f.write(b'1\\n'); f.flush(); time.sleep(60)"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(fifo)])

    async def read_for_a_second() -> None:
        with anyio.move_on_after(1.0):
            async with JsonLinesReader(str(fifo)) as reader:
                async for _ in reader.chunks():
                    pass

    try:
        started = time.monotonic()
        anyio.run(read_for_a_second)
        assert time.monotonic() - started < 3
    finally:
        writer.kill()
        writer.wait()
