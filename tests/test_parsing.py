"""Parsing in worker processes gives exactly what parsing in a thread gives, and survives losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from orchestrator import inputs, parsing
from orchestrator.inputs import FileInput
from orchestrator.records import Collection, Scope

pytestmark = pytest.mark.anyio

CONTACT = Collection("Orders", scope=Scope.CONTACT, type="orders")


def write_mixed(path: Path, records: int) -> None:
    """Valid records with, every so often, each kind of line the parser must treat specially."""
    lines: list[bytes] = []
    for i in range(records):
        record = {
            "key": f"k{i % (records - 7)}",  # a few keys repeat
            "contactIdentity": {"identifier": "email", "value": f"c{i}@example.com"},
            "json": {"n": i, "tags": ["a", "b"], "text": "x" * (i % 300)},
        }
        line = orjson.dumps(record)
        match i % 97:
            case 5:
                line = b"{not json"
            case 11:
                line = b"   "
            case 17:
                line = b"  " + line + b"  "  # valid, but stripped
            case 23:
                line = orjson.dumps({**record, "key": i})  # integer key: re-encoded
            case 29:
                line = orjson.dumps({**record, "json": {"m": [[1]]}})  # a rule broken
            case _:
                pass
        lines.append(line)
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")


async def read_chunks(path: Path, processes: int) -> list[tuple[object, ...]]:
    source = FileInput(str(path), processes=processes)
    seen: list[tuple[object, ...]] = []
    try:
        async for chunk in source.chunks(CONTACT):
            assert chunk is not None
            assert chunk.run is not None
            run = chunk.run
            seen.append(
                (
                    chunk.first_line,
                    chunk.last_line,
                    chunk.digest_through(chunk.last_line - chunk.first_line + 1),
                    bytes(run.segment),  # a view of shared memory: valid until next chunk
                    list(run.ends),
                    run.keys,
                    run.identifiers,
                    run.values,
                    list(run.lines),
                    [(str(r.error.source), r.error.rule, r.raw) for r in chunk.results],
                )
            )
    finally:
        await source.aclose()
    return seen


@pytest.fixture
def parse_everything_in_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parsing, "PROCESS_AFTER", 0)
    monkeypatch.setattr(inputs, "_CHUNK_BYTES", 1 << 18)  # many chunks from a small file


async def test_processes_and_thread_agree(
    tmp_path: Path, parse_everything_in_processes: None
) -> None:
    """Every chunk (records, bytes, line numbers, rejects, fingerprints) is the same either way."""
    path = tmp_path / "mixed.jsonl"
    write_mixed(path, 30_000)  # more chunks than spool slots
    in_thread = await read_chunks(path, processes=0)
    in_processes = await read_chunks(path, processes=2)
    assert len(in_thread) > 2 + 2 + 1
    assert in_processes == in_thread
    rejects = [reject for chunk in in_thread for reject in chunk[-1]]  # type: ignore[union-attr]
    assert {rule for _, rule, _ in rejects} == {"json-syntax", "json-nested-array"}


async def test_chunk_larger_than_a_spool_slot(
    tmp_path: Path, parse_everything_in_processes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk too big for the shared-memory ring travels through the pipe, with the same result."""
    monkeypatch.setattr(parsing, "_SLOT_BYTES", 1_000)
    path = tmp_path / "mixed.jsonl"
    write_mixed(path, 1_500)
    assert await read_chunks(path, processes=1) == await read_chunks(path, processes=0)


async def test_a_dead_worker_falls_back_to_a_thread(
    tmp_path: Path, parse_everything_in_processes: None
) -> None:
    """A worker killed mid-run loses nothing: its chunks are parsed in a thread instead."""
    path = tmp_path / "mixed.jsonl"
    write_mixed(path, 15_000)
    expected = await read_chunks(path, processes=0)
    pool = parsing._start_pool(2)
    for pid in list(pool._processes):  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGKILL)
    assert await read_chunks(path, processes=2) == expected
    # and the next input starts a fresh pool
    assert await read_chunks(path, processes=2) == expected
    assert parsing._pool is not pool


def test_workers_leave_when_their_parent_is_killed(tmp_path: Path) -> None:
    """A parent killed outright (no shutdown) does not leave parse workers behind."""
    script = textwrap.dedent(
        """
        import os, sys
        from orchestrator import inputs, parsing
        if __name__ == "__main__":
            pool = parsing._start_pool(2)
            print(" ".join(map(str, pool._processes)), flush=True)
            os._exit(0)
        """
    )
    (tmp_path / "parent.py").write_text(script)
    output = tmp_path / "pids.txt"
    with output.open("w") as stdout:  # a file, not a pipe: helpers of multiprocessing keep it
        subprocess.run(
            [sys.executable, str(tmp_path / "parent.py")], stdout=stdout, check=True, timeout=60
        )
    out = output.read_text()
    pids = [int(pid) for pid in out.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its (gone) parent counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_that_cannot_start_leave_parsing_to_a_thread(tmp_path: Path) -> None:
    """A program whose main module is not import-safe still imports everything (in a thread)."""
    data = tmp_path / "mixed.jsonl"
    write_mixed(data, 3_000)
    script = textwrap.dedent(
        f"""
        import anyio
        from orchestrator import inputs, parsing
        from orchestrator.inputs import FileInput
        from orchestrator.records import Collection, Scope

        parsing.PROCESS_AFTER = 0
        # no `if __name__ == "__main__":` guard: a new worker would run this again and fail

        async def count() -> int:
            source = FileInput({str(data)!r}, processes=2)
            total = 0
            async for chunk in source.chunks(Collection("Orders", scope=Scope.CONTACT)):
                total += chunk.read
            await source.aclose()
            return total

        print(anyio.run(count))
        """
    )
    (tmp_path / "unguarded.py").write_text(script)
    output = tmp_path / "out.txt"
    with output.open("w") as stdout:
        done = subprocess.run(
            [sys.executable, str(tmp_path / "unguarded.py")],
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    blank = sum(1 for i in range(3_000) if i % 97 == 11)
    assert output.read_text().split()[-1] == str(3_000 - blank)  # every non-blank line
