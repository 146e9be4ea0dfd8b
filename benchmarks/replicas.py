"""Benchmark: 1, 2 and 3 `insight-import worker` replicas sharing one PostgreSQL outbox.

- **throughput**: the same orders, enqueued for 3 accounts (a simulator process each), drained
  by N replicas (real processes, continuous mode, stopped once the outbox is empty); records/s
  and the ratio to 1 replica;
- **claim overhead**: time in ``claim`` + ``seal`` per batch of one replica's store (in this
  process, the body assembled between them is not counted);
- **CPU**: CPU seconds per 1,000 records of the replicas, the simulators and every PostgreSQL
  process of the server (other users of the server included) during each drain, and how busy
  the machine's cores were: what bounds the scaling.

The PostgreSQL server is the one of the tests: ``INSIGHT_IMPORT_TEST_POSTGRES`` (each run gets a
fresh schema); without it the benchmark says so and exits.

    INSIGHT_IMPORT_TEST_POSTGRES=postgresql://... python -m benchmarks.replicas [--mb 30]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from benchmarks._common import SIM_PASSWORD, credentials_env, ensure_bytecode, simulator_child
from benchmarks._data import record_section, write_orders_jsonl
from tests.conftest import fresh_schema

TITLE = "Replicas: workers sharing a PostgreSQL outbox (benchmarks.replicas)"
ACCOUNTS = ("acme", "globex", "initech")
COLLECTION = "Orders"
ENV = "INSIGHT_IMPORT_TEST_POSTGRES"


def fill(url: str, lines: list[str]) -> None:
    import psycopg

    from orchestrator.outbox.postgres import INSERT_ROW

    with psycopg.connect(url) as conn, conn.cursor() as cursor:
        for account in ACCOUNTS:
            cursor.executemany(
                INSERT_ROW, [(account, COLLECTION, "contact", "orders", line) for line in lines]
            )


def left(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM insight_outbox) + (SELECT count(*) FROM insight_import)"
        ).fetchone()
    assert row is not None
    return int(row[0])


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far (those gone count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def postgres_pids() -> list[int]:
    """Every process named ``postgres`` on the machine (the server's backends)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    found.append(int(entry.name))
    return found


def busy_cores() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def drain(
    url: str, accounts: Path, replicas: int, max_body: int, sim_pids: list[int]
) -> tuple[float, dict[str, float]]:
    """Seconds from starting ``replicas`` workers to an empty outbox, and CPU seconds spent
    meanwhile by the workers, the simulators, PostgreSQL, and the machine (busy, elapsed)."""
    command = [
        sys.executable,
        "-m",
        "orchestrator",
        "worker",
        "--database",
        url,
        "--accounts",
        str(accounts),
        "--poll-min",
        "0.1",
        "--poll-max",
        "0.5",
        "--linger",
        "0.2",
        "--poll-interval",
        "0.2",
        "--max-body-bytes",
        str(max_body),
        "--log-level",
        "warning",
        "--log-format",
        "json",
    ]
    env = {**credentials_env(), "SIM_PASSWORD": SIM_PASSWORD}
    sims_before = cpu_seconds(sim_pids)
    pg_before = {pid: cpu_seconds([pid]) for pid in postgres_pids()}
    machine_before = busy_cores()
    started = time.perf_counter()
    logs = [accounts.with_name(f"replica-{i}.log") for i in range(replicas)]
    processes = []
    for log in logs:
        with log.open("wb") as stream:
            processes.append(
                subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stream)
            )
    try:
        while left(url):
            for process, log in zip(processes, logs, strict=True):
                if process.poll() is not None:
                    raise RuntimeError(
                        f"a replica exited ({process.returncode}) before the outbox was drained:"
                        f"\n{log.read_text()[-3000:]}"
                    )
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        busy, total = busy_cores()
        cpu = {
            "workers": cpu_seconds([p.pid for p in processes]),
            "simulators": cpu_seconds(sim_pids) - sims_before,
            "postgres": sum(
                cpu_seconds([pid]) - pg_before.get(pid, 0.0) for pid in postgres_pids()
            ),
            "busy": busy - machine_before[0],
            "elapsed": total - machine_before[1],
        }
        return seconds, cpu
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)
        for log in logs:
            log.unlink()


