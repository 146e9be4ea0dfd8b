"""Parsing in worker processes gives exactly what parsing in a thread gives, and survives losses."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import orjson
import psutil
import pytest

from orchestrator import InsightClient, Orchestrator, RunStats, Settings, inputs, parsing
from orchestrator.errors import OrchestratorError
from orchestrator.inputs import FileInput
from orchestrator.logs import capture_events
from orchestrator.parsing import ParsePool
from orchestrator.records import Collection, Scope
from orchestrator.simulator import Simulator, SimulatorConfig
from tests.conftest import sim_client_settings

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


async def read_chunks(path: Path, pool: ParsePool | None) -> list[tuple[object, ...]]:
    source = FileInput(str(path), pool=pool)
    seen: list[tuple[object, ...]] = []
    async with source.open(CONTACT) as chunks:
        async for chunk in chunks:
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
    in_thread = await read_chunks(path, None)
    async with ParsePool(2) as pool:
        in_processes = await read_chunks(path, pool)
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
    async with ParsePool(1) as pool:
        assert await read_chunks(path, pool) == await read_chunks(path, None)


async def test_a_dead_worker_falls_back_to_a_thread(
    tmp_path: Path, parse_everything_in_processes: None
) -> None:
    """A worker killed mid-run loses nothing: its chunks are parsed in a thread instead."""
    path = tmp_path / "mixed.jsonl"
    write_mixed(path, 15_000)
    expected = await read_chunks(path, None)
    async with ParsePool(2) as pool:
        executor = await pool.executor()
        for pid in list(executor._processes):
            os.kill(pid, signal.SIGKILL)
        assert await read_chunks(path, pool) == expected
        # and the next input starts fresh workers
        assert await read_chunks(path, pool) == expected
        assert pool._executor is not None
        assert pool._executor is not executor


def _read_in_a_daemon(path: str, answers: multiprocessing.SimpleQueue[object]) -> None:
    parsing.PROCESS_AFTER = 0  # ask for the workers from the first chunk

    async def read() -> tuple[list[tuple[object, ...]], list[str]]:
        with capture_events() as events:
            async with ParsePool(2) as pool:
                seen = await read_chunks(Path(path), pool)
        return seen, [event["event"] for event in events]

    try:
        answers.put(anyio.run(read))
    except BaseException as error:
        answers.put(repr(error))


def test_a_daemonic_process_parses_in_a_thread(tmp_path: Path) -> None:
    """A daemonic process (a prefork task worker's) may not start processes: its parser says so
    once and parses in a thread, reading exactly what workers would have."""
    path = tmp_path / "mixed.jsonl"
    write_mixed(path, 3_000)
    expected = anyio.run(read_chunks, path, None)
    context = multiprocessing.get_context("spawn")
    answers: multiprocessing.SimpleQueue[object] = context.SimpleQueue()
    daemon = context.Process(target=_read_in_a_daemon, args=(str(path), answers), daemon=True)
    daemon.start()
    answer = answers.get()
    daemon.join(30)
    assert isinstance(answer, tuple), answer
    seen, events = answer
    assert seen == expected
    assert events.count("parsing.processes_unavailable") == 1


def test_workers_leave_when_their_parent_is_killed(tmp_path: Path) -> None:
    """A parent killed outright (no shutdown) does not leave parse workers behind."""
    script = textwrap.dedent(
        """
        import os, sys
        from orchestrator import parsing
        if __name__ == "__main__":
            executor = parsing.ParsePool(2)._start()
            print(" ".join(map(str, executor._processes)), flush=True)
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


def test_workers_of_a_killed_parent_leave_while_it_is_not_reaped(tmp_path: Path) -> None:
    """A parent killed outright, whose caller still reads the output it shares with its parse
    workers (so nobody has reaped it yet), leaves no worker behind to keep that output open:
    the caller sees the end of it (before, the workers and the fork server kept each other,
    and the caller, waiting for ever)."""
    script = textwrap.dedent(
        """
        import os, signal
        from orchestrator import parsing
        if __name__ == "__main__":
            executor = parsing.ParsePool(2)._start()
            print(" ".join(map(str, executor._processes)), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    (tmp_path / "parent.py").write_text(script)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "parent.py")], capture_output=True, timeout=30
    )
    assert done.returncode == -signal.SIGKILL
    pids = [int(pid) for pid in done.stdout.split()]
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


def test_a_main_module_that_is_not_import_safe_does_not_stop_the_workers(tmp_path: Path) -> None:
    """A program whose main module has no ``__main__`` guard still parses in worker processes."""
    data = tmp_path / "mixed.jsonl"
    write_mixed(data, 3_000)
    script = textwrap.dedent(
        f"""
        import anyio
        from orchestrator import parsing
        from orchestrator.inputs import FileInput
        from orchestrator.records import Collection, Scope

        parsing.PROCESS_AFTER = 0
        # no `if __name__ == "__main__":` guard: a worker that ran this again would fail

        async def count() -> int:
            total = 0
            async with parsing.ParsePool(2) as pool:
                source = FileInput({str(data)!r}, pool=pool)
                async with source.open(Collection("Orders", scope=Scope.CONTACT)) as chunks:
                    async for chunk in chunks:
                        total += chunk.read
                assert pool._executor is not None  # in worker processes, not in a thread
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


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(records_per_second=100_000, seed=5)) as simulator:
        yield simulator


def write_orders(path: Path, collection: str, count: int) -> Path:
    path.write_bytes(
        b"".join(
            orjson.dumps(
                {
                    "key": f"{collection}-{i}",
                    "contactIdentity": {"identifier": "email", "value": f"c{i % 40}@x.io"},
                    "json": {"n": i, "pad": "x" * (i % 500)},
                }
            )
            + b"\n"
            for i in range(count)
        )
    )
    return path


async def test_two_orchestrators_with_different_parse_processes_import_side_by_side(
    sim: Simulator,
    tmp_path: Path,
    parse_everything_in_processes: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each orchestrator has its own workers: two importing at once both import every record."""
    monkeypatch.setattr(inputs, "_CHUNK_BYTES", 1 << 20)  # the worker, not the parent, is busy
    counts = {"OrdersA": 40_000, "OrdersB": 3_000}
    paths = {name: write_orders(tmp_path / f"{name}.jsonl", name, n) for name, n in counts.items()}
    read: dict[str, int] = {}
    a_stats = RunStats()

    async def run(name: str, processes: int, stats: RunStats | None = None) -> None:
        settings = Settings.scaled(0.01, parse_processes=processes)
        async with Orchestrator(InsightClient(sim_client_settings(sim)), settings=settings) as orch:
            result = await orch.import_files(
                Collection(name, "contact"), [str(paths[name])], stats=stats
            )
        assert result.ok
        read[name] = result.records_read

    async def run_b_while_a_parses() -> None:
        # A's first chunk is in: its worker is busy with the next ones (the engine has no event
        # for this, so the test looks every millisecond)
        while a_stats.records_read == 0:  # noqa: ASYNC110
            await anyio.sleep(0.001)
        await run("OrdersB", 2)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "OrdersA", 1, a_stats)
            tg.start_soon(run_b_while_a_parses)
    assert read == counts
    for name, count in counts.items():
        keys = {identity[2] for identity in sim.collections.get(name, {})}
        assert keys == {f"{name}-{i}" for i in range(count)}


async def test_closing_the_orchestrator_ends_its_parse_workers(
    sim: Simulator, tmp_path: Path, parse_everything_in_processes: None
) -> None:
    """After the Orchestrator's block no parse worker of its pool is left running."""
    me = psutil.Process()
    before = {process.pid for process in me.children(recursive=True)}
    path = write_orders(tmp_path / "in.jsonl", "Orders", 3_000)
    settings = Settings.scaled(0.01, parse_processes=2)
    async with Orchestrator(InsightClient(sim_client_settings(sim)), settings=settings) as orch:
        result = await orch.import_files(Collection("Orders", "contact"), [str(path)])
        # the workers: new processes started by a fork server (not by this process itself)
        workers = [
            process.pid
            for process in me.children(recursive=True)
            if process.pid not in before and process.ppid() != me.pid
        ]
    assert result.records_read == 3_000
    assert len(workers) == 2
    assert not [pid for pid in workers if _alive(pid)]


def test_workers_never_import_the_main_module(tmp_path: Path) -> None:
    """Workers started from a script (as from ``insight-import``) import only the record rules."""
    data = tmp_path / "orders.jsonl"
    write_mixed(data, 3_000)
    marker = tmp_path / "main-imported-again.txt"
    script = textwrap.dedent(
        f"""
        from pathlib import Path

        import orchestrator.cli  # as the insight-import console script does

        if __name__ != "__main__":  # imported again, under another name: by a worker
            Path({str(marker)!r}).write_text(__name__)
        else:
            import asyncio

            import anyio
            import orjson

            from orchestrator import Collection, InsightClient, Orchestrator, Settings
            from orchestrator import parse_worker, parsing
            from orchestrator.client import ClientSettings, RetryPolicy
            from orchestrator.simulator import Simulator, SimulatorConfig

            parsing.PROCESS_AFTER = 0  # every chunk to the workers

            async def main() -> None:
                async with Simulator(SimulatorConfig(records_per_second=100_000)) as sim:
                    client = InsightClient(
                        ClientSettings(
                            username=sim.config.username,
                            password=sim.config.password,
                            base_url=sim.base_url,
                            retry=RetryPolicy.immediate(timeout=10.0),
                        )
                    )
                    settings = Settings.scaled(0.01, parse_processes=2)
                    async with Orchestrator(client, settings=settings) as orch:
                        result = await orch.import_files(
                            Collection("Orders", "contact"), [{str(data)!r}]
                        )
                        executor = await orch._parse_pool.executor()
                        modules = await asyncio.wrap_future(
                            executor.submit(parse_worker._loaded_modules)
                        )
                print(orjson.dumps({{"read": result.records_read, "modules": modules}}).decode())

            anyio.run(main)
        """
    )
    (tmp_path / "program.py").write_text(script)
    output = tmp_path / "out.json"
    with output.open("w") as stdout:  # a file, not a pipe: helpers of multiprocessing keep it
        done = subprocess.run(
            [sys.executable, str(tmp_path / "program.py")],
            stdout=stdout,
            stderr=subprocess.PIPE,
            timeout=120,
            check=False,
        )
    assert not marker.exists(), "a worker imported the main module again"
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    answer = orjson.loads(output.read_text().splitlines()[-1])
    assert answer["read"] == 3_000 - sum(1 for i in range(3_000) if i % 97 == 11)
    modules = set(answer["modules"])
    assert "orchestrator.records" in modules
    assert not modules & {"orchestrator.cli", "orchestrator.engine", "aiohttp"}


async def test_a_closed_pool_says_so() -> None:
    """A pool used after it was closed raises an error that says how to keep runs inside it."""
    pool = ParsePool(1)
    await pool.aclose()
    with pytest.raises(OrchestratorError, match="keep every run inside"):
        await pool.executor()


async def test_workers_run_below_the_parents_priority() -> None:
    """Parsing is background work: the workers are niced, so the parent's event loop gets a CPU
    first when both want one."""
    async with ParsePool(1) as pool:
        executor = await pool.executor()
        theirs = await asyncio.wrap_future(executor.submit(os.getpriority, os.PRIO_PROCESS, 0))
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    assert theirs == min(ours + 10, 19)
