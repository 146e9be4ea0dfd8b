"""The worker embedded on a test's loop: real SQLite files and in-process simulators."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
from prometheus_client import REGISTRY

from orchestrator.accounts import Account
from orchestrator.client import InsightClient
from orchestrator.outbox import OutboxQueue, SqliteOutbox
from orchestrator.records import Collection, Scope
from orchestrator.settings import Settings
from orchestrator.simulator import Simulator, SimulatorConfig
from orchestrator.worker import Worker
from orchestrator.worker_http import serve_http
from tests.conftest import sim_client_settings

pytestmark = pytest.mark.anyio

ORDERS = Collection("Orders", Scope.ACCOUNT, "custom")
CARTS = Collection("Carts", Scope.ACCOUNT, "custom")


def fast(**overrides: Any) -> Settings:
    """Production settings scaled 100 times down: polls 0.05-0.3 s, linger 0.1 s."""
    values: dict[str, Any] = {"linger": 0.1}
    values.update(overrides)
    return Settings.scaled(0.01, **values)


def line(key: str, **json: Any) -> str:
    return orjson.dumps({"key": key, "json": json or {"n": 1}}).decode()


def insert(path: Path, account: str, collection: Collection, texts: list[str]) -> None:
    with sqlite3.connect(path) as conn:
        conn.executemany(
            "INSERT INTO insight_outbox (account, collection, scope, collection_type, record)"
            " VALUES (?, ?, ?, ?, ?)",
            [(account, collection.name, str(collection.scope), collection.type, t) for t in texts],
        )


def outbox_rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM insight_outbox").fetchone()[0])


async def wait_until(condition: Callable[[], object], within: float = 10.0) -> None:
    """Return once ``condition()`` holds; fail after ``within`` seconds."""
    with anyio.fail_after(within):
        while True:
            if condition():
                return
            await anyio.sleep(0.01)


def default_account(sim: Simulator) -> dict[str, Account]:
    return {"default": Account("default", sim_client_settings(sim))}


async def burst(store: SqliteOutbox, sim: Simulator, settings: Settings) -> Worker:
    """Run a worker of the default account over ``store`` once (``run(burst=True)``)."""
    async with Worker(store, default_account(sim), settings=settings, poll_interval=0.05) as w:
        with anyio.fail_after(30):
            await w.run(burst=True)
    return w


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(SimulatorConfig(records_per_second=20_000, jitter=0.3, seed=5)) as s:
        yield s


async def test_burst_imports_every_row_and_empties_the_outbox(
    sim: Simulator, tmp_path: Path
) -> None:
    """run(burst=True) imports every row of two collections, then returns with the outbox empty."""
    path = tmp_path / "outbox.sqlite"
    accounts = {"default": Account("default", sim_client_settings(sim))}
    async with SqliteOutbox(path, exclusive=True) as store:
        insert(path, "default", ORDERS, [line(f"o-{i}", i=i) for i in range(500)])
        insert(path, "default", CARTS, [line(f"c-{i}") for i in range(30)])
        async with Worker(store, accounts, settings=fast(), poll_interval=0.05) as worker:
            with anyio.fail_after(30):
                await worker.run(burst=True)
    assert len(sim.collections["Orders"]) == 500
    assert len(sim.collections["Carts"]) == 30
    assert outbox_rows(path) == 0
    assert worker.stats.records_imported == 530
    assert worker.dead_lettered == 0


async def test_a_burst_ends_when_its_last_import_does_not_at_the_next_look(
    sim: Simulator, tmp_path: Path
) -> None:
    """The store is looked at every 30 s here: the burst still returns as soon as its one import
    ends (before, it waited for the watcher's next look, 24-36 s later)."""
    path = tmp_path / "outbox.sqlite"
    async with SqliteOutbox(path, exclusive=True) as store:
        insert(path, "default", ORDERS, [line(f"o-{i}") for i in range(20)])
        async with Worker(store, default_account(sim), settings=fast(), poll_interval=30) as w:
            started = time.monotonic()
            with anyio.fail_after(20):
                await w.run(burst=True)
            elapsed = time.monotonic() - started
    assert len(sim.collections["Orders"]) == 20
    assert elapsed < 10, elapsed


class RecordingPools(SqliteOutbox):
    """A real SQLite store that records the parse pool each claim is given, and its workers."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, exclusive=True)
        self.pools: list[object] = []
        self.pids: set[int] = set()

    async def claim(self, queue: OutboxQueue, **kwargs: Any) -> Any:
        found = await super().claim(queue, **kwargs)
        pool = kwargs.get("parse_pool")
        self.pools.append(pool)
        if pool is not None and pool._executor is not None:  # started by the claim at the latest
            self.pids.update(pool._executor._processes)
        return found


async def test_large_claims_are_encoded_in_the_workers_parse_processes(
    sim: Simulator, tmp_path: Path
) -> None:
    """The worker starts its parse processes as it starts, encodes large claims in them, and
    stops them when it closes; with parse_processes=0, or bodies of 8 MB at most (claims that
    small are cheaper in a thread), it starts none."""
    import os

    path = tmp_path / "outbox.sqlite"
    pad = "x" * 1000
    async with RecordingPools(path) as store:
        insert(path, "default", ORDERS, [line(f"o-{i}", pad=pad) for i in range(600)])
        worker = await burst(store, sim, fast(parse_processes=2))
        assert store.pools
        assert all(pool is worker.parse_pool is not None for pool in store.pools)
        for settings in (fast(parse_processes=0), fast(max_body_bytes=8 << 20)):
            async with Worker(store, default_account(sim), settings=settings) as none:
                assert none.parse_pool is None
    assert len(store.pids) == 2
    assert len(sim.collections["Orders"]) == 600
    for pid in store.pids:  # stopped with the worker
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


class CountingLoads(SqliteOutbox):
    """A real SQLite store that counts the bodies read back from the file."""

    loads = 0

    async def load_body(self, ref: int) -> bytes | bytearray:
        self.loads += 1
        return await super().load_body(ref)


async def test_a_body_is_sent_from_memory_and_stored_before_the_put(
    sim: Simulator, tmp_path: Path
) -> None:
    """Each first PUT sends the body just sealed: no body is read back from the file."""
    path = tmp_path / "outbox.sqlite"
    async with CountingLoads(path, exclusive=True) as store:
        insert(path, "default", ORDERS, [line(f"o-{i}", i=i) for i in range(300)])
        await burst(store, sim, fast(max_body_bytes=4_000))
    assert len(sim.collections["Orders"]) == 300
    assert len(sim.stats.imports) > 2
    assert store.loads == 0


async def test_last_write_wins_across_imports(sim: Simulator, tmp_path: Path) -> None:
    """A key written again while its first row is in flight ends with the later value."""
    path = tmp_path / "outbox.sqlite"
    async with (
        SqliteOutbox(path, exclusive=True) as store,
        Worker(store, default_account(sim), settings=fast(), poll_interval=0.05) as worker,
        anyio.create_task_group() as tg,
    ):
        insert(path, "default", ORDERS, [line("k", v=0)])
        tg.start_soon(worker.run)
        for version in range(1, 30):
            insert(path, "default", ORDERS, [line("k", v=version)])
            await anyio.sleep(0.01)
        await wait_until(lambda: outbox_rows(path) == 0 and not worker._runs["default"].unfinished)
        worker.stop()
    assert len(sim.stats.imports) > 1  # versions were in flight while later ones arrived
    [record] = sim.collections["Orders"].values()
    assert record["json"] == {"v": 29}


async def test_invalid_rows_are_dead_lettered_with_reason_and_text(
    sim: Simulator, tmp_path: Path
) -> None:
    """Rows that break a record rule or that the API rejects are dead letters with their text."""
    path = tmp_path / "outbox.sqlite"
    contacts = Collection("Visits", Scope.CONTACT, "custom")
    good = orjson.dumps(
        {"key": "v-1", "json": {}, "contactIdentity": {"identifier": "email", "value": "a@b.io"}}
    ).decode()
    ghost = orjson.dumps(
        {
            "key": "v-2",
            "json": {},
            "contactIdentity": {"identifier": "email", "value": "ghost@nowhere.invalid"},
        }
    ).decode()
    broken = '{"key": "v-3", "json": [1]}'
    accounts = {"default": Account("default", sim_client_settings(sim))}
    async with SqliteOutbox(path, exclusive=True) as store:
        insert(path, "default", contacts, [good, ghost, broken])
        async with Worker(store, accounts, settings=fast(), poll_interval=0.05) as worker:
            with anyio.fail_after(20):
                await worker.run(burst=True)
        letters = {letter.key: letter for letter in await store.dead_letters()}
    assert set(letters) == {"v-2", "v-3"}
    assert letters["v-3"].record == broken
    assert letters["v-2"].record == ghost
    assert letters["v-2"].import_id is not None
    assert worker.dead_lettered == 2
    assert len(sim.collections["Visits"]) == 1
    assert outbox_rows(path) == 0


async def test_accounts_are_drained_each_into_its_own_account(tmp_path: Path) -> None:
    """Two accounts, a simulator each: each gets its own rows and no other's."""
    path = tmp_path / "outbox.sqlite"
    async with (
        Simulator(SimulatorConfig(seed=1)) as one,
        Simulator(SimulatorConfig(seed=2, max_active_imports=1)) as two,
        SqliteOutbox(path, exclusive=True) as store,
    ):
        accounts = {
            "one": Account("one", sim_client_settings(one)),
            "two": Account("two", sim_client_settings(two), max_concurrent=1),
        }
        insert(path, "one", ORDERS, [line(f"a-{i}") for i in range(50)])
        insert(path, "two", ORDERS, [line(f"b-{i}") for i in range(40)])
        async with Worker(store, accounts, settings=fast(), poll_interval=0.05) as worker:
            with anyio.fail_after(20):
                await worker.run(burst=True)
        assert sorted(one.collections["Orders"]) == sorted(f"a-{i}" for i in range(50))
        assert sorted(two.collections["Orders"]) == sorted(f"b-{i}" for i in range(40))


async def test_a_trickle_is_sent_within_linger(sim: Simulator, tmp_path: Path) -> None:
    """Rows arriving one by one are imported about linger after they were written."""
    path = tmp_path / "outbox.sqlite"
    latencies = []
    settings = fast(linger=0.2)
    async with (
        SqliteOutbox(path, exclusive=True) as store,
        Worker(store, default_account(sim), settings=settings, poll_interval=0.05) as worker,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(worker.run)
        for i in range(5):
            written = time.monotonic()
            insert(path, "default", ORDERS, [line(f"t-{i}")])
            await wait_until(lambda i=i: f"t-{i}" in sim.collections.get("Orders", {}))
            latencies.append(time.monotonic() - written)
        worker.stop()
    # linger 0.2 + a look at the store 0.06 + processing and a poll of the import (<= 0.3)
    assert max(latencies) < 0.2 + 0.06 + 0.6, latencies
    assert min(latencies) >= 0.2 * 0.5, latencies  # it did wait for company


async def test_a_backlog_in_one_collection_does_not_hold_another_back(tmp_path: Path) -> None:
    """With one slot and a long backlog in Orders, a few Carts rows go within about one import."""
    path = tmp_path / "outbox.sqlite"
    config = SimulatorConfig(records_per_second=50_000, min_processing_s=0.1, jitter=0, seed=9)
    async with (
        Simulator(config) as sim,
        SqliteOutbox(path, exclusive=True) as store,
    ):
        insert(path, "default", ORDERS, [line(f"o-{i}", pad="z" * 50) for i in range(3000)])
        settings = fast(max_concurrent=1, max_body_bytes=8_000)
        async with (
            Worker(store, default_account(sim), settings=settings, poll_interval=0.05) as worker,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(worker.run)
            await wait_until(lambda: len(sim.stats.imports) >= 2)
            written = time.monotonic()
            insert(path, "default", CARTS, [line(f"c-{i}") for i in range(3)])
            await wait_until(lambda: len(sim.collections.get("Carts", {})) == 3, within=30)
            waited = time.monotonic() - written
            orders_left = 3000 - len(sim.collections.get("Orders", {}))
            worker.stop()
    # linger 0.1 + up to two imports of 0.1 s processing and their polls (0.05-0.3 s apart)
    assert waited < 1.5, waited
    assert orders_left > 1000  # Orders' backlog was far from done: Carts did not wait for it


async def test_recovery_polls_submitted_imports_and_resends_in_doubt_ones(
    sim: Simulator, tmp_path: Path
) -> None:
    """At start, a submitted import is polled by id (not sent again); one in doubt is re-sent."""
    path = tmp_path / "outbox.sqlite"
    queue = OutboxQueue.of("default", ORDERS)
    prefix, suffix = ORDERS.envelope()
    async with SqliteOutbox(path, exclusive=True) as store:
        insert(path, "default", ORDERS, [line("s-1"), line("s-2")])
        claim = await store.claim(queue, budget_bytes=10_000)
        first, second = claim.rows
        body = prefix + first.record.data + suffix
        submitted = await store.seal(queue, [first], body, ends=[len(body) - len(suffix)])
        await store.mark_submitting(submitted.ref)
        async with InsightClient(sim_client_settings(sim)) as client:
            receipt = await client.submit_import(bytes(body))
        await store.mark_submitted(submitted.ref, receipt.import_id)
        body = prefix + second.record.data + suffix
        doubt = await store.seal(queue, [second], body, ends=[len(body) - len(suffix)])
        await store.mark_submitting(doubt.ref)  # killed before the id was stored
    async with (
        SqliteOutbox(path, exclusive=True) as store,
        Worker(store, default_account(sim), settings=fast(), poll_interval=0.05) as worker,
    ):
        assert worker.stats.imports_recovered == 2
        with anyio.fail_after(20):
            await worker.run(burst=True)
    assert sorted(sim.collections["Orders"]) == ["s-1", "s-2"]
    assert len(sim.stats.imports) == 2  # the submitted one was polled, not sent again
    assert outbox_rows(path) == 0


async def test_a_body_the_api_finds_too_large_is_split_and_imported(tmp_path: Path) -> None:
    """The API's body limit below max_body_bytes: outbox imports are split, every row imported."""
    path = tmp_path / "outbox.sqlite"
    async with (
        Simulator(SimulatorConfig(max_body_bytes=3_000, seed=4)) as sim,
        SqliteOutbox(path, exclusive=True) as store,
    ):
        insert(path, "default", ORDERS, [line(f"p-{i}", pad="q" * 40) for i in range(200)])
        w = await burst(store, sim, fast(max_body_bytes=10_000))
        assert len(sim.collections["Orders"]) == 200
        assert sim.stats.rejected_too_large >= 1
        assert outbox_rows(path) == 0
        assert w.dead_lettered == 0


async def test_embedded_worker_serves_health_readiness_and_metrics(
    sim: Simulator, tmp_path: Path
) -> None:
    """On the application's loop: /healthz and /readyz 200 while running, 503 once stopping."""
    path = tmp_path / "outbox.sqlite"
    async with (
        SqliteOutbox(path, exclusive=True) as store,
        Worker(store, default_account(sim), settings=fast(), poll_interval=0.05) as worker,
        serve_http(worker, "127.0.0.1", 0) as (host, port),
        aiohttp.ClientSession() as http,
        anyio.create_task_group() as tg,
    ):
        base = f"http://{host}:{port}"
        async with http.get(base + "/healthz") as answer:
            assert answer.status == 503  # not running yet
        tg.start_soon(worker.run)
        insert(path, "default", ORDERS, [line("m-1")])
        await wait_until(lambda: worker.stats.records_imported == 1)
        async with http.get(base + "/healthz") as answer:
            assert answer.status == 200
        async with http.get(base + "/readyz") as answer:
            assert answer.status == 200
        async with http.get(base + "/metrics") as answer:
            text = await answer.text()
        assert 'insight_records_imported_total{account="default",collection="Orders"} 1.0' in text
        worker.stop()
        async with http.get(base + "/readyz") as answer:
            assert answer.status == 503
    # the library left no process-wide trace: the default registry has none of its metrics
    assert REGISTRY.get_sample_value("insight_records_imported_total") is None
