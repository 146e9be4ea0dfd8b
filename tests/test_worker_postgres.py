"""Several `insight-import worker` processes on one PostgreSQL outbox: slots, kill -9, SIGSTOP."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import SIM_PASSWORD, SimulatorProcess, run_cli, serve_simulator
from tests.test_worker_cli import environment, events, versioned

psycopg = pytest.importorskip("psycopg")

ACCOUNTS = ("acme", "globex")
COLLECTION = "Orders"
MAX_CONCURRENT = 5
LEASE = 2.0


@dataclass
class Replica:
    """One worker process and the file its log goes to."""

    process: subprocess.Popen[bytes]
    log: Path

    def events(self) -> list[dict[str, Any]]:
        return events(self.log.read_bytes())


@dataclass
class Setup:
    """The database, one simulator per account, and the accounts file pointing at them."""

    url: str
    sims: dict[str, SimulatorProcess]
    accounts: Path
    tmp: Path
    replicas: list[Replica]

    def start(self, *extra: str) -> Replica:
        index = len(self.replicas)
        log = self.tmp / f"replica-{index}.log"
        with log.open("wb") as stream:
            process = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", *self.worker_args(*extra)],
                stdout=subprocess.DEVNULL,
                stderr=stream,
                env=environment(SIM_PASSWORD=SIM_PASSWORD),
            )
        replica = Replica(process, log)
        self.replicas.append(replica)
        return replica

    def worker_args(self, *extra: str) -> list[str]:
        return [
            "worker",
            "--database",
            self.url,
            "--accounts",
            str(self.accounts),
            "--max-body-bytes",
            "2500",
            "--poll-min",
            "0.05",
            "--poll-max",
            "0.2",
            "--linger",
            "0.05",
            "--poll-interval",
            "0.1",
            "--lease",
            str(LEASE),
            "--log-format",
            "json",
            *extra,
        ]

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cursor = conn.execute(query, params)
            return list(cursor.fetchall()) if cursor.description else []

    def enqueue(self, account: str, records: list[dict[str, Any]]) -> None:
        with psycopg.connect(self.url) as conn, conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO insight_outbox (account, collection, record) VALUES (%s, %s, %s)",
                [(account, COLLECTION, orjson.dumps(r).decode()) for r in records],
            )

    def drained(self) -> bool:
        left = self.sql(
            "SELECT (SELECT count(*) FROM insight_outbox) + (SELECT count(*) FROM insight_import)"
        )
        return int(left[0][0]) == 0

    def owners(self) -> dict[int, int]:
        """Imports accepted by the API (submitted), by the pid of the worker that owns them."""
        rows = self.sql(
            "SELECT w.name, count(*) FROM insight_import i JOIN insight_worker w"
            " ON w.id = i.owner WHERE i.phase = 'submitted' GROUP BY w.name"
        )
        return {int(name.rsplit(":", 1)[1]): int(count) for name, count in rows}

    def held_by(self, pid: int) -> int:
        """Imports (any phase) owned by the worker of that pid."""
        rows = self.sql(
            "SELECT count(*) FROM insight_import i JOIN insight_worker w ON w.id = i.owner"
            " WHERE w.name LIKE %s",
            (f"%:{pid}",),
        )
        return int(rows[0][0])

    def registered(self, pid: int) -> bool:
        return bool(self.sql("SELECT 1 FROM insight_worker WHERE name LIKE %s", (f"%:{pid}",)))

    def stop_all(self) -> list[int]:
        for replica in self.replicas:
            if replica.process.poll() is None:
                replica.process.send_signal(signal.SIGTERM)
        return [replica.process.wait(timeout=25) for replica in self.replicas]


@pytest.fixture
def setup(postgres_url: str, tmp_path: Path) -> Iterator[Setup]:
    """Two accounts, each on a simulator of its own whose 5-import limit is off (it counts)."""
    with contextlib.ExitStack() as stack:
        sims = {
            name: stack.enter_context(
                serve_simulator("--max-active-imports", "1000", "--min-processing", "0.4")
            )
            for name in ACCOUNTS
        }
        accounts = tmp_path / "accounts.toml"
        accounts.write_text(
            "".join(
                f'[accounts.{name}]\nuser = "apiuser-demo@apiconnector.com"\n'
                f'password_env = "SIM_PASSWORD"\nbase_url = "{sim.base_url}"\n'
                f"max_concurrent = {MAX_CONCURRENT}\n\n"
                for name, sim in sims.items()
            )
        )
        done = run_cli("outbox", "init", "--database", postgres_url)
        assert done.returncode == 0, done.stderr
        found = Setup(postgres_url, sims, accounts, tmp_path, [])
        try:
            yield found
        finally:
            for replica in found.replicas:
                if replica.process.poll() is None:
                    replica.process.kill()
                replica.process.wait(timeout=10)


def load(setup: Setup, count: int = 900, keys: int = 300) -> dict[str, dict[str, Any]]:
    """Enqueue versioned orders for every account; the final value of each key, by account."""
    expected: dict[str, dict[str, Any]] = {}
    for seed, account in enumerate(ACCOUNTS):
        records = versioned(seed, count, keys)
        setup.enqueue(account, records)
        expected[account] = {r["key"]: r["json"] for r in records}
    return expected


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def check_final(
    setup: Setup,
    expected: dict[str, dict[str, Any]],
    resent: int = 0,
    *,
    once: bool = False,
    stale: int = 0,
) -> None:
    """Every key holds its last write, no account saw more than 5 (+ ``stale``) imports at once,
    no body went twice beyond ``resent`` (with ``once``: each key went in one import)."""
    assert setup.sql("SELECT count(*) FROM insight_dead_letter") == [(0,)]
    duplicates = 0
    for account, sim in setup.sims.items():
        stored = {r["key"]: r["json"] for r in sim.records(COLLECTION)}
        assert stored == expected[account]
        stats = sim.get("/_simulator/stats")
        assert 1 <= stats["max_active_seen"] <= MAX_CONCURRENT + stale
        per_body = Counter(i["body_sha256"] for i in stats["imports"])
        duplicates += sum(n - 1 for n in per_body.values())
        if once:  # every version was enqueued before the first claim: one import per key
            assert sum(i["records"] for i in stats["imports"]) == len(expected[account])
    assert duplicates <= resent


def test_three_replicas_import_every_row_once_within_the_shared_slots(setup: Setup) -> None:
    """Three replicas woken by the insert import each key's last write once, never > 5 at once
    per account, and take turns at the queues."""
    replicas = [setup.start() for _ in range(3)]
    wait_for(lambda: setup.sql("SELECT count(*) FROM insight_worker") == [(3,)], 15, "replicas")
    expected = load(setup)
    wait_for(setup.drained, 25, "the outbox to drain")
    assert setup.stop_all() == [0, 0, 0], [r.log.read_text()[-2000:] for r in replicas]
    check_final(setup, expected, once=True)
    busy = [r for r in replicas if any(e.get("event") == "batch.sealed" for e in r.events())]
    assert len(busy) >= 2  # the queues were served in turn, not by one replica


def test_kill_9_of_a_replica_is_adopted_within_the_lease_and_nothing_is_lost(
    setup: Setup,
) -> None:
    """kill -9 of the replica holding accepted imports: another adopts them within the lease,
    polls them by id (no resend but in-doubt ones), and every row ends imported."""
    expected = load(setup, count=1200, keys=400)
    for _ in range(3):
        setup.start()
    pids = {r.process.pid: r for r in setup.replicas}
    wait_for(lambda: any(n >= 2 for n in setup.owners().values()), 15, "accepted imports")
    victim_pid = max(setup.owners().items(), key=lambda item: item[1])[0]
    victim = pids[victim_pid]
    victim.process.kill()
    victim.process.wait(timeout=5)
    killed = time.monotonic()
    held = setup.held_by(victim_pid)
    assert held, "the killed replica held no import"
    wait_for(lambda: not setup.registered(victim_pid), 3 * LEASE, "the dead one's adoption")
    adopted_after = time.monotonic() - killed
    wait_for(setup.drained, 25, "the outbox to drain")
    codes = setup.stop_all()
    survivors = [r for r in setup.replicas if r is not victim]
    assert [r.process.returncode for r in survivors] == [0, 0], codes
    adoptions = [e for r in survivors for e in r.events() if e.get("event") == "worker.adopted"]
    assert sum(e["imports"] for e in adoptions) >= held
    assert adopted_after < 3 * LEASE
    check_final(setup, expected, resent=sum(e["in_doubt"] for e in adoptions))


def test_a_replica_stopped_past_its_lease_is_fenced_out_when_it_wakes(setup: Setup) -> None:
    """SIGSTOP past the lease, then SIGCONT: the replica exits 3 (fenced out), writes nothing,
    and the adopter finishes every import."""
    expected = load(setup, count=1200, keys=400)
    for _ in range(2):
        setup.start()
    pids = {r.process.pid: r for r in setup.replicas}
    held = 0
    while not held:  # stop a replica while it holds imports (they end fast)
        wait_for(lambda: any(n >= 2 for n in setup.owners().values()), 15, "accepted imports")
        stalled_pid = max(setup.owners().items(), key=lambda item: item[1])[0]
        stalled = pids[stalled_pid]
        stalled.process.send_signal(signal.SIGSTOP)
        held = setup.held_by(stalled_pid)
        if not held:
            stalled.process.send_signal(signal.SIGCONT)
    try:
        wait_for(lambda: not setup.registered(stalled_pid), 4 * LEASE, "the stalled one's adoption")
    finally:
        stalled.process.send_signal(signal.SIGCONT)
    assert stalled.process.wait(timeout=10) == 3
    fenced = [e for e in stalled.events() if e.get("event") == "worker.fenced_out"]
    assert fenced, stalled.log.read_text()[-2000:]
    wait_for(setup.drained, 25, "the outbox to drain")
    setup.stop_all()
    survivor = next(r for r in setup.replicas if r is not stalled)
    assert survivor.process.returncode == 0
    adoptions = [e for e in survivor.events() if e.get("event") == "worker.adopted"]
    assert sum(e["imports"] for e in adoptions) >= held
    # a submit stalled between its intent and its PUT goes out when the replica wakes, while
    # the adopter sends it again in doubt: the contract's one exception to the slot limit
    in_doubt = sum(e["in_doubt"] for e in adoptions)
    check_final(setup, expected, resent=2 * in_doubt, stale=in_doubt)