async def claim_overhead(url: str, lines: list[str], max_body: int) -> dict[str, float]:
    """Mean and p50 milliseconds of claim + seal per batch of one store, and batches."""
    from orchestrator.outbox.base import OutboxQueue
    from orchestrator.outbox.postgres import PostgresOutbox
    from orchestrator.worker import _assemble

    queue = OutboxQueue("acme", COLLECTION, "contact", "orders")
    times: list[float] = []
    async with PostgresOutbox(url, worker=True, name="bench") as store:
        await store.enqueue(queue.account, queue.target(), lines, check=False)
        while True:
            began = time.perf_counter()
            claim = await store.claim(queue, budget_bytes=max_body - 200)
            spent = time.perf_counter() - began
            if not claim.rows:
                break
            batch, rows, _ = _assemble(queue.target(), max_body, claim.rows)
            assert batch is not None
            assert batch.refs.ends is not None
            began = time.perf_counter()
            held = await store.seal(queue, rows, batch.body, ends=batch.refs.ends)
            times.append(spent + time.perf_counter() - began)
            await store.mark_submitting(held.ref)
            await store.mark_submitted(held.ref, f"bench-{held.ref}")
            await store.finish(held.ref)
    return {
        "batches": len(times),
        "mean_ms": statistics.fmean(times) * 1e3,
        "p50_ms": statistics.median(times) * 1e3,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0, help="MB of orders per account")
    parser.add_argument("--rps", type=float, default=200_000, help="simulator records/s")
    parser.add_argument("--max-body-mb", type=float, default=2.0, help="body cap, MB")
    args = parser.parse_args(argv)
    ensure_bytecode()  # start-ups as an installed copy makes them
    server = os.environ.get(ENV, "")
    if not server:
        print(f"benchmarks.replicas: skipped, set {ENV} to a PostgreSQL URL", file=sys.stderr)
        return
    max_body = int(args.max_body_mb * 1e6)
    folder = Path(tempfile.mkdtemp(prefix="replicas-bench-"))
    jsonl = folder / "orders.jsonl"
    count, size = write_orders_jsonl(jsonl, mb=args.mb, seed=5)
    lines = jsonl.read_text(encoding="utf-8").splitlines()
    jsonl.unlink()
    results: dict[int, float] = {}
    cpus: dict[int, dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        children = [
            stack.enter_context(simulator_child(records_per_second=args.rps, seed=i))
            for i in range(len(ACCOUNTS))
        ]
        sims = [base_url for base_url, _ in children]
        sim_pids = [pid for _, pid in children]
        accounts = folder / "accounts.toml"
        accounts.write_text(
            "".join(
                f'[accounts.{name}]\nuser = "apiuser-demo@apiconnector.com"\n'
                f'password_env = "SIM_PASSWORD"\nbase_url = "{url}"\n\n'
                for name, url in zip(ACCOUNTS, sims, strict=True)
            )
        )
        for replicas in (1, 2, 3):
            with fresh_schema(server, prefix="bench") as url:
                subprocess.run(
                    [sys.executable, "-m", "orchestrator", "outbox", "init", "--database", url],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                fill(url, lines)
                results[replicas], cpus[replicas] = drain(
                    url, accounts, replicas, max_body, sim_pids
                )
                print(f"{replicas} replicas: {results[replicas]:.2f} s", file=sys.stderr)
    with fresh_schema(server, prefix="bench") as url:
        overhead = anyio.run(claim_overhead, url, lines, max_body)
    accounts.unlink()
    os.rmdir(folder)
    total = count * len(ACCOUNTS)
    rows = "\n".join(
        f"| {n} | {seconds:.2f} | {total / seconds:,.0f} | {results[1] / seconds:.2f}x |"
        for n, seconds in results.items()
    )
    thousands = total / 1000
    cpu_rows = "\n".join(
        f"| {n} | {cpu['workers'] / thousands:.3f} | {cpu['simulators'] / thousands:.3f} |"
        f" {cpu['postgres'] / thousands:.3f} | {cpu['busy'] / cpu['elapsed']:.0%} |"
        for n, cpu in cpus.items()
    )
    body = f"""
{len(ACCOUNTS)} accounts, a simulator process each at {args.rps:,.0f} records/s; {size / 1e6:.0f} MB
({count:,} orders) enqueued per account before the replicas start; the wall time runs from
starting the replicas (real processes) to an empty outbox, so it includes their start-up;
bodies of up to {args.max_body_mb:g} MB.

| replicas | seconds | records/s | vs 1 replica |
|---:|---:|---:|---:|
{rows}

CPU seconds per 1,000 records during each drain (PostgreSQL: every process of the server,
its other users included), and the share of the machine's {os.cpu_count()} cores that was busy:

| replicas | workers | simulators | PostgreSQL | cores busy |
|---:|---:|---:|---:|---:|
{cpu_rows}

Claim overhead (one store, {overhead["batches"]:.0f} batches of up to {args.max_body_mb:g} MB):
claim + seal **{overhead["mean_ms"]:.1f} ms** a batch on average (p50 {overhead["p50_ms"]:.1f} ms).
"""
    print(body)
    record_section(TITLE, body)


if __name__ == "__main__":
    main()
