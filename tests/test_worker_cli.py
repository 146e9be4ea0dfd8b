"""`insight-import worker` as a real process: burst, signals, kill -9, HTTP endpoints, memory."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from tests.conftest import SIM_PASSWORD, SIM_USER, SimulatorProcess, run_cli, serve_simulator


def worker_args(sim: SimulatorProcess, database: Path, *extra: str) -> list[str]:
    """`worker` options pointing at the simulator, with intervals scaled 100 times down."""
    return [
        "worker",
        "--database",
        f"sqlite:///{database}",
        "--base-url",
        sim.base_url,
        "--poll-min",
        "0.05",
        "--poll-max",
        "0.3",
        "--linger",
        "0.1",
        "--poll-interval",
        "0.05",
        "--log-format",
        "json",
        *extra,
    ]


def environment(**extra: str) -> dict[str, str]:
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("INSIGHT_IMPORT_", "DOTDIGITAL_"))
    }
    environ.update(DOTDIGITAL_API_USER=SIM_USER, DOTDIGITAL_API_PASSWORD=SIM_PASSWORD)
    environ.update(extra)
    return environ


@pytest.fixture
def worker_proc() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Worker processes started by a test, killed at its end if still running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def start_worker(
    started: list[subprocess.Popen[bytes]], args: list[str], **env: str
) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=environment(**env),
    )
    started.append(process)
    return process


def versioned(seed: int, count: int, keys: int) -> list[dict[str, Any]]:
    """Orders with repeated keys (updates), so the final value of each key is known."""
    rng = random.Random(seed)
    return [
        {
            "key": f"order-{rng.randrange(keys)}",
            "json": {"version": i, "pad": "x" * rng.randrange(80)},
        }
        for i in range(count)
    ]


def insert(database: Path, collection: str, records: list[Any], account: str = "default") -> None:
    with sqlite3.connect(database) as conn:
        conn.executemany(
            "INSERT INTO insight_outbox (account, collection, record) VALUES (?, ?, ?)",
            [
                (account, collection, r if isinstance(r, str) else orjson.dumps(r).decode())
                for r in records
            ],
        )


def init(database: Path) -> None:
    done = run_cli("outbox", "init", "--database", f"sqlite:///{database}")
    assert done.returncode == 0, done.stderr


def outbox_rows(database: Path) -> int:
    with sqlite3.connect(database) as conn:
        return int(conn.execute("SELECT count(*) FROM insight_outbox").fetchone()[0])


def stored(sim: SimulatorProcess, collection: str) -> dict[str, Any]:
    return {r["key"]: r["json"] for r in sim.records(collection)}


def events(stderr: bytes) -> list[dict[str, Any]]:
    found = []
    for raw in stderr.splitlines():
        try:
            found.append(orjson.loads(raw))
        except orjson.JSONDecodeError:
            continue
    return found


def test_burst_imports_everything_then_exits_0(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """--burst imports every row (last write per key), empties the outbox and exits 0."""
    database = tmp_path / "outbox.sqlite"
    init(database)
    records = versioned(1, 2_000, 700)
    insert(database, "BurstOrders", records)
    done = run_cli(
        *worker_args(simulator_process, database, "--burst", "--max-body-bytes", "20000")
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert stored(simulator_process, "BurstOrders") == {r["key"]: r["json"] for r in records}
    assert outbox_rows(database) == 0
    names = [event["event"] for event in events(done.stderr)]
    assert names[0] == "worker.started"
    assert "worker.stopped" in names


def test_burst_with_dead_letters_exits_1(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """A row that breaks a record rule is dead-lettered with its text, and --burst exits 1."""
    database = tmp_path / "outbox.sqlite"
    init(database)
    insert(database, "BurstBad", [{"key": "ok", "json": {}}, '{"key": "bad", "json": 3}'])
    done = run_cli(*worker_args(simulator_process, database, "--burst"))
    assert done.returncode == 1, done.stderr.decode()[-2000:]
    listed = run_cli("dead-letters", "--database", f"sqlite:///{database}")
    [letter] = [orjson.loads(raw) for raw in listed.stdout.splitlines()]
    assert letter["key"] == "bad"
    assert letter["record"] == {"key": "bad", "json": 3}
    assert stored(simulator_process, "BurstBad") == {"ok": {}}


def test_usage_and_credential_errors_have_their_exit_status(
    simulator_process: SimulatorProcess, tmp_path: Path
) -> None:
    """A bad option value exits 2, refused credentials exit 3."""
    database = tmp_path / "outbox.sqlite"
    init(database)
    bad = run_cli(*worker_args(simulator_process, database, "--burst", "--http", "nonsense"))
    assert bad.returncode == 2
    negative = run_cli(
        *worker_args(simulator_process, database, "--burst", "--parse-processes", "-1")
    )
    assert negative.returncode == 2
    assert b"parse_processes" in negative.stderr
    insert(database, "Creds", [{"key": "k", "json": {}}])
    refused = run_cli(
        *worker_args(simulator_process, database, "--burst"),
        env={"DOTDIGITAL_API_PASSWORD": "wrong"},
    )
    assert refused.returncode == 3, refused.stderr.decode()[-2000:]
    assert b"wrong" not in refused.stderr


@pytest.mark.parametrize(
    ("failpoint", "count"),
    [
        ("intent", 2),
        ("accepted", 2),
        ("submitted", 3),
        ("polled", 4),
        ("terminal", 2),
        ("finished", 3),
    ],
)
def test_kill_9_then_restart_loses_nothing(
    simulator_process: SimulatorProcess, tmp_path: Path, failpoint: str, count: int
) -> None:
    """SIGKILL at a failpoint, then a restart: every last write stored, none lost, and only the
    submits in doubt sent twice."""
    collection = f"WorkerCrash{failpoint.capitalize()}{count}"
    database = tmp_path / "outbox.sqlite"
    init(database)
    records = versioned(count, 1_500, 600)
    insert(database, collection, records)
    args = worker_args(simulator_process, database, "--burst", "--max-body-bytes", "6000")
    crashed = run_cli(*args, env={"INSIGHT_IMPORT_FAILPOINT": f"{failpoint}:{count}"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()[-2000:]
    with sqlite3.connect(database) as conn:
        in_doubt_rows = conn.execute(
            "SELECT count(*) FROM insight_held h JOIN insight_import i ON h.ref = i.id"
            " WHERE i.phase = 'submitting'"
        ).fetchone()[0]
    restarted = run_cli(*args)
    assert restarted.returncode == 0, restarted.stderr.decode()[-2000:]
    assert stored(simulator_process, collection) == {r["key"]: r["json"] for r in records}
    assert outbox_rows(database) == 0
    sent = sum(i["records"] for i in simulator_process.imports(collection))
    assert sent <= len(records) + in_doubt_rows
    if failpoint == "accepted":
        assert in_doubt_rows >= 1


def test_sigterm_stops_within_the_grace_period_and_the_next_worker_finishes(
    tmp_path: Path, worker_proc: list[subprocess.Popen[bytes]]
) -> None:
    """SIGTERM: exit 0 quickly, submits done keep their ids; a second worker imports the rest."""
    database = tmp_path / "outbox.sqlite"
    init(database)
    records = versioned(9, 3_000, 3_000)
    insert(database, "Term", records)
    with serve_simulator("--records-per-second", "2000", "--min-processing", "0.5") as sim:
        process = start_worker(worker_proc, worker_args(sim, database, "--max-body-bytes", "8000"))
        deadline = time.monotonic() + 20
        while not sim.imports("Term") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sim.imports("Term")
        sent_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - sent_at < 5
        assert process.stderr is not None
        names = [event["event"] for event in events(process.stderr.read())]
        assert "worker.stopping" in names
        assert "worker.stopped" in names
        with sqlite3.connect(database) as conn:
            phases = [p for (p,) in conn.execute("SELECT phase FROM insight_import")]
        assert "submitting" not in phases  # nothing left in doubt by a graceful stop
        finished = run_cli(*worker_args(sim, database, "--burst", "--max-body-bytes", "8000"))
        assert finished.returncode == 0, finished.stderr.decode()[-2000:]
        assert stored(sim, "Term") == {r["key"]: r["json"] for r in records}


def test_a_second_signal_exits_at_once_with_the_state_consistent(
    tmp_path: Path, worker_proc: list[subprocess.Popen[bytes]]
) -> None:
    """Two SIGTERMs: the worker exits at once; a restart still imports every row."""
    database = tmp_path / "outbox.sqlite"
    init(database)
    records = versioned(11, 2_000, 2_000)
    insert(database, "Twice", records)
    with serve_simulator("--records-per-second", "500", "--min-processing", "1") as sim:
        process = start_worker(
            worker_proc,
            worker_args(sim, database, "--max-body-bytes", "8000", "--shutdown-timeout", "60"),
        )
        deadline = time.monotonic() + 20
        while not sim.imports("Twice") and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        process.wait(timeout=10)
        assert time.monotonic() - sent_at < 3
        finished = run_cli(*worker_args(sim, database, "--burst", "--max-body-bytes", "8000"))
        assert finished.returncode == 0, finished.stderr.decode()[-2000:]
        assert stored(sim, "Twice") == {r["key"]: r["json"] for r in records}


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_health_readiness_and_metrics_over_http(
    simulator_process: SimulatorProcess,
    tmp_path: Path,
    worker_proc: list[subprocess.Popen[bytes]],
) -> None:
    """/healthz and /readyz answer 200 while running, /metrics has the worker's metrics."""
    database = tmp_path / "outbox.sqlite"
    init(database)
    insert(database, "Http", [{"key": f"h-{i}", "json": {}} for i in range(50)])
    insert(database, "Http", ['{"key": "broken"}'])
    process = start_worker(
        worker_proc, worker_args(simulator_process, database, "--http", "127.0.0.1:0")
    )
    assert process.stderr is not None
    address = None
    deadline = time.monotonic() + 20
    while address is None and time.monotonic() < deadline:
        raw = process.stderr.readline()
        if raw.startswith(b"{"):
            event = orjson.loads(raw)
            if event["event"] == "worker.http":
                address = event["address"]
    assert address is not None
    base = f"http://{address}"
    assert fetch(base + "/healthz")[0] == 200
    assert fetch(base + "/readyz")[0] == 200
    deadline = time.monotonic() + 20
    while len(stored(simulator_process, "Http")) < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the watcher lists the (now empty) outbox again
    status, text = fetch(base + "/metrics")
    assert status == 200
    assert 'insight_records_imported_total{account="default",collection="Http"} 50.0' in text
    assert 'insight_records_dead_lettered_total{account="default",collection="Http"} 1.0' in text
    assert 'insight_api_calls_total{account="default",method="PUT",status="202"}' in text
    assert 'insight_slots{account="default"} 5.0' in text
    assert 'insight_outbox_pending_rows{account="default",collection="Http"} 0.0' in text
    assert "insight_import_duration_seconds_bucket" in text
    assert "h-1" not in text  # never a key
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=20) == 0


def test_a_flood_is_drained_in_bounded_memory(
    simulator_process: SimulatorProcess,
    tmp_path: Path,
    worker_proc: list[subprocess.Popen[bytes]],
) -> None:
    """60,000 rows (about 12 MB) drain with the worker's RSS well under its bound."""
    database = tmp_path / "outbox.sqlite"
    init(database)
    pad = "y" * 150
    with sqlite3.connect(database) as conn:
        conn.executemany(
            "INSERT INTO insight_outbox (account, collection, record) VALUES (?, ?, ?)",
            (
                ("default", "Flood", f'{{"key": "f-{i}", "json": {{"pad": "{pad}"}}}}')
                for i in range(60_000)
            ),
        )
    process = start_worker(
        worker_proc,
        worker_args(simulator_process, database, "--burst", "--max-body-bytes", "1000000"),
    )
    watched = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    assert process.returncode == 0
    assert outbox_rows(database) == 0
    assert len(simulator_process.records("Flood")) == 60_000
    assert peak < 200_000_000, peak
